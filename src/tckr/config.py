"""Typed run configuration: profiles (YAML) + dotted CLI overrides, validated by pydantic.

A profile is a YAML file in ``tckr/profiles`` (or any path). It may name a parent with ``extends:``;
the child is deep-merged over the parent. ``--set a.b=value`` overrides are applied last, values are
parsed as YAML scalars (``3`` -> int, ``true`` -> bool, ``[1, 2]`` -> list).
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A profile, override or value that cannot make a valid configuration."""


class _Strict(BaseModel):
    # Unknown keys are typos until proven otherwise: refuse them instead of ignoring them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class IngestConfig(_Strict):
    """Where the private dataset comes from and how its train split is divided."""

    source: Literal["fashion-mnist", "hub", "disk", "imagefolder"] = Field(
        description="fashion-mnist: Debian package files; hub: datasets.load_dataset(name); "
        "disk: datasets.load_from_disk(name); imagefolder: a class-per-folder directory")
    name: str = Field("", description="hub id, or a local path for disk/imagefolder/fashion-mnist")
    hub_config: str | None = Field(None, description="second argument of load_dataset, e.g. 'full_size'")
    train_split: str = "train"
    test_split: str | None = Field(
        "test", description="the source's test split; null carves one from train (test_fraction)")
    image_column: str | None = Field(None, description="null: detect (an Image feature)")
    label_column: str | None = Field(None, description="null: detect (ClassLabel, or label/class/...)")
    class_name_fixes: dict[str, str] = Field(default_factory=dict, description="e.g. {cra: crab}")
    validation_fraction: float = Field(0.05, gt=0, lt=1, description="model selection only")
    holdout_fraction: float = Field(
        0.3, ge=0, lt=1, description="never trained on by the target: LiRA's non-member population")
    public_fraction: float = Field(
        0.0, ge=0, lt=1, description="disjoint public split (offline stand-in for public pretraining data)")
    test_fraction: float = Field(0.0, ge=0, lt=1, description="only used when test_split is null")
    train_limit: int | None = Field(
        None, gt=0, description="stratified cap on the source train split (quick runs); null: all")
    test_limit: int | None = Field(None, gt=0, description="stratified cap on the test split; null: all")
    seed: int = 0

    @model_validator(mode="after")
    def _fractions_leave_a_train_split(self) -> IngestConfig:
        taken = self.validation_fraction + self.holdout_fraction + self.public_fraction
        if taken >= 0.95:
            raise ValueError(
                f"validation_fraction + holdout_fraction + public_fraction = {taken:.2f} leaves "
                "less than 5% of the train split for private training")
        if self.test_split is None and self.test_fraction <= 0:
            raise ValueError("test_split is null, so test_fraction must be > 0 to carve a test split")
        if self.source != "fashion-mnist" and not self.name:
            raise ValueError(f"source '{self.source}' needs a name (hub id or path)")
        return self


