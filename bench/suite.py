"""The benchmark suite (`make bench`): every stage's optimised path against its baseline, in one process.

For each stage the optimised path (tckr's own code, with the demo profiles' settings) and a baseline (the
straightforward way) are warmed up, then timed in alternating turns of a few seconds each. Every entry records
throughput (``items_per_s``), peak memory growth (``peak_mb``: RSS on a CPU, allocated memory on CUDA), the same
two for the baseline, their ``ratio`` (optimised / baseline throughput), the model FLOPs per item of the optimised
path (torch's FlopCounterMode on one batch; forward and backward for training) and the model-FLOP utilisation
``mfu`` = FLOPs per item x items/s / the dense matmul peak, in the dtype the optimised path computes in, which a
matmul probe measures at the start of the same run. Results go to ``--out`` (JSON) and a table to stdout;
progress lines to stderr. On a GPU (``--device auto`` takes one), write to ``bench/gpu/results.json``.

    python bench/suite.py [--quick] [--only generation,fid] [--out bench/results.json] [--seconds 8]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from common import (
    FASHION_MNIST_INFO,
    caption_prompts,
    demo_generator,
    fashion_mnist,
    pick_device,
    sample_batched,
    sample_per_prompt,
    shadow_population,
    synchronize,
    train_shadows,
)
from measure import count_flops, cpu_model, matmul_peak, measure
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from tckr.core.precision import autocast_dtype, cpu_computes_bf16, precision_name
from tckr.recipes.config import load_config

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Settings:
    device: torch.device
    quick: bool
    seconds: float  # each variant's measured time
    rounds: int  # turns the measured time is split into, alternating with the other variant

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def tckr(self):
        """The TCKR demo profile (``--quick``: the smoke profile, the same code paths at toy sizes)."""
        return load_config("smoke" if self.quick else "demo")

    def privimage(self):
        return load_config("smoke-privimage" if self.quick else "demo-privimage")


@dataclass
class Bench:
    """One stage's two ways of doing the same work: each call processes some items and returns how many."""

    items: str  # the unit of work
    method: str  # the optimised path, in words
    baseline: str  # the baseline, in words
    optimised: Callable[[], int]
    reference: Callable[[], int]  # the baseline's call
    dtype: torch.dtype | None  # what the optimised path computes in (None: fp32), whose matmul peak MFU is against
    sizes: dict
    flops: Callable[[], int] | None = None  # one batch of the optimised path (default: its call)
    # Warm-up: each call ``warmups`` times; the FLOP count's run of the optimised call, when that is the call
    # counted, is its first. ``warmup`` replaces both (``warmups`` times).
    warmup: Callable[[], object] | None = None
    warmups: int = 1
    note: str = ""
    precision: str = ""  # what the table says it computes in, where that is not ``dtype`` (NumPy's float64)


# ------------------------------------------------------------------------------------------- captioning
def captioning(s: Settings) -> Bench:
    from tckr.generators.caption import build_captioner

    cfg = s.tckr().caption
    captioner = build_captioner(cfg, s.device)
    straightforward = build_captioner(cfg.model_copy(update={"mixed_precision": False}), s.device)
    batch, singles = s.size(cfg.batch_size, 8), s.size(32, 4)
    images, _ = fashion_mnist(batch)  # 28 px, as ingest stores them
    pictures = [Image.fromarray(image[0].numpy()) for image in images]

    def batched() -> int:
        captioner.caption(pictures)
        return len(pictures)

    def one_by_one() -> int:
        for picture in pictures[:singles]:
            straightforward.caption([picture])
        return singles

    return Bench("images", f"{captioner.name}, {batch} images per call", "one image per fp32 captioner call",
                 batched, one_by_one, autocast_dtype(s.device, cfg.mixed_precision), {"batch": batch, "image_px": 28})


