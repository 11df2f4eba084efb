"""Generation throughput: tckr's batched sampler vs a naive per-prompt loop, same model, same steps.

The naive loop is what calling a text-to-image pipeline once per prompt does: encode the prompt,
run the solver on one image (conditional and unconditional halves in one UNet call), in fp32. tckr
encodes each distinct prompt once and runs the solver on `--batch-size` images per UNet call, under
the generation stage's mixed precision (bf16 autocast on CPUs that compute it natively, fp16 on CUDA).

    python bench/bench_generation.py [--images 256] [--steps 20] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import caption_prompts, demo_generator, pick_device, sample_batched, sample_per_prompt, synchronize

from tckr.core.precision import autocast_dtype, precision_name
from tckr.recipes.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--profile", default="demo")
    args = parser.parse_args()

    cfg = load_config(args.profile)
    device = pick_device()
    generator = demo_generator(cfg.generator, cfg.image_size, device)
    prompts, seeds = caption_prompts(args.images), list(range(args.images))
    guidance = cfg.generate.guidance
    dtype = autocast_dtype(device, cfg.generate.mixed_precision)

    sample_batched(generator, prompts[:2], seeds[:2], 2, guidance, device, 2, dtype)  # warm-up
    rates = {}
    for name, run in (
            ("naive per-prompt loop", lambda: sample_per_prompt(generator, prompts, seeds, args.steps, guidance,
                                                                device)),
            (f"tckr batched (batch {args.batch_size}, {precision_name(dtype)})",
             lambda: sample_batched(generator, prompts, seeds, args.steps, guidance, device, args.batch_size, dtype))):
        started = time.perf_counter()
        run()
        synchronize(device)
        rates[name] = args.images / (time.perf_counter() - started)
        print(f"{name:>32}: {rates[name]:8.1f} images/s")
    naive_rate, batched_rate = rates.values()
    print(f"{'speed-up':>32}: {batched_rate / naive_rate:8.1f}x  ({args.images} images, {args.steps} steps, "
          f"{cfg.image_size} px, {device.type}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
