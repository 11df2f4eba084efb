"""A shadow group in several CPU processes (``runtime.cpu_processes``) against one process on all the cores.

Both variants run the demo's shadow-group stage the way a pipeline task does (``tckr.recipes.invoke.invoke``: the
processes' start-up, each loading the population, then its share of the shadows) on the demo's real private set,
in turns, and report shadow models per minute; the ratio is the split over one process, measured in the same run.
Each shadow is its own random streams, so both make the same shadows up to floating-point summation order (the
thread count per process differs, and training amplifies it): how often they predict the same class is printed
beside.

    python bench/bench_processes.py [--processes 2] [--shadows 4] [--epochs 2] [--rounds 2] [--profile demo]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from tckr.core.distributed import usable_cores
from tckr.data.ingest import prepare
from tckr.recipes.config import load_config
from tckr.recipes.invoke import invoke, sections_of
from tckr.recipes.tckr.stages import STAGES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=max(2, usable_cores()))
    parser.add_argument("--shadows", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="turns of each variant")
    parser.add_argument("--profile", default="demo")
    args = parser.parse_args()

    stage = STAGES["shadow_group"]
    overrides = ["runtime.device=cpu", f"attack.shadows={args.shadows}", f"attack.shadows_per_group={args.shadows}",
                 f"teacher.epochs={args.epochs}"]
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        cfg = load_config(args.profile, overrides)
        prepare(cfg.ingest, scratch / "data", cfg.dataset)
        seconds = {1: 0.0, args.processes: 0.0}
        for turn in range(args.rounds):
            for processes in seconds:
                cfg = load_config(args.profile, [*overrides, f"runtime.cpu_processes={processes}"])
                out = scratch / f"shadows-{processes}-{turn}"
                started = time.perf_counter()
                invoke(stage, sections_of(cfg, stage), {"data": scratch / "data", "shadows": out}, {"group": 0}, None)
                seconds[processes] += time.perf_counter() - started
        rates = {processes: args.shadows * args.rounds / (spent / 60) for processes, spent in seconds.items()}
        logits = {processes: np.stack([np.load(scratch / f"shadows-{processes}-0" / f"shadow-{index:04d}/logits.npy")
                                       for index in range(args.shadows)]) for processes in seconds}
    cores = usable_cores()
    for processes, rate in rates.items():
        print(f"{processes} process(es), {max(1, cores // processes)} thread(s) each: {rate:8.2f} shadow models/min")
    print(f"{'speed-up':>34}: {rates[args.processes] / rates[1]:8.2f}x  ({args.shadows} shadows of "
          f"{cfg.teacher.model}, {args.epochs} epochs, {cfg.image_size} px, {cores} cores, {args.rounds} turns each)")
    one, split = logits[1], logits[args.processes]
    print(f"{'same predicted class':>34}: {(one.argmax(-1) == split.argmax(-1)).mean():8.1%}  (largest logit "
          f"difference {np.abs(one - split).max():.2g}: training amplifies the summation order)")


if __name__ == "__main__":
    main()
