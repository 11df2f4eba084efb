"""Calling a declared stage: its sections typed, its artifacts and parameters passed by keyword, its
processes launched (one per GPU for a multi-GPU stage; on a many-core CPU, several for a stage of independent
items). The KFP launcher and ``tckr stage`` both go through :func:`invoke`, so a stage runs the same way in a pod,
in DVC and in a test."""

from __future__ import annotations

import functools
import json
import time
from typing import Annotated, Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from tckr.core import distributed
from tckr.core.atomic import disk_full_as_error
from tckr.core.config import format_errors
from tckr.core.errors import ConfigError
from tckr.core.stage import ALL_SECTIONS, Stage
from tckr.platform.tracking import Tracking, outage_as_error, stage_run
from tckr.recipes.config import RECIPES, Recipe, parse_config


def sections_of(cfg: Any, stage: Stage) -> dict[str, Any]:
    """The stage's sections of a validated run configuration, by keyword."""
    if stage.sections == (ALL_SECTIONS,):
        return {"config": cfg}
    return {name: getattr(cfg, name) for name in stage.sections}


def parse_sections(recipe: Recipe, stage: Stage, values: dict[str, Any]) -> dict[str, Any]:
    """The stage's sections from the values a task receives (``RunBase.task_parameter``: scalars as themselves,
    sections as their JSON text), each validated as its field of the recipe's model."""
    fields = recipe.config.model_fields

    def decoded(name: str) -> Any:
        is_section = isinstance(fields[name].annotation, type) and issubclass(fields[name].annotation, BaseModel)
        return json.loads(values[name]) if is_section and isinstance(values[name], str) else values[name]

    if stage.sections == (ALL_SECTIONS,):
        return {"config": parse_config({name: decoded(name) for name in fields},
                                       origin=f"{stage.name} task's configuration")}
    typed = {}
    for name in stage.sections:
        try:
            typed[name] = TypeAdapter(Annotated[fields[name].annotation, fields[name]]).validate_python(decoded(name))
        except ValidationError as error:
            raise ConfigError(f"invalid {name} section of the {stage.name} task: "
                              f"{format_errors(error, fields[name].annotation)}") from None
    return typed


def invoke(stage: Stage, sections: dict[str, Any], artifacts: dict[str, Any], params: dict[str, Any],
           tracking: Tracking | None) -> Any:
    """Run ``stage``: in this process, or in :func:`process_count` ranks (:mod:`tckr.core.distributed`)."""
    kwargs = {**sections, **artifacts, **params}
    if stage.own_run:  # the stage runs inside its run; ``tracking`` may then be a section it reads
        function = functools.partial(call, stage, tracking)
    else:
        function = stage.run
        kwargs |= {"tracking": tracking} if stage.tracked else {}
    count = process_count(stage, kwargs)
    with outage_as_error(stage.name), disk_full_as_error(stage.name):
        return distributed.run_stage(stage.name, function, kwargs, count,
                                     kwargs["runtime"].device if count > 1 else "")


def process_count(stage: Stage, kwargs: dict[str, Any]) -> int:
    """A multi-GPU stage: one process per GPU of its pod (``TCKR_PROCESSES``, compiled in by the cluster). Without
    a GPU, a stage of independent items (``parallel_items``): ``runtime.cpu_processes``, at most one per item.
    Any other: one."""
    if not stage.multi_gpu:
        return 1
    if distributed.processes() > 1 or stage.parallel_items is None:
        return distributed.processes()
    from tckr.core.device import resolve_device

    runtime = kwargs["runtime"]
    if resolve_device(runtime.device).type != "cpu":
        return 1
    return distributed.cpu_processes(runtime.cpu_processes, stage.parallel_items(kwargs))


def call(stage: Stage, tracking: Tracking, /, **kwargs: Any) -> Any:
    """One process's run of a stage with its own MLflow run: the run (nested under the pipeline's) gets the
    stage's sections as params, its returned metrics and ``stage.<name>.seconds``. Only the lead rank tracks.
    Positional-only: a stage may read a section named ``tracking`` among its keyword arguments."""
    import mlflow

    params = {} if stage.sections == (ALL_SECTIONS,) else {
        name: value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        for name, value in kwargs.items() if name in stage.sections}
    with stage_run(stage.name, tracking, params=params) as run:
        started = time.perf_counter()
        metrics = stage.run(**kwargs)
        if run is None:  # a rank other than the lead: its share is done, rank 0 reports
            return metrics
        metrics = {**metrics, f"stage.{stage.name}.seconds": time.perf_counter() - started}
        mlflow.log_metrics(metrics)
    return metrics


def recipe_stage(recipe: str, name: str) -> tuple[Recipe, Stage]:
    """The recipe and its stage ``name``, or a :class:`ConfigError` listing the recipe's stages."""
    if name not in RECIPES[recipe].stages:
        raise ConfigError(f"the {recipe} recipe has no stage '{name}'; its stages are "
                          f"{', '.join(RECIPES[recipe].stages.names()) or '(none yet)'}")
    return RECIPES[recipe], RECIPES[recipe].stages[name]