# ---------------------------------------------------------------------------------- denoiser training
def denoiser_training(s: Settings, unet, parameters, data, scheduler, steps: int, images_per_step: int,
                      mixed_precision: bool, **recipe) -> Bench:
    """``train_denoiser`` (pretraining's or LoRA's ``recipe`` of arguments) for ``steps`` steps per call, with
    mixed precision against fp32; each call a fresh optimiser and a scratch checkpoint, as a stage's run has."""
    from tckr.generators.pixel import train_denoiser

    def train(mixed: bool, count: int) -> Callable[[], int]:
        def call() -> int:
            with tempfile.TemporaryDirectory() as scratch:
                train_denoiser(unet, parameters, data, scheduler, steps=count, device=s.device,
                               checkpoint=Path(scratch) / "checkpoint.pt", mixed_precision=mixed, **recipe)
            return count * images_per_step
        return call

    dtype = autocast_dtype(s.device, mixed_precision)
    return Bench("images", f"train_denoiser, {precision_name(dtype)} autocast", "train_denoiser in fp32",
                 train(mixed_precision, steps), train(False, steps), dtype,
                 {"batch": images_per_step, "steps_per_call": steps, "image_px": data.samples.shape[-1],
                  "trained_parameters": sum(p.numel() for p in parameters)},
                 flops=train(mixed_precision, 1),
                 note="each call includes train_denoiser's end-of-run checkpoint")


def denoiser_data(generator, count: int, image_size: int):
    from tckr.generators.pixel import DenoiserData, PromptBank

    images, _ = fashion_mnist(count, image_size)
    return DenoiserData(images, PromptBank.build(generator.text_encoder, caption_prompts(count)))


def generator_step(s: Settings) -> Bench:
    """Base-generator pretraining's step (pretrain_pixel_generator's arguments to train_denoiser)."""
    from tckr.generators.pixel import build_noise_scheduler

    run = s.tckr()
    cfg = run.generator
    generator = demo_generator(cfg, run.image_size, s.device)
    unet = generator.unet
    ema = copy.deepcopy(unet).requires_grad_(False)
    data = denoiser_data(generator, s.size(1024, 2 * cfg.batch_size), run.image_size)
    return denoiser_training(
        s, unet, list(unet.parameters()), data, build_noise_scheduler(cfg), s.size(2, 1), cfg.batch_size,
        cfg.mixed_precision, batch_size=cfg.batch_size, grad_accum=1, lr=cfg.lr, weight_decay=0.0, max_grad_norm=1.0,
        caption_dropout=cfg.caption_dropout, random_flip=False, seed=cfg.seed, ema=ema, ema_decay=cfg.ema_decay)


def lora_step(s: Settings) -> Bench:
    """LoRA fine-tuning's step (train_adapter's arguments to train_denoiser) on the demo UNet."""
    from diffusers import DDPMScheduler

    from tckr.generators.lora import add_lora

    run = s.tckr()
    cfg = run.finetune
    generator = demo_generator(run.generator, run.image_size, s.device)
    torch.manual_seed(cfg.seed)
    parameters = add_lora(generator.unet, cfg)
    data = denoiser_data(generator, s.size(1024, 2 * cfg.batch_size), run.image_size)
    return denoiser_training(
        s, generator.unet, parameters, data, DDPMScheduler.from_config(generator.scheduler_config), s.size(4, 1),
        cfg.batch_size * cfg.grad_accum, cfg.mixed_precision, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
        lr=cfg.lr, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, caption_dropout=0.0,
        random_flip=cfg.random_flip, seed=cfg.seed)


# ------------------------------------------------------------------------------------------- generation
def generation(s: Settings) -> Bench:
    run = s.tckr()
    cfg = run.generate
    generator = demo_generator(run.generator, run.image_size, s.device)
    batch, singles = s.size(cfg.batch_size, 4), s.size(8, 2)
    prompts, seeds = caption_prompts(batch), list(range(batch))
    dtype = autocast_dtype(s.device, cfg.mixed_precision)

    def batched() -> int:
        sample_batched(generator, prompts, seeds, cfg.steps, cfg.guidance, s.device, batch, dtype)
        return batch

    def per_prompt() -> int:
        sample_per_prompt(generator, prompts[:singles], seeds[:singles], cfg.steps, cfg.guidance, s.device)
        return singles

    return Bench("images", f"sample_pixel_images, {batch} prompts per call, {precision_name(dtype)} autocast",
                 "one fp32 sampler call per prompt", batched, per_prompt, dtype,
                 {"batch": batch, "solver_steps": cfg.steps, "guidance": cfg.guidance, "image_px": run.image_size})


