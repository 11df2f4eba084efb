"""Run the pipeline without a cluster: the same KFP graph, executed by ``kfp.local``'s subprocess runner.

Each run gets ``runs/<timestamp>-<profile>/`` holding ``config.yaml``, ``run.json`` (its MLflow run name, KFP run
id and state), ``report.md``, ``metrics.json`` and the KFP artifacts (``kfp/``); ``runs/latest`` points at the
newest finished one.

A run can be resumed (:func:`resume_local`) after a kill, a Ctrl-C or a failure: the same KFP run id (so the same
MLflow parent run), the same artifact paths, and kfp.local's task cache under ``kfp/.kfp_cache``, so a task that
finished is not run again and the task that was interrupted finds its checkpoint and partial outputs where it left
them. The bookkeeping tasks (never cached) run again and are idempotent: the parent run is reopened, a model
already registered from the same logged model is not registered twice, a stage's MLflow run is continued.
"""

from __future__ import annotations

import contextlib
import json
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

from tckr.core.atomic import write_text
from tckr.core.environment import scoped
from tckr.core.errors import FAILURE_FILE_ENV, TckrError
from tckr.platform.tracking import KFP_RUN_ID_ENV, configure, default_tracking_uri


class PipelineFailed(TckrError, RuntimeError):
    """A stage failed; its own error was printed by the stage, this says where to look."""


RUN_FILE = "run.json"
RUNNING, INTERRUPTED, FAILED, FINISHED = "running", "interrupted", "failed", "finished"


@dataclass
class RunOutcome:
    run_dir: Path
    metrics: dict[str, float]
    tracking_uri: str

    @property
    def artifacts(self) -> Path:
        """The KFP artifacts: ``<task>/<output>`` (a fan-out's under ``for-loop-<n>-iteration-<i>/``)."""
        return artifacts_dir(self.run_dir)


def artifacts_dir(run_dir: Path) -> Path:
    return run_dir / "kfp" / run_dir.name


def new_run_name(cfg: Any) -> str:
    """Names the MLflow parent run, the local run directory and the KFP run alike."""
    return f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.profile}"


def run_local(cfg: Any, pipeline: Any, runs_root: Path = Path("runs"), tracking_uri: str | None = None) -> RunOutcome:
    """Run ``pipeline`` (built from ``cfg``: its parameters default to ``cfg``'s sections) in a new run directory."""
    tracking_uri = tracking_uri or default_tracking_uri()
    configure(tracking_uri)  # fail before any work when the server is down
    run_name = new_run_name(cfg)
    run_dir = Path(runs_root).resolve() / run_name
    run_dir.mkdir(parents=True, exist_ok=False)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    _write_state(run_dir, {"run_name": run_name, "kfp_run_id": uuid.uuid4().hex, "state": RUNNING})
    return _execute(cfg, pipeline, run_dir, tracking_uri)


def resume_local(run_dir: Path, cfg: Any, pipeline: Any, tracking_uri: str | None = None) -> RunOutcome:
    """Finish the unfinished run in ``run_dir`` where it stopped; ``cfg`` is its ``config.yaml`` and ``pipeline``
    built from it."""
    state = resumable(run_dir)
    tracking_uri = tracking_uri or default_tracking_uri()
    configure(tracking_uri)
    _write_state(run_dir, state | {"state": RUNNING})
    return _execute(cfg, pipeline, run_dir, tracking_uri)


class RunStateError(TckrError, RuntimeError):
    """A run directory that cannot be resumed (finished, or not a run)."""


def read_state(run_dir: Path) -> dict[str, str]:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise RunStateError(f"{run_dir} is not a tckr run directory (no {RUN_FILE})")
    return json.loads(path.read_text())


def resumable(run_dir: Path) -> dict[str, str]:
    """The state of a run that can be resumed, or an error that says why it cannot."""
    state = read_state(run_dir)
    if state["state"] == FINISHED:
        raise RunStateError(f"run {run_dir} has finished already: nothing to resume")
    return state


