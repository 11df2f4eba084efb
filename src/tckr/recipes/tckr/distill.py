"""Stage 6: the student, trained on the synthetic set only by Generative Knowledge Distillation.

Every batch of synthetic images is augmented once; the frozen teacher and the student both see that
same augmented batch, and the student is fitted to the teacher's output distribution, recomputed
every batch (the teacher is never cached: augmentation changes its answer). The reference loss is
``CrossEntropy(label_smoothing=0.1)(student(x), softmax(teacher(x)))``, with no temperature and no
hard-label term; ``kl`` is the classic Hinton loss ``KL(softmax(t/T) || softmax(s/T)) * T^2``.

The student never sees a real training image: model selection uses the real validation split, and
its accuracy is measured on the real test split, like the teacher's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from tckr.data.ingest import DatasetInfo
from tckr.recipes.tckr.config import DistillConfig
from tckr.training.classifier import Objective, TrainResult, load_classifier, train_classifier
from tckr.training.config import ClassifierConfig


def gkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """The reference GKD loss: smoothed cross-entropy against the teacher's probabilities."""
    targets = teacher_logits.float().softmax(-1)
    return nn.functional.cross_entropy(student_logits.float(), targets, label_smoothing=label_smoothing)


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(teacher_T || student_T) * T^2``: the T^2 keeps gradient size independent of T."""
    student = (student_logits.float() / temperature).log_softmax(-1)
    teacher = (teacher_logits.float() / temperature).log_softmax(-1)
    return nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature ** 2


def distillation_objective(teacher: nn.Module, cfg: DistillConfig, label_smoothing: float) -> Objective:
    """The student's loss on a batch: the teacher runs frozen on the very images the student sees."""
    teacher.eval().requires_grad_(False)

    def objective(student_logits: torch.Tensor, images: torch.Tensor, _labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher(images)
        if cfg.loss == "kl":
            return kl_loss(student_logits, teacher_logits, cfg.temperature)
        return gkd_loss(student_logits, teacher_logits, label_smoothing)

    return objective


def positive_control_recipe(student: ClassifierConfig, teacher: ClassifierConfig) -> ClassifierConfig:
    """The student's recipe for the teacher's number of epochs. An epoch count belongs to a training set's size:
    the student's is set for the synthetic set (the demo's, a quarter of the members, takes 30 epochs to the
    teacher's 8), and the positive control trains on the members, as the teacher did. Against the teacher, the
    distillation loss is then all that differs (the paper's profiles give both the same epochs anyway)."""
    return student.model_copy(update={"epochs": teacher.epochs})


def train_student(cfg: ClassifierConfig, distill: DistillConfig, synthetic, real_splits, info: DatasetInfo,
                  image_size: int, teacher_dir: Path, out_dir: Path, device: torch.device,
                  sources_key: str, on_epoch: Callable[[dict], None] | None = None,
                  name: str = "student") -> TrainResult:
    """Distil the teacher in ``teacher_dir`` into a new classifier trained on ``synthetic`` only (the positive
    control, ``name`` ``positive_control``, passes the real members instead).

    ``sources_key`` identifies the synthetic set and the teacher: a checkpoint made from others is not resumed.
    """
    teacher = load_classifier(Path(teacher_dir), device)
    splits = {"train": synthetic, "validation": real_splits["validation"], "test": real_splits["test"]}
    return train_classifier(cfg, splits, info, image_size, Path(out_dir), device, on_epoch=on_epoch, name=name,
                            objective=distillation_objective(teacher, distill, cfg.label_smoothing),
                            resume_key=f"{distill.model_dump_json()}|{sources_key}")