# ------------------------------------------------------------------------------------ classifier epochs
class PilImages(Dataset):
    """The straightforward input pipeline: each item a PIL image through torchvision's per-sample transforms."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable) -> None:
        self.images, self.labels, self.transform = images[:, 0].numpy(), labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def per_sample_transforms(cfg, image_size: int) -> Callable:
    from torchvision import transforms

    steps = [transforms.RandomCrop(image_size, padding=cfg.crop_padding)] if cfg.crop_padding else []
    steps += [transforms.RandomHorizontalFlip()] if cfg.hflip else []
    return transforms.Compose([*steps, transforms.ToTensor(),
                               transforms.Normalize(FASHION_MNIST_INFO.mean, FASHION_MNIST_INFO.std)])


def classifier_step(model, recipe, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> None:
    """train_classifier's step on a batch already augmented and normalised."""
    labels = labels.to(device, non_blocking=True)
    if recipe.mixup:
        images, labels = recipe.mixup(images, labels)
    with recipe.autocast(device):
        loss = recipe.objective(model(images), images, labels)
    recipe.optimizer.zero_grad(set_to_none=True)
    recipe.scaler.scale(loss).backward()
    recipe.scaler.step(recipe.optimizer)
    recipe.scaler.update()
    loss.item()


def classifier_epoch(s: Settings, cfg, image_size: int, objective=None) -> Bench:
    """An epoch of ``cfg``'s recipe over real images: uint8 batches through BatchAugment under the recipe's mixed
    precision, against per-sample PIL transforms in a DataLoader and fp32."""
    from tckr.data.images import BatchAugment
    from tckr.training.classifier import Recipe
    from tckr.training.models import create_classifier

    info, device, batch = FASHION_MNIST_INFO, s.device, cfg.batch_size
    count = s.size(2048, 2 * batch) // batch * batch
    images, labels = fashion_mnist(count, image_size)

    def model_and_recipe(amp: bool):
        torch.manual_seed(cfg.seed)
        model = create_classifier(cfg.model, info.num_classes, info.channels, cfg.pretrained).to(device).train()
        return model, Recipe.build(cfg.model_copy(update={"amp": amp}), model.parameters(), info.num_classes, device,
                                   objective)

    model, recipe = model_and_recipe(cfg.amp)
    augment = BatchAugment(info.mean, info.std, cfg.crop_padding, cfg.hflip).to(device)

    def uint8_batches(rows: torch.Tensor) -> int:
        for chunk in rows.split(batch):
            classifier_step(model, recipe, augment(images[chunk].to(device, non_blocking=True), train=True),
                            labels[chunk], device)
        return len(rows)

    base_model, base_recipe = model_and_recipe(False)
    loader = DataLoader(PilImages(images, labels, per_sample_transforms(cfg, image_size)), batch_size=batch,
                        shuffle=True, drop_last=True, num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=cfg.num_workers > 0)

    def pil_epoch() -> int:
        for x, y in loader:
            classifier_step(base_model, base_recipe, x.to(device, non_blocking=True), y, device)
        return len(loader) * batch

    return Bench("images", f"uint8 batches, BatchAugment, {recipe.precision} autocast",
                 "per-sample PIL transforms in a DataLoader, fp32", lambda: uint8_batches(torch.randperm(count)),
                 pil_epoch, recipe.dtype, {"batch": batch, "epoch_images": count, "model": cfg.model,
                                           "image_px": image_size},
                 flops=lambda: uint8_batches(torch.arange(batch)))


def teacher_epoch(s: Settings) -> Bench:
    run = s.tckr()
    return classifier_epoch(s, run.teacher, run.image_size)


