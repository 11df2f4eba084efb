"""The launcher inside the image: what every component's body calls. It turns the KFP calling convention
(parameters, artifact objects with ``.path`` and ``.metadata``) into the stage's keyword arguments, runs
the stage through :func:`tckr.recipes.invoke.invoke`, and hands metrics and fan-out lists back to KFP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tckr.platform.tracking import Tracking, default_tracking_uri
from tckr.recipes.invoke import invoke, parse_sections, recipe_stage


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
    tracking = (Tracking(arguments["tracking_uri"] or default_tracking_uri(), arguments["experiment"])
                if stage.tracked else None)
    result = invoke(stage, parse_sections(recipe, stage, arguments), artifacts,
                    {name: kind(arguments[name]) for name, kind in stage.params.items()}, tracking)
    if stage.returns == "metrics":
        for name, value in result.items():
            arguments["metrics"].log_metric(name, value)
        return None
    return result
