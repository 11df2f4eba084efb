"""MLflow tracking: one experiment per recipe and dataset, a parent run per pipeline run, a nested run per stage.

Without ``MLFLOW_TRACKING_URI`` everything lives in the working directory: ``mlruns.db`` (sqlite,
so the model registry works) and ``mlartifacts/``. Browse with ``make mlflow-ui``.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from tckr.core import distributed
from tckr.core.errors import TckrError

LOCAL_DB = "mlruns.db"
LOCAL_ARTIFACTS = "mlartifacts"


class TrackingError(TckrError, RuntimeError):
    """The tracking server cannot be reached or refused a request."""


@dataclass(frozen=True)
class Tracking:
    """Where a stage logs: the tracking server (or local store) and the experiment (``<recipe>-<dataset>``)."""

    uri: str
    experiment: str


def default_tracking_uri(workdir: Path | None = None) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(Path(workdir or Path.cwd()) / LOCAL_DB).resolve()}"


# MLflow's HTTP client retries a failing request 7 times with backoff factor 2 (about 5 minutes when the server's
# object store is down); these bound it to about 30 s (waits of 0, 2, 4, 8 and 16 s) unless the environment says
# otherwise: long enough for a restarted server to come back, short enough that a stage never hangs on a dead one.
CLIENT_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def retry_budget_s() -> float:
    """How long one MLflow request keeps retrying (urllib3: no wait before the first retry, then doubling)."""
    retries = int(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", CLIENT_RETRIES["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]))
    factor = float(os.environ.get("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                                  CLIENT_RETRIES["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"]))
    return factor * max(0, 2 ** retries - 2)


@contextlib.contextmanager
def outage_as_error(stage: str) -> Iterator[None]:
    """A tracking server that stops answering, or keeps failing, mid-stage, as one line. Once its retries are spent
    MLflow raises a bare MlflowException whose only link to the cause is the HTTP error it was raised while
    handling. Which of the two it was is not reliably told apart (a server refusing an upload may reset the
    connection instead of answering 500), so the line gives the reason and both remedies."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as error:
        reason = _http_failure(error)
        if reason is None:
            raise
        import mlflow

        raise TrackingError(
            f"the MLflow server {mlflow.get_tracking_uri()} failed stage {stage}'s requests (retried for about "
            f"{retry_budget_s():.0f} s: {reason}): if it is down, start it again; if it answers, its log says why "
            "(storing artifacts fails when its S3 store is down, refuses its keys or lacks its bucket); what the "
            "stage finished is kept: run it again (tckr run --resume, or the same tckr stage command)") from None


def _http_failure(error: BaseException) -> str | None:
    """What the HTTP client last met, in a few words ("Connection refused", "too many 500 error responses"), or
    None if ``error`` did not come from the client giving up."""
    import requests

    seen: BaseException | None = error
    while seen is not None and not isinstance(seen, requests.exceptions.RequestException):
        seen = seen.__cause__ or seen.__context__
    if seen is None:
        return None
    reason: BaseException = seen
    while True:  # requests wraps urllib3's MaxRetryError (.reason) or ProtocolError (the OSError among its args)
        inner = getattr(reason, "reason", None) or next(
            (arg for arg in reversed(reason.args) if isinstance(arg, BaseException)), None)
        if not isinstance(inner, BaseException):
            break
        reason = inner
    text = getattr(reason, "strerror", None) or str(reason).rsplit(": ", 1)[-1].splitlines()[0]
    return re.sub(r"^\[Errno \d+\] ", "", text)


def configure(tracking_uri: str, attempts: int = 5, delay: float = 1.0) -> None:
    """Point MLflow at ``tracking_uri``; an HTTP server must answer /health within ``attempts`` tries."""
    import mlflow

    if tracking_uri.startswith(("http://", "https://")):
        for name, value in CLIENT_RETRIES.items():
            os.environ.setdefault(name, value)
        health = tracking_uri.rstrip("/") + "/health"
        for attempt in range(1, attempts + 1):
            try:
                with urllib.request.urlopen(health, timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError) as error:
                if attempt == attempts:
                    raise TrackingError(f"MLflow server {tracking_uri} is unreachable after {attempts} "
                                        f"attempts ({error}); start it (make mlflow-up) or unset "
                                        "MLFLOW_TRACKING_URI to track locally") from None
                time.sleep(delay * 2 ** (attempt - 1))
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)


def experiment_id(name: str, tracking_uri: str) -> str:
    """Get or create the experiment; local sqlite stores keep artifacts beside the database."""
    import mlflow

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = (Path(tracking_uri.removeprefix("sqlite:///")).parent / LOCAL_ARTIFACTS / name).as_uri()
    # The UI shows an experiment of this kind with its runs table, not the GenAI (traces) view.
    return mlflow.create_experiment(name, artifact_location=location,
                                    tags={"mlflow.experimentKind": "custom_model_development"})


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (MLflow params, metrics.json keys)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


