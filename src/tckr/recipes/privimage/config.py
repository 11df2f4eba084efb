"""PrivImage's run configuration: the shared sections; its own (query, pretraining, DP fine-tuning,
sampling, evaluation) arrive with its stages."""

from __future__ import annotations

from typing import Literal

from tckr.recipes.base import RunBase


class PrivImageRun(RunBase):
    recipe: Literal["privimage"] = "privimage"
