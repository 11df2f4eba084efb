"""Classifier training (the TCKR recipe): the teacher, the student (with a distillation objective) and,
through :class:`Recipe`, the attack's shadow models.

Images are decoded and resized once per item on the CPU (``ImageSplit``, optionally with AugMix);
random crop, flip and normalisation run batched on the training device (``BatchAugment``), MixUp
via timm. The best epoch on the validation split is kept; the test split is only read at the end.
Under torchrun (:mod:`tckr.core.distributed`) the same loop is DistributedDataParallel: each rank trains on
its slice of every global batch, and rank 0 alone validates, checkpoints, tests and reports.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from tckr.core import distributed
from tckr.core.atomic import atomic_path, write_text
from tckr.core.errors import ConfigError
from tckr.core.precision import autocast, autocast_dtype, loss_scaler, precision_name
from tckr.core.progress import progress
from tckr.core.seeds import derive_seed
from tckr.data.images import BatchAugment, ImageSplit, shift_images
from tckr.data.ingest import DatasetInfo
from tckr.training.config import ClassifierConfig
from tckr.training.loop import Loop
from tckr.training.models import create_classifier

TRAINER = "tckr.classifier"  # what its checkpoints say made them


@dataclass
class TrainResult:
    val_accuracy: float
    test_accuracy: float
    best_epoch: int
    epochs_run: int
    seconds: float
    images_per_second: float
    precision: str  # what training computed in (:func:`tckr.core.precision.precision_name`)
    history: list[dict] = field(default_factory=list)


@torch.no_grad()
def batch_logits(forward: Callable[[torch.Tensor], torch.Tensor], augment: BatchAugment,
                 batches: Iterable[torch.Tensor], device: torch.device, flip: bool = False,
                 shift: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """``forward`` over normalised uint8 batches (shifted by ``shift`` and mirrored if ``flip``: a membership
    query), concatenated along the sample axis, float32 on the CPU: the one evaluation loop for single models and
    shadow stacks alike."""
    outputs = []
    for images in batches:
        x = shift_images(augment(images.to(device, non_blocking=True)), *shift)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            outputs.append(forward(x.flip(-1) if flip else x).float().cpu())
    return torch.cat(outputs, dim=-2)


def predict_logits(model: nn.Module, augment: BatchAugment, dataset: ImageSplit, batch_size: int,
                   device: torch.device, desc: str = "eval") -> torch.Tensor:
    """Logits for every item of ``dataset`` in order (float32, on the CPU)."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    return batch_logits(model, augment, (images for images, _ in progress(loader, desc=desc, unit="batch")), device)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(logits, augmented images, targets) -> loss``: how a batch is scored (labels, or a teacher's outputs)."""