def student_epoch(s: Settings) -> Bench:
    """The student's recipe with its distillation objective (a frozen teacher run on every augmented batch)."""
    from tckr.recipes.tckr.distill import distillation_objective
    from tckr.training.models import create_classifier

    run = s.tckr()
    info = FASHION_MNIST_INFO
    teacher = create_classifier(run.teacher.model, info.num_classes, info.channels).to(s.device)
    bench = classifier_epoch(s, run.student, run.image_size,
                             distillation_objective(teacher, run.distill, run.student.label_smoothing))
    bench.note = f"{run.distill.loss} distillation: the teacher's forward pass is part of every step"
    return bench


# ---------------------------------------------------------------------------------------------- shadows
def shadows(s: Settings) -> Bench:
    from tckr.privacy.lira import balanced_keep_matrix
    from tckr.privacy.shadows import use_vmap

    run = s.tckr()
    recipe = run.teacher.model_copy(update={"epochs": s.size(2, 1)})
    group = run.attack.shadows_per_group
    size = s.size(800, 4 * recipe.batch_size)
    population, validation = shadow_population(size, run.image_size, s.size(256, 64))
    keep = balanced_keep_matrix(group, size, seed=0)
    vectorize = use_vmap(run.attack, s.device)
    models = list(range(group))

    def stacked() -> int:
        train_shadows(recipe, [models], keep, population, validation, s.device, vectorize)
        return group

    def one_at_a_time() -> int:
        train_shadows(recipe, [[m] for m in models], keep, population, validation, s.device, False)
        return group

    return Bench("shadow models", f"train_shadow_group, {group} stacked ({'vmap' if vectorize else 'looped'}), "
                 f"{precision_name(autocast_dtype(s.device, recipe.amp))} autocast",
                 "one model per train_shadow_group call", stacked, one_at_a_time,
                 autocast_dtype(s.device, recipe.amp),
                 {"shadows": group, "images_per_shadow": size // 2, "epochs": recipe.epochs,
                  "validation_images": len(validation[1]), "batch": recipe.batch_size},
                 warmup=lambda: train_shadows(recipe, [[0]], keep, population, validation, s.device, False),
                 note="a shadow model here is a small one (see sizes): per-group costs weigh more than in the demo")


# ------------------------------------------------------------------------------------------------- LiRA
def lira_per_example(shadow_scores: np.ndarray, keep: np.ndarray, target_scores: np.ndarray) -> np.ndarray:
    """LiRA's online statistic with one pooled spread per query, one example at a time: medians of each example's
    IN and OUT shadow scores, the spread pooled over all examples' residuals, then each example's log ratio."""
    _, queries, population = shadow_scores.shape
    mean_in, mean_out = np.empty((queries, population)), np.empty((queries, population))
    squares, dof = np.zeros(queries), 0
    for i in range(population):
        scores_in, scores_out = shadow_scores[keep[:, i], :, i], shadow_scores[~keep[:, i], :, i]
        mean_in[:, i], mean_out[:, i] = np.median(scores_in, axis=0), np.median(scores_out, axis=0)
        squares += ((scores_in - mean_in[:, i]) ** 2).sum(0) + ((scores_out - mean_out[:, i]) ** 2).sum(0)
        dof += len(scores_in) + len(scores_out) - 2
    spread = np.sqrt(squares / dof) + 1e-30
    statistic = np.empty(population)
    for i in range(population):
        z_in, z_out = (target_scores[:, i] - mean_in[:, i]) / spread, (target_scores[:, i] - mean_out[:, i]) / spread
        statistic[i] = np.mean(0.5 * z_out**2 - 0.5 * z_in**2)  # the log-spreads cancel: one spread for both
    return statistic


