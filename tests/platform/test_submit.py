"""`tckr submit`: a clear, quick failure without a server; the run it creates (against a stand-in client)."""

import http.server
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import kfp
import pytest
import yaml

import tckr.platform.submit
from tckr.cli import main
from tckr.recipes.config import load_config

pytestmark = pytest.mark.unit  # starts no server, trains nothing beyond a few steps


def test_unreachable_host_fails_fast_with_one_line(capsys):
    started = time.monotonic()
    assert main(["submit", "--host", "http://127.0.0.1:9", "--profile", "smoke"]) == 1
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert err.startswith("tckr: Kubeflow Pipelines at http://127.0.0.1:9 is unreachable after 3 attempts")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_server_that_is_not_an_open_kfp_api_is_named():
    class Unauthorized(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            self.send_error(401)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Unauthorized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(tckr.platform.submit.SubmitError, match="answered HTTP 401: not a Kubeflow Pipelines API"):
            tckr.platform.submit.check_reachable(f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()


class FakeClient:
    """Stands in for kfp.Client: records the run it is asked for, then plays back run states."""

    created: list[dict] = []
    states: list[str] = []

    def __init__(self, host: str, namespace: str):
        self.host = host

    def create_run_from_pipeline_package(self, pipeline_file: str, **request):
        spec, platform = yaml.safe_load_all(Path(pipeline_file).read_text())
        FakeClient.created.append(request | {"spec": spec, "platform": platform})
        return SimpleNamespace(run_id="run-1")

    def get_run(self, run_id: str):
        state = FakeClient.states.pop(0)
        task = SimpleNamespace(display_name="teacher", state="RUNNING" if state == "RUNNING" else state)
        return SimpleNamespace(state=state, run_details=SimpleNamespace(task_details=[task]))


@pytest.fixture
def fake_kfp(monkeypatch):
    monkeypatch.setattr(kfp, "Client", FakeClient)
    monkeypatch.setattr(tckr.platform.submit, "check_reachable", lambda host: None)
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    FakeClient.created, FakeClient.states = [], []
    return FakeClient


def test_submit_compiles_the_profiles_resources_and_passes_the_run_arguments(fake_kfp, capsys):
    assert main(["submit", "--host", "http://kfp:8080/", "--profile", "demo", "--set", "teacher.seed=7",
                 "--no-cache"]) == 0
    (request,) = fake_kfp.created
    cfg = load_config("demo")
    assert request["experiment_name"] == cfg.experiment_name and "enable_caching" not in request
    spec_tasks = request["spec"]["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert not any(task.get("cachingOptions", {}).get("enableCache") for task in spec_tasks.values())  # --no-cache
    arguments = request["arguments"]
    assert arguments["tracking_uri"] == cfg.kubernetes.tracking_uri and arguments["experiment"] == "tckr-fashion-mnist"
    chosen = load_config("demo", ["teacher.seed=7"])
    assert json.loads(arguments["teacher"]) == chosen.teacher.model_dump(mode="json")  # each section as JSON text
    assert set(arguments) == set(chosen.model_fields) | {"run_name", "tracking_uri", "experiment"}
    assert arguments["run_name"] == request["run_name"] and request["run_name"].endswith("-demo")
    # The demo's kubernetes section was compiled in: CPU only, 4Gi for the teacher.
    teacher = request["spec"]["deploymentSpec"]["executors"]["exec-teacher"]["container"]["resources"]
    assert teacher["resourceMemoryLimit"] == "4Gi" and "accelerator" not in teacher
    assert capsys.readouterr().out.strip() == f"submitted {request['run_name']}: http://kfp:8080/#/runs/details/run-1"


class RecordingClient(kfp.Client):
    """The real kfp.Client up to the HTTP call: it builds the run request (job config, caching overrides) as it
    would for a server, and records it instead of sending it."""

    sent: list = []

    def __init__(self, host: str, namespace: str):  # no server: nothing is fetched at construction
        self._host = host

    def create_experiment(self, name: str, description: str | None = None, namespace: str | None = None):
        return SimpleNamespace(experiment_id="experiment-1")

    def _get_url_prefix(self) -> str:
        return self._host

    @property
    def _run_api(self):
        return SimpleNamespace(run_service_create_run=lambda run: RecordingClient.sent.append(run)
                               or SimpleNamespace(run_id=f"run-{len(RecordingClient.sent)}"))


@pytest.mark.parametrize("no_cache", [False, True])
def test_a_resubmitted_run_keeps_its_bookkeeping_tasks_uncached(monkeypatch, no_cache):
    """A second `tckr submit` of an unchanged config may reuse training from the cache, never the MLflow parent
    run's start, the registration or the report (a cached start_run would leave the parent run RUNNING)."""
    monkeypatch.setattr(kfp, "Client", RecordingClient)
    monkeypatch.setattr(tckr.platform.submit, "check_reachable", lambda host: None)
    RecordingClient.sent = []
    for _ in range(2):
        assert main(["submit", "--host", "http://kfp:8080", "--profile", "smoke",
                     *(["--no-cache"] if no_cache else [])]) == 0
    for run in RecordingClient.sent:
        spec = run.pipeline_spec["pipeline_spec"]
        dags = [spec["root"], *spec["components"].values()]  # the top level and the exit handler's and loops' DAGs
        tasks = {name: task for dag in dags for name, task in dag.get("dag", {}).get("tasks", {}).items()}
        assert {"start-run", "register", "report", "ingest", "teacher", "finish-run"} <= set(tasks)
        cached = {name for name, task in tasks.items() if task.get("cachingOptions", {}).get("enableCache")}
        assert not {"start-run", "register", "report"} & cached
        assert ("ingest" in cached) is not no_cache and ("teacher" in cached) is not no_cache


@pytest.mark.parametrize(("final", "exit_code"), [("SUCCEEDED", 0), ("FAILED", 1)])
def test_wait_follows_the_run_to_its_end(fake_kfp, capsys, final, exit_code):
    fake_kfp.states = ["PENDING", "RUNNING", "RUNNING", final]
    assert main(["submit", "--host", "http://kfp:8080", "--profile", "paper-cifar10", "--wait"]) == exit_code
    assert "enable_caching" not in fake_kfp.created[0]  # the compiled spec's caching, task by task
    lines = capsys.readouterr().out.strip().splitlines()[1:]
    assert lines == ["PENDING: 1 pending", "RUNNING: 1 running (running: teacher)", f"{final}: 1 {final.lower()}"]
