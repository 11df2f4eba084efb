"""Configuration machinery shared by every recipe: strict sections, profiles (YAML) with ``extends:``,
dotted CLI overrides, one-line validation errors; and the sections every recipe shares (tracking,
runtime, Kubernetes).

A profile may name a parent with ``extends:``; the child is deep-merged over the parent. ``--set
a.b=value`` overrides are applied last, values parsed as YAML scalars (``3`` -> int, ``true`` -> bool,
``[1, 2]`` -> list). Which profiles exist and which model validates them is the recipes' business
(:mod:`tckr.recipes.config`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tckr.core.errors import ConfigError

__all__ = ["ConfigError", "Section", "TrackingConfig", "RuntimeConfig", "StageResources", "Toleration",
           "KubernetesConfig", "read_profile", "apply_override", "validate", "format_errors"]


class Section(BaseModel):
    """A configuration section. Unknown keys are typos until proven otherwise: refused, not ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TrackingConfig(Section):
    experiment: str | None = Field(None, description="null: <recipe>-<dataset>")
    log_real_images: bool = Field(False, description="show real private images where tckr would otherwise show only "
                                  "their distances: the members and holdout images nearest synthetic ones, in the "
                                  "audit's figure, the report and MLflow (off: no real image leaves the pipeline)")
    register_models: bool = Field(True, description="register teacher and student in the model registry (their "
                                  "logged models are kept with their runs either way)")


# What every ``mixed_precision`` (and the classifiers' ``amp``) setting means: :mod:`tckr.core.precision`.
MIXED_PRECISION = ("autocast where the device has a fast path: fp16 (loss-scaled) on CUDA, bf16 on CPUs with native "
                   "bf16 (AVX512-BF16, AMX), else fp32; weights and optimiser state stay fp32")


