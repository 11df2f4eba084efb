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
