"""Compile a run configuration's pipeline to YAML; without one, the committed pipelines beside their source
(the files tests compare against): each recipe's reference profile, its settings as parameter defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kfp import compiler

from tckr.pipelines import privimage_pipeline, tckr_pipeline
from tckr.pipelines.build import build_pipeline
from tckr.recipes.config import load_config

GRAPHS = {"tckr": (tckr_pipeline.tckr_graph, tckr_pipeline.DESCRIPTION),
          "privimage": (privimage_pipeline.privimage_graph, privimage_pipeline.DESCRIPTION)}
COMMITTED = {"tckr": "paper-cifar10", "privimage": "paper-cifar10-privimage"}
"""Recipe -> the profile its committed YAML is compiled from (the paper's settings on GPU nodes)."""


def pipeline_for(cfg: Any, cache: bool = True):
    """``cfg``'s pipeline; ``cache=False``: no task may be served from the cache (``tckr submit --no-cache``)."""
    graph, description = GRAPHS[cfg.recipe]
    return build_pipeline(cfg, graph, description, cache)


def local_pipeline(cfg: Any):
    """``cfg``'s pipeline for ``kfp.local`` (``tckr run``): its fan-outs one task at a time, and no Kubernetes
    placement. kfp.local runs up to two loop iterations side by side, but each task's torch already uses every core
    of the one machine, so two at once only oversubscribe it. It ignores resources and volumes, yet it would give
    the tasks the environment meant for their pods' volumes (``TMPDIR=/scratch``, which does not exist here) and
    retry a failed task after the cluster's backoff (minutes, for an error that will not change)."""
    graph, description = GRAPHS[cfg.recipe]
    return build_pipeline(cfg, graph, description, parallelism=1, placed=False)


def compile_pipeline(cfg: Any, out_dir: Path, cache: bool = True) -> Path:
    """``cfg``'s pipeline as ``out_dir/<recipe>_pipeline.yaml``."""
    path = Path(out_dir) / f"{cfg.recipe}_pipeline.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_for(cfg, cache), str(path))
    return path


def compile_committed(out_dir: Path | None = None) -> list[Path]:
    out_dir = Path(out_dir or Path(__file__).parent)
    return [compile_pipeline(load_config(profile), out_dir) for profile in COMMITTED.values()]

