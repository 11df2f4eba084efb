"""Tracking through a real MLflow server: when its object store fails, a clear error within bounded
retries and nothing registered that points at missing artifacts; with a PostgreSQL backend."""

import dataclasses
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import mlflow
import pytest
import torch

from tckr.platform.services import Server, free_port, start_mlflow, start_seaweedfs
from tckr.platform.tracking import Tracking, TrackingError, log_classifier, register_model, stage_run


@pytest.fixture
def failing_store(tmp_path, monkeypatch):
    """An MLflow server whose S3 store is stopped after the first run is created."""
    s3_server, endpoint = start_seaweedfs(tmp_path / "s3")
    mlflow_server, uri = start_mlflow(tmp_path / "mlflow", endpoint)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # the default bound (3) takes ~20 s
    try:
        yield s3_server, uri
    finally:
        mlflow_server.stop()
        if s3_server.process.poll() is None:
            s3_server.stop()


def test_model_upload_to_a_down_store_fails_clearly_and_registers_nothing(failing_store):
    s3_server, uri = failing_store
    tracking = Tracking(uri, "tckr-fashion-mnist")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()
    with stage_run("teacher", tracking) as healthy:  # logs fine while the store is up
        good_uri = log_classifier(model, torch.rand(2, 1, 4, 4).numpy())
    s3_server.stop()

    with (pytest.raises(TrackingError, match="storing the model's artifacts failed.*reachable"),
          stage_run("student", tracking) as broken):
        log_classifier(model, torch.rand(2, 1, 4, 4).numpy())
    client = mlflow.MlflowClient(uri)
    assert client.get_run(broken.info.run_id).info.status == "FAILED"
    assert client.get_run(healthy.info.run_id).info.status == "FINISHED"
    logged = client.search_logged_models([broken.info.experiment_id])
    failed = [m for m in logged if m.source_run_id == broken.info.run_id]
    assert [m.status.name for m in failed] == ["FAILED"]

    with pytest.raises(TrackingError, match="not READY"):
        register_model(failed[0].model_uri, "tckr-fashion-mnist-student", {}, ("champion",))
    assert client.search_registered_models() == []
    # A model whose artifacts did land still registers (the registry itself needs no S3).
    assert register_model(good_uri, "tckr-fashion-mnist-teacher", {"aop": "0.5"}, ("champion",)) == "1"
    assert str(client.get_model_version_by_alias("tckr-fashion-mnist-teacher", "champion").version) == "1"


def _postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server from Debian's packages on a free loopback port; its URL."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("needs Debian's postgresql (`make tools` installs it as root)")
    # PostgreSQL refuses to run as root: as root, the cluster belongs to `nobody`, in a directory it can reach.
    as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="tckr-pg-"))
    if as_user:
        shutil.chown(root, "nobody")
    port = free_port()
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", "tckr", "--auth=trust"],
                   check=True, capture_output=True)
    with open(root / "postgres.log", "wb") as log:
        process = subprocess.Popen([*as_user, str(bin_dir / "postgres"), "-D", str(root / "data"), "-p", str(port),
                                    "-k", str(root), "-c", "listen_addresses=127.0.0.1"],
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server("PostgreSQL", process, "", root / "postgres.log")
    try:
        for _ in range(100):
            if subprocess.run([str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                              capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "tckr", "mlflow"],
                       check=True, capture_output=True)
        yield f"postgresql://tckr@127.0.0.1:{port}/mlflow"
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_postgresql_backend(tmp_path, s3_store, postgres_url, monkeypatch):
    """`MLFLOW_BACKEND_STORE_URI=postgresql://… make mlflow-up`: runs and the registry live in PostgreSQL,
    artifacts in S3."""
    import psycopg

    from tckr.platform.objectstore import list_keys, s3_client
    from tckr.platform.services import MLFLOW_BUCKET

    server, uri = start_mlflow(tmp_path / "mlflow", s3_store, backend_store_uri=postgres_url)
    try:
        with stage_run("teacher", Tracking(uri, "tckr-fashion-mnist")) as run:
            mlflow.log_metric("teacher.test_accuracy", 0.5)
            mlflow.log_text("logged through PostgreSQL", "notes.txt")
        assert not (tmp_path / "mlflow" / "mlflow.db").exists()
        with psycopg.connect(postgres_url) as connection, connection.cursor() as cursor:
            cursor.execute("SELECT name, status FROM runs WHERE run_uuid = %s", (run.info.run_id,))
            assert cursor.fetchall() == [("teacher", "FINISHED")]
        assert any(key.endswith(f"{run.info.run_id}/artifacts/notes.txt")
                   for key in list_keys(s3_client(s3_store), MLFLOW_BUCKET))
    finally:
        server.stop()


def test_the_server_runs_no_job_consumers(tmp_path):
    """MLflow 3 starts a job runner and half a dozen huey consumers unless told not to: tckr submits no jobs."""
    import psutil

    s3_server, endpoint = start_seaweedfs(tmp_path / "s3")
    server, uri = start_mlflow(tmp_path / "mlflow", endpoint)
    try:
        mlflow.MlflowClient(uri).search_experiments()  # up and answering
        commands = [" ".join(child.cmdline()) for child in psutil.Process(server.process.pid).children(recursive=True)]
        assert any("uvicorn" in command for command in commands), commands
        assert not any("huey" in command or "_job_runner" in command for command in commands), commands
    finally:
        server.stop()
        s3_server.stop()


def test_wrong_s3_keys_behind_the_tracking_server_fail_a_stage_in_one_line(tmp_path, monkeypatch, capsys):
    """The MLflow server's S3 keys are wrong (a rotated secret): it answers every artifact request with 500, and the
    stage ends, within its retries, with one line that names the server and points at its store."""
    from tckr.cli import main
    from tckr.platform.objectstore import S3Credentials

    s3_server, endpoint = start_seaweedfs(tmp_path / "s3")
    server, uri = start_mlflow(tmp_path / "mlflow", dataclasses.replace(endpoint, credentials=S3Credentials.generate()))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # the default bound (5) waits about 30 s
    try:
        code = main(["stage", "ingest", "--profile", "smoke", "--data", str(tmp_path / "data")])
    finally:
        server.stop()
        s3_server.stop()
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tckr:")]
    assert code == 1
    # It answers 500, or resets the connection of an upload it refuses: either reason, and both remedies.
    assert line.startswith(f"tckr: the MLflow server {uri} failed stage ingest's requests (retried for about 0 s: ")
    assert "too many 500 error responses)" in line or "Connection reset by peer)" in line, line
    assert "if it answers, its log says why (storing artifacts fails when its S3 store is down, refuses its" in line
