"""How a stage is declared: once, beside its function, and everything else is derived from that.

A :class:`Stage` names the config sections the stage reads, the artifacts it consumes and produces,
its plain parameters, whether it divides its work across several GPUs (and, when that work is independent
items, across several CPU processes), whether it tracks to MLflow and what it asks Kubernetes for by default.
From it come the KFP component (``tckr.components``: a typed signature whose body is one call), ``tckr stage
<name>`` (the CLI, DVC's entry point), the DVC stage's ``params:`` list, the Kubernetes resource defaults and
the pipeline task's inputs: a task receives only its own sections, so a setting of a later stage never changes
an earlier task's cache key.

Stage functions take keyword arguments only: each section by name (the validated section model), each
artifact by port name (a directory path; a list of them for a fan-in; a ``dict`` of floats for metrics) and
each parameter by name; a tracked stage runs inside its own MLflow run, or (``own_run=False``, the pipeline's
bookkeeping) receives ``tracking``, where to log.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

ArtifactKind = Literal["dataset", "model", "artifact", "metrics", "markdown", "html", "roc"]
ALL_SECTIONS = "*"
"""A stage that reads the whole configuration (only the uncached bookkeeping stages: run start, registry, report)."""


@dataclass(frozen=True)
class Port:
    """An artifact a stage reads or writes: a directory (dataset, model, artifact), a Markdown or HTML file, an ROC
    curve (outputs only: a JSON file ``{"fpr", "tpr", "thresholds"}`` that the KFP side turns into an artifact its UI
    draws) or (inputs only) another stage's metrics. ``many``: the collected outputs of a fan-out."""

    kind: ArtifactKind
    many: bool = False

    @property
    def is_file(self) -> bool:
        """A single file (its path is the file's), not a directory."""
        return self.kind in ("markdown", "html", "roc")


DATASET, MODEL, ARTIFACT, METRICS, MARKDOWN, HTML, ROC = (
    Port(kind) for kind in ("dataset", "model", "artifact", "metrics", "markdown", "html", "roc"))


@dataclass(frozen=True)
class PipelineStatus:
    """How the tasks guarded by an exit handler ended (KFP's ``PipelineTaskFinalStatus``, without KFP): a stage
    parameter of this type is filled in by the orchestrator, never passed by the pipeline."""

    state: str  # SUCCEEDED, FAILED, CANCELLED, ...
    error: str = ""


def collected(port: Port) -> Port:
    return Port(port.kind, many=True)


def resources(cpu: str, cpu_limit: str | None, memory: str, memory_limit: str, gpus: int = 0,
              shm: str | None = None, scratch: str | None = None) -> dict[str, Any]:
    """A stage's default Kubernetes request (``kubernetes.stages.<name>`` entries are merged over it)."""
    return {"cpu": cpu, "cpu_limit": cpu_limit, "memory": memory, "memory_limit": memory_limit, "gpus": gpus,
            "shm": shm, "scratch": scratch}


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[..., Any]
    sections: tuple[str, ...]
    inputs: dict[str, Port]
    outputs: dict[str, Port]
    resources: dict[str, Any]
    params: dict[str, type] = field(default_factory=dict)
    returns: Literal["metrics", "fan-out", "nothing"] = "metrics"
    tracked: bool = True
    own_run: bool = True
    multi_gpu: bool = False
    cache: bool = True
    parallel_items: Callable[[dict[str, Any]], int] | None = None

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.run) or ""

    @property
    def summary(self) -> str:
        return self.doc.split("\n\n")[0].replace("\n", " ")


class StageRegistry:
    """The ordered stages of one recipe, filled by the :meth:`declare` decorator."""

    def __init__(self) -> None:
        self._stages: dict[str, Stage] = {}

    def declare(self, *, sections: tuple[str, ...], resources: dict[str, Any], inputs: dict[str, Port] | None = None,
                outputs: dict[str, Port] | None = None, params: dict[str, type] | None = None,
                returns: Literal["metrics", "fan-out", "nothing"] = "metrics", tracked: bool = True,
                own_run: bool = True, multi_gpu: bool = False, cache: bool = True,
                parallel_items: Callable[[dict[str, Any]], int] | None = None) -> Callable[[Callable], Callable]:
        """``tracked``: the stage logs to MLflow. With ``own_run`` (the default) it is called inside its own run,
        nested under the pipeline's, which logs its sections as params, its returned metrics and
        ``stage.<name>.seconds`` (:func:`tckr.recipes.invoke.call`): the function logs only what is particular to
        it (artifacts, tags, curves) to the active run. Without, it receives ``tracking`` and manages runs itself
        (the pipeline's parent run). ``cache``: False for the bookkeeping stages a cluster must run every time.
        ``parallel_items``: for a ``multi_gpu`` stage whose ranks make independent items (shadow models, sampling
        batches), each the same whichever rank makes it, how many items a call's arguments hold: without a GPU
        it may then run as up to that many processes (``runtime.cpu_processes``)."""

        def register(function: Callable) -> Callable:
            stage = Stage(function.__name__, function, tuple(sections), dict(inputs or {}), dict(outputs or {}),
                          resources, dict(params or {}), returns, tracked, own_run and tracked, multi_gpu, cache,
                          parallel_items)
            _check_signature(stage)
            self._stages[stage.name] = stage
            return function

        return register

    def __getitem__(self, name: str) -> Stage:
        return self._stages[name]

    def __contains__(self, name: object) -> bool:
        return name in self._stages

    def __iter__(self) -> Iterator[Stage]:
        return iter(self._stages.values())

    def names(self) -> list[str]:
        return list(self._stages)


def _check_signature(stage: Stage) -> None:
    """The function must take exactly what the declaration says, by keyword: a mismatch is a bug caught at import."""
    expected = set(stage.inputs) | set(stage.outputs) | set(stage.params)
    expected |= {"tracking"} if stage.tracked and not stage.own_run else set()  # an own run: the stage is inside it
    expected |= {"config"} if stage.sections == (ALL_SECTIONS,) else set(stage.sections)
    parameters = inspect.signature(stage.run).parameters
    if any(p.kind is not inspect.Parameter.KEYWORD_ONLY for p in parameters.values()):
        raise TypeError(f"stage {stage.name}: every parameter must be keyword-only")
    if set(parameters) != expected:
        raise TypeError(f"stage {stage.name} takes {sorted(parameters)}, its declaration gives {sorted(expected)}")
    if stage.parallel_items is not None and not (stage.multi_gpu and "runtime" in stage.sections):
        raise TypeError(f"stage {stage.name}: parallel_items needs a multi_gpu stage that reads runtime")
