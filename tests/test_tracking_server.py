"""Tracking through a real MLflow server whose object store fails: a clear error within bounded retries,
and nothing registered that points at missing artifacts."""

import mlflow
import pytest
import torch

from tckr.config import load_config
from tckr.services import start_mlflow, start_seaweedfs
from tckr.tracking import TrackingError, log_classifier, register_model, stage_run


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
    cfg = load_config("smoke")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()
    with stage_run("teacher", cfg, uri) as healthy:  # logs fine while the store is up
        good_uri = log_classifier(model, torch.rand(2, 1, 4, 4).numpy())
    s3_server.stop()

    with (pytest.raises(TrackingError, match="storing the model's artifacts failed.*reachable"),
          stage_run("student", cfg, uri) as broken):
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
