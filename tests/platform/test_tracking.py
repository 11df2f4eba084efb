"""Stages find the pipeline's parent MLflow run by the KFP run id, so no task takes the parent's id as input."""

import mlflow
import pytest

from tckr.platform.tracking import (
    KFP_RUN_ID_ENV,
    KFP_RUN_ID_TAG,
    Tracking,
    TrackingError,
    outage_as_error,
    retry_budget_s,
    stage_run,
    start_pipeline_run,
)

pytestmark = pytest.mark.unit  # starts no server, trains nothing beyond a few steps


def _parent_of(run) -> str | None:
    return run.data.tags.get("mlflow.parentRunId")


def test_stages_nest_under_the_parent_run_of_their_own_kfp_run(tracking_uri, monkeypatch):
    """Two pipeline runs at once in one experiment: each stage finds its own run's parent."""
    tracking = Tracking(tracking_uri, "tckr-test")
    parents = {}
    for kfp_run in ("run-a", "run-b"):
        monkeypatch.setenv(KFP_RUN_ID_ENV, kfp_run)
        parents[kfp_run] = start_pipeline_run(tracking, f"pipeline-{kfp_run}", {}, {"a": {"b": 1}}, "a:\n  b: 1\n")
    client = mlflow.MlflowClient(tracking_uri)
    assert client.get_run(parents["run-a"]).data.tags[KFP_RUN_ID_TAG] == "run-a"
    assert client.get_run(parents["run-a"]).data.params == {"a.b": "1"}
    for kfp_run in ("run-b", "run-a"):
        monkeypatch.setenv(KFP_RUN_ID_ENV, kfp_run)
        with stage_run("ingest", tracking) as run:
            stage_run_id = run.info.run_id
        assert _parent_of(client.get_run(stage_run_id)) == parents[kfp_run]


def test_outside_a_pipeline_a_stage_run_is_top_level(tracking_uri, monkeypatch):
    """``tckr stage`` and DVC: no KFP run, no parent."""
    monkeypatch.delenv(KFP_RUN_ID_ENV, raising=False)
    with stage_run("teacher", Tracking(tracking_uri, "tckr-test")) as run:
        stage_run_id = run.info.run_id
    assert _parent_of(mlflow.MlflowClient(tracking_uri).get_run(stage_run_id)) is None


def test_a_pipeline_run_without_its_parent_is_refused(tracking_uri, monkeypatch):
    tracking = Tracking(tracking_uri, "tckr-test")
    monkeypatch.delenv(KFP_RUN_ID_ENV, raising=False)
    with pytest.raises(TrackingError, match=f"{KFP_RUN_ID_ENV} is unset"):
        start_pipeline_run(tracking, "orphan", {}, {}, "")
    monkeypatch.setenv(KFP_RUN_ID_ENV, "never-started")
    with pytest.raises(TrackingError, match=f"is tagged {KFP_RUN_ID_TAG}=never-started: the pipeline's start_run"), \
            stage_run("ingest", tracking):
        pass


def test_a_stage_logs_its_datasets_figures_and_a_described_model_version(tracking_uri, monkeypatch):
    """The helpers behind MLflow's dataset view, figures beside a model and the registry's description."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from tckr.platform.tracking import log_classifier, log_dataset, log_figure_to_model_run, register_model

    monkeypatch.delenv(KFP_RUN_ID_ENV, raising=False)
    tracking = Tracking(tracking_uri, "tckr-test")
    with stage_run("teacher", tracking) as run:
        log_dataset("fashion-mnist/train", "03d92f8102b43d25", "/data/ingest", "training", 10000)
        model_uri = log_classifier(torch.nn.Flatten(), torch.zeros(2, 1, 4, 4).numpy())
    figure = plt.figure()
    log_figure_to_model_run(model_uri, figure, "mia/roc.png")  # later, from another stage's run
    plt.close(figure)
    version = register_model(model_uri, "tckr-test-teacher", {"accuracy": "0.9"}, ("champion",), "a described model")

    client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    (used,) = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert (used.dataset.name, used.dataset.digest) == ("fashion-mnist/train", "03d92f8102b43d25")
    assert {tag.key: tag.value for tag in used.tags} == {"mlflow.data.context": "training", "images": "10000"}
    assert "/data/ingest" in used.dataset.source
    assert [a.path for a in client.list_artifacts(run.info.run_id, "mia")] == ["mia/roc.png"]
    assert client.get_model_version("tckr-test-teacher", version).description == "a described model"


def test_a_server_that_stops_answering_is_one_line_naming_it_and_the_reason(monkeypatch):
    """A real MLflow HTTP client against a port nobody listens on, its retries spent: one line with the server, the
    retry budget and the reason; any other MLflow error passes through unchanged."""
    from mlflow.exceptions import MlflowException

    from tckr.platform.services import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    uri = f"http://127.0.0.1:{free_port()}"
    mlflow.set_tracking_uri(uri)
    with pytest.raises(TrackingError) as raised, outage_as_error("teacher"):
        mlflow.MlflowClient().get_experiment_by_name("tckr-test")
    message = str(raised.value)
    assert message.startswith(f"the MLflow server {uri} failed stage teacher's requests (retried for about 0 s: "
                              "Connection refused): if it is down, start it again"), message
    assert "\n" not in message and message.endswith("(tckr run --resume, or the same tckr stage command)")
    with pytest.raises(MlflowException, match="not an outage"), outage_as_error("teacher"):
        raise MlflowException("not an outage")


@pytest.mark.parametrize(("retries", "factor", "seconds"),
                         [("5", "1", 30), ("3", "1", 6), ("1", "2", 0), ("0", "1", 0)])
def test_the_retry_budget_follows_urllib3s_backoff(monkeypatch, retries, factor, seconds):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", retries)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", factor)
    assert retry_budget_s() == seconds
