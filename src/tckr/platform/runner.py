"""Run the pipeline without a cluster: the same KFP graph, executed by ``kfp.local``'s subprocess runner.

Each run gets ``runs/<timestamp>-<profile>/`` holding ``config.yaml``, ``report.md``,
``metrics.json`` and the KFP artifacts (``kfp/``); ``runs/latest`` points at the newest.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from tckr.core.errors import FAILURE_FILE_ENV, TckrError
from tckr.platform.tracking import KFP_RUN_ID_ENV, configure, default_tracking_uri


class PipelineFailed(TckrError, RuntimeError):
    """A stage failed; its own error was printed by the stage, this says where to look."""


@dataclass
class RunOutcome:
    run_dir: Path
    metrics: dict[str, float]
    tracking_uri: str


def new_run_name(cfg: Any) -> str:
    """Names the MLflow parent run, the local run directory and the KFP run alike."""
    return f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.profile}"


def run_local(cfg: Any, pipeline: Any, runs_root: Path = Path("runs"), tracking_uri: str | None = None) -> RunOutcome:
    """Run ``pipeline`` (built from ``cfg``: its parameters default to ``cfg``'s sections) in a new run directory."""
    from kfp import local

    tracking_uri = tracking_uri or default_tracking_uri()
    configure(tracking_uri)  # fail before any work when the server is down
    run_name = new_run_name(cfg)
    run_dir = Path(runs_root).resolve() / run_name
    run_dir.mkdir(parents=True, exist_ok=False)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())

    # kfp.local warns that a non-Python base image may differ from this venv; here it is the same
    # package, installed in both.
    warnings.filterwarnings("ignore", message="You may be attemping to run a task that uses custom")
    # Resources, GPUs and Kubernetes settings are compiled in for clusters; kfp.local ignores them by design.
    warnings.filterwarnings("ignore", message="Task '.*': settings .* have no effect in the current local runner")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(run_dir / "kfp"),
               raise_on_error=True)
    started = time.perf_counter()
    failures = run_dir / "failures.txt"
    try:
        with _task_environment({KFP_RUN_ID_ENV: uuid.uuid4().hex, FAILURE_FILE_ENV: str(failures)}):
            pipeline(run_name=run_name, tracking_uri=tracking_uri, experiment=cfg.experiment_name)
    except KeyboardInterrupt:
        _mark_unfinished(run_name, cfg, tracking_uri, "KILLED")
        raise
    except RuntimeError as error:
        _mark_unfinished(run_name, cfg, tracking_uri, "FAILED")
        stage = re.search(r"Inner task failed: '([^']+)'", re.sub(r"\x1b\[[0-9;]*m", "", str(error)))
        said = failures.read_text(encoding="utf-8").splitlines()[-1:] if failures.exists() else []
        why = f": {said[0]}" if said else " (its error is printed above)"
        raise PipelineFailed(
            f"the pipeline failed at stage '{stage.group(1) if stage else '?'}'{why}; "
            f"MLflow run '{run_name}' is marked FAILED, KFP outputs are in {run_dir / 'kfp'}") from error
    report_files = next((run_dir / "kfp").rglob("report/report_files"))  # the report task's declared output
    for path in report_files.iterdir():  # report.md, metrics.json, samples.png, ...
        if path.name != "config.yaml":
            shutil.copyfile(path, run_dir / path.name)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["run.wall_seconds"] = time.perf_counter() - started
    (run_dir / "metrics.json").write_text(json.dumps(dict(sorted(metrics.items())), indent=2) + "\n")
    _point_latest(run_dir)
    return RunOutcome(run_dir, metrics, tracking_uri)


@contextlib.contextmanager
def _task_environment(variables: dict[str, str]) -> Iterator[None]:
    """Variables kfp.local's task subprocesses inherit: the run id a cluster gives every pod of a run
    (pipelines/cluster.py), and where a failing task writes its one-line error."""
    previous = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


def _point_latest(run_dir: Path) -> None:
    latest = run_dir.parent / "latest"
    temporary = run_dir.parent / ".latest.tmp"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(run_dir.name)
    temporary.replace(latest)


def _mark_unfinished(run_name: str, cfg: Any, tracking_uri: str, status: str) -> None:
    """A killed or failed local run must not stay RUNNING in the MLflow UI."""
    import mlflow

    experiment = mlflow.get_experiment_by_name(cfg.experiment_name)
    if experiment is None:
        return
    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`tckr.run_name` = '{run_name}'")
    for run in runs:
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status)