class ClassifierConfig(_Strict):
    """One classifier and its training recipe: the teacher, the student and the attack's shadows."""

    model: str = Field(description="a timm model name, e.g. mobilenetv3_large_100 or tckr_cnn")
    pretrained: bool = Field(False, description="ImageNet weights from the hub (only when reachable)")
    epochs: int = Field(gt=0)
    batch_size: int = Field(96, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(5e-5, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    mixup_alpha: float = Field(0.0, ge=0, description="0 disables MixUp")
    augmix: bool = False
    crop_padding: int = Field(0, ge=0, description="random crop after zero padding by this many pixels")
    hflip: bool = True
    amp: bool = Field(True, description="mixed precision on CUDA (ignored on CPU)")
    num_workers: int = Field(0, ge=0)
    eval_batch_size: int = Field(512, gt=0)
    seed: int = 0


class CaptionConfig(_Strict):
    """Stage 2: one caption per image of the private train split (and the public split, if any)."""

    captioner: Literal["blip2", "imagenet"] = Field(
        "imagenet", description="blip2: a BLIP-2 hub model (paper); imagenet: offline ImageNet-MobileNetV2 "
        "labels + measured visual attributes (demo)")
    model: str = Field("Salesforce/blip2-opt-2.7b", description="BLIP-2 hub id or local directory")
    fp16: bool = Field(True, description="half precision on CUDA (ignored on CPU)")
    max_new_tokens: int = Field(20, gt=0)
    batch_size: int = Field(32, gt=0)
    top_labels: int = Field(2, ge=1, le=5, description="imagenet captioner: ImageNet labels named per image")
    input_size: int = Field(112, ge=32, description="imagenet captioner: resolution fed to MobileNetV2")
    template: str = Field("{class_name}: {caption}", description="the text a generator is conditioned on")
    splits: list[str] = Field(default_factory=lambda: ["train", "public"],
                              description="splits to caption (absent ones are skipped)")

    @model_validator(mode="after")
    def _template_names_both_parts(self) -> CaptionConfig:
        if "{class_name}" not in self.template or "{caption}" not in self.template:
            raise ValueError("template must contain {class_name} and {caption}")
        return self


class GeneratorConfig(_Strict):
    """Stage 3: the base text-to-image model that LoRA adapts.

    ``pixel``: a small text-conditioned diffusers UNet in pixel space, conditioned on the packaged
    all-MiniLM-L6-v2 text encoder and pretrained here on the public split (the offline stand-in for
    SD2's public pretraining). ``stable-diffusion``: a hub pipeline (paper: SD2, v-prediction).
    """

    kind: Literal["pixel", "stable-diffusion"] = "pixel"
    model: str = Field("stabilityai/stable-diffusion-2", description="stable-diffusion: hub id or directory")
    revision: str | None = Field(
        None, description="stable-diffusion: hub branch, tag or commit to pin the weights to; null: main")
    variant: str | None = Field(
        None, description="stable-diffusion: weight files variant, e.g. fp16 (half the download); null: full")
    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = Field(1, ge=1)
    attention_head_dim: int = Field(8, ge=1)
    prediction_type: Literal["epsilon", "v_prediction"] = Field(
        "epsilon", description="pixel: the training target; stable-diffusion: must match the model's scheduler")
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    max_text_tokens: int = Field(32, ge=4)
    steps: int = Field(1000, ge=1, description="pretraining optimiser steps")
    batch_size: int = Field(128, gt=0)
    lr: float = Field(1e-3, gt=0)
    caption_dropout: float = Field(0.1, ge=0, lt=1, description="empty prompt rate: enables guidance")
    ema_decay: float = Field(0.999, ge=0, lt=1)
    seed: int = 0

    @model_validator(mode="after")
    def _blocks_fit_groups(self) -> GeneratorConfig:
        if len(self.block_out_channels) < 2 or any(c % 8 for c in self.block_out_channels):
            raise ValueError("block_out_channels needs >= 2 entries, each a multiple of 8")
        return self


class FinetuneConfig(_Strict):
    """Stage 4: LoRA on the UNet's attention projections, trained on the private (image, caption) pairs."""

    rank: int = Field(4, ge=1)
    alpha: int = Field(4, ge=1)
    init: Literal["gaussian", "default"] = "gaussian"
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(1, gt=0)
    grad_accum: int = Field(4, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    random_flip: bool = True
    mixed_precision: bool = Field(True, description="fp16 autocast with fp32 LoRA weights on CUDA")
    seed: int = 420


class GenerateConfig(_Strict):
    """Stage 5: ratio x |private train| synthetic images, balanced per class, seeded per image."""

    ratio: float = Field(1.0, gt=0, description="synthetic size as a multiple of the private train size")
    steps: int = Field(20, ge=1)
    guidance: float = Field(2.0, ge=1.0)
    batch_size: int = Field(32, gt=0, description="prompts per sampler call")
    shard_size: int = Field(1024, gt=0, description="images per shard (the unit of resume and fan-out)")
    seed: int = 0


class DistillConfig(_Strict):
    """Stage 6: the student learns from the synthetic set only, through the frozen teacher's outputs."""

    loss: Literal["gkd", "kl"] = Field(
        "gkd", description="gkd: cross-entropy (student.label_smoothing) against softmax(teacher) on the same "
        "augmented batch (the reference); kl: KL(teacher/T || student/T) x T^2")
    temperature: float = Field(4.0, gt=0, description="kl only")


class AttackConfig(_Strict):
    """Stage 7: LiRA against the teacher and the student, with shadows of the teacher's recipe.

    The population is the private train split (the targets' members) plus the holdout split
    (non-members); each shadow trains on a random half of it, every example IN for half the shadows.
    ``variant`` and ``variance`` are declared here, before the run: only that variant is reported.
    """

    shadows: int = Field(16, ge=2, description="shadow models (even)")
    variant: Literal["online", "offline"] = "online"
    variance: Literal["global", "per_example"] = Field(
        "global", description="global: one pooled within-example spread (LiRA's choice for few shadows)")
    population_limit: int | None = Field(
        None, gt=1, description="cap on members and on non-members each (balanced sample); null: all of both")
    shadows_per_group: int = Field(4, ge=1, description="shadows trained together in one task (the fan-out unit)")
    vectorize: Literal["auto", "on", "off"] = Field(
        "auto", description="train a group as one vmap-ed stack (on), one model after another (off), or "
        "vmap on CUDA only (auto: on CPU a stack is slower, see bench/bench_shadows.py)")
    seed: int = 0

    @model_validator(mode="after")
    def _shadows_split_evenly(self) -> AttackConfig:
        if self.shadows % 2:
            raise ValueError(f"shadows must be even, so every example is IN for exactly half (got {self.shadows})")
        return self


class TrackingConfig(_Strict):
    experiment: str | None = Field(None, description="null: tckr-<dataset>")
    register_models: bool = True


class RuntimeConfig(_Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int = Field(0, ge=0, description="0: torch's default")


# Kubernetes quantities: CPU in cores or millicores, memory in bytes with an SI or binary suffix.
_CPU = r"^[0-9]+(\.[0-9]+)?m?$"
_MEMORY = r"^[0-9]+(\.[0-9]+)?(k|M|G|T|Ki|Mi|Gi|Ti)?$"
_SCALE = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _quantity(text: str) -> float:
    number = text.rstrip("mkMGTi")
    return float(number) * _SCALE.get(text[len(number):], 1.0)


class StageResources(_Strict):
    """What one pipeline task asks Kubernetes for."""

    cpu: str = Field(pattern=_CPU, description="CPU request: cores (4) or millicores (500m)")
    cpu_limit: str | None = Field(pattern=_CPU, description="null: no CPU limit (bursts into idle cores)")
    memory: str = Field(pattern=_MEMORY, description="memory request, e.g. 16Gi")
    memory_limit: str = Field(pattern=_MEMORY, description="above it the container is OOM-killed")
    gpus: int = Field(ge=0, description="GPUs of kubernetes.gpu_resource; more than 1 only for the stages "
                      "that divide their work across GPUs (MULTI_GPU_STAGES), one process each")
    shm: str | None = Field(pattern=_MEMORY, description="memory-backed /dev/shm for DataLoader workers "
                            "(counts against memory_limit); null: the runtime's 64 MB")

    @model_validator(mode="after")
    def _limits_cover_requests(self) -> StageResources:
        if self.cpu_limit is not None and _quantity(self.cpu_limit) < _quantity(self.cpu):
            raise ValueError(f"cpu_limit {self.cpu_limit} is below the request {self.cpu}")
        if _quantity(self.memory_limit) < _quantity(self.memory):
            raise ValueError(f"memory_limit {self.memory_limit} is below the request {self.memory}")
        return self


def _stage(cpu: str, cpu_limit: str | None, memory: str, memory_limit: str, gpus: int = 0,
           shm: str | None = None) -> dict[str, Any]:
    return {"cpu": cpu, "cpu_limit": cpu_limit, "memory": memory, "memory_limit": memory_limit, "gpus": gpus,
            "shm": shm}


# The stages whose code divides its work across several GPUs of one pod (tckr.distributed): classifier
# training as DistributedDataParallel, generation by batches, a shadow group by shadows. Captioning,
# LoRA fine-tuning and the attack's scoring run on one device.
MULTI_GPU_STAGES = ("teacher", "student", "generate_shard", "generate", "shadow_group")


# The paper profile on a cluster of GPU nodes (one 24-80 GB NVIDIA GPU per GPU task). Every stage that
# resolves a torch device gets a GPU: `runtime.device: cuda` refuses to run without one.
PAPER_STAGE_RESOURCES: dict[str, dict[str, Any]] = {
    "start_run": _stage("250m", "1", "1Gi", "2Gi"),
    "ingest": _stage("4", "8", "16Gi", "32Gi"),
    "teacher": _stage("8", "16", "32Gi", "48Gi", gpus=1, shm="8Gi"),
    "caption": _stage("4", "8", "32Gi", "48Gi", gpus=1),  # BLIP-2 2.7B loads on the host first
    "generator": _stage("2", "4", "16Gi", "24Gi"),  # SD2: checks the hub pipeline loads; trains nothing
    "finetune": _stage("8", "16", "32Gi", "48Gi", gpus=1),
    "generation_plan": _stage("500m", "2", "4Gi", "8Gi"),
    "generate_shard": _stage("4", "8", "24Gi", "32Gi", gpus=1),
    "generate": _stage("8", "16", "32Gi", "48Gi", gpus=1),  # missing shards + the teacher over all images
    "student": _stage("8", "16", "32Gi", "48Gi", gpus=1, shm="8Gi"),
    "shadow_plan": _stage("250m", "1", "1Gi", "2Gi"),
    "shadow_group": _stage("8", "16", "32Gi", "48Gi", gpus=1, shm="8Gi"),
    "attack": _stage("8", "16", "32Gi", "48Gi", gpus=1),  # both targets over the population, two queries
    "register": _stage("1", "2", "4Gi", "8Gi"),
    "report": _stage("500m", "2", "2Gi", "4Gi"),
}


class Toleration(_Strict):
    key: str
    operator: Literal["Equal", "Exists"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = "NoSchedule"


class KubernetesConfig(_Strict):
    """Cluster settings compiled into the pipeline by `tckr compile` / `tckr submit` (KFP fixes resources
    at compile time; kfp.local ignores all of them). Defaults: the paper profile on NVIDIA GPU nodes."""

    stages: dict[str, StageResources] = Field(
        default_factory=dict, validate_default=True,
        description="per KFP component; each given entry is merged over that stage's default")
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

    @field_validator("stages", mode="before")
    @classmethod
    def _merge_over_defaults(cls, given: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(given) - set(PAPER_STAGE_RESOURCES))
        if unknown:
            raise ValueError(f"unknown stages {unknown}; stages are {', '.join(PAPER_STAGE_RESOURCES)}")
        merged = {}
        for name, default in PAPER_STAGE_RESOURCES.items():
            entry = given.get(name, {})
            merged[name] = default | (entry.model_dump() if isinstance(entry, BaseModel) else entry)
        return merged

    @model_validator(mode="after")
    def _several_gpus_only_where_used(self) -> KubernetesConfig:
        for name, need in self.stages.items():
            if need.gpus > 1 and name not in MULTI_GPU_STAGES:
                raise ValueError(f"stages.{name}.gpus: {need.gpus} > 1, but {name} runs on one device (only "
                                 f"{', '.join(MULTI_GPU_STAGES)} use several); scale out with more pods instead")
        return self


class TckrConfig(_Strict):
    profile: str
    dataset: str = Field(description="short name used for experiments and registered models")
    image_size: int = Field(gt=7, description="the one resolution every stage shares")
    ingest: IngestConfig
    teacher: ClassifierConfig
    caption: CaptionConfig = CaptionConfig()
    generator: GeneratorConfig = GeneratorConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    generate: GenerateConfig = GenerateConfig()
    student: ClassifierConfig | None = Field(
        None, description="null: the teacher's architecture and recipe without MixUp (as the reference)")
    distill: DistillConfig = DistillConfig()
    attack: AttackConfig = AttackConfig()
    tracking: TrackingConfig = TrackingConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    kubernetes: KubernetesConfig = KubernetesConfig()

    @model_validator(mode="after")
    def _batches_split_evenly_over_gpus(self) -> TckrConfig:
        """Data parallelism keeps the recipe's global batch: each of n GPUs takes batch_size / n of it."""
        for stage, recipe in (("teacher", self.teacher), ("student", self.student_recipe)):
            gpus = self.kubernetes.stages[stage].gpus
            if gpus > 1 and recipe.batch_size % gpus:
                raise ValueError(f"{stage} batch_size {recipe.batch_size} does not split evenly over "
                                 f"kubernetes.stages.{stage}.gpus = {gpus}")
        return self

    @property
    def student_recipe(self) -> ClassifierConfig:
        return self.student or self.teacher.model_copy(update={"mixup_alpha": 0.0})

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or f"tckr-{self.dataset}"

    def fingerprint(self) -> str:
        """Short stable hash of every setting: names cached artifacts and tags registered models."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def available_profiles() -> list[str]:
    folder = resources.files("tckr") / "profiles"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_profile(profile: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    if profile in seen:
        raise ConfigError(f"profile inheritance loops: {' -> '.join((*seen, profile))}")
    path = Path(profile)
    if path.suffix not in (".yaml", ".yml"):
        path = Path(str(resources.files("tckr") / "profiles" / f"{profile}.yaml"))
        if not path.is_file():
            raise ConfigError(
                f"unknown profile '{profile}': choose one of {', '.join(available_profiles())} "
                "or pass a path to a .yaml file")
    elif not path.is_file():
        raise ConfigError(f"profile file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"profile {path} must be a YAML mapping")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    return _deep_merge(_read_profile(parent, (*seen, profile)), data)


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_override(data: dict[str, Any], assignment: str) -> None:
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


def _format_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown setting (typo?)"
        got = "" if item["type"] in ("missing", "extra_forbidden") else f" (got {item['input']!r})"
        lines.append(f"  {where}: {message}{got}")
    return "\n".join(lines)


def load_config(profile: str = "demo", overrides: list[str] | tuple[str, ...] = ()) -> TckrConfig:
    """Resolve a profile plus ``key=value`` overrides into a validated :class:`TckrConfig`."""
    data = _read_profile(profile)
    data.setdefault("profile", Path(profile).stem if profile.endswith((".yaml", ".yml")) else profile)
    for assignment in overrides:
        _apply_override(data, assignment)
    return parse_config(data, origin=f"profile '{profile}'")


def parse_config(data: dict[str, Any] | str, origin: str = "config") -> TckrConfig:
    """Validate a mapping (or its JSON text, as components receive it)."""
    try:
        if isinstance(data, str):
            return TckrConfig.model_validate_json(data)
        return TckrConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"invalid {origin}:\n{_format_errors(error)}") from None
