"""The tracking server going away in the middle of work. A short outage (the server restarted) costs a stage a few
retries and the run completes; a long one fails the stage within its bounded retries with one line that names
the server, and the same command run again once the server is back continues the stage's checkpoints and its
MLflow run. Neither ever hangs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from tckr.platform.services import free_port, start_mlflow, start_seaweedfs
from tests.faults.processes import start, wait_for

pytestmark = pytest.mark.faults

TCKR = str(Path(sys.executable).with_name("tckr"))
TEACHER = ["--profile", "smoke", "--set", "teacher.epochs=8", "--set", "teacher.batch_size=16"]
EXPERIMENT = "tckr-fashion-mnist"


class Tracker:
    """A real MLflow server (its artifacts in a real SeaweedFS store) that a test can stop and start again on the
    same port, with the same database."""

    def __init__(self, root: Path):
        self.root = root
        self.s3_server, self.s3 = start_seaweedfs(root / "s3")
        self.port = free_port()
        self.server, self.uri = start_mlflow(root / "mlflow", self.s3, port=self.port)

    def stop(self) -> None:
        self.server.stop()

    def restart(self) -> float:
        """Start the server again; seconds until it answered."""
        started = time.monotonic()
        self.server, _ = start_mlflow(self.root / "mlflow", self.s3, port=self.port)
        return time.monotonic() - started

    def close(self) -> None:
        if self.server.process.poll() is None:
            self.server.stop()
        self.s3_server.stop()

    def runs(self, **tags: str) -> list:
        client = mlflow.MlflowClient(self.uri)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        where = " and ".join(f"tags.`{tag}` = '{value}'" for tag, value in tags.items())
        return [] if experiment is None else client.search_runs([experiment.experiment_id], filter_string=where)


@pytest.fixture
def tracker(tmp_path):
    tracker = Tracker(tmp_path)
    yield tracker
    tracker.close()


def _env(tracker: Tracker, root: Path) -> dict[str, str]:
    return os.environ | {"MLFLOW_TRACKING_URI": tracker.uri, "TCKR_CACHE": str(root / "cache")}


def _logged_an_epoch(tracker: Tracker) -> bool:
    """The teacher's run exists and has logged at least one epoch's metrics."""
    runs = tracker.runs(**{"tckr.stage": "teacher"})
    return bool(runs) and bool(runs[0].data.metrics)


def test_the_tracking_server_down_for_good_fails_the_stage_in_one_line_and_the_stage_resumes(tracker, tmp_path):
    env = _env(tracker, tmp_path)
    data, model = tmp_path / "ingest", tmp_path / "teacher"
    subprocess.run([TCKR, "stage", "ingest", *TEACHER, "--data", str(data)], env=env, check=True, timeout=300)
    command = [TCKR, "stage", "teacher", *TEACHER, "--data", str(data), "--model", str(model)]

    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert wait_for(process, lambda: _logged_an_epoch(tracker), "the teacher's first epoch in MLflow", timeout=300)
    tracker.stop()
    stopped = time.monotonic()
    # Each MLflow call retries for about 30 s: the failing call, then the run marked FAILED, then out.
    _, stderr = process.communicate(timeout=180)
    waited = time.monotonic() - stopped
    lines = stderr.strip().splitlines()
    assert process.returncode == 1, stderr[-3000:]
    assert lines[-1].startswith(f"tckr: the MLflow server {tracker.uri} failed stage teacher's requests (retried "
                                "for about 30 s: Connection refused): if it is down, start it again"), stderr[-3000:]
    assert "Traceback" not in stderr
    assert 25 < waited < 150, waited
    checkpoints = sorted(p.name for p in model.rglob("*") if p.is_file())
    assert checkpoints, "the epochs finished before the outage left nothing to resume from"

    tracker.restart()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = tracker.runs(**{"tckr.stage": "teacher"})  # the same run, continued, not a second one
    assert run.info.status == "FINISHED"
    history = mlflow.MlflowClient(tracker.uri).get_metric_history(run.info.run_id, "train_loss")
    assert sorted({m.step for m in history}) == list(range(1, 9)), history


def test_a_tracking_server_restarted_mid_run_costs_the_run_nothing(tracker, tmp_path):
    """The whole smoke pipeline (``tckr run``) with the server stopped while the teacher trains and started again a
    few seconds later: the teacher's logging calls retry through it and the run completes, one parent run."""
    runs_dir = tmp_path / "runs"
    process = start([TCKR, "run", "--profile", "smoke", "--runs-dir", str(runs_dir)], _env(tracker, tmp_path))
    try:
        assert wait_for(process, lambda: _logged_an_epoch(tracker), "the teacher's first epoch in MLflow", timeout=600)
        tracker.stop()
        time.sleep(3)
        restart_s = tracker.restart()
        assert process.poll() is None, "the run ended during the outage"
        assert process.wait(timeout=900) == 0
    finally:
        if process.poll() is None:
            process.kill()
    kfp_run_id = json.loads((runs_dir / "latest" / "run.json").read_text())["kfp_run_id"]
    (parent,) = tracker.runs(**{"tckr.kfp_run_id": kfp_run_id})
    assert parent.info.status == "FINISHED", f"down for {3 + restart_s:.0f} s"
    (teacher,) = tracker.runs(**{"tckr.stage": "teacher"})
    assert teacher.info.status == "FINISHED" and teacher.data.tags["mlflow.parentRunId"] == parent.info.run_id

