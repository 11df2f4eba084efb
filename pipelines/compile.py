"""Compile every pipeline to the YAML committed beside its source (tests compare against it)."""

from __future__ import annotations

from pathlib import Path

from kfp import compiler

from tckr.pipelines.tckr_pipeline import tckr_pipeline

PIPELINES = {"tckr_pipeline.yaml": tckr_pipeline}


def compile_all(out_dir: Path | None = None) -> list[Path]:
    out_dir = out_dir or Path(__file__).parent
    written = []
    for filename, pipeline in PIPELINES.items():
        path = Path(out_dir) / filename
        compiler.Compiler().compile(pipeline, str(path))
        written.append(path)
    return written
