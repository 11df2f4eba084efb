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
    def _batches_split_evenly_over_gpus(self) -> TckrRun:
        """Data parallelism keeps the recipe's global batch: each of n GPUs takes batch_size / n of it."""
        for stage, recipe in (("teacher", self.teacher), ("student", self.student)):
            resources = self.kubernetes.stages.get(stage)
            if resources and resources.gpus > 1 and recipe.batch_size % resources.gpus:
                raise ValueError(f"{stage} batch_size {recipe.batch_size} does not split evenly over "
                                 f"kubernetes.stages.{stage}.gpus = {resources.gpus}")
        return self
