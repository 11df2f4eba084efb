"""The membership-inference attack's settings, declared before the run."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tckr.core.config import MIXED_PRECISION, Section


class AttackConfig(Section):
    """Stage 7: LiRA and RMIA against the teacher and the student, with shadows of the teacher's recipe.

    The population is the private train split (the targets' members) plus the holdout split
    (non-members); each shadow trains on a random half of it, every example IN for half the shadows.
    ``variant`` and ``variance`` are declared here, before the run: only that variant is reported. RMIA uses the
    same shadows as its reference models and the same variant, and is always reported beside LiRA.
    """

    shadows: int = Field(16, ge=2, description="shadow models (even)")
    variant: Literal["online", "offline"] = "online"
    variance: Literal["global", "per_example"] = Field(
        "global", description="global: one within-example spread shared by IN and OUT scores (monotone in the "
        "target's score; LiRA's choice for few shadows); per_example: each example's own IN and OUT spreads")
    shadows_per_group: int = Field(4, ge=1, description="shadows trained together in one task (the fan-out unit)")
    vectorize: Literal["auto", "on", "off"] = Field(
        "auto", description="train a group as one vmap-ed stack (on), one model after another (off), or "
        "vmap on CUDA only (auto: on CPU a stack is slower, see bench/bench_shadows.py)")
    query_shift: int = Field(
        0, ge=0, description="queries = the training augmentations: 0, identity and mirror; s > 0, every shift "
        "(dy, dx) in {-s, 0, s}^2, plain and mirrored (18 queries; s <= the targets' crop_padding)")
    rmia_references: int = Field(2000, ge=1, description="RMIA's population samples z: test images no model trains on")
    rmia_gamma: float = Field(2.0, gt=0, description="RMIA: x beats z when LR(x) / LR(z) >= gamma")
    rmia_offline_a: float = Field(0.3, ge=0, le=1, description="RMIA offline: Pr(x) = ((1 + a) Pr_OUT(x) + 1 - a) / 2, "
                                  "fixed here (not tuned on any target)")
    bootstrap: int = Field(1000, ge=100, description="bootstrap resamples (and null draws) behind every 95% interval")
    seed: int = 0

    @model_validator(mode="after")
    def _shadows_split_evenly(self) -> AttackConfig:
        if self.shadows % 2:
            raise ValueError(f"shadows must be even, so every example is IN for exactly half (got {self.shadows})")
        return self

    def groups(self) -> list[list[int]]:
        """Shadow indices per group (one fan-out task each): consecutive runs of ``shadows_per_group``."""
        return [list(range(start, min(start + self.shadows_per_group, self.shadows)))
                for start in range(0, self.shadows, self.shadows_per_group)]


class DPConfig(Section):
    """DP-SGD with Opacus, under one end-to-end (epsilon, delta) that also covers every other private step of the
    run: the noise multiplier is solved so that the composed epsilon hits ``target_epsilon``."""

    target_epsilon: float = Field(10.0, gt=0, description="the whole run's epsilon")
    delta: float | None = Field(None, gt=0, lt=1,
                                description="null: 1 / (N ln N) for N private training images (< 1/N)")
    accountant: Literal["prv", "rdp"] = Field("prv", description="prv: tight numerical composition; rdp: Renyi DP")
    max_grad_norm: float = Field(1e-3, gt=0, description="per-example clipping norm C")
    epochs: float = Field(50.0, gt=0, description="expected passes over the private set: steps = epochs / q")
    batch_size: int = Field(2048, gt=0, description="expected (Poisson) batch of examples: q = batch_size / N")
    physical_batch_size: int = Field(256, gt=0, description="examples per forward/backward (memory only)")
    multiplicity: int = Field(
        1, ge=1, description="noise multiplicity K: K diffusion-noise draws per example, their gradients averaged "
        "before clipping (each example still contributes at most C)")
    lr: float = Field(3e-4, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA restarted from the pretrained weights, updated "
                             "on real optimiser steps only")
    lora_rank: int = Field(0, ge=0, description="0: DP-SGD on every UNet weight; r > 0: on rank-r LoRA adapters only")
    max_noise_multiplier: float = Field(
        50.0, gt=0, description="refuse to start when the budget needs more noise than this (nothing would be learnt)")
    mixed_precision: bool = Field(True, description=f"{MIXED_PRECISION}; per-example gradients are clipped in fp32")
    seed: int = 0


class AuditConfig(Section):
    """The audit of the synthetic set (:mod:`tckr.privacy.audit`): is each synthetic image nearer a member than
    a holdout image, in pixels and in a public network's features? Declared before the run, like the attack."""

    features: Literal["imagenet", "none"] = Field(
        "imagenet", description="imagenet: also audit in the ImageNet MobileNetV2's pooled features (the same "
        "offline network the captioner and the semantic query use); none: pixels only")
    feature_size: int = Field(64, ge=32, description="px the images are resized to for the feature network")
    references: int = Field(0, ge=0, description="train and holdout images compared against (as many of each); "
                            "0: as many as the smaller split has")
    near_copy_quantile: float = Field(
        0.01, gt=0, lt=0.5, description="a near copy lies closer than this quantile of real holdout-to-train "
        "distances")
    alpha: float = Field(0.01, gt=0, lt=1, description="flag the set when either test's p-value is below alpha / 2")
    permutations: int = Field(2000, ge=100, description="train/holdout relabellings behind each p-value")
    worst_pairs: int = Field(12, ge=1, le=64, description="synthetic images nearest a member shown in the report")
    batch_size: int = Field(1024, gt=0)
    seed: int = 0
