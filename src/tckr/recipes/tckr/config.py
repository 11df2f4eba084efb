"""TCKR's run configuration: the shared sections plus the teacher, the generator stack, the student and
the attack."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from tckr.core.config import Section
from tckr.generators.config import CaptionConfig, FidConfig, FinetuneConfig, GenerateConfig, GeneratorConfig
from tckr.privacy.config import AttackConfig, AuditConfig
from tckr.recipes.base import RunBase
from tckr.training.config import ClassifierConfig


class DistillConfig(Section):
    """Stage 6: the student learns from the synthetic set only, through the frozen teacher's outputs."""

    loss: Literal["gkd", "kl"] = Field(
        "gkd", description="gkd: cross-entropy (student.label_smoothing) against softmax(teacher) on the same "
        "augmented batch (the reference); kl: KL(teacher/T || student/T) x T^2")
    temperature: float = Field(4.0, gt=0, description="kl only")



class ControlsConfig(Section):
    """Extra attack targets that calibrate the attack, trained beside the teacher and the student."""

    negative: bool = Field(
        True, description="the teacher's recipe on as many public images as the teacher has members: it saw no "
        "member and no holdout image, so every attack must score it at chance (needs ingest.public_fraction > 0)")
    positive: bool = Field(
        True, description="the student's recipe distilled from the teacher on the real members instead of "
        "synthetic images, for the teacher's epochs: how much of the teacher's leak distillation alone hides")


class TckrRun(RunBase):
    recipe: Literal["tckr"] = "tckr"
    teacher: ClassifierConfig
    caption: CaptionConfig = CaptionConfig()
    generator: GeneratorConfig = GeneratorConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    generate: GenerateConfig = GenerateConfig()
    fid: FidConfig = FidConfig()
    student: ClassifierConfig = Field(
        description="null or absent: the teacher's architecture and recipe without MixUp (as the reference)")
    distill: DistillConfig = DistillConfig()
    controls: ControlsConfig = ControlsConfig()
    attack: AttackConfig = AttackConfig()
    audit: AuditConfig = AuditConfig()

    @model_validator(mode="before")
    @classmethod
    def _student_defaults_to_the_teacher(cls, data: Any) -> Any:
        """Resolved here, so the student's task receives its own section and never the teacher's."""
        if isinstance(data, dict) and data.get("student") is None and isinstance(data.get("teacher"), dict):
            data = {**data, "student": {**data["teacher"], "mixup_alpha": 0.0}}
        return data

    @model_validator(mode="after")
    def _negative_control_has_public_data(self) -> TckrRun:
        if self.controls.negative and self.ingest.public_fraction == 0:
            raise ValueError("controls.negative trains on the public split and ingest.public_fraction is 0: set "
                             "ingest.public_fraction > 0, or controls.negative: false")
        return self

    @model_validator(mode="after")
    def _batches_split_evenly_over_gpus(self) -> TckrRun:
        """Data parallelism keeps the recipe's global batch: each of n GPUs takes batch_size / n of it."""
        for stage, recipe in (("teacher", self.teacher), ("student", self.student)):
            resources = self.kubernetes.stages.get(stage)
            if resources and resources.gpus > 1 and recipe.batch_size % resources.gpus:
                raise ValueError(f"{stage} batch_size {recipe.batch_size} does not split evenly over "
                                 f"kubernetes.stages.{stage}.gpus = {resources.gpus}")
        return self
