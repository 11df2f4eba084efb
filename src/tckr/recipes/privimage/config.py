"""PrivImage's run configuration: the shared sections plus the public pool, the semantic query, pretraining,
DP-SGD fine-tuning, sampling, FID, the downstream classifier and the attack on it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tckr.core.config import MIXED_PRECISION, Section
from tckr.data.public_pool import PublicPoolConfig
from tckr.generators.config import ClassGeneratorConfig, FidConfig, GenerateConfig
from tckr.privacy.config import AttackConfig, AuditConfig, DPConfig
from tckr.recipes.base import RunBase
from tckr.training.config import ClassifierConfig


class QueryConfig(Section):
    """The DP semantic query: each private image votes for its top-k public classes; Gaussian noise; each
    sensitive class takes its k noisy-highest classes not taken before it."""

    classifier: Literal["imagenet-mobilenet_v2"] = Field(
        "imagenet-mobilenet_v2", description="the semantic classifier over the public vocabulary (the paper's "
        "ResNet-50 on ImageNet32 is not shipped anywhere; torchvision's ImageNet MobileNetV2 installs from PyPI)")
    input_size: int = Field(112, ge=32, description="the classifier's input resolution")
    k: int = Field(5, ge=1, description="votes per image (L2 sensitivity sqrt(k)) and classes per sensitive class")
    sigma: float = Field(484.0, gt=0, description="noise multiplier of the histogram (std sigma * sqrt(k))")
    batch_size: int = Field(256, gt=0)
    mixed_precision: bool = Field(True, description=f"the classifier's inference (labelling the pool, the votes): "
                                  f"{MIXED_PRECISION}")
    seed: int = 0


class PretrainConfig(ClassGeneratorConfig):
    """Non-private pretraining of the class-conditional generator on public data (cached by a key over these
    settings and the data it trains on)."""

    subset: Literal["selected", "pool", "none"] = Field(
        "selected", description="selected: the query's classes, relabelled (PrivImage); pool: every public image, "
        "unconditional (the ablation's baseline); none: no pretraining, DP-SGD from random weights")


class FinetuneConfig(DPConfig):
    """DP-SGD fine-tuning of the pretrained generator on the private train split."""

    label_dropout: float = Field(0.1, ge=0, lt=1, description="null-label rate: keeps classifier-free guidance")
    lora_targets: list[str] = Field(
        default_factory=lambda: ["conv1", "conv2", "time_emb_proj"],
        description="the UNet modules that get LoRA adapters when lora_rank > 0 (DP-LoRA)")


class DownstreamConfig(Section):
    """The classifier trained on the synthetic set, tested on the real test split."""

    selection: Literal["synthetic", "real"] = Field(
        "synthetic", description="synthetic: pick the epoch on a held-out synthetic split (inside the guarantee); "
        "real: on the real validation split (spends privacy the accountant does not count: outside the guarantee)")
    validation_fraction: float = Field(0.1, gt=0, lt=1, description="share of the synthetic set held out")
    seed: int = 0


class PrivImageRun(RunBase):
    recipe: Literal["privimage"] = "privimage"
    pool: PublicPoolConfig = PublicPoolConfig()
    query: QueryConfig = QueryConfig()
    pretrain: PretrainConfig = PretrainConfig()
    privacy: FinetuneConfig = FinetuneConfig()
    sample: GenerateConfig = GenerateConfig()
    fid: FidConfig = FidConfig()
    classifier: ClassifierConfig
    downstream: DownstreamConfig = DownstreamConfig()
    attack: AttackConfig = AttackConfig()
    audit: AuditConfig = AuditConfig()

    @model_validator(mode="after")
    def _physical_batch_fits(self) -> PrivImageRun:
        if self.privacy.physical_batch_size > self.privacy.batch_size:
            raise ValueError(f"privacy.physical_batch_size {self.privacy.physical_batch_size} > privacy.batch_size "
                             f"{self.privacy.batch_size}: a physical batch is a slice of a logical one")
        return self
