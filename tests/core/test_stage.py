"""A stage is declared once: its function's signature is checked against the declaration, and the KFP component,
`tckr stage`'s options and the task's inputs all come from it."""

from pathlib import Path

import pytest

from tckr.components.factory import component, component_source, section_parameters
from tckr.core.stage import DATASET, MODEL, StageRegistry, collected, resources
from tckr.recipes.config import RECIPES

pytestmark = pytest.mark.unit
DEFAULTS = resources("1", None, "1Gi", "1Gi")


def test_a_declaration_must_match_its_function():
    stages = StageRegistry()

    @stages.declare(sections=("teacher",), inputs={"data": DATASET}, outputs={"model": MODEL}, resources=DEFAULTS)
    def train(*, teacher, data: Path, model: Path) -> dict:
        """Train."""
        return {}

    assert stages.names() == ["train"] and stages["train"].summary == "Train."
    with pytest.raises(TypeError, match=r"takes \['data', 'teacher'\], its declaration gives"):
        @stages.declare(sections=("teacher",), inputs={"data": DATASET}, outputs={"model": MODEL}, resources=DEFAULTS)
        def forgets_its_output(*, teacher, data: Path) -> dict:
            return {}
    with pytest.raises(TypeError, match="keyword-only"):
        @stages.declare(sections=(), resources=DEFAULTS, tracked=False, returns="nothing")
        def positional(data) -> None:
            pass


@pytest.mark.parametrize(("recipe", "stage"), [(recipe, stage) for recipe in ("tckr", "privimage")
                                               for stage in RECIPES[recipe].stages],
                         ids=lambda value: value if isinstance(value, str) else value.name)
def test_each_component_is_its_declaration(recipe, stage):
    """Inputs: the declared artifacts, sections and parameters, plus where to log when tracked; outputs: the
    declared artifacts plus metrics for a stage that returns them; the body is one launcher call."""
    spec = component(recipe, stage.name).component_spec
    expected_inputs = set(stage.inputs) | set(section_parameters(recipe, stage)) | set(stage.params)
    expected_inputs |= {"tracking_uri", "experiment"} if stage.tracked else set()
    assert set(spec.inputs or {}) == expected_inputs
    expected_outputs = set(stage.outputs) | ({"metrics"} if stage.returns == "metrics" else set())
    expected_outputs |= {"Output"} if stage.returns == "fan-out" else set()
    assert set(spec.outputs or {}) == expected_outputs
    for name, port in stage.inputs.items():
        assert spec.inputs[name].is_artifact_list == port.many, name
    source = component_source(recipe, stage)
    assert source.rstrip().endswith(f"launch({recipe!r}, {stage.name!r}, locals())")
    assert len(source.splitlines()) == 5  # signature, docstring, import, blank line, the call


def test_fan_ins_are_collected_artifacts():
    stages = RECIPES["tckr"].stages
    assert stages["generate"].inputs["shards"] == collected(DATASET)
    assert stages["attack"].inputs["shadows"] == collected(MODEL)
    stages = RECIPES["privimage"].stages
    assert stages["sample"].inputs["shards"] == collected(DATASET)
    assert stages["attack"].inputs["shadows"] == collected(MODEL)


def test_the_recipes_share_the_common_stages_declared_once():
    """start_run, ingest and shadow_plan are one declaration each (``recipes.common``), not two copies."""
    tckr, privimage = RECIPES["tckr"].stages, RECIPES["privimage"].stages
    for name in ("start_run", "ingest", "shadow_plan"):
        assert tckr[name] == privimage[name] and tckr[name].run is privimage[name].run, name
