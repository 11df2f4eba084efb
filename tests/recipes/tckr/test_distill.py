"""The student: the GKD and KL losses by hand, the teacher's part in a batch, a distillation run."""

import json

import pytest
import torch

from tckr.data.ingest import IngestConfig, load_prepared, prepare
from tckr.recipes.config import load_config
from tckr.recipes.tckr.config import DistillConfig
from tckr.recipes.tckr.distill import (
    distillation_objective,
    gkd_loss,
    kl_loss,
    positive_control_recipe,
    train_student,
)
from tckr.training.classifier import load_classifier, train_classifier
from tckr.training.config import ClassifierConfig

pytestmark = pytest.mark.unit  # starts no server, trains nothing beyond a few steps

CPU = torch.device("cpu")


def test_gkd_loss_is_smoothed_cross_entropy_against_teacher_probabilities():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 4), torch.randn(5, 4)
    targets = teacher.softmax(-1) * (1 - 0.1) + 0.1 / 4  # label smoothing mixes in the uniform distribution
    by_hand = -(targets * student.log_softmax(-1)).sum(-1).mean()
    assert gkd_loss(student, teacher, 0.1) == pytest.approx(by_hand.item(), abs=1e-6)


def test_kl_loss_by_hand_and_zero_at_agreement():
    torch.manual_seed(1)
    student, teacher = torch.randn(3, 6), torch.randn(3, 6)
    p, q = (teacher / 2).softmax(-1), (student / 2).softmax(-1)
    by_hand = (p * (p.log() - q.log())).sum(-1).mean() * 4
    assert kl_loss(student, teacher, 2.0) == pytest.approx(by_hand.item(), abs=1e-6)
    assert kl_loss(teacher, teacher, 3.0) == pytest.approx(0.0, abs=1e-6)


def test_objective_runs_the_frozen_teacher_on_the_student_batch():
    teacher = torch.nn.Linear(3, 2)
    seen = []
    teacher.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    objective = distillation_objective(teacher, DistillConfig(), label_smoothing=0.1)
    images = torch.randn(4, 3)
    student_logits = torch.randn(4, 2, requires_grad=True)
    objective(student_logits, images, torch.zeros(4, dtype=torch.long)).backward()
    assert seen[0] is images  # the very augmented batch, not a re-augmented copy
    assert teacher.weight.grad is None and student_logits.grad is not None


def test_positive_control_is_the_students_recipe_for_the_teachers_epochs():
    demo = load_config("demo")
    recipe = positive_control_recipe(demo.student, demo.teacher)
    assert demo.student.epochs > demo.teacher.epochs  # the demo's student makes up for a quarter-size set
    assert recipe.epochs == demo.teacher.epochs
    assert recipe.model_dump(exclude={"epochs"}) == demo.student.model_dump(exclude={"epochs"})


def test_student_learns_from_the_teacher_on_images_it_never_labels(tmp_path, saved_dataset_dir):
    cfg = IngestConfig(source="disk", name=str(saved_dataset_dir), validation_fraction=0.1, holdout_fraction=0.2)
    prepare(cfg, tmp_path / "prepared", "fm", min_train_images=32)
    splits, info = load_prepared(tmp_path / "prepared")
    recipe = ClassifierConfig(model="tckr_cnn", epochs=12, batch_size=32, lr=3e-3, crop_padding=1, seed=3)
    teacher = train_classifier(recipe, splits, info, 16, tmp_path / "teacher", CPU)
    # "Synthetic" stand-in: the holdout images with their labels scrambled; the student may only use the teacher.
    scrambled = splits["holdout"].map(lambda row, i: {"label": (row["label"] + i) % 10}, with_indices=True)
    records = []
    result = train_student(recipe, DistillConfig(), scrambled, splits, info, 16, tmp_path / "teacher",
                           tmp_path / "student", CPU, sources_key="holdout", on_epoch=records.append)
    assert len(records) == 12 and result.test_accuracy > 0.3  # the labels alone would teach nothing (seeds 0-4 pass)
    assert result.test_accuracy >= 0.5 * teacher.test_accuracy
    assert json.loads((tmp_path / "student" / "model.json").read_text())["architecture"] == "tckr_cnn"
    assert load_classifier(tmp_path / "student") is not None
