"""Real kills, stage by stage: each long stage of both recipes runs as ``tckr stage`` in a subprocess, is sent
SIGKILL at a point chosen from a seed inside its working time, and is run again with the same command. The result
must equal an unbroken run's byte for byte (weights, shards, captions, logits; JSON and CSV files compared without
their timings), with no partial file or stray shard left, and one MLflow run for the killed task."""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import pickle
import random
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pyarrow as pa
import pytest

from tests.faults.processes import kill_after, start, wait_for

pytestmark = pytest.mark.faults

TCKR = str(Path(sys.executable).with_name("tckr"))
# Enough work that a kill lands inside it, past a checkpoint about half the time (classifiers checkpoint every
# epoch, the denoisers every 50 steps).
SETTINGS = ["--profile", "smoke", "--set", "teacher.epochs=6", "--set", "teacher.batch_size=16",
            "--set", "student.epochs=6", "--set", "student.batch_size=16", "--set", "generator.steps=90",
            "--set", "finetune.epochs=2", "--set", "finetune.batch_size=8", "--set", "generate.steps=12"]
KILL_POINTS = 2  # seeded kill points per stage; TCKR_KILL_SEED picks another set
UNSTABLE = ("seconds", "images_per_second", "model_uri", "resumed_from")  # timings, ids, where it resumed
SKIPPED = {"metrics.json", "logged_model.json"}  # the stage's metrics (timings), the MLflow model's id


# PrivImage's generator stages, long enough to be killed inside (DP-SGD checkpoints every step).
PRIVIMAGE_SETTINGS = ["--profile", "smoke-privimage", "--set", "pretrain.steps=90", "--set", "privacy.epochs=3"]
SETTINGS_OF = {"tckr": SETTINGS, "privimage": PRIVIMAGE_SETTINGS}


@dataclass(frozen=True)
class Kill:
    stage: str
    inputs: dict[str, str]  # port -> the stage (a name in this table, or a prerequisite) whose unbroken output it reads
    output: str
    params: tuple[str, ...] = ()
    recipe: str = "tckr"

    @property
    def name(self) -> str:
        """Its outputs' folder and its test id: TCKR's stage names plain, another recipe's under the recipe."""
        return self.stage if self.recipe == "tckr" else f"{self.recipe}/{self.stage}"


KILLS = [
    Kill("caption", {"data": "ingest"}, "captions"),
    Kill("generator", {"data": "ingest", "captions": "caption"}, "base_model"),
    Kill("finetune", {"data": "ingest", "captions": "caption", "base_model": "generator"}, "adapter"),
    Kill("generate_shard", {"captions": "caption", "base_model": "generator", "adapter": "finetune"}, "images",
         ("--shard", "0")),
    Kill("teacher", {"data": "ingest"}, "model"),
    # the student's recipe and distillation objective, on real members (the student's own input is the synthetic set)
    Kill("positive_control", {"data": "ingest", "teacher_model": "teacher"}, "model"),
    Kill("shadow_group", {"data": "ingest"}, "shadows", ("--group", "0")),
    # PrivImage: public pretraining on the selected subset, then DP-SGD fine-tuning on the private set
    Kill("pretrain", {"data": "privimage/ingest", "public": "privimage/public_pool", "selection": "privimage/query"},
         "base_model", recipe="privimage"),
    Kill("finetune", {"data": "privimage/ingest", "selection": "privimage/query", "base_model": "privimage/pretrain"},
         "generator", recipe="privimage"),
]
# What the killed stages read and nobody kills: made once, unbroken, by the module's fixture.
PREREQUISITES = [
    Kill("ingest", {}, "data"),
    Kill("ingest", {}, "data", recipe="privimage"),
    Kill("public_pool", {"data": "privimage/ingest"}, "public", recipe="privimage"),
    Kill("query", {"data": "privimage/ingest", "public": "privimage/public_pool"}, "selection", recipe="privimage"),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The unbroken outputs, each stage's made once and read by the next; one MLflow store for every run."""
    root = tmp_path_factory.mktemp("kills")
    for prerequisite in PREREQUISITES:
        _run(_command(prerequisite, root, root / "unbroken" / prerequisite.name), _environment(root / "unbroken"))
    return root


def _environment(folder: Path) -> dict[str, str]:
    """The unbroken runs and the killed ones each have their own MLflow store and their own cache (the base
    generator is cached across runs)."""
    folder.mkdir(parents=True, exist_ok=True)
    return os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlruns.db'}",
                         "TCKR_CACHE": str(folder / "cache")}


