"""What a task receives (the pipeline's section parameters) turns back into exactly the stage's sections."""

import pytest

from tckr.core.errors import ConfigError
from tckr.pipelines.build import pipeline_arguments
from tckr.recipes.config import RECIPES, load_config
from tckr.recipes.invoke import parse_sections, recipe_stage, sections_of

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("profile", ["demo", "paper-cifar10"])
def test_task_parameters_round_trip_to_the_sections(profile):
    cfg = load_config(profile)
    arguments = pipeline_arguments(cfg, "run", "")
    for stage in RECIPES["tckr"].stages:
        assert parse_sections(RECIPES["tckr"], stage, arguments) == sections_of(cfg, stage), stage.name


def test_a_bad_section_or_stage_is_one_line():
    recipe, teacher = recipe_stage("tckr", "teacher")
    with pytest.raises(ConfigError, match=r"^invalid teacher section of the teacher task: epochs: Input should be "
                                          r"greater than 0 \(got 0\)$"):
        parse_sections(recipe, teacher, {"image_size": 16, "teacher": '{"model": "x", "epochs": 0}', "runtime": "{}"})
    with pytest.raises(ConfigError,
                       match="the tckr recipe has no stage 'teachr'; its stages are start_run, finish_run, ingest"):
        recipe_stage("tckr", "teachr")


def test_a_tracked_stage_reads_its_tracking_section_inside_its_own_run(tmp_path):
    """``tracking`` is both a section (what to log) and where a stage logs: a stage with its own MLflow run receives
    the section, and its run is made where the Tracking points."""
    import mlflow

    from tckr.core.config import TrackingConfig
    from tckr.core.stage import StageRegistry, resources
    from tckr.platform.tracking import Tracking
    from tckr.recipes.invoke import invoke

    registry = StageRegistry()

    def shows(*, tracking: TrackingConfig) -> dict[str, float]:
        return {"shown": float(tracking.log_real_images)}

    registry.declare(sections=("tracking",), resources=resources("1", "1", "1Gi", "1Gi"))(shows)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    metrics = invoke(registry["shows"], {"tracking": TrackingConfig(log_real_images=True)}, {}, {},
                     Tracking(uri, "sections"))
    assert metrics["shown"] == 1.0
    (run,) = mlflow.MlflowClient(uri).search_runs([mlflow.MlflowClient(uri).get_experiment_by_name("sections")
                                                   .experiment_id])
    assert run.data.tags["tckr.stage"] == "shows" and run.data.params["tracking.log_real_images"] == "True"
