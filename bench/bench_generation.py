"""Generation throughput: tckr's batched sampler vs a naive per-prompt loop, same model, same steps.

The naive loop is what calling a text-to-image pipeline once per prompt does: encode the prompt,
run the solver on one image (conditional and unconditional halves in one UNet call). tckr encodes
each distinct prompt once and runs the solver on `--batch-size` images per UNet call.

    python bench/bench_generation.py [--images 256] [--steps 20] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import time

import torch

from tckr.data.ingest import FASHION_MNIST_CLASSES
from tckr.generators.pixel import (
    PixelGenerator,
    TextEncoder,
    build_noise_scheduler,
    build_unet,
    sample_pixel_images,
    text_encoder_path,
)
from tckr.recipes.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--profile", default="demo")
    args = parser.parse_args()

    cfg = load_config(args.profile)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    encoder = TextEncoder(text_encoder_path(), cfg.generator.max_text_tokens, device)
    unet = build_unet(cfg.generator, 1, cfg.image_size, encoder.dim).to(device).eval()
    generator = PixelGenerator(unet, encoder, dict(build_noise_scheduler(cfg.generator).config), cfg.image_size, 1)
    words = ["dark", "bright", "small", "large"]
    prompts = [f"{FASHION_MNIST_CLASSES[i % 10]}: a {words[(i // 10) % 4]} item" for i in range(args.images)]
    seeds = list(range(args.images))
    guidance = cfg.generate.guidance

    def naive() -> None:
        for prompt, seed in zip(prompts, seeds, strict=True):
            sample_pixel_images(generator, [prompt], [seed], args.steps, guidance, device, prompt_cache={})

    def batched() -> None:
        cache: dict[str, torch.Tensor] = {}
        for start in range(0, len(prompts), args.batch_size):
            sample_pixel_images(generator, prompts[start:start + args.batch_size], seeds[start:start + args.batch_size],
                                args.steps, guidance, device, cache)

    sample_pixel_images(generator, prompts[:2], seeds[:2], 2, guidance, device, {})  # warm-up
    rates = {}
    for name, run in (("naive per-prompt loop", naive), (f"tckr batched (batch {args.batch_size})", batched)):
        started = time.perf_counter()
        run()
        rates[name] = args.images / (time.perf_counter() - started)
        print(f"{name:>32}: {rates[name]:8.1f} images/s")
    naive_rate, batched_rate = rates.values()
    print(f"{'speed-up':>32}: {batched_rate / naive_rate:8.1f}x  ({args.images} images, {args.steps} steps, "
          f"{cfg.image_size} px, {device.type}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
