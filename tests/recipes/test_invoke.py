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


PLANS_WITHOUT_TORCH = """
import json, sys
from pathlib import Path
from tckr.recipes.config import RECIPES, load_config

folder = Path(sys.argv[1])
(folder / "captions" / "train").mkdir(parents=True)
(folder / "captions" / "train" / "run.json").write_text(json.dumps({"classes": ["a", "b"], "images": 64}))
(folder / "captions" / "train" / "captions_by_class.json").write_text(json.dumps({"a": ["an a"], "b": ["a b"]}))
(folder / "generator").mkdir()
(folder / "generator" / "generator.json").write_text(json.dumps({"classes": ["a", "b"],
                                                                 "finetuning": {"private_images": 64}}))
tckr, privimage = load_config("smoke"), load_config("smoke-privimage")
plans = [RECIPES["tckr"].stages["shadow_plan"].run(attack=tckr.attack),
         RECIPES["tckr"].stages["generation_plan"].run(generate=tckr.generate, captions=folder / "captions"),
         RECIPES["privimage"].stages["sample_plan"].run(sample=privimage.sample, generator=folder / "generator")]
imported = [name for name in ("torch", "timm", "diffusers") if name in sys.modules]
print(json.dumps({"plans": plans, "imported": imported}))
"""


def test_the_fan_out_plans_start_without_torch(tmp_path):
    """A plan task only counts shards and shadow groups: importing torch (and timm) would make it start in 5 s
    instead of 1.4 (``time tckr stage shadow_plan``, every run)."""
    import json
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", PLANS_WITHOUT_TORCH, str(tmp_path)], capture_output=True, text=True,
                            check=True, timeout=120)
    found = json.loads(result.stdout)
    assert found["imported"] == []
    assert all(plan and plan == list(range(len(plan))) for plan in found["plans"]), found["plans"]
