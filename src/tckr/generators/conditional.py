"""PrivImage's generator: a class-conditional pixel diffusion UNet, pretrained without privacy on public data.

The model is a diffusers ``UNet2DModel`` (DDPM training, cosine schedule, epsilon or v target) with a
class embedding. It has only Conv2d, Linear, GroupNorm and Embedding parameters, the layers Opacus
computes per-sample gradients for with hooks, so the same UNet is later fine-tuned with DP-SGD on the
private data through :func:`class_denoising_loss`.

Null label convention: with ``C`` classes the embedding has ``C + 1`` rows and label ``C`` is the null
label, "no class". Label dropout maps training rows to it and sampling contrasts each class with it
(classifier-free guidance); pretraining rows labelled ``C`` are unconditional images (an unlabelled pool).

A saved generator is a directory: ``unet/`` (EMA weights, safetensors), ``scheduler/`` and
``generator.json`` (kind ``class-pixel``, the class names, the resolution).
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tckr.core.errors import ConfigError
from tckr.core.volume import checkpoint_location
from tckr.generators.config import ClassGeneratorConfig, GeneratorError
from tckr.generators.pixel import (
    DenoiserData,
    build_noise_scheduler,
    denoiser_prediction,
    digest_files,
    guided_sample,
    read_card,
    require_divisible,
    train_denoiser,
    training_precision,
    write_scheduler_config,
)

KIND = "class-pixel"
RECIPE = "privimage.pretrain"
_WEIGHTS = "diffusion_pytorch_model.safetensors"  # what UNet2DModel.save_pretrained writes


def build_class_unet(cfg: ClassGeneratorConfig, channels: int, image_size: int, num_classes: int):
    """Pixel-space UNet with ``num_classes + 1`` class embeddings (the last is the null label); ResNet blocks,
    with self-attention at the lowest resolution only if ``cfg.attention``."""
    from diffusers import UNet2DModel

    levels = len(cfg.block_out_channels)
    require_divisible(image_size, levels, "pretrain.block_out_channels")
    lowest = ("AttnDownBlock2D", "AttnUpBlock2D") if cfg.attention else ("DownBlock2D", "UpBlock2D")
    return contiguous_conv_inputs(UNet2DModel(
        sample_size=image_size, in_channels=channels, out_channels=channels,
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        down_block_types=("DownBlock2D",) * (levels - 1) + (lowest[0],),
        up_block_types=(lowest[1],) + ("UpBlock2D",) * (levels - 1),
        add_attention=cfg.attention, num_class_embeds=num_classes + 1, norm_num_groups=8))


def contiguous_conv_inputs(unet: nn.Module) -> nn.Module:
    """Hand every conv a contiguous input. diffusers' attention blocks return channels-last views, and Opacus'
    conv per-sample gradients (``unfold2d``, 1.6) read any input's strides as contiguous: without this, every
    conv after an attention block gets silently wrong (zero) per-sample gradients under DP-SGD. Call it again
    after adding convs (LoRA adapters) to a built or loaded UNet: convs already hooked are left as they are."""
    for module in unet.modules():
        hooked = any(hook is _contiguous for hook in getattr(module, "_forward_pre_hooks", {}).values())
        if isinstance(module, nn.Conv2d) and not hooked:
            module.register_forward_pre_hook(_contiguous)
    return unet


def _contiguous(_conv: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(x.contiguous() for x in inputs)


@dataclass
class ClassLabels:
    """Class conditioning of training rows: ``labels[i]`` in ``0 .. num_classes``, ``num_classes`` the null label."""

    labels: torch.Tensor
    num_classes: int

    def __call__(self, rows: torch.Tensor, dropped: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        return {"class_labels": torch.where(dropped, self.num_classes, self.labels[rows]).to(device)}


def class_denoising_loss(unet: nn.Module, images: torch.Tensor, labels: torch.Tensor, noise_scheduler,
                         label_dropout: float, rng: torch.Generator, device: torch.device,
                         dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-image denoising losses ``[B]`` (mean over pixels only), so Opacus can clip per-sample gradients.

    ``images`` (uint8 ``[B, C, S, S]``) and ``labels`` live on the CPU and move to ``device`` here; label
    dropout, noise and timesteps come from ``rng`` (a CPU generator), so a DP-SGD step is reproducible.
    ``unet`` may be wrapped in Opacus' GradSampleModule; ``dtype``: its autocast dtype (``None``: fp32).
    """
    num_classes = unet.class_embedding.num_embeddings - 1  # GradSampleModule forwards submodule lookups
    data = DenoiserData(images, ClassLabels(labels, num_classes))
    prediction, target = denoiser_prediction(unet, data, torch.arange(len(images)), noise_scheduler, label_dropout,
                                             False, rng, device, dtype)
    return (prediction.float() - target.float()).square().flatten(1).mean(1)


