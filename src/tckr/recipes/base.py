"""The sections every recipe shares, and what a run configuration can say about itself."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import yaml
from pydantic import Field

from tckr.core.config import KubernetesConfig, RuntimeConfig, Section, TrackingConfig
from tckr.data.ingest import IngestConfig


class RunBase(Section):
    """A run of some recipe: the shared sections. Each recipe subclasses it with ``recipe: Literal[name]``
    (the tag of the discriminated union :data:`tckr.recipes.config.RunConfig`) and its own sections."""

    recipe: str
    profile: str
    dataset: str = Field(description="short name used for experiments and registered models")
    image_size: int = Field(gt=7, description="the one resolution every stage shares")
    ingest: IngestConfig
    tracking: TrackingConfig = TrackingConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    kubernetes: KubernetesConfig = KubernetesConfig()

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
