"""Prompt encoding: the demo generator's frozen text encoder (all-MiniLM-L6-v2, padded to the generator's
``max_text_tokens``) in float32 vs under bfloat16 autocast, as the generator stages encode it with mixed precision
on a CPU that computes bf16 (``pixel.encode_prompts``, and the sampler), same prompts.

The prompts are the demo's: real Fashion-MNIST images captioned by the demo's captioner and put in its template
(``{class_name}: {caption}``), deduplicated as ``PromptBank`` does. Both variants encode them batch by batch in
turn and report prompts per second; the ratio is bf16 over float32, measured in the same run. Then what bf16 does
to the states the UNet cross-attends to, after the float16 storage ``PromptBank`` keeps them in: their relative
error (the norm of the difference over the norm of float32's), set beside the error float16 storage alone adds,
and the lowest cosine similarity of one prompt's states.

    python bench/bench_text_encoder.py [--images 4096] [--batch-size 256] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch
from common import fashion_mnist, in_turns, pick_device
from PIL import Image

from tckr.core.precision import autocast
from tckr.data.ingest import FASHION_MNIST_CLASSES
from tckr.generators.caption import build_captioner
from tckr.generators.config import CaptionConfig
from tckr.generators.pixel import TextEncoder, text_encoder_path
from tckr.recipes.config import load_config


def demo_prompts(cfg: CaptionConfig, images: int, device: torch.device) -> list[str]:
    """The distinct prompts the demo's captioner and template make of ``images`` real train images."""
    pixels, labels = fashion_mnist(images)
    captions = build_captioner(cfg, device).caption([Image.fromarray(image[0].numpy()) for image in pixels])
    return sorted({cfg.template.format(class_name=FASHION_MNIST_CLASSES[int(label)], caption=caption)
                   for label, caption in zip(labels, captions, strict=True)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096, help="real images captioned into prompts")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = pick_device()
    demo = load_config("demo")
    prompts = demo_prompts(demo.caption, args.images, device)
    encoder = TextEncoder(text_encoder_path(), demo.generator.max_text_tokens, device)
    dtypes = {"float32": None, "bfloat16": torch.bfloat16}

    def encode(dtype: torch.dtype | None):
        def call(start: int, stop: int) -> list[torch.Tensor]:
            with torch.no_grad(), autocast(device, dtype):  # as pixel.encode_prompts and the sampler encode
                return list(encoder.encode(prompts[start:stop], args.batch_size))
        return call

    for dtype in dtypes.values():
        encode(dtype)(0, args.batch_size)  # warm-up: oneDNN picks its kernels on the first call
    rates, states = in_turns({name: encode(dtype) for name, dtype in dtypes.items()}, len(prompts), args.batch_size)
    for name, rate in rates.items():
        print(f"{name:>40}: {rate:8.1f} prompts/s")
    fp32_rate, bf16_rate = rates.values()
    print(f"{'bf16 speed-up':>40}: {bf16_rate / fp32_rate:8.2f}x  ({len(prompts)} distinct prompts of "
          f"{args.images} images, {encoder.max_tokens} tokens, batch {args.batch_size}, {device.type}, "
          f"{torch.get_num_threads()} threads)")
    exact, bf16 = (torch.stack(rows).float() for rows in states.values())
    stored, bf16_stored = exact.half().float(), bf16.half().float()
    print(f"{'relative error of bf16, stored in fp16':>40}: {float((bf16_stored - exact).norm() / exact.norm()):8.2%}")
    print(f"{'relative error of fp16 storage alone':>40}: {float((stored - exact).norm() / exact.norm()):8.2%}")
    cosine = torch.nn.functional.cosine_similarity(bf16_stored.flatten(1), exact.flatten(1))
    print(f"{'lowest cosine similarity of a prompt':>40}: {float(cosine.min()):8.5f}")


if __name__ == "__main__":
    main()
