"""Captioning throughput: the ImageNet captioner in float32 vs under bfloat16 autocast, same images, and what bf16
does to the captions.

Both variants caption the same real Fashion-MNIST images (28 px, as ingest stores them), batch by batch in turn,
and report images per second; the ratio is bf16 over float32, measured in the same run. Then how many of bf16's
captions are float32's word for word, and how many name the same first ImageNet category (the word that varies
is a near-tied second label or category).

    python bench/bench_caption.py [--images 2048] [--batch-size 256] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch
from common import fashion_mnist, in_turns, pick_device
from PIL import Image

from tckr.generators.caption import build_captioner
from tckr.generators.config import CaptionConfig


def first_category(caption: str) -> str:
    """``a dim, large, smooth object like a jersey or a cardigan`` -> ``jersey``."""
    return caption.split(" like ", 1)[1].split(" or ", 1)[0].split(" ", 1)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = pick_device()
    images, _ = fashion_mnist(args.images)
    pictures = [Image.fromarray(image[0].numpy()) for image in images]
    variants = {"float32": build_captioner(CaptionConfig(mixed_precision=False), device),
                "bfloat16": build_captioner(CaptionConfig(mixed_precision=True), device)}
    for captioner in variants.values():
        captioner.caption(pictures[:args.batch_size])  # warm-up: oneDNN picks its kernels on the first call
    rates, captions = in_turns({name: lambda start, stop, captioner=captioner: captioner.caption(pictures[start:stop])
                                for name, captioner in variants.items()}, args.images, args.batch_size)
    for name, rate in rates.items():
        print(f"{variants[name].name:>44}: {rate:8.1f} images/s")
    fp32_rate, bf16_rate = rates.values()
    print(f"{'bf16 speed-up':>44}: {bf16_rate / fp32_rate:8.2f}x  ({args.images} images, batch {args.batch_size}, "
          f"{device.type}, {torch.get_num_threads()} threads)")
    pairs = list(zip(*captions.values(), strict=True))
    print(f"{'captions word for word as float32':>44}: {sum(a == b for a, b in pairs) / len(pairs):8.1%}")
    print(f"{'same first category as float32':>44}: "
          f"{sum(first_category(a) == first_category(b) for a, b in pairs) / len(pairs):8.1%}")


if __name__ == "__main__":
    main()
