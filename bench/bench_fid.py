"""FID feature throughput: Inception in float32 vs under bfloat16 autocast, same images, and what bf16 does to FID.

Both variants embed the same real Fashion-MNIST images, downsampled to `--size` px (as the pipeline's
images are) and resized to 299x299 for Inception, batch by batch in turn, and report images per second;
the ratio is bf16 over float32, measured in the same run. Then the FID between the two halves of the images, from each
variant's features: the change is what choosing bf16 costs a score.

    python bench/bench_fid.py [--images 256] [--size 16] [--batch-size 64] [--threads 2]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from common import fashion_mnist, in_turns, pick_device

from tckr.generators.fid import FeatureStatistics, InceptionFeatures, frechet_distance


def halves_fid(features: np.ndarray) -> float:
    half = len(features) // 2
    return frechet_distance(FeatureStatistics.of(features[:half]), FeatureStatistics.of(features[half:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = pick_device()
    images, _ = fashion_mnist(args.images, args.size)
    variants = {str(dtype).removeprefix("torch."): InceptionFeatures(device, args.batch_size, dtype)
                for dtype in (torch.float32, torch.bfloat16)}
    for inception in variants.values():
        for _ in range(2):  # TorchScript profiles its first calls before it optimises
            inception(images[:args.batch_size])
    rates, features = in_turns({name: lambda start, stop, inception=inception: list(inception(images[start:stop]))
                                for name, inception in variants.items()}, args.images, args.batch_size)
    for name, rate in rates.items():
        print(f"{name:>24}: {rate:8.1f} images/s")
    fp32_rate, bf16_rate = rates.values()
    print(f"{'bf16 speed-up':>24}: {bf16_rate / fp32_rate:8.2f}x  ({args.images} images, {args.size} px -> 299, "
          f"batch {args.batch_size}, {device.type}, {torch.get_num_threads()} threads)")

    fp32, bf16 = (np.stack(rows) for rows in features.values())
    fp32_fid, bf16_fid = halves_fid(fp32), halves_fid(bf16)
    print(f"{'feature change':>24}: {np.abs(bf16 - fp32).max() / np.abs(fp32).max():8.2%} of the largest feature")
    print(f"{'FID halves, float32':>24}: {fp32_fid:8.3f}")
    print(f"{'FID halves, bfloat16':>24}: {bf16_fid:8.3f}  ({bf16_fid / fp32_fid - 1:+.2%})")


if __name__ == "__main__":
    main()
