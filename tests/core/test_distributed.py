"""Stages given several GPUs run as one process per GPU under torchrun: here two CPU processes (gloo). Without a
GPU, stages of independent items run as several CPU processes, each on its share of the cores."""

import csv
import json
import os
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from tckr.core import distributed
from tckr.core.distributed import PROCESSES_ENV, StageProcessFailed, run_stage
from tckr.core.errors import ConfigError
from tckr.data.images import BatchAugment, ImageSplit
from tckr.data.ingest import IngestConfig, load_prepared, prepare
from tckr.platform.tracking import Tracking
from tckr.recipes.config import load_config
from tckr.recipes.invoke import invoke, process_count, sections_of
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


@pytest.mark.unit
@pytest.mark.parametrize(("cores", "setting", "expected"), [
    (2, "auto", 1),   # below 8 cores: one process, all the cores
    (8, "auto", 2),   # one per 4 cores
    (64, "auto", 2),  # never more than the group's shadows (the smoke profile groups them in twos)
    (2, 2, 2),
    (2, 5, 2),
])
def test_without_a_gpu_a_shadow_group_runs_as_cpu_processes(monkeypatch, cores, setting, expected):
    monkeypatch.setattr(distributed, "usable_cores", lambda: cores)
    cfg = load_config("smoke", ["runtime.device=cpu", f"runtime.cpu_processes={setting}"])
    stage = STAGES["shadow_group"]
    assert process_count(stage, sections_of(cfg, stage) | {"group": 0}) == expected


@pytest.mark.unit
def test_cpu_processes_only_divide_independent_items(monkeypatch):
    """A shard's sampler batches divide; a classifier's training does not (its batches' statistics depend on the
    split) and runs as one process; a GPU pod's TCKR_PROCESSES overrides the CPU setting."""
    monkeypatch.setattr(distributed, "usable_cores", lambda: 64)
    cfg = load_config("smoke", ["runtime.device=cpu", "generate.batch_size=4", "generate.shard_size=10"])
    counts = {name: process_count(STAGES[name], sections_of(cfg, STAGES[name]) | {"shard": 0, "group": 0})
              for name in ("generate_shard", "generate", "teacher", "caption")}
    assert counts == {"generate_shard": 3, "generate": 3, "teacher": 1, "caption": 1}  # 10 images: batches 4, 4, 2
    monkeypatch.setenv(PROCESSES_ENV, "4")
    assert process_count(STAGES["shadow_group"], sections_of(cfg, STAGES["shadow_group"]) | {"group": 0}) == 4


def _thread_count() -> int:
    """What a rank runs: its torch thread count."""
    return torch.get_num_threads()


def test_cpu_ranks_share_the_cores(monkeypatch):
    """Two ranks on four cores take two threads each (torchrun alone would give them one; torch never takes more
    threads than the machine has cores)."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))  # the ranks unpickle the helper
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(distributed, "usable_cores", lambda: 4)
    assert run_stage("shadow_group", _thread_count, {}, count=2, device="cpu") == min(2, os.cpu_count())


def test_a_shadow_group_in_two_cpu_processes_trains_the_shadows_one_process_trains(
        tmp_path, saved_dataset_dir, monkeypatch):
    """Through the launcher's own path (invoke): two ranks, one shadow each, files identical to a single process's."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # the same float arithmetic in every run
    prepare(IngestConfig(source="disk", name=str(saved_dataset_dir), validation_fraction=0.1, holdout_fraction=0.5),
            tmp_path / "data", "fm", min_train_images=32)
    counts = []
    real_run_stage = distributed.run_stage
    monkeypatch.setattr(distributed, "run_stage", lambda stage, function, kwargs, count, device: (
        counts.append(count), real_run_stage(stage, function, kwargs, count, device))[1])
    stage = STAGES["shadow_group"]
    for processes in (1, 2):
        cfg = load_config("smoke", ["runtime.device=cpu", f"runtime.cpu_processes={processes}"])
        invoke(stage, sections_of(cfg, stage), {"data": tmp_path / "data", "shadows": tmp_path / str(processes)},
               {"group": 0}, None)
    assert counts == [1, 2]
    for index in (0, 1):
        name = f"shadow-{index:04d}/logits.npy"
        assert np.array_equal(np.load(tmp_path / "1" / name), np.load(tmp_path / "2" / name)), name