def latest_unfinished(runs_root: Path) -> Path:
    """The newest run under ``runs_root`` that did not finish (what ``tckr run --resume`` takes by default)."""
    runs = sorted((path.parent for path in Path(runs_root).glob(f"*/{RUN_FILE}")), key=lambda path: path.name)
    unfinished = [run for run in runs if read_state(run)["state"] != FINISHED]
    if not unfinished:
        raise RunStateError(f"no unfinished run under {runs_root}/ to resume")
    return unfinished[-1].resolve()


def _write_state(run_dir: Path, state: dict[str, str]) -> None:
    write_text(run_dir / RUN_FILE, json.dumps(state, indent=2) + "\n")


def _execute(cfg: Any, pipeline: Any, run_dir: Path, tracking_uri: str) -> RunOutcome:
    from kfp import local

    state = read_state(run_dir)
    run_name = state["run_name"]
    # kfp.local warns that a non-Python base image may differ from this venv; here it is the same
    # package, installed in both.
    warnings.filterwarnings("ignore", message="You may be attemping to run a task that uses custom")
    # Resources, GPUs and Kubernetes settings are compiled in for clusters; kfp.local ignores them by design.
    warnings.filterwarnings("ignore", message="Task '.*': settings .* have no effect in the current local runner")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(run_dir / "kfp"),
               raise_on_error=True, enable_caching=True)  # the cache lives in the run: only a resume hits it
    started = time.perf_counter()
    failures = run_dir / "failures.txt"
    failures.unlink(missing_ok=True)
    try:
        # What the tasks' processes inherit: the run id a cluster gives every pod of a run (pipelines/cluster.py),
        # and where a failing task writes its one-line error.
        with scoped({KFP_RUN_ID_ENV: state["kfp_run_id"], FAILURE_FILE_ENV: str(failures)}), \
                _artifacts_under(run_name):
            pipeline(run_name=run_name, tracking_uri=tracking_uri, experiment=cfg.experiment_name)
    except KeyboardInterrupt:
        _mark_unfinished(run_name, cfg, tracking_uri, "KILLED")
        _write_state(run_dir, state | {"state": INTERRUPTED})
        raise
    except RuntimeError as error:
        _mark_unfinished(run_name, cfg, tracking_uri, "FAILED")
        _write_state(run_dir, state | {"state": FAILED})
        stage = re.search(r"Inner task failed: '([^']+)'", re.sub(r"\x1b\[[0-9;]*m", "", str(error)))
        said = failures.read_text(encoding="utf-8").splitlines()[-1:] if failures.exists() else []
        why = f": {said[0]}" if said else " (its error is printed above)"
        raise PipelineFailed(
            f"the pipeline failed at stage '{stage.group(1) if stage else '?'}'{why}; "
            f"MLflow run '{run_name}' is marked FAILED, KFP outputs are in {run_dir / 'kfp'}; "
            f"`tckr run --resume {run_dir}` goes on from there") from error
    report_files = next(artifacts_dir(run_dir).rglob("report/report_files"))  # the report's declared output
    for path in report_files.iterdir():  # report.md, metrics.json, samples.png, ...
        if path.name != "config.yaml":
            shutil.copyfile(path, run_dir / path.name)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["run.wall_seconds"] = time.perf_counter() - started
    (run_dir / "metrics.json").write_text(json.dumps(dict(sorted(metrics.items())), indent=2) + "\n")
    _write_state(run_dir, state | {"state": FINISHED})
    _point_latest(run_dir)
    return RunOutcome(run_dir, metrics, tracking_uri)


@contextlib.contextmanager
def _artifacts_under(name: str) -> Iterator[None]:
    """kfp.local puts a run's artifacts under ``<pipeline root>/<pipeline name>-<timestamp>/``, new every call; a
    resumed run must find its tasks' outputs, checkpoints and cache entries at the paths they had, so the folder is
    the run's name (:func:`artifacts_dir`)."""
    from kfp.local import executor_input_utils

    original = executor_input_utils.get_local_pipeline_resource_name
    executor_input_utils.get_local_pipeline_resource_name = lambda pipeline_name: name
    try:
        yield
    finally:
        executor_input_utils.get_local_pipeline_resource_name = original


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
