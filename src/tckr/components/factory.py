"""A KFP component from a stage's declaration.

KFP's lightweight components embed their function's source in the container command and call it by
name, so each component is a real function whose source is generated here from the declaration: a
typed signature and one call to the launcher. The source is registered with :mod:`linecache`, which is
where :func:`inspect.getsource` (and so KFP) reads it from.
"""

from __future__ import annotations

import functools
import linecache
from typing import Any

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from tckr.components import default_images
from tckr.core.stage import ALL_SECTIONS, PipelineStatus, Stage
from tckr.recipes.config import RECIPES

ARTIFACT_TYPES = {"dataset": "Dataset", "model": "Model", "artifact": "Artifact", "metrics": "Metrics",
                  "markdown": "Markdown", "html": "HTML", "roc": "ClassificationMetrics"}
TRACKING_PARAMETERS = ("tracking_uri", "experiment")


def parameter_type(annotation: Any) -> type:
    """A config field's KFP parameter type: a scalar's own, text for the rest (sections travel as JSON text,
    ``RunBase.task_parameter``)."""
    return annotation if annotation in (int, float, bool) else str


def section_parameters(recipe: str, stage: Stage) -> dict[str, type]:
    fields = RECIPES[recipe].config.model_fields
    names = list(fields) if stage.sections == (ALL_SECTIONS,) else stage.sections
    return {name: parameter_type(fields[name].annotation) for name in names}


def _parameter_annotation(kind: type) -> str:
    """KFP fills a ``PipelineTaskFinalStatus`` parameter itself (exit handlers); the rest are plain types."""
    return "PipelineTaskFinalStatus" if kind is PipelineStatus else kind.__name__


def component_source(recipe: str, stage: Stage) -> str:
    """The component function's source: typed signature, the stage's docstring, one launcher call."""
    signature = [f"{name}: Input[list[{ARTIFACT_TYPES[port.kind]}]]" if port.many
                 else f"{name}: Input[{ARTIFACT_TYPES[port.kind]}]" for name, port in stage.inputs.items()]
    signature += [f"{name}: {kind.__name__}" for name, kind in section_parameters(recipe, stage).items()]
    signature += [f"{name}: {_parameter_annotation(kind)}" for name, kind in stage.params.items()]
    signature += [f"{name}: str" for name in TRACKING_PARAMETERS] if stage.tracked else []
    signature += [f"{name}: Output[{ARTIFACT_TYPES[port.kind]}]" for name, port in stage.outputs.items()]
    signature += ["metrics: Output[Metrics]"] if stage.returns == "metrics" else []
    returns = " -> list" if stage.returns == "fan-out" else ""
    call = f"launch({recipe!r}, {stage.name!r}, locals())"
    doc = stage.summary.replace('"""', "'''")
    return (f"def {stage.name}({', '.join(signature)}){returns}:\n"
            f'    """{doc}"""\n'
            "    from tckr.components.launcher import launch\n\n"
            f"    {'return ' if stage.returns == 'fan-out' else ''}{call}\n")


@functools.cache
def component(recipe: str, name: str):
    """The KFP component of ``recipe``'s stage ``name`` (built once per process)."""
    stage = RECIPES[recipe].stages[name]
    source = component_source(recipe, stage)
    filename = f"<tckr.components {recipe}.{name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    namespace = {"Input": Input, "Output": Output, "Artifact": Artifact, "Dataset": Dataset, "Model": Model,
                 "Metrics": Metrics, "Markdown": Markdown, "HTML": HTML, "ClassificationMetrics": ClassificationMetrics,
                 "PipelineTaskFinalStatus": dsl.PipelineTaskFinalStatus}
    # dont_inherit: this module's `from __future__ import annotations` would turn the annotations into strings
    exec(compile(source, filename, "exec", dont_inherit=True), namespace)  # noqa: S102 - generated here, see above
    # kfp is in the image (a dependency of tckr): a pod that ran `pip install kfp` at start would need the
    # internet, which many clusters' nodes lack, and would spend seconds per pod on it.
    return dsl.component(namespace[name], base_image=default_images().cpu, install_kfp_package=False)
