"""Run the pipeline on a Kubeflow Pipelines server: compile it with the profile's ``kubernetes:``
section, check the server answers, create the run, and optionally follow it to the end."""

from __future__ import annotations

import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
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


def submit(host: str, compile_to: Callable[[Path], Path], arguments: dict[str, Any], run_name: str, experiment: str,
           namespace: str | None = None):
    """Compile the pipeline (``compile_to(folder)`` writes the package and returns its path) and create the run
    with ``arguments``; returns ``(client, run_id)``. Caching is the compiled spec's, task by task (bookkeeping
    tasks never cached): kfp.Client's ``enable_caching`` would overwrite it on the top-level tasks (with True, an
    unchanged second run would reuse the first one's start, registration and report; with False it misses the
    tasks inside the exit handler), so ``--no-cache`` is compiled in instead."""
    import kfp
    import kfp_server_api
    import urllib3

    check_reachable(host)
    with tempfile.TemporaryDirectory(prefix="tckr-submit-") as folder:
        package = compile_to(Path(folder))
        try:
            client = kfp.Client(host=host, namespace=namespace or "kubeflow")
            result = client.create_run_from_pipeline_package(
                str(package), arguments=arguments, run_name=run_name, experiment_name=experiment, namespace=namespace)
        except (kfp_server_api.ApiException, urllib3.exceptions.HTTPError, TimeoutError) as error:
            reason = getattr(error, "reason", None) or str(error).splitlines()[0]
            raise SubmitError(f"Kubeflow Pipelines at {host} refused the run: {reason}") from None
    return client, result.run_id


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