@dataclass
class Recipe:
    """The optimiser, schedule, MixUp and loss of a :class:`ClassifierConfig`: shared by every trainer
    (one model here, a stack of shadow models in :mod:`tckr.privacy.shadows`) so they cannot drift apart."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    mixup: Callable | None
    objective: Objective
    dtype: torch.dtype | None  # autocast's (:mod:`tckr.core.precision`); None: fp32

    def autocast(self, device: torch.device) -> torch.autocast:
        return autocast(device, self.dtype)

    @property
    def precision(self) -> str:
        return precision_name(self.dtype)

    @classmethod
    def build(cls, cfg: ClassifierConfig, parameters, num_classes: int, device: torch.device,
              objective: Objective | None = None) -> Recipe:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
        mixup = (Mixup(mixup_alpha=cfg.mixup_alpha, label_smoothing=cfg.label_smoothing, num_classes=num_classes)
                 if cfg.mixup_alpha > 0 else None)
        if objective is None:
            objective = _label_objective(
                SoftTargetCrossEntropy() if mixup else nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing))
        dtype = autocast_dtype(device, cfg.amp)
        return cls(optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs),
                   loss_scaler(device, dtype), mixup, objective, dtype)


def _label_objective(criterion: nn.Module) -> Objective:
    def objective(logits: torch.Tensor, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return criterion(logits, targets)

    return objective


def train_classifier(cfg: ClassifierConfig, splits, info: DatasetInfo, image_size: int, out_dir: Path,
                     device: torch.device, on_epoch: Callable[[dict], None] | None = None,
                     name: str = "classifier", objective: Objective | None = None,
                     resume_key: str = "") -> TrainResult | None:
    """Train on ``splits['train']``, select on ``splits['validation']``, test on ``splits['test']``.

    ``objective`` replaces the label loss (the student's distillation from a teacher). Writes
    ``model.safetensors`` + ``model.json`` (best epoch) and, until training is done, ``checkpoint.pt`` (last
    epoch) to ``out_dir``; a checkpoint there of the same settings (and ``resume_key``) is resumed, one of other
    settings restarted, another trainer's refused (:class:`~tckr.training.loop.CheckpointMismatchError`).

    On several ranks (:mod:`tckr.core.distributed`) each takes ``batch_size / ranks`` of every batch, so the
    recipe is the one a single device runs; only rank 0 validates, writes, calls ``on_epoch`` and
    returns a result (the others return None).
    """
    rank, ranks = distributed.rank(), distributed.world_size()
    if cfg.batch_size % ranks:
        raise ConfigError(f"batch_size {cfg.batch_size} does not split evenly over {ranks} processes")
    lead = rank == 0
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(derive_seed(cfg.seed, name, "init"))
    model = create_classifier(cfg.model, info.num_classes, info.channels, cfg.pretrained).to(device)
    # The module that trains: under DDP its backward averages gradients across ranks (and its
    # construction copies rank 0's weights to all); evaluation uses ``model`` itself, on rank 0 only.
    trained = (nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
               if ranks > 1 else model)
    augment = BatchAugment(info.mean, info.std, cfg.crop_padding, cfg.hflip).to(device)
    recipe = Recipe.build(cfg, model.parameters(), info.num_classes, device, objective)
    optimizer, scheduler, scaler, mixup = recipe.optimizer, recipe.scheduler, recipe.scaler, recipe.mixup

    train_set = ImageSplit(splits["train"], image_size, info.channels, augmix=cfg.augmix)
    val_set = ImageSplit(splits["validation"], image_size, info.channels)
    generator = torch.Generator().manual_seed(derive_seed(cfg.seed, name, "order"))
    # Several ranks: disjoint slices of one seeded permutation per epoch (set_epoch), so nothing to checkpoint.
    sampler = (DistributedSampler(train_set, num_replicas=ranks, rank=rank, shuffle=True,
                                  seed=derive_seed(cfg.seed, name, "order"),
                                  drop_last=True) if ranks > 1 else None)
    loader = DataLoader(train_set, batch_size=cfg.batch_size // ranks, shuffle=sampler is None, sampler=sampler,
                        drop_last=True, generator=generator, num_workers=cfg.num_workers,
                        persistent_workers=cfg.num_workers > 0, pin_memory=device.type == "cuda")
    if len(loader) == 0:
        raise ConfigError(f"{len(train_set)} training images make no full batch of {cfg.batch_size}")

    settings = cfg.model_dump_json() + f"|{image_size}|{info.fingerprint}|{recipe.precision}|{resume_key}"
    loop = Loop(out_dir / "checkpoint.pt", TRAINER, settings,
                {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler,
                 "generator": generator},
                {"best_val": -1.0, "best_epoch": 0, "history": []}, desc=name, lead=lead)
    state = loop.extra
    started = time.perf_counter()
    trained_images = 0
    epoch_start = started

    def batches(epoch: int) -> DataLoader:
        nonlocal epoch_start
        trained.train()
        if sampler is not None:
            sampler.set_epoch(epoch)
            torch.manual_seed(derive_seed(cfg.seed, name, "augment", epoch, rank))  # this rank's crops, flips, MixUp
        epoch_start = time.perf_counter()
        return loader

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        images, labels = batch
        images = augment(images.to(device, non_blocking=True), train=True)
        labels = labels.to(device, non_blocking=True)
        if mixup:
            images, labels = mixup(images, labels)
        with recipe.autocast(device):
            loss = recipe.objective(trained(images), images, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.item()

    def end_epoch(epoch: int, train_loss: float) -> dict | None:
        nonlocal trained_images
        scheduler.step()
        trained_images += len(loader) * cfg.batch_size
        if not lead:
            return None
        val_logits = predict_logits(model, augment, val_set, cfg.eval_batch_size, device, "validate")
        record = {"epoch": epoch, "train_loss": train_loss, "val_accuracy": accuracy(val_logits, val_set.labels),
                  "lr": optimizer.param_groups[0]["lr"], "optimizer_steps": loop.steps,
                  "epoch_seconds": time.perf_counter() - epoch_start}
        state["history"].append(record)
        if record["val_accuracy"] > state["best_val"]:
            state["best_val"], state["best_epoch"] = record["val_accuracy"], epoch
            _save_weights(model, out_dir, cfg, info, image_size)
        write_text(out_dir / "history.csv", _history_csv(state["history"]))
        tqdm.write(f"{name} epoch {epoch}/{cfg.epochs}: loss {train_loss:.4f} "
                   f"val_acc {record['val_accuracy']:.4f} ({record['epoch_seconds']:.1f}s)")
        return record

    loop.run_epochs(cfg.epochs, batches, step, end_epoch, on_epoch=on_epoch)
    if not lead:
        return None
    seconds = time.perf_counter() - started

    best = load_classifier(out_dir, device)
    test_set = ImageSplit(splits["test"], image_size, info.channels)
    test_logits = predict_logits(best, augment, test_set, cfg.eval_batch_size, device, "test")
    loop.finish()
    return TrainResult(val_accuracy=state["best_val"], test_accuracy=accuracy(test_logits, test_set.labels),
                       best_epoch=state["best_epoch"], epochs_run=loop.done, seconds=seconds,
                       images_per_second=trained_images / seconds if seconds > 0 else math.nan,
                       precision=recipe.precision, history=state["history"])


def _history_csv(history: list[dict]) -> str:
    """The training curve (one row per epoch) that DVC plots and MLflow shows as metric histories."""
    columns = list(history[0])
    return "\n".join([",".join(columns), *(",".join(f"{row[c]:.6g}" for c in columns) for row in history)]) + "\n"


def _save_weights(model: nn.Module, out_dir: Path, cfg: ClassifierConfig, info: DatasetInfo,
                  image_size: int) -> None:
    """Adapter-free, framework-neutral weights plus what is needed to rebuild and feed the model."""
    with atomic_path(out_dir / "model.safetensors") as partial:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(partial))
    card = {"architecture": cfg.model, "num_classes": info.num_classes, "in_chans": info.channels,
            "image_size": image_size, "mean": info.mean, "std": info.std, "classes": info.classes,
            "dataset_fingerprint": info.fingerprint}
    (out_dir / "model.json").write_text(json.dumps(card, indent=2) + "\n")


def load_classifier(model_dir: Path, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild a classifier saved by :func:`train_classifier` (eval mode)."""
    card = json.loads((Path(model_dir) / "model.json").read_text())
    model = create_classifier(card["architecture"], card["num_classes"], card["in_chans"])
    model.load_state_dict(load_file(str(Path(model_dir) / "model.safetensors")))
    return model.to(device).eval()