@dataclass
class ClassConditionalGenerator:
    """A loaded class-conditional generator; ``sample`` takes class names where text generators take prompts,
    so generation's plan, shards and manifests work unchanged (the plan's prompt is the class name)."""

    unet: nn.Module
    scheduler_config: dict
    classes: list[str]
    image_size: int
    channels: int

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def sample(self, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> np.ndarray:
        """uint8 ``[B, H, W, C]``, one image per (class name, seed), guided against the null label."""
        unknown = sorted(set(prompts) - set(self.classes))
        if unknown:
            raise GeneratorError(f"this generator knows the classes {self.classes}, not {unknown}")
        labels = [len(self.classes)] * len(prompts) + [self.classes.index(name) for name in prompts]
        condition = {"class_labels": torch.tensor(labels, device=self.device)}
        return guided_sample(self.unet, condition, self.scheduler_config, seeds,
                             (self.channels, self.image_size, self.image_size), steps, guidance, self.device)

    def save(self, directory: Path, metadata: dict) -> None:
        directory = Path(directory)
        self.unet.save_pretrained(directory / "unet")
        write_scheduler_config(directory, self.scheduler_config)
        card = {"kind": KIND, "classes": self.classes, "image_size": self.image_size,
                "channels": self.channels} | metadata
        (directory / "generator.json").write_text(json.dumps(card, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path, device: torch.device) -> ClassConditionalGenerator:
        from diffusers import UNet2DModel

        directory = Path(directory)
        card = _read_class_card(directory)
        unet = contiguous_conv_inputs(UNet2DModel.from_pretrained(directory / "unet")).to(device).eval()
        scheduler_config = json.loads((directory / "scheduler" / "scheduler_config.json").read_text())
        return cls(unet, scheduler_config, card["classes"], card["image_size"], card["channels"])


def pretrain_class_generator(cfg: ClassGeneratorConfig, images: torch.Tensor, labels: torch.Tensor,
                             classes: list[str], out_dir: Path, device: torch.device,
                             on_step: Callable[[int, float], None] | None = None,
                             init_from: Path | None = None) -> dict:
    """Pretrain (no privacy) on public ``images`` with ``labels`` in ``0 .. len(classes)`` (the last: no class)
    and save the EMA weights to ``out_dir``; resumes from its checkpoint there. ``init_from``: a saved
    class generator to start from (the same architecture and classes) instead of random weights."""
    _check_labelled(images, labels, classes)
    labels = labels.long()
    if len(images) < cfg.batch_size:
        raise ConfigError(f"{len(images)} public images make no batch of {cfg.batch_size}: "
                          "select more public data or lower pretrain.batch_size")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    _, channels, image_size, _ = images.shape
    unet = build_class_unet(cfg, channels, image_size, len(classes))
    if init_from is not None:
        _load_weights(unet, Path(init_from))
    unet = unet.to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    scheduler = build_noise_scheduler(cfg)
    data_digest = hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()[:16]
    init_digest = None if init_from is None else digest_files([Path(init_from) / "unet" / _WEIGHTS])
    resume_key = json.dumps({"config": cfg.model_dump(mode="json"), "classes": classes, "data": data_digest,
                             "init": init_digest})
    started = time.perf_counter()
    checkpoint = checkpoint_location(out_dir / "pretrain-checkpoint.pt")
    losses = train_denoiser(
        unet, list(unet.parameters()), DenoiserData(images, ClassLabels(labels, len(classes))), scheduler,
        steps=cfg.steps, batch_size=cfg.batch_size, grad_accum=1, lr=cfg.lr, weight_decay=0.0, max_grad_norm=1.0,
        caption_dropout=cfg.label_dropout, random_flip=False, seed=cfg.seed, device=device, checkpoint=checkpoint,
        ema=ema, ema_decay=cfg.ema_decay, desc="pretrain class generator", on_step=on_step, recipe=RECIPE,
        resume_key=resume_key, mixed_precision=cfg.mixed_precision)
    summary = {"steps": cfg.steps, "final_loss": float(np.mean(losses[-50:])),
               "seconds": time.perf_counter() - started, "train_images": len(images),
               "precision": training_precision(cfg, device),
               "parameters": sum(p.numel() for p in unet.parameters())}
    ClassConditionalGenerator(ema, dict(scheduler.config), classes, image_size, channels).save(
        out_dir, {"pretraining": summary})
    checkpoint.unlink(missing_ok=True)
    return summary


def _check_labelled(images: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[2] != images.shape[3]:
        raise GeneratorError(f"images must be uint8 [N, C, S, S], got {images.dtype} {list(images.shape)}")
    if len(images) != len(labels):
        raise GeneratorError(f"{len(images)} images but {len(labels)} labels")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) <= len(classes):
        raise GeneratorError(f"labels must lie in 0..{len(classes)} ({len(classes)}: no class), "
                             f"got {int(labels.min())}..{int(labels.max())}")


def _read_class_card(directory: Path) -> dict:
    card = read_card(directory)
    if card["kind"] != KIND:
        raise GeneratorError(f"{directory} holds a {card['kind']!r} generator, not a {KIND!r} one")
    return card


def _load_weights(unet: nn.Module, directory: Path) -> None:
    """Start from a saved class generator's weights; refuse one of another architecture or class count."""
    from safetensors.torch import load_file

    _read_class_card(directory)
    try:
        unet.load_state_dict(load_file(str(directory / "unet" / _WEIGHTS)))
    except RuntimeError as error:
        raise GeneratorError(f"{directory} holds a generator of another architecture or class count: "
                             f"{str(error).splitlines()[0]}") from error
