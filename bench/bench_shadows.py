"""Shadow-model training throughput: one stack of models vs one model at a time, same recipe, same epochs.

LiRA needs many shadow models of the target's recipe. "One at a time" trains each shadow alone (a
group of one); "stack, vmap" trains them as one ``ModelStack`` whose models run in a single
``torch.vmap``-ed call (``attack.vectorize: on``); "stack, looped" steps the same stack with one
model after another (``attack.vectorize: off``, what ``auto`` picks on a CPU). Every variant trains
the same shadows on the same real Fashion-MNIST population with the demo's recipe and reports
shadow models per minute; the ratios are against "one at a time", measured in the same run.

    python bench/bench_shadows.py [--shadows 8] [--population 4000] [--epochs 2] [--profile demo]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import pick_device, shadow_population, train_shadows

from tckr.privacy.lira import balanced_keep_matrix
from tckr.recipes.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shadows", type=int, default=8)
    parser.add_argument("--population", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--profile", default="demo")
    args = parser.parse_args()

    cfg = load_config(args.profile)
    recipe = cfg.teacher.model_copy(update={"epochs": args.epochs})
    device = pick_device()
    pop, validation = shadow_population(args.population, cfg.image_size)
    keep = balanced_keep_matrix(args.shadows, args.population, seed=0)
    everyone = list(range(args.shadows))

    train_shadows(recipe, [[0]], keep, pop, validation, device, False)  # warm-up: allocator, kernels
    rates = {}
    for name, groups, vectorize in (("one at a time", [[i] for i in everyone], False),
                                    ("stack, looped", [everyone], False),
                                    ("stack, vmap", [everyone], True)):
        started = time.perf_counter()
        train_shadows(recipe, groups, keep, pop, validation, device, vectorize)
        rates[name] = args.shadows / ((time.perf_counter() - started) / 60)
        print(f"{name:>16}: {rates[name]:8.1f} shadow models/min")
    for name in ("stack, looped", "stack, vmap"):
        print(f"{name + ' speed-up':>30}: {rates[name] / rates['one at a time']:6.2f}x")
    print(f"({args.shadows} shadows of {recipe.model}, {args.population // 2} images each, {args.epochs} epochs, "
          f"{cfg.image_size} px, batch {recipe.batch_size}, {device.type}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
