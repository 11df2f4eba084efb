"""The classifier's settings, apart from the training code so that reading a config does not import torch
(every pipeline task parses its sections; a plan task needs nothing more)."""

from __future__ import annotations

from pydantic import Field

from tckr.core.config import MIXED_PRECISION, Section


class ClassifierConfig(Section):
    """One classifier and its training recipe: the teacher, the student and the attack's shadows."""

    model: str = Field(description="a timm model name, e.g. mobilenetv3_large_100 or tckr_cnn")
    pretrained: bool = Field(False, description="ImageNet weights from the hub (only when reachable)")
    epochs: int = Field(gt=0)
    batch_size: int = Field(96, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(5e-5, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    mixup_alpha: float = Field(0.0, ge=0, description="0 disables MixUp")
    augmix: bool = False
    crop_padding: int = Field(0, ge=0, description="random crop after zero padding by this many pixels")
    hflip: bool = True
    amp: bool = Field(True, description=MIXED_PRECISION)
    num_workers: int = Field(0, ge=0)
    eval_batch_size: int = Field(512, gt=0)
    seed: int = 0
