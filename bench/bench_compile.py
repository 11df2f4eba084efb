"""Pipeline compilation: tckr's task placement with kfp's own container-spec check vs tckr's replacement.

kfp 2.17 calls ``inspect.stack()`` before every resource setter (``set_cpu_request``, ``set_memory_limit``, ...)
only to name the caller in an error it almost never raises; ``tckr.pipelines.cluster`` replaces that check with
one that reads the caller's frame alone. ``inspect.stack()`` looks up the module of every frame on the stack by
scanning ``sys.modules`` (until ``inspect``'s and ``linecache``'s caches hold them), so its cost grows with what
the process has imported. Each compile here starts with those caches empty, as the one compile of a ``tckr compile``,
``tckr submit`` or ``tckr run`` process does, in a process that first imports what a notebook or a test session that
compiles has (torch, mlflow, datasets; ``--bare``: nothing more). Both variants compile the same profile, in
alternating turns after a warm-up, in this process; the ratio is tckr's compiles per second over kfp's.

    python bench/bench_compile.py [--profile paper-cifar10] [--rounds 2] [--bare]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import linecache
import sys
import tempfile
import time
from pathlib import Path

from kfp.dsl import PipelineTask

from tckr.pipelines import cluster
from tckr.pipelines.compile import compile_pipeline
from tckr.recipes.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="paper-cifar10")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bare", action="store_true", help="import nothing beyond what compiling needs")
    args = parser.parse_args()
    if not args.bare:
        for library in ("torch", "mlflow", "datasets"):
            importlib.import_module(library)

    cfg = load_config(args.profile)
    variants = {"kfp": cluster.KFP_CONTAINER_SPEC_CHECK, "tckr": cluster.ensure_container_spec_exists}
    seconds = dict.fromkeys(variants, 0.0)
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.rounds + 1):  # round 0 warms both up (imports, inspect's module cache)
            for name, check in variants.items():
                PipelineTask._ensure_container_spec_exists = check
                inspect.modulesbyfile.clear()
                inspect._filesbymodname.clear()
                linecache.clearcache()
                started = time.perf_counter()
                compile_pipeline(cfg, Path(folder))
                if round_:
                    seconds[name] += time.perf_counter() - started
    PipelineTask._ensure_container_spec_exists = cluster.ensure_container_spec_exists
    rates = {name: args.rounds / spent for name, spent in seconds.items()}
    for name, rate in rates.items():
        print(f"{name + ' check':>13}: {1 / rate:6.2f} s per compile")
    print(f"{'speed-up':>13}: {rates['tckr'] / rates['kfp']:6.2f}x  ({args.profile}, {args.rounds} compiles each, "
          f"{len(sys.modules)} modules imported)")


if __name__ == "__main__":
    main()
