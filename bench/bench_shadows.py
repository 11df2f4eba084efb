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
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from tckr.data.ingest import _read_idx, fashion_mnist_dir
from tckr.privacy.lira import balanced_keep_matrix
from tckr.privacy.shadows import Population, train_shadow_group
from tckr.recipes.config import load_config


def population(size: int, image_size: int) -> tuple[Population, tuple[torch.Tensor, torch.Tensor]]:
    """The first ``size`` real train images at ``image_size`` px, and the next 1,000 for selection."""
    root = fashion_mnist_dir()
    images = torch.tensor(_read_idx(root / "train-images-idx3-ubyte.gz")[:size + 1000]).float().unsqueeze(1)
    images = torch.nn.functional.interpolate(images, size=image_size, mode="area").round().to(torch.uint8)
    labels = torch.tensor(_read_idx(root / "train-labels-idx1-ubyte.gz")[:size + 1000].astype(np.int64))
    members = np.r_[np.ones(size // 2, bool), np.zeros(size - size // 2, bool)]
    return (Population(images[:size], labels[:size], members, np.arange(size)),
            (images[size:], labels[size:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shadows", type=int, default=8)
    parser.add_argument("--population", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--profile", default="demo")
    args = parser.parse_args()

    cfg = load_config(args.profile)
    recipe = cfg.teacher.model_copy(update={"epochs": args.epochs})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pop, validation = population(args.population, cfg.image_size)
    info = SimpleNamespace(mean=[0.286], std=[0.353], num_classes=10, channels=1)
    keep = balanced_keep_matrix(args.shadows, args.population, seed=0)
    everyone = list(range(args.shadows))

    def train(groups: list[list[int]], vectorize: bool) -> None:
        with tempfile.TemporaryDirectory() as out_dir:
            for group in groups:
                train_shadow_group(recipe, group, keep, pop, validation, info, Path(out_dir), device, vectorize)

    train([[0]], False)  # warm-up: allocator, kernels
    rates = {}
    for name, groups, vectorize in (("one at a time", [[i] for i in everyone], False),
                                    ("stack, looped", [everyone], False),
                                    ("stack, vmap", [everyone], True)):
        started = time.perf_counter()
        train(groups, vectorize)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates[name] = args.shadows / ((time.perf_counter() - started) / 60)
        print(f"{name:>16}: {rates[name]:8.1f} shadow models/min")
    for name in ("stack, looped", "stack, vmap"):
        print(f"{name + ' speed-up':>30}: {rates[name] / rates['one at a time']:6.2f}x")
    print(f"({args.shadows} shadows of {recipe.model}, {args.population // 2} images each, {args.epochs} epochs, "
          f"{cfg.image_size} px, batch {recipe.batch_size}, {device.type}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
