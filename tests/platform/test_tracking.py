"""Stages find the pipeline's parent MLflow run by the KFP run id, so no task takes the parent's id as input."""

import mlflow
import pytest

from tckr.platform.tracking import (
    KFP_RUN_ID_ENV,
    KFP_RUN_ID_TAG,
    Tracking,
    TrackingError,
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