# The KFP run a task belongs to: on a cluster from its pod's `pipeline/runid` label (pipelines/cluster.py
# exposes it), under kfp.local from the runner. Stages find the pipeline's parent MLflow run by this id
# instead of taking the parent's run id as an input, which would change every task's cache key every run.
KFP_RUN_ID_ENV = "TCKR_KFP_RUN_ID"
KFP_RUN_ID_TAG = "tckr.kfp_run_id"


def start_pipeline_run(tracking: Tracking, run_name: str, tags: dict[str, str], params: dict[str, Any],
                       config_yaml: str) -> str:
    """Create the parent run, tagged with the KFP run id (left RUNNING; :func:`finish_pipeline_run` closes it). A
    second start of the same KFP run (a retried pod, ``tckr run --resume``) reopens the run it made."""
    import mlflow

    kfp_run_id = os.environ.get(KFP_RUN_ID_ENV)
    if not kfp_run_id:
        raise TrackingError(f"{KFP_RUN_ID_ENV} is unset: the pipeline's parent run is opened inside a pipeline run "
                            "(the cluster sets it from the pod's pipeline/runid label, `tckr run` sets it itself)")
    configure(tracking.uri)
    client = mlflow.MlflowClient()
    existing = pipeline_run_id(tracking.experiment, must_exist=False)
    if existing is not None:
        client.update_run(existing, status="RUNNING")
        return existing
    run = client.create_run(experiment_id(tracking.experiment, tracking.uri), run_name=run_name,
                            tags=tags | {"tckr.run_name": run_name, KFP_RUN_ID_TAG: kfp_run_id})
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, str(v)[:6000])
                                               for k, v in flatten(params).items()])
    client.log_text(run.info.run_id, config_yaml, "config.yaml")
    return run.info.run_id


def pipeline_run_id(experiment: str, must_exist: bool = True) -> str | None:
    """The parent MLflow run of the KFP run this process belongs to (in the configured tracking store), or
    None outside a pipeline (``tckr stage``, DVC). Tasks run after ``start_run``, so a missing parent is
    an error, not a race to wait out (unless ``must_exist`` is False: then None)."""
    import mlflow

    kfp_run_id = os.environ.get(KFP_RUN_ID_ENV)
    if not kfp_run_id:
        return None
    found = mlflow.get_experiment_by_name(experiment)
    runs = [] if found is None else mlflow.MlflowClient().search_runs(
        [found.experiment_id], filter_string=f"tags.`{KFP_RUN_ID_TAG}` = '{kfp_run_id}'",
        order_by=["attributes.start_time ASC"], max_results=1)
    if not runs and not must_exist:
        return None
    if not runs:
        raise TrackingError(f"no run of MLflow experiment '{experiment}' at {mlflow.get_tracking_uri()} "
                            f"is tagged {KFP_RUN_ID_TAG}={kfp_run_id}: the pipeline's start_run task creates it")
    return runs[0].info.run_id


def close_failed_pipeline_run(tracking: Tracking, state: str, error: str) -> None:
    """Mark this KFP run's parent MLflow run FAILED (KILLED when cancelled) with the error as a tag, unless it
    already ended; nothing when the run never started one."""
    import mlflow

    configure(tracking.uri)
    try:
        parent_run_id = pipeline_run_id(tracking.experiment)
    except TrackingError:  # it failed before start_run opened one
        return
    if parent_run_id is None or mlflow.get_run(parent_run_id).info.status != "RUNNING":
        return
    client = mlflow.MlflowClient()
    client.set_tag(parent_run_id, "tckr.failure", f"{state}: {error}"[:4000])
    finish_pipeline_run(parent_run_id, "KILLED" if state.upper().startswith("CANCEL") else "FAILED")


def finish_pipeline_run(run_id: str, status: str = "FINISHED") -> None:
    import mlflow

    mlflow.MlflowClient().set_terminated(run_id, status)


TASK_KEY_ENV = "TCKR_TASK_KEY"
"""What the running task is (recipe, stage and a digest of its inputs and settings; set by the launcher and by
``tckr stage``): the same for a retried pod, a resumed run and a killed stage run again, so the task's MLflow run is
continued instead of made twice."""
TASK_KEY_TAG = "tckr.task"


@contextlib.contextmanager
def stage_run(stage: str, tracking: Tracking, params: dict[str, Any] | None = None) -> Iterator[Any]:
    """A run for one stage: nested under the pipeline's parent run (:func:`pipeline_run_id`), or
    top-level when the stage runs on its own (``tckr stage``, DVC). Marked FAILED if the stage raises.
    A task that ran before continues its run instead of making a second: in a pipeline, any run of the task under
    this pipeline's parent (killed, failed, or a bookkeeping task of a resumed run); on its own, a run of the task
    that did not finish (a killed ``tckr stage`` run again). In a stage run by several processes
    (:mod:`tckr.core.distributed`) only rank 0 tracks: the others get None."""
    import mlflow

    if not distributed.is_lead():
        yield None
        return
    configure(tracking.uri)
    experiment = experiment_id(tracking.experiment, tracking.uri)  # the parent's too
    parent = pipeline_run_id(tracking.experiment)
    task = os.environ.get(TASK_KEY_ENV)
    same_task = f"tags.`{TASK_KEY_TAG}` = '{task}' and " + (
        f"tags.`mlflow.parentRunId` = '{parent}'" if parent else "attributes.status != 'FINISHED'")
    earlier = mlflow.MlflowClient().search_runs([experiment], filter_string=same_task, max_results=1) if task else []
    with (mlflow.start_run(run_id=earlier[0].info.run_id) if earlier else
          mlflow.start_run(run_name=stage, experiment_id=experiment, parent_run_id=parent,
                           tags={"tckr.stage": stage} | ({TASK_KEY_TAG: task} if task else {}))) as run:
        if params and not earlier:
            mlflow.log_params({k: str(v)[:6000] for k, v in flatten(params).items()})
        yield run