def _run(argv: list[str], env: dict[str, str]) -> None:
    done = subprocess.run([TCKR, *argv], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _command(kill: Kill, root: Path, out: Path) -> list[str]:
    inputs = [argument for port, stage in kill.inputs.items()
              for argument in (f"--{port.replace('_', '-')}", str(root / "unbroken" / stage))]
    return ["stage", kill.stage, *SETTINGS_OF[kill.recipe], *inputs, *kill.params, f"--{kill.output.replace('_', '-')}",
            str(out)]


def _working_window(command: list[str], env: dict[str, str], out: Path) -> tuple[float, float]:
    """Run unbroken, timing when the stage first wrote into ``out`` and when it ended (seconds from the start)."""
    started = time.monotonic()
    process = subprocess.Popen([TCKR, *command], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    first_write = None
    while process.poll() is None:
        if first_write is None and _written(out):
            first_write = time.monotonic() - started
        time.sleep(0.05)
    assert process.returncode == 0, process.stderr.read()[-3000:]
    ended = time.monotonic() - started
    return (first_write if first_write is not None else ended), ended


def _written(folder: Path) -> bool:
    return folder.exists() and any(folder.iterdir())


def _content(path: Path) -> object:
    """A file as compared: JSON, CSV and an Arrow shard's metadata without their timing fields, anything else (an
    Arrow shard's table included) byte for byte."""
    if path.suffix == ".arrow":
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_stream(source).read_all()
        metadata = {key: _without_timings(json.loads(value)) for key, value in (table.schema.metadata or {}).items()}
        return metadata, [zlib.crc32(pickle.dumps(column.to_pylist())) for column in table.columns]
    if path.suffix == ".json":
        return _without_timings(json.loads(path.read_text()))
    if path.suffix == ".jsonl":
        return [_without_timings(json.loads(line)) for line in path.read_text().splitlines()]
    if path.suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(path.read_text())))
        return [{k: v for k, v in row.items() if not any(word in k for word in UNSTABLE)} for row in rows]
    return zlib.crc32(path.read_bytes()), path.stat().st_size


def _without_timings(value: object) -> object:
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if not any(word in k for word in UNSTABLE)}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _files(root: Path) -> dict[str, object]:
    return {str(path.relative_to(root)): _content(path) for path in sorted(root.rglob("*"))
            if path.is_file() and path.name not in SKIPPED}


@pytest.fixture(scope="module")
def windows() -> dict[str, tuple[float, float]]:
    """Each stage's unbroken run, made once for all its seeds: when it first wrote and when it ended."""
    return {}


@pytest.mark.parametrize("point", range(KILL_POINTS), ids=lambda point: f"point{point}")
@pytest.mark.parametrize("kill", KILLS, ids=[kill.name for kill in KILLS])
def test_a_stage_killed_and_run_again_ends_as_an_unbroken_run(kill, point, workdir, windows):
    from tckr.recipes.config import RECIPES

    root = workdir
    unbroken = root / "unbroken" / kill.name
    if kill.name not in windows:
        windows[kill.name] = _working_window(_command(kill, root, unbroken), _environment(root / "unbroken"), unbroken)
    first_write, ended = windows[kill.name]
    run = int(os.environ.get("TCKR_KILL_SEED", "0")) * KILL_POINTS + point
    seed = run * 1000 + zlib.crc32(kill.name.encode()) % 1000
    fraction = random.Random(seed).uniform(0.1, 0.8)
    # The kill is timed from the killed run's own first write, so a slower start-up (a loaded machine) does not
    # move it; a run faster than the unbroken one is tried again, killed earlier, in fresh folders.
    for attempt in range(3):
        attempt_root = root / "killed" / f"point{point}-try{attempt}"
        killed = attempt_root / kill.name
        command, env = _command(kill, root, killed), _environment(attempt_root)
        process = start([TCKR, *command], env)
        delay = fraction / 2 ** attempt * (ended - first_write)
        if wait_for(process, functools.partial(_written, killed), f"{kill.name}'s first write") \
                and kill_after(process, delay):
            break
    else:
        pytest.fail(f"{kill.name} ended before each kill (last {delay:.1f} s after its first write)")
    interrupted = _stage_runs(env, kill)
    _run(command, env)  # the same command again: it resumes

    files = _files(killed)
    assert not [name for name in files if ".partial" in name or name.endswith((".tmp", "checkpoint.pt"))], files
    assert files.keys() == _files(unbroken).keys()
    assert files == _files(unbroken), f"killed {delay:.1f} s after its first write, of {ended - first_write:.1f}"
    if RECIPES[kill.recipe].stages[kill.stage].tracked:  # the killed run's MLflow run is continued, not made again
        after = _stage_runs(env, kill)
        assert set(after.values()) == {"FINISHED"}
        assert len(after) == len(interrupted) + (0 if "RUNNING" in interrupted.values() else 1), (interrupted, after)


def _stage_runs(env: dict[str, str], kill: Kill) -> dict[str, str]:
    """The status of each MLflow run of the killed stage in the store ``env`` names."""
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(f"{kill.recipe}-fashion-mnist")
    runs = [] if experiment is None else client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`tckr.stage` = '{kill.stage}'")
    return {run.info.run_id: run.info.status for run in runs}
