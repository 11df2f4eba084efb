"""The membership-inference attack's settings, declared before the run."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tckr.core.config import Section


class AttackConfig(Section):
    """Stage 7: LiRA against the teacher and the student, with shadows of the teacher's recipe.

    The population is the private train split (the targets' members) plus the holdout split
    (non-members); each shadow trains on a random half of it, every example IN for half the shadows.
    ``variant`` and ``variance`` are declared here, before the run: only that variant is reported.
    """

    shadows: int = Field(16, ge=2, description="shadow models (even)")
    variant: Literal["online", "offline"] = "online"
    variance: Literal["global", "per_example"] = Field(
        "global", description="global: one pooled within-example spread (LiRA's choice for few shadows)")
    shadows_per_group: int = Field(4, ge=1, description="shadows trained together in one task (the fan-out unit)")
    vectorize: Literal["auto", "on", "off"] = Field(
        "auto", description="train a group as one vmap-ed stack (on), one model after another (off), or "
        "vmap on CUDA only (auto: on CPU a stack is slower, see bench/bench_shadows.py)")
    seed: int = 0

    @model_validator(mode="after")
    def _shadows_split_evenly(self) -> AttackConfig:
        if self.shadows % 2:
            raise ValueError(f"shadows must be even, so every example is IN for exactly half (got {self.shadows})")
        return self
