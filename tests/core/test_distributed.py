"""Stages given several GPUs run as one process per GPU under torchrun: here two CPU processes (gloo)."""

import csv
import json

import mlflow
import pytest
import torch

from tckr.core.distributed import PROCESSES_ENV, StageProcessFailed, run_stage
from tckr.core.errors import ConfigError
from tckr.data.images import BatchAugment, ImageSplit
from tckr.data.ingest import IngestConfig, load_prepared, prepare
from tckr.platform.tracking import Tracking
from tckr.recipes.config import load_config
from tckr.recipes.invoke import invoke, sections_of
from tckr.recipes.tckr.stages import STAGES
from tckr.training.classifier import accuracy, load_classifier, predict_logits


def test_teacher_trains_data_parallel_and_only_rank_0_writes_and_tracks(tmp_path, saved_dataset_dir, tracking_uri,
                                                                         monkeypatch):
    prepare(IngestConfig(source="disk", name=str(saved_dataset_dir), validation_fraction=0.1, holdout_fraction=0.2),
            tmp_path / "data", "fm", min_train_images=32)
    epochs = 3
    cfg = load_config("smoke", ["runtime.device=cpu", "kubernetes.stages.teacher.gpus=2", f"teacher.epochs={epochs}",
                                "teacher.batch_size=32", "teacher.seed=3"])
    monkeypatch.setenv(PROCESSES_ENV, "2")  # what the cluster sets on a pod given two GPUs
    metrics = invoke(STAGES["teacher"], sections_of(cfg, STAGES["teacher"]),
                     {"data": tmp_path / "data", "model": tmp_path / "teacher"}, {},
                     Tracking(tracking_uri, cfg.experiment_name))

    # One set of outputs, written by rank 0: the best weights, their card, the training curve, the logged model
    # (the checkpoint goes once training is over).
    assert {p.name for p in (tmp_path / "teacher").iterdir()} == {"model.safetensors", "model.json", "history.csv",
                                                                  "logged_model.json"}
    curve = list(csv.DictReader((tmp_path / "teacher" / "history.csv").open()))
    assert [int(row["epoch"]) for row in curve] == list(range(1, epochs + 1))
    splits, info = load_prepared(tmp_path / "data")
    test = ImageSplit(splits["test"], cfg.image_size, info.channels)
    logits = predict_logits(load_classifier(tmp_path / "teacher"), BatchAugment(info.mean, info.std), test, 64,
                            torch.device("cpu"))
    assert metrics["teacher.test_accuracy"] == pytest.approx(accuracy(logits, test.labels))
    assert metrics["teacher.test_accuracy"] > 0.3  # 10 classes, 280 training images: well above chance (0.1)
    # The recipe of one device: its global batch of 32 (16 per rank), so as many optimiser steps an epoch.
    steps_per_epoch = len(splits["train"]) // 32
    assert [int(row["optimizer_steps"]) for row in curve] == [steps_per_epoch * e for e in range(1, epochs + 1)]

    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.experiment_name).experiment_id])
    assert [r.data.tags["tckr.stage"] for r in runs] == ["teacher"]  # one run: rank 1 tracked nothing
    history = client.get_metric_history(runs[0].info.run_id, "val_accuracy")
    assert [m.step for m in history] == list(range(1, epochs + 1))
    assert json.loads((tmp_path / "teacher" / "model.json").read_text())["architecture"] == cfg.teacher.model


def test_a_rank_that_fails_fails_the_stage(tmp_path):
    cfg = load_config("smoke", ["runtime.device=cpu"])
    arguments = {"image_size": cfg.image_size, "teacher": cfg.teacher, "runtime": cfg.runtime,
                 "data": tmp_path / "no-data", "model": tmp_path / "teacher"}
    with pytest.raises(StageProcessFailed, match="stage teacher failed in one of its 2 processes"):
        run_stage("teacher", STAGES["teacher"].run, arguments, count=2, device="cpu")


@pytest.mark.unit
def test_the_launcher_runs_a_multi_gpu_stage_as_one_process_per_gpu_of_its_pod(tmp_path, monkeypatch, tracking_uri):
    """The pod's TCKR_PROCESSES (compiled in from kubernetes.stages.<stage>.gpus) decides; one-device stages
    ignore it."""
    from tckr.core import distributed

    counts = []
    monkeypatch.setattr(distributed, "run_stage", lambda stage, function, kwargs, count, device: counts.append(count))
    monkeypatch.setenv(distributed.PROCESSES_ENV, "4")
    cfg = load_config("smoke")
    for name in ("teacher", "caption"):
        invoke(STAGES[name], sections_of(cfg, STAGES[name]), {}, {}, Tracking(tracking_uri, cfg.experiment_name))
    assert counts == [4, 1]


@pytest.mark.unit
@pytest.mark.parametrize(("overrides", "message"), [
    (["kubernetes.stages.caption.gpus=2"], "caption runs on one device"),
    (["kubernetes.stages.teacher.gpus=3"], "teacher batch_size 64 does not split evenly"),
    (["kubernetes.stages.student.gpus=3"], "student batch_size 16 does not split evenly"),
])
def test_several_gpus_only_where_the_stage_uses_them(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", overrides)