def _pinned(*packages: str) -> list[str]:
    return [f"{name}=={metadata.version(name)}" for name in packages]


def log_classifier(model: Any, example_batch: Any) -> str:
    """Log a PyTorch classifier in the active run; returns its ``models:/<model id>`` URI (registered
    later, once the attack has measured what it leaks).

    Saved as torch.export (pt2, no pickle). The example must have batch >= 2: export specialises
    sizes 0 and 1, and a batch-1 example would pin every later batch to 1. Requirements are given
    explicitly (inferring them costs seconds per model).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        info = mlflow.pytorch.log_model(model, name="model", serialization_format="pt2",
                                        input_example=example_batch, pip_requirements=_pinned("torch", "numpy"))
    except MlflowException as error:  # the logged model is left FAILED, so it can never be registered
        raise TrackingError(f"storing the model's artifacts failed ({error}); is the artifact store behind "
                            f"{mlflow.get_tracking_uri()} reachable?") from None
    return info.model_uri


def log_dataset(name: str, digest: str, source: str, context: str, images: int) -> None:
    """One dataset the active run read, for MLflow's dataset views (the run's "Datasets used", filterable in the
    runs table): its name, content digest, where it lies and its size; ``context`` says what for ("training",
    "validation", "test"). The images stay where they are (a metadata-only dataset)."""
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    dataset = MetaDataset(LocalArtifactDatasetSource(source), name=name, digest=digest)
    mlflow.log_input(dataset, context=context, tags={"images": str(images)})


def log_figure_to_model_run(model_uri: str, figure: Any, artifact_file: str) -> None:
    """``figure`` in the run that logged ``model_uri`` (``models:/<model id>``): a figure measured later (the
    attack's ROC) beside the model it describes, on the page a user opens from the registry."""
    import mlflow

    client = mlflow.MlflowClient()
    run_id = client.get_logged_model(model_uri.removeprefix("models:/")).source_run_id
    client.log_figure(run_id, figure, artifact_file)


def register_model(model_uri: str, name: str, tags: dict[str, str], aliases: tuple[str, ...] = (),
                   description: str = "") -> str:
    """Register a logged model as a new version of ``name`` with ``tags`` (and, in a pipeline, its KFP run id),
    ``aliases`` and ``description``: all of it or, when the server fails midway, nothing (a version without its
    aliases is deleted again)."""
    import mlflow
    from mlflow.entities import LoggedModelStatus
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    model_id = model_uri.removeprefix("models:/")
    try:
        status = client.get_logged_model(model_id).status
    except MlflowException as error:
        raise TrackingError(f"cannot register {model_uri}: {error}") from None
    if status != LoggedModelStatus.READY:  # its upload failed or never finished
        raise TrackingError(f"cannot register {model_uri}: its artifacts are {status}, not READY")
    version = None
    try:
        in_pipeline = {KFP_RUN_ID_TAG: os.environ[KFP_RUN_ID_ENV]} if os.environ.get(KFP_RUN_ID_ENV) else {}
        version = mlflow.register_model(model_uri, name, tags=tags | in_pipeline).version
        if description:
            client.update_model_version(name, version, description=description)
        for alias in aliases:
            client.set_registered_model_alias(name, alias, version)
    except MlflowException as error:
        if version is not None:
            with contextlib.suppress(MlflowException):
                client.delete_model_version(name, version)
        raise TrackingError(f"registering {model_uri} as {name} failed: {error}") from None
    return str(version)


def registered_version(model_uri: str, name: str) -> Any | None:
    """The version of ``name`` this pipeline run registered from the logged model ``model_uri`` before (its register
    pod was retried, or the run resumed), if there is one; None outside a pipeline, where registering again is
    asked for."""
    import mlflow

    kfp_run_id = os.environ.get(KFP_RUN_ID_ENV)
    if not kfp_run_id:
        return None
    client = mlflow.MlflowClient()
    model_id = model_uri.removeprefix("models:/")
    source_run = client.get_logged_model(model_id).source_run_id
    return next((version for version in client.search_model_versions(f"name = '{name}' and run_id = '{source_run}'")
                 if version.model_id == model_id and version.tags.get(KFP_RUN_ID_TAG) == kfp_run_id), None)


def champion_score(name: str, tag: str) -> float | None:
    """The ``tag`` value of the version that holds the ``champion`` alias, if there is one."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        version = mlflow.MlflowClient().get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None
    return float(version.tags[tag]) if tag in version.tags else None
