"""Run the pipeline on a Kubeflow Pipelines server: compile it with the profile's ``kubernetes:``
section, check the server answers, upload it as a version of the recipe's pipeline, run that version, and
optionally follow it to the end."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tckr.core.errors import TckrError

HEALTHZ = "/apis/v2beta1/healthz"
FINAL_STATES = {"SUCCEEDED", "FAILED", "CANCELED", "SKIPPED"}


class SubmitError(TckrError, RuntimeError):
    """The KFP server cannot be reached or refused the run."""


def check_reachable(host: str, attempts: int = 3, delay: float = 0.5, timeout: float = 5.0) -> None:
    """The KFP API must answer its health check within ``attempts`` tries (kfp.Client itself would retry
    for half a minute and log a stack trace per try)."""
    url = host.rstrip("/") + HEALTHZ
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(url, timeout=timeout):
                return
        except urllib.error.HTTPError as error:  # it answered, but not as an open KFP API does
            raise SubmitError(f"{url} answered HTTP {error.code}: not a Kubeflow Pipelines API, or one behind "
                              "authentication (port-forward ml-pipeline-ui or svc/ml-pipeline instead)") from None
        except (urllib.error.URLError, OSError) as error:
            if attempt == attempts:
                reason = getattr(error, "reason", error)
                raise SubmitError(f"Kubeflow Pipelines at {host} is unreachable after {attempts} attempts "
                                  f"({reason}); check --host, or start a cluster (make run-local)") from None
            time.sleep(delay * 2 ** (attempt - 1))


@dataclass
class Submitted:
    client: Any
    run_id: str
    pipeline_id: str
    version_id: str
    version_name: str


def package_version(package: Path, profile: str) -> str:
    """A pipeline version's name: the profile and the package's content (the same package is the same version)."""
    return f"{profile}-{hashlib.sha256(package.read_bytes()).hexdigest()[:12]}"


def _named(name: str) -> str:
    """A KFP API filter: display_name equals ``name``."""
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})


def pipeline_version(client: Any, package: Path, pipeline_name: str, version_name: str, description: str,
                     version_description: str, namespace: str | None = None) -> tuple[str, str]:
    """``(pipeline_id, version_id)`` of ``package`` as version ``version_name`` of the pipeline ``pipeline_name``,
    each created only when it is not there yet: a resubmitted package reuses its version, and the UI lists every
    package ever run under its pipeline. The pipeline is created empty (``upload_pipeline`` would make the package
    its first version, named after the pipeline rather than its content)."""
    import kfp_server_api

    pipeline_id = client.get_pipeline_id(pipeline_name)
    if pipeline_id is None:
        pipeline = kfp_server_api.V2beta1Pipeline(display_name=pipeline_name, description=description,
                                                  namespace=namespace)
        pipeline_id = client._pipelines_api.pipeline_service_create_pipeline(pipeline=pipeline).pipeline_id
    listing = client.list_pipeline_versions(pipeline_id, filter=_named(version_name))
    existing = next(iter(listing.pipeline_versions or []), None)
    if existing is not None:
        return pipeline_id, existing.pipeline_version_id
    version = client.upload_pipeline_version(str(package), version_name, pipeline_id=pipeline_id,
                                             description=version_description)
    return pipeline_id, version.pipeline_version_id


def submit(host: str, compile_to: Callable[[Path], Path], arguments: dict[str, Any], run_name: str, experiment: str,
           pipeline_name: str, profile: str, description: str, version_description: str,
           namespace: str | None = None) -> Submitted:
    """Compile the pipeline (``compile_to(folder)`` writes the package and returns its path), make it a version of
    the pipeline ``pipeline_name`` (:func:`pipeline_version`) and run that version with ``arguments``. Caching is
    the compiled spec's, task by task (bookkeeping tasks never cached): kfp.Client's ``enable_caching`` would
    overwrite it on the top-level tasks (with True, an unchanged second run would reuse the first one's start,
    registration and report; with False it misses the tasks inside the exit handler), so ``--no-cache`` is
    compiled in instead."""
    import kfp
    import kfp_server_api
    import urllib3

    check_reachable(host)
    with tempfile.TemporaryDirectory(prefix="tckr-submit-") as folder:
        package = compile_to(Path(folder))
        version_name = package_version(package, profile)
        try:
            # kfp.Client prints a link per call; the caller prints the ones that matter, once.
            with contextlib.redirect_stdout(io.StringIO()):
                client = kfp.Client(host=host, namespace=namespace or "kubeflow")
                pipeline_id, version_id = pipeline_version(client, package, pipeline_name, version_name,
                                                           description, version_description, namespace)
                experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
                run = client.run_pipeline(experiment_id, run_name, params=arguments, pipeline_id=pipeline_id,
                                          version_id=version_id)
        except (kfp_server_api.ApiException, urllib3.exceptions.HTTPError, TimeoutError) as error:
            reason = getattr(error, "reason", None) or str(error).splitlines()[0]
            raise SubmitError(f"Kubeflow Pipelines at {host} refused the run: {reason}") from None
    return Submitted(client, run.run_id, pipeline_id, version_id, version_name)


def ui_links(host: str, submitted: Submitted) -> dict[str, str]:
    """The KFP UI's pages of the run and of the pipeline version it ran."""
    base = host.rstrip("/")
    return {"run": f"{base}/#/runs/details/{submitted.run_id}",
            "pipeline": f"{base}/#/pipelines/details/{submitted.pipeline_id}/version/{submitted.version_id}"}


def follow(client, run_id: str, poll_seconds: float = 15.0, echo: Callable[[str], None] = print) -> str:
    """Poll the run until it ends, echoing a line whenever its state or its tasks' states change."""
    last = None
    while True:
        run = client.get_run(run_id)
        tasks = (run.run_details.task_details if run.run_details else None) or []
        counts = Counter(str(task.state).lower() for task in tasks)
        running = sorted(task.display_name for task in tasks if task.state == "RUNNING")
        line = f"{run.state}: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        if running:
            line += f" (running: {', '.join(running)})"
        if line != last:
            echo(line)
            last = line
        if run.state in FINAL_STATES:
            return run.state
        time.sleep(poll_seconds)