def lira(s: Settings) -> Bench:
    from tckr.privacy.lira import balanced_keep_matrix, membership_statistic, training_queries

    attack = s.tckr().attack
    if (attack.variant, attack.variance) != ("online", "global"):
        raise SystemExit(f"the per-example LiRA baseline is written for online/global, not {attack.variant}/"
                         f"{attack.variance}")
    models, queries, population = attack.shadows, len(training_queries(0)), s.size(20000, 400)
    rng = np.random.default_rng(0)
    keep = balanced_keep_matrix(models, population, seed=0)
    shadow_scores = rng.normal(size=(models, queries, population)) + 1.5 * keep[:, None, :]
    target_scores = rng.normal(size=(queries, population)) + 0.5

    vectorised = membership_statistic(shadow_scores, keep, target_scores, "online", "global")
    difference = np.abs(vectorised - lira_per_example(shadow_scores, keep, target_scores)).max()
    if not difference <= 1e-6:
        raise AssertionError(f"the per-example LiRA loop disagrees with membership_statistic by {difference:.3g}")

    def whole() -> int:
        membership_statistic(shadow_scores, keep, target_scores, "online", "global")
        return population

    def one_by_one() -> int:
        lira_per_example(shadow_scores, keep, target_scores)
        return population

    return Bench("examples", "membership_statistic over the population (NumPy, float64)",
                 "a Python loop over examples", whole, one_by_one, None,
                 {"shadows": models, "queries": queries, "population": population,
                  "max_abs_difference": float(difference)}, precision="float64",
                 note="no model: FlopCounterMode counts no FLOPs in NumPy's medians, so flops_per_item and mfu are 0")


# -------------------------------------------------------------------------------------------------- FID
def fid(s: Settings) -> Bench:
    from tckr.generators.fid import InceptionFeatures

    run = s.tckr()
    batch = s.size(min(run.fid.batch_size, 50), 2)  # Inception at 299 px: ~30 images/s on two cores
    images, _ = fashion_mnist(batch, run.image_size)
    bf16, fp32 = (InceptionFeatures(s.device, batch, dtype) for dtype in (torch.bfloat16, torch.float32))

    def features(inception: InceptionFeatures) -> Callable[[], int]:
        def call() -> int:
            inception(images)
            return batch
        return call

    return Bench("images", "InceptionFeatures under bfloat16 autocast", "InceptionFeatures in float32",
                 features(bf16), features(fp32), torch.bfloat16,
                 {"batch": batch, "image_px": run.image_size, "inception_px": 299},
                 warmups=2)  # TorchScript profiles its first calls before it optimises


# ----------------------------------------------------------------------------------------------- DP-SGD
def dp_sgd(s: Settings) -> Bench:
    from opacus import GradSampleModule

    from tckr.generators.conditional import build_class_unet, class_denoising_loss
    from tckr.generators.pixel import build_noise_scheduler
    from tckr.privacy.dp_sgd import MultiplicityDPOptimizer

    run = s.privimage()
    cfg, pretrain = run.privacy, run.pretrain
    batch = s.size(cfg.physical_batch_size, 8)
    images, labels = fashion_mnist(batch, run.image_size)
    rows = torch.arange(batch).repeat_interleave(cfg.multiplicity)  # each example `multiplicity` rows, as train_dp
    images, labels = images[rows], labels[rows]
    scheduler = build_noise_scheduler(pretrain)
    dtype = autocast_dtype(s.device, cfg.mixed_precision)
    torch.manual_seed(pretrain.seed)
    unet = build_class_unet(pretrain, 1, run.image_size, 10).to(s.device).train()
    plain = copy.deepcopy(unet)
    private = GradSampleModule(unet, batch_first=True, loss_reduction="mean")
    dp_optimizer = MultiplicityDPOptimizer(
        torch.optim.Adam(unet.parameters(), lr=cfg.lr), multiplicity=cfg.multiplicity, noise_multiplier=1.0,
        max_grad_norm=cfg.max_grad_norm, expected_batch_size=batch, loss_reduction="mean")
    plain_optimizer = torch.optim.Adam(plain.parameters(), lr=cfg.lr)

    def step(model, optimizer) -> Callable[[], int]:
        def call() -> int:
            optimizer.zero_grad(set_to_none=True)
            losses = class_denoising_loss(model, images, labels, scheduler, cfg.label_dropout,
                                          torch.Generator().manual_seed(0), s.device, dtype)
            losses.mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return batch
        return call

    return Bench("images", f"MultiplicityDPOptimizer step (Opacus per-example gradients), {precision_name(dtype)} "
                 "autocast", f"non-private Adam step, same model and batch, {precision_name(dtype)} autocast",
                 step(private, dp_optimizer), step(plain, plain_optimizer), dtype,
                 {"batch": batch, "multiplicity": cfg.multiplicity, "image_px": run.image_size,
                  "unet_blocks": pretrain.block_out_channels},
                 note="ratio < 1 is the price of privacy: DP-SGD's throughput over the same step without it")


