"""The launcher inside the image: what every component's body calls. It turns the KFP calling convention
(parameters, artifact objects with ``.path`` and ``.metadata``) into the stage's keyword arguments, runs
the stage through :func:`tckr.recipes.invoke.invoke`, and hands metrics and fan-out lists back to KFP."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tckr.components.factory import TRACKING_PARAMETERS
from tckr.core.atomic import write_text
from tckr.core.errors import TckrError, record_failure
from tckr.core.stage import PipelineStatus
from tckr.core.volume import enter_task, task_key
from tckr.platform.tracking import TASK_KEY_ENV, Tracking, default_tracking_uri
from tckr.recipes.invoke import invoke, parse_sections, recipe_stage


def task_identity(stage, arguments: dict[str, Any]) -> dict[str, Any]:
    """What a task is, the same for each retry of its pod: its inputs' URIs, its sections and its parameters (not
    its outputs' paths, which every pod gets anew, nor the tracking server)."""
    identity: dict[str, Any] = {}
    for name, port in stage.inputs.items():
        given = arguments[name]
        identity[name] = [a.uri for a in given] if port.many else given.uri
    return identity | {name: arguments[name] for name in arguments
                       if name not in identity and name not in stage.outputs and name not in TRACKING_PARAMETERS
                       and name != "metrics" and isinstance(arguments[name], str | int | float | bool)}


def launch(recipe_name: str, stage_name: str, arguments: dict[str, Any]) -> Any:
    recipe, stage = recipe_stage(recipe_name, stage_name)
    artifacts: dict[str, Any] = {}
    for name, port in stage.inputs.items():
        given = arguments[name]
        if port.kind == "metrics":
            artifacts[name] = dict(given.metadata)
        else:
            artifacts[name] = [Path(a.path) for a in given] if port.many else Path(given.path)
    for name in stage.outputs:
        artifacts[name] = Path(arguments[name].path)
    identity = task_identity(stage, arguments)
    enter_task(recipe_name, stage_name, identity)
    os.environ[TASK_KEY_ENV] = task_key(recipe_name, stage_name, identity)
    tracking = (Tracking(arguments["tracking_uri"] or default_tracking_uri(), arguments["experiment"])
                if stage.tracked else None)
    params = {name: PipelineStatus(arguments[name].state, arguments[name].error_message or "")
              if kind is PipelineStatus else kind(arguments[name]) for name, kind in stage.params.items()}
    try:
        result = invoke(stage, parse_sections(recipe, stage, arguments), artifacts, params, tracking)
    except TckrError as error:
        record_failure(error)
        raise
    for name, port in stage.outputs.items():
        if port.kind == "roc":  # the stage wrote the curve; KFP's UI draws it from the artifact's metadata
            curve = json.loads(artifacts[name].read_text())
            arguments[name].log_roc_curve(curve["fpr"], curve["tpr"], curve["thresholds"])
    if stage.returns == "metrics":
        for name, value in result.items():
            arguments["metrics"].log_metric(name, value)
        # KFP keeps metrics in the artifact's metadata; the file too makes the output complete on disk (kfp.local's
        # cache counts an output whose file is missing as not made), and readable beside the others in the store.
        Path(arguments["metrics"].path).parent.mkdir(parents=True, exist_ok=True)
        write_text(Path(arguments["metrics"].path), json.dumps(result, indent=2, sort_keys=True) + "\n")
        return None
    return result
