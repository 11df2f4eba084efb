"""From a recipe's graph to a KFP pipeline whose parameters are the run configuration's sections.

A recipe's graph (``tckr_pipeline.tckr_graph``) says only how stages connect; :class:`Tasks` fills in
each task's own sections (from the pipeline parameters), its tracking parameters and its caching from
the stage's declaration, and :func:`build_pipeline` gives the pipeline one parameter per section, with
the compiled profile's values as defaults, then places every task on the cluster.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from kfp import dsl
from kfp.dsl.graph_component import GraphComponent

from tckr.components.factory import TRACKING_PARAMETERS, component, parameter_type, section_parameters
from tckr.core.stage import PipelineStatus
from tckr.pipelines.cluster import place_all_tasks
from tckr.recipes.config import RECIPES, recipe_of


def pipeline_arguments(cfg: Any, run_name: str, tracking_uri: str) -> dict[str, Any]:
    """A run's arguments: every section of ``cfg``, then what is per run, not a setting: the parent run's name
    (only ``start_run`` takes it, and it is never cached), the MLflow server as the pods see it (empty: the
    image's default) and the experiment (``<recipe>-<dataset>``)."""
    return {name: cfg.task_parameter(name) for name in type(cfg).model_fields} | {
        "run_name": run_name, "tracking_uri": tracking_uri, "experiment": cfg.experiment_name}


class Tasks:
    """Makes the tasks of one pipeline: ``tasks("teacher", data=...)`` passes the stage its sections."""

    def __init__(self, recipe: str, parameters: dict[str, Any], cache: bool = True, parallelism: int = 0) -> None:
        self.recipe = recipe
        self.parameters = parameters
        self.cache = cache
        self.parallelism = parallelism
        """Most pods of one fan-out at once (``dsl.ParallelFor(parallelism=...)``; 0: no limit)."""

    def __call__(self, name: str, **inputs: Any) -> dsl.PipelineTask:
        """``inputs``: other tasks' outputs and fan-out loop items, by port or parameter name; a declared
        parameter not among them (``run_name``) is the pipeline's own."""
        factory = component(self.recipe, name)
        stage = RECIPES[self.recipe].stages[name]
        arguments = {section: self.parameters[section] for section in section_parameters(self.recipe, stage)}
        arguments |= {p: self.parameters[p] for p, kind in stage.params.items()
                      if p not in inputs and kind is not PipelineStatus}
        if stage.tracked:
            arguments |= {p: self.parameters[p] for p in TRACKING_PARAMETERS}
        task = factory(**arguments, **inputs)
        if not (stage.cache and self.cache):
            task.set_caching_options(False)
        return task


def build_pipeline(cfg: Any, graph: Callable[[Tasks], None], description: str, cache: bool = True,
                   parallelism: int | None = None, placed: bool = True) -> GraphComponent:
    """``graph`` as a pipeline whose parameters are :func:`pipeline_arguments` (defaults: ``cfg``'s values, no
    run name, the image's tracking server), every task placed by ``cfg.kubernetes`` unless not ``placed``;
    ``parallelism``: the fan-outs' limit when not ``cfg.kubernetes.parallelism``."""
    if parallelism is None:
        parallelism = cfg.kubernetes.parallelism
    recipe = recipe_of(cfg)
    defaults = pipeline_arguments(cfg, run_name="", tracking_uri="")
    names = list(defaults)

    def body(*values: Any) -> None:
        tasks = Tasks(recipe.name, dict(zip(names, values, strict=True)), cache, parallelism)
        # finish_run runs however the graph ends. KFP takes no pipeline output from inside an exit handler: the
        # report is the report task's declared output (and the MLflow parent run's artifacts).
        with dsl.ExitHandler(tasks("finish_run"), name="pipeline"):
            graph(tasks)
        if placed:
            place_all_tasks(cfg.kubernetes, recipe.stages)

    types = {name: parameter_type(field.annotation) for name, field in type(cfg).model_fields.items()}
    body.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=value,
                           annotation=types.get(name, str)) for name, value in defaults.items()],
        return_annotation=None)
    body.__name__ = f"{recipe.name}_pipeline"
    return dsl.pipeline(name=recipe.name, description=description)(body)
