"""The sections every recipe shares, and what a run configuration can say about itself."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import yaml
from pydantic import Field, model_validator

from tckr.core.config import KubernetesConfig, RuntimeConfig, Section, TrackingConfig
from tckr.core.seeds import section_seed
from tckr.data.ingest import IngestConfig


class RunBase(Section):
    """A run of some recipe: the shared sections. Each recipe subclasses it with ``recipe: Literal[name]``
    (the tag of the discriminated union :data:`tckr.recipes.config.RunConfig`) and its own sections."""

    recipe: str
    profile: str
    seed: int = Field(0, ge=0, description="the run's root seed: each section's seed that is not set explicitly is "
                      "derived from it and the section's name (tckr.core.seeds.section_seed)")
    dataset: str = Field(description="short name used for experiments and registered models")
    image_size: int = Field(gt=7, description="the one resolution every stage shares")
    ingest: IngestConfig
    tracking: TrackingConfig = TrackingConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    kubernetes: KubernetesConfig = KubernetesConfig()

    @model_validator(mode="after")
    def _section_seeds_from_the_root(self) -> RunBase:
        """One root seed per run: every section whose seed the profile leaves unset gets its own, derived from the
        root and its name, so no two roles share a stream by accident and ``--set seed=N`` reseeds the whole run.
        Resolved here, so a task (and a saved config) sees the derived seed as an explicit one."""
        for name in type(self).model_fields:
            section = getattr(self, name)
            if (isinstance(section, Section) and "seed" in type(section).model_fields
                    and "seed" not in section.model_fields_set):
                section.seed = section_seed(self.seed, name)
        return self

    @property
    def experiment_name(self) -> str:
        """One MLflow experiment per recipe and dataset (``tckr-fashion-mnist``, ``privimage-fashion-mnist``)."""
        return self.tracking.experiment or f"{self.recipe}-{self.dataset}"

    def registered_model_name(self, role: str) -> str:
        """Registered models are named by recipe too, so one recipe's model never takes another's alias."""
        return f"{self.recipe}-{self.dataset}-{role}"

    def fingerprint(self) -> str:
        """Short stable hash of every setting: tags registered models and the pipeline's parent run."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def task_parameter(self, name: str) -> Any:
        """A section as a pipeline task receives it: a scalar as itself, a section as its JSON text (a protobuf
        Struct would refuse its nulls and turn its integers into floats); :func:`tckr.recipes.invoke.parse_sections`
        reads it back."""
        value = getattr(self, name)
        return value.model_dump_json() if isinstance(value, Section) else value
