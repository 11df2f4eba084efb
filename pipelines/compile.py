"""Compile every pipeline to YAML: by default beside its source, with the default ``kubernetes:``
section (the committed files tests compare against)."""

from __future__ import annotations

from pathlib import Path

from kfp import compiler

from tckr.config import KubernetesConfig
from tckr.pipelines.tckr_pipeline import build_pipeline

PIPELINES = {"tckr_pipeline.yaml": build_pipeline}


def compile_all(out_dir: Path | None = None, cluster: KubernetesConfig | None = None) -> list[Path]:
    """``cluster``: the resources, placement and secrets to compile in (default: ``KubernetesConfig()``)."""
    out_dir = Path(out_dir or Path(__file__).parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, build in PIPELINES.items():
        path = out_dir / filename
        compiler.Compiler().compile(build(cluster or KubernetesConfig()), str(path))
        written.append(path)
    return written