STAGES: dict[str, Callable[[Settings], Bench]] = {
    "captioning": captioning,
    "generator_step": generator_step,
    "lora_step": lora_step,
    "generation": generation,
    "teacher_epoch": teacher_epoch,
    "student_epoch": student_epoch,
    "shadows": shadows,
    "lira": lira,
    "fid": fid,
    "dp_sgd": dp_sgd,
}


# ------------------------------------------------------------------------------------------------ runner
@dataclass
class Machine:
    device: torch.device
    peaks: dict[str, float] = field(default_factory=dict)  # FLOP/s by dtype name
    probe: dict[str, dict[int, float]] = field(default_factory=dict)

    def record(self) -> dict:
        gpu = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        return {"device": self.device.type, "gpu": gpu, "cpu": cpu_model(), "torch": torch.__version__,
                "threads": torch.get_num_threads(), "python": platform.python_version(),
                "cpu_computes_bf16": cpu_computes_bf16(),
                "peak_gflops": {name: peak / 1e9 for name, peak in self.peaks.items()},
                "matmul_probe_gflops": {name: {str(n): rate / 1e9 for n, rate in rates.items()}
                                        for name, rates in self.probe.items()}}


def probe_machine(device: torch.device, quick: bool) -> Machine:
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if device.type == "cuda" else [])
    sizes = (1024, 4096, 8192) if device.type == "cuda" else (256, 512, 1024, 2048)
    machine = Machine(device)
    for dtype in dtypes:
        rates = matmul_peak(device, dtype, sizes[:2] if quick else sizes, 0.05 if quick else 0.5)
        machine.probe[precision_name(dtype)] = rates
        machine.peaks[precision_name(dtype)] = max(rates.values())
    return machine


@contextlib.contextmanager
def quietly():
    """What a stage prints (tckr's progress bars, libraries' warnings) is kept out of the suite's output, and shown
    only if the stage fails."""
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            yield
    except BaseException:
        sys.stderr.write(chatter.getvalue())
        raise


def run_stage(name: str, s: Settings, machine: Machine) -> dict:
    started = time.perf_counter()
    with quietly():
        return measure_stage(name, s, machine) | {"stage_seconds": time.perf_counter() - started}


def measure_stage(name: str, s: Settings, machine: Machine) -> dict:
    bench = STAGES[name](s)
    flops = count_flops(bench.flops or bench.optimised)  # a real run of the optimised path: its first warm-up
    for turn in range(bench.warmups):
        if bench.warmup is not None:
            bench.warmup()
            continue
        if turn or bench.flops is not None:
            bench.optimised()
        bench.reference()
    synchronize(s.device)
    rates = measure({"optimised": bench.optimised, "baseline": bench.reference}, s.seconds, s.device, s.rounds)
    optimised, baseline = rates["optimised"], rates["baseline"]
    peak = machine.peaks[precision_name(bench.dtype)]
    return {"stage": name, "items": bench.items, "items_per_s": optimised.items_per_s, "peak_mb": optimised.peak_mb,
            "baseline": bench.baseline, "baseline_items_per_s": baseline.items_per_s,
            "baseline_peak_mb": baseline.peak_mb, "ratio": optimised.items_per_s / baseline.items_per_s,
            "flops_per_item": flops, "mfu": flops * optimised.items_per_s / peak,
            "method": bench.method, "precision": bench.precision or precision_name(bench.dtype), "sizes": bench.sizes,
            "note": bench.note,
            "measured": {"optimised": vars(optimised), "baseline": vars(baseline)}}