class RuntimeConfig(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int = Field(0, ge=0, description="threads per process; 0: torch's default (the process's share "
                               "of the cores)")
    cpu_processes: int | Literal["auto"] = Field(
        "auto", description="without a GPU, how many processes a stage whose work is independent items (a shadow "
        "group's models, a shard's sampling batches) runs as, each on an equal share of the cores and never more "
        "than it has items; each item is made as one process makes it (up to floating-point summation order). "
        "auto: one per 4 usable cores (1 below 8)")

    @field_validator("cpu_processes", mode="before")
    @classmethod
    def _count_or_auto(cls, value: Any) -> Any:
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError("a number of processes (1 or more), or auto")
        return value


# Kubernetes quantities: CPU in cores or millicores, memory in bytes with an SI or binary suffix.
_CPU = r"^[0-9]+(\.[0-9]+)?m?$"
_MEMORY = r"^[0-9]+(\.[0-9]+)?(k|M|G|T|Ki|Mi|Gi|Ti)?$"
_SCALE = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _quantity(text: str) -> float:
    number = text.rstrip("mkMGTi")
    return float(number) * _SCALE.get(text[len(number):], 1.0)


class StageResources(Section):
    """What one pipeline task asks Kubernetes for."""

    cpu: str = Field(pattern=_CPU, description="CPU request: cores (4) or millicores (500m)")
    cpu_limit: str | None = Field(pattern=_CPU, description="null: no CPU limit (bursts into idle cores)")
    memory: str = Field(pattern=_MEMORY, description="memory request, e.g. 16Gi")
    memory_limit: str = Field(pattern=_MEMORY, description="above it the container is OOM-killed")
    gpus: int = Field(ge=0, description="GPUs of kubernetes.gpu_resource; more than 1 only for the stages "
                      "that divide their work across GPUs (declared multi_gpu), one process each")
    shm: str | None = Field(pattern=_MEMORY, description="memory-backed /dev/shm for DataLoader workers "
                            "(counts against memory_limit); null: the runtime's 64 MB")
    scratch: str | None = Field(
        pattern=_MEMORY, description="disk for the pod's temporary files and, without work_pvc, its hub downloads: "
        "a generic ephemeral volume of this size at /scratch, provisioned per pod from "
        "kubernetes.scratch_storage_class and deleted with it, so the pod is only scheduled where the disk "
        "exists (KFP's task spec has no ephemeral-storage request); null: the node's disk, unrequested")

    @model_validator(mode="after")
    def _limits_cover_requests(self) -> StageResources:
        if self.cpu_limit is not None and _quantity(self.cpu_limit) < _quantity(self.cpu):
            raise ValueError(f"cpu_limit {self.cpu_limit} is below the request {self.cpu}")
        if _quantity(self.memory_limit) < _quantity(self.memory):
            raise ValueError(f"memory_limit {self.memory_limit} is below the request {self.memory}")
        return self


class Toleration(Section):
    key: str
    operator: Literal["Equal", "Exists"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = "NoSchedule"


class KubernetesConfig(Section):
    """Cluster settings compiled into the pipeline by `tckr compile` / `tckr submit` (KFP fixes resources
    at compile time; kfp.local ignores all of them). Defaults: NVIDIA GPU nodes, KFP's own object store."""

    stages: dict[str, StageResources] = Field(
        default_factory=dict,
        description="per stage; each given entry is merged over the default its stage declares "
        "(tckr.recipes.config.parse_config fills in every stage of the recipe)")
    gpu_resource: str = Field("nvidia.com/gpu", description="the extended resource GPU tasks request")
    gpu_node_selector: dict[str, str] = Field(
        default_factory=lambda: {"nvidia.com/gpu.present": "true"},
        description="labels of the GPU nodes (this one: NVIDIA GPU feature discovery)")
    gpu_tolerations: list[Toleration] = Field(
        default_factory=lambda: [Toleration(key="nvidia.com/gpu")], description="taints GPU nodes carry")
    s3_secret: str | None = Field(
        "mlpipeline-minio-artifact", description="secret with accesskey/secretkey for the object store (KFP's "
        "own), exposed to tracked tasks as AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY; null: none")
    s3_endpoint: str = Field("http://minio-service.kubeflow:9000",
                             description="MLFLOW_S3_ENDPOINT_URL of tracked tasks (KFP's SeaweedFS S3 service)")
    mlflow_secret: str | None = Field(
        "tckr-mlflow", description="optional secret with username/password, exposed to tracked tasks as "
        "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD; null: none")
    tracking_uri: str = Field("http://mlflow.kubeflow:5000",
                              description="the MLflow server `tckr submit` gives the run (mlflow/k8s)")
    parallelism: int = Field(8, ge=0, description="most pods of one fan-out (generation shards, shadow groups) "
                             "running at once; 0: as many as the cluster schedules")
    image: str = Field("", description="image of the CPU tasks; empty: this code's own, tagged by content "
                       "(`make images` builds and prints it)")
    cuda_image: str = Field("", description="image of the GPU tasks; empty: this code's own CUDA image")
    work_pvc: str | None = Field(
        None, description="an existing ReadWriteMany PVC every task mounts (at /mnt/tckr): the Hugging Face cache, "
        "tckr's caches (pretrained generators, FID statistics) and each task's checkpoints live there, so pods "
        "share downloads and a retried pod resumes its training; null: none, every pod starts cold")
    scratch_storage_class: str | None = Field(
        None, description="storage class of the stages' scratch volumes; null: the cluster's default class")
    retries: int = Field(2, ge=0, description="times KFP retries a failed pod of a resumable stage (backoff 1 min, "
                         "doubling); bookkeeping stages (run start, registry, report) are never retried")


def read_profile(profile: str, locate: Callable[[str], Path], seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The profile's mapping with its ``extends:`` chain merged in; ``locate`` turns a name or path into a file."""
    if profile in seen:
        raise ConfigError(f"profile inheritance loops: {' -> '.join((*seen, profile))}")
    path = locate(profile)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"profile {path} must be a YAML mapping")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    return deep_merge(read_profile(parent, locate, (*seen, profile)), data)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """``section.key=value`` into ``data`` (the value parsed as YAML)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{assignment}' must look like section.key=value")
    *parents, leaf = key.strip().split(".")
    node = data
    for name in parents:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{assignment}': '{name}' is a value, not a section")
        node = child
    node[leaf] = yaml.safe_load(raw) if raw.strip() else None


def _valid_keys(model: Any, location: tuple) -> list[str]:
    """The setting names valid where ``location`` points (for a typo's suggestion)."""
    node = model
    for part in location[:-1]:
        fields = getattr(node, "model_fields", None)
        if fields is None or part not in fields:
            return []
        node = fields[part].annotation
    return list(getattr(node, "model_fields", {}))


def format_errors(error: ValidationError, model: Any) -> str:
    """Every invalid setting of ``error`` on one line, by dotted name (a typo with its nearest valid key)."""
    problems = []
    for item in error.errors():
        location = item["loc"]
        where = ".".join(str(part) for part in location) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(location[-1]), _valid_keys(model, location), n=1)
            message = f"unknown setting (did you mean '{close[0]}'?)" if close else "unknown setting (typo?)"
        shown = item["type"] not in ("missing", "extra_forbidden") and not isinstance(item["input"], dict | list)
        got = f" (got {item['input']!r})" if shown else ""  # a whole section's input would bury the message
        problems.append(f"{where}: {message}{got}")
    return "; ".join(problems)


def validate(model: type[BaseModel], data: dict[str, Any], origin: str) -> Any:
    """Validate ``data`` as ``model``; a :class:`ConfigError` names every invalid setting, on one line."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"invalid {origin}: {format_errors(error, model)}") from None
