"""`tckr submit`: a clear, quick failure without a server; the run it creates (against a stand-in client)."""

import email
import http.server
import json
import re
import threading
import time
import urllib.parse

import kfp
import pytest
import yaml

import tckr.platform.submit
from tckr.cli import main
from tckr.components import default_images
from tckr.pipelines.compile import GRAPHS
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


class KfpApi(http.server.BaseHTTPRequestHandler):
    """A stand-in Kubeflow Pipelines API server (v2beta1 REST, the endpoints `tckr submit` reaches), so the real
    kfp.Client builds and sends every request as it would to a cluster. State lives on the server object."""

    def _reply(self, body: dict, status: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _named(self, items: list[dict], query: dict) -> list[dict]:
        predicates = json.loads(query["filter"][0])["predicates"] if "filter" in query else []
        return [i for i in items if all(i[p["key"]] == p["stringValue"] for p in predicates)]

    def do_GET(self):  # noqa: N802 (http.server's naming)
        state, url = self.server.state, urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        parts = url.path.removeprefix("/apis/v2beta1/").split("/")
        if parts == ["healthz"]:
            return self._reply({"multi_user": False})
        if parts == ["pipelines"]:
            return self._reply({"pipelines": self._named(state["pipelines"], query)})
        if parts[0] == "pipelines" and parts[2:] == ["versions"]:
            versions = [v for v in state["versions"] if v["pipeline_id"] == parts[1]]
            return self._reply({"pipeline_versions": self._named(versions, query)})
        if parts == ["experiments"]:
            return self._reply({"experiments": self._named(state["experiments"], query)})
        if parts[0] == "runs":
            run = next(r for r in state["runs"] if r["run_id"] == parts[1])
            final = state["states"].pop(0)
            task = {"display_name": "teacher", "state": final}
            return self._reply(run | {"state": final, "run_details": {"task_details": [task]}})
        return self._reply({"error": self.path}, 404)

    def do_POST(self):  # noqa: N802
        state, url = self.server.state, urllib.parse.urlsplit(self.path)
        query = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if url.path.endswith("/pipelines"):
            pipeline = json.loads(body) | {"pipeline_id": f"pipeline-{len(state['pipelines']) + 1}"}
            state["pipelines"].append(pipeline)
            return self._reply(pipeline)
        if url.path.endswith("/pipelines/upload_version"):
            message = email.message_from_bytes(f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + body)
            (upload,) = [part.get_payload(decode=True) for part in message.get_payload()]
            version = {"pipeline_id": query["pipelineid"], "display_name": query["name"],
                       "description": query.get("description"),
                       "pipeline_version_id": f"version-{len(state['versions']) + 1}",
                       "package": list(yaml.safe_load_all(upload))}
            state["versions"].append(version)
            return self._reply({k: v for k, v in version.items() if k != "package"})
        if url.path.endswith("/experiments"):
            experiment = json.loads(body) | {"experiment_id": f"experiment-{len(state['experiments']) + 1}"}
            state["experiments"].append(experiment)
            return self._reply(experiment)
        if url.path.endswith("/runs"):
            run = json.loads(body) | {"run_id": f"run-{len(state['runs']) + 1}"}
            state["runs"].append(run)
            return self._reply(run)
        return self._reply({"error": self.path}, 404)

    def log_message(self, *args):
        pass


@pytest.fixture
def kfp_api(monkeypatch, tmp_path):
    """The stand-in server's URL and state; kfp.Client's context file goes to a temporary home."""
    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp" / "context.json"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), KfpApi)
    server.state = {"pipelines": [], "versions": [], "experiments": [], "runs": [], "states": []}
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", server.state
    server.shutdown()


def _tasks(spec: dict) -> dict[str, dict]:
    """Every task of the top level, the exit handler's and the loops' DAGs, by name."""
    dags = [spec["root"], *spec["components"].values()]
    return {name: task for dag in dags for name, task in dag.get("dag", {}).get("tasks", {}).items()}


def test_submit_uploads_a_pipeline_version_and_runs_it_with_the_run_arguments(kfp_api, capsys):
    host, state = kfp_api
    assert main(["submit", "--host", host + "/", "--profile", "demo", "--set", "teacher.seed=7", "--no-cache"]) == 0
    cfg = load_config("demo")
    (pipeline,), (version,), (experiment,), (run,) = (state[k] for k in ("pipelines", "versions", "experiments",
                                                                           "runs"))
    assert pipeline["display_name"] == "tckr" and pipeline["description"] == GRAPHS["tckr"][1]
    assert re.fullmatch(r"demo-[0-9a-f]{12}", version["display_name"])
    assert version["description"] == f"profile demo; images {', '.join(default_images())}"
    assert version["pipeline_id"] == pipeline["pipeline_id"] and experiment["display_name"] == cfg.experiment_name
    # The run is of that version (no inline spec, no caching override) in that experiment.
    assert run["pipeline_version_reference"] == {"pipeline_id": pipeline["pipeline_id"],
                                                 "pipeline_version_id": version["pipeline_version_id"]}
    assert "pipeline_spec" not in run and run["experiment_id"] == experiment["experiment_id"]
    spec, platform = version["package"]
    assert not any(task.get("cachingOptions", {}).get("enableCache") for task in _tasks(spec).values())  # --no-cache
    arguments = run["runtime_config"]["parameters"]
    assert arguments["tracking_uri"] == cfg.kubernetes.tracking_uri and arguments["experiment"] == "tckr-fashion-mnist"
    chosen = load_config("demo", ["teacher.seed=7"])
    assert json.loads(arguments["teacher"]) == chosen.teacher.model_dump(mode="json")  # each section as JSON text
    assert set(arguments) == set(chosen.model_fields) | {"run_name", "tracking_uri", "experiment"}
    assert arguments["run_name"] == run["display_name"] and run["display_name"].endswith("-demo")
    # The demo's kubernetes section was compiled in: CPU only, 4Gi for the teacher.
    teacher = spec["deploymentSpec"]["executors"]["exec-teacher"]["container"]["resources"]
    assert teacher["resourceMemoryLimit"] == "4Gi" and "accelerator" not in teacher
    assert capsys.readouterr().out.splitlines() == [
        f"pipeline:      tckr, version {version['display_name']}: "
        f"{host}/#/pipelines/details/{pipeline['pipeline_id']}/version/{version['pipeline_version_id']}",
        f"submitted {run['display_name']}: {host}/#/runs/details/run-1"]


@pytest.mark.parametrize("no_cache", [False, True])
def test_a_resubmitted_run_reuses_its_version_and_keeps_its_bookkeeping_tasks_uncached(kfp_api, no_cache):
    """A second `tckr submit` of an unchanged config runs the same pipeline version (uploaded once) and may reuse
    training from the cache, never the MLflow parent run's start, the registration or the report (a cached
    start_run would leave the parent run RUNNING)."""
    host, state = kfp_api
    for _ in range(2):
        assert main(["submit", "--host", host, "--profile", "smoke", *(["--no-cache"] if no_cache else [])]) == 0
    assert len(state["pipelines"]) == len(state["versions"]) == len(state["experiments"]) == 1
    assert len(state["runs"]) == 2
    assert {r["pipeline_version_reference"]["pipeline_version_id"] for r in state["runs"]} == {"version-1"}
    assert all("pipeline_spec" not in run for run in state["runs"])  # no caching override sent with the run
    tasks = _tasks(state["versions"][0]["package"][0])
    assert {"start-run", "register", "report", "ingest", "teacher", "finish-run"} <= set(tasks)
    cached = {name for name, task in tasks.items() if task.get("cachingOptions", {}).get("enableCache")}
    assert not {"start-run", "register", "report"} & cached
    assert ("ingest" in cached) is not no_cache and ("teacher" in cached) is not no_cache
    # Another profile (other defaults and resources) is another version of the same pipeline.
    assert main(["submit", "--host", host, "--profile", "demo"]) == 0
    assert len(state["pipelines"]) == 1 and [v["display_name"][:5] for v in state["versions"]] == ["smoke", "demo-"]


@pytest.mark.parametrize(("final", "exit_code"), [("SUCCEEDED", 0), ("FAILED", 1)])
def test_wait_follows_the_run_to_its_end(kfp_api, monkeypatch, capsys, final, exit_code):
    host, state = kfp_api
    state["states"] = ["PENDING", "RUNNING", "RUNNING", final]
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    assert main(["submit", "--host", host, "--profile", "paper-cifar10", "--wait"]) == exit_code
    lines = capsys.readouterr().out.strip().splitlines()[2:]
    assert lines == ["PENDING: 1 pending", "RUNNING: 1 running (running: teacher)", f"{final}: 1 {final.lower()}"]