def table(results: dict) -> str:
    header = ("stage", "items", "optimised /s", "baseline /s", "ratio", "peak MB", "baseline MB", "GFLOP/item",
              "MFU", "in", "baseline")
    rows = [header] + [(e["stage"], e["items"], f"{e['items_per_s']:.4g}", f"{e['baseline_items_per_s']:.4g}",
                        f"{e['ratio']:.2f}x", f"{e['peak_mb']:.0f}", f"{e['baseline_peak_mb']:.0f}",
                        f"{e['flops_per_item'] / 1e9:.3g}", f"{e['mfu']:.2%}", e["precision"], e["baseline"])
                       for e in results["entries"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    numeric = {2, 3, 4, 5, 6, 7, 8}

    def line(row) -> str:
        return "| " + " | ".join(cell.rjust(w) if i in numeric else cell.ljust(w)
                                 for i, (cell, w) in enumerate(zip(row, widths, strict=True))) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in numeric else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    peaks = ", ".join(f"{name} {gflops:.0f}" for name, gflops in results["peak_gflops"].items())
    lines = [f"{results['device']}: {results['gpu'] or results['cpu']}, {results['threads']} threads, torch "
             f"{results['torch']}; matmul peak GFLOP/s: {peaks}", "", line(header), rule,
             *(line(row) for row in rows[1:])]
    notes = [f"- {e['stage']}: {e['note']}" for e in results["entries"] if e["note"]]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes (smoke profiles), well under a minute")
    parser.add_argument("--only", default="", help=f"comma-separated stages of: {', '.join(STAGES)}")
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument("--seconds", type=float, default=None,
                        help="measured seconds per variant and stage (default 8; --quick: 0.2)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--show", action="store_true", help="print the table of the results in --out, measuring "
                        "nothing (the README quotes it)")
    args = parser.parse_args()
    if args.show:
        if not args.out.is_file():
            parser.error(f"{args.out} does not exist: run the suite first")
        print(table(json.loads(args.out.read_text())), end="")
        return

    names = [name.strip() for name in args.only.split(",") if name.strip()] or list(STAGES)
    unknown = sorted(set(names) - set(STAGES))
    if unknown:
        parser.error(f"unknown stages {unknown}: choose from {', '.join(STAGES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus, every DP step
    device = pick_device(args.device)
    settings = Settings(device, args.quick, args.seconds or (0.2 if args.quick else 8.0), 1 if args.quick else 2)

    started = time.perf_counter()
    print(f"matmul probe on {device.type} ...", file=sys.stderr, flush=True)
    machine = probe_machine(device, args.quick)
    print("  peak GFLOP/s: " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in machine.peaks.items()), file=sys.stderr,
          flush=True)
    entries = []
    for index, name in enumerate(names, start=1):
        entry = run_stage(name, settings, machine)
        entries.append(entry)
        print(f"[{index}/{len(names)}] {name}: {entry['items_per_s']:.4g} {entry['items']}/s ({entry['precision']}) "
              f"vs {entry['baseline_items_per_s']:.4g} baseline = {entry['ratio']:.2f}x, peak {entry['peak_mb']:.0f}"
              f"/{entry['baseline_peak_mb']:.0f} MB, MFU {entry['mfu']:.2%} ({entry['stage_seconds']:.0f} s)",
              file=sys.stderr, flush=True)
    results = machine.record() | {"created": datetime.now(UTC).isoformat(timespec="seconds"), "quick": args.quick,
                                  "seconds_per_measurement": settings.seconds, "rounds": settings.rounds,
                                  "total_seconds": time.perf_counter() - started, "entries": entries}
    bad = [f"{e['stage']}.{key}" for e in entries for key, value in e.items()
           if isinstance(value, float) and not math.isfinite(value)]
    if bad:
        raise SystemExit(f"non-finite figures: {bad}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\n{len(entries)} stages in {results['total_seconds']:.0f} s; written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
