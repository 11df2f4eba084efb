"""One run configuration for either recipe: ``recipe: tckr | privimage`` selects the model (a discriminated
union over :class:`~tckr.recipes.base.RunBase`), profiles come from every recipe's ``profiles/`` folder,
and the recipe's stage declarations supply the Kubernetes defaults that ``kubernetes.stages`` overrides."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from tckr.core.config import StageResources, apply_override, deep_merge, read_profile, validate
from tckr.core.errors import ConfigError
from tckr.core.stage import StageRegistry
from tckr.recipes.privimage.config import PrivImageRun
from tckr.recipes.privimage.stages import STAGES as PRIVIMAGE_STAGES
from tckr.recipes.tckr.config import TckrRun
from tckr.recipes.tckr.stages import STAGES as TCKR_STAGES

RunConfig = Annotated[TckrRun | PrivImageRun, Field(discriminator="recipe")]
DEFAULT_RECIPE = "tckr"


@dataclass(frozen=True)
class Recipe:
    name: str
    config: type[TckrRun] | type[PrivImageRun]
    stages: StageRegistry


RECIPES = {recipe.name: recipe for recipe in (Recipe("tckr", TckrRun, TCKR_STAGES),
                                              Recipe("privimage", PrivImageRun, PRIVIMAGE_STAGES))}


def recipe_of(cfg: RunConfig) -> Recipe:
    return RECIPES[cfg.recipe]


def _profile_dirs() -> list[Path]:
    return [Path(str(resources.files("tckr.recipes") / name / "profiles")) for name in RECIPES]


def available_profiles() -> list[str]:
    return sorted(path.stem for folder in _profile_dirs() if folder.is_dir() for path in folder.glob("*.yaml"))


def _locate(profile: str) -> Path:
    path = Path(profile)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"profile file not found: {path}")
        return path
    for folder in _profile_dirs():
        if (folder / f"{profile}.yaml").is_file():
            return folder / f"{profile}.yaml"
    raise ConfigError(f"unknown profile '{profile}': choose one of {', '.join(available_profiles())} "
                      "or pass a path to a .yaml file")


def load_config(profile: str = "demo", overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Resolve a profile plus ``key=value`` overrides into a validated run configuration."""
    data = read_profile(profile, _locate)
    data.setdefault("profile", Path(profile).stem if profile.endswith((".yaml", ".yml")) else profile)
    for assignment in overrides:
        apply_override(data, assignment)
    return parse_config(data, origin=f"profile '{profile}'")


def parse_config(data: dict[str, Any] | str, origin: str = "config") -> RunConfig:
    """Validate a mapping (or its JSON text) as the run configuration of its ``recipe`` (default: tckr), with
    every declared stage's Kubernetes resources filled in."""
    if isinstance(data, str):
        data = json.loads(data)
    name = data.get("recipe", DEFAULT_RECIPE)
    if name not in RECIPES:
        raise ConfigError(f"invalid {origin}: recipe: unknown recipe '{name}' (choose one of {', '.join(RECIPES)})")
    recipe = RECIPES[name]
    data = {**data, "recipe": name, "kubernetes": _with_stage_resources(dict(data.get("kubernetes") or {}),
                                                                        recipe, origin)}
    return validate(recipe.config, data, origin)


def _with_stage_resources(kubernetes: dict[str, Any], recipe: Recipe, origin: str) -> dict[str, Any]:
    """``kubernetes.stages``: each declared stage's default resources with the given entry merged over them."""
    given = kubernetes.get("stages") or {}
    unknown = sorted(set(given) - set(recipe.stages.names()))
    if unknown:
        raise ConfigError(f"invalid {origin}: kubernetes.stages: unknown stages {unknown}; the {recipe.name} "
                          f"recipe's stages are {', '.join(recipe.stages.names())}")
    stages = {}
    for stage in recipe.stages:
        entry = given.get(stage.name) or {}
        merged = deep_merge(stage.resources, entry.model_dump() if isinstance(entry, StageResources) else entry)
        if merged.get("gpus", 0) > 1 and not stage.multi_gpu:
            multi = ", ".join(s.name for s in recipe.stages if s.multi_gpu)
            raise ConfigError(f"invalid {origin}: kubernetes.stages.{stage.name}.gpus: {merged['gpus']} > 1, but "
                              f"{stage.name} runs on one device (only {multi} use several); scale out with more "
                              "pods instead")
        stages[stage.name] = merged
    return {**kubernetes, "stages": stages}
