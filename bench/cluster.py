"""What a paper profile costs on a Kubeflow cluster: pods per stage, model FLOPs, GPU-hours (`make cluster-cost`).

The work of each stage is counted from the resolved profile (split sizes, epochs, synthetic ratio, sampling steps,
shadows, queries) and the FLOPs of one item from the real architectures, built on PyTorch's ``meta`` device (no
weights, no download) and counted by ``FlopCounterMode``: SD2's UNet, VAE and text encoder, BLIP-2 (ViT-g, Q-Former,
OPT-2.7B), MobileNetV3-Large. GPU-hours divide the FLOPs by a GPU's dense bf16 peak: at 100 % of it (a floor no
cluster beats) and at an assumed share of it per model size (``--utilisation-large``, ``--utilisation-small``:
assumptions, printed as such; nothing here ran on a GPU). Pods are the
compiled pipeline's tasks, with the two fan-outs expanded as the plan stages expand them. Writes
``bench/cluster.json`` and prints a table.

    python bench/cluster.py [--profile paper-cifar10] [--train-images 50000] [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from tckr.privacy.lira import training_queries
from tckr.recipes.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def flops(build, run) -> float:
    """FLOPs of ``run(model)`` for a model built on the meta device."""
    with torch.device("meta"):
        model = build()
        with FlopCounterMode(display=False) as counter:
            run(model)
    return float(counter.get_total_flops())


def sd2_flops(image_size: int) -> dict[str, float]:
    """Stable Diffusion 2's parts at ``image_size`` px (latents at 1/8), with its 77-token OpenCLIP-H prompts."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    latent = image_size // 8

    def unet():
        return UNet2DConditionModel(
            in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)

    def vae():
        return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                             block_out_channels=(128, 256, 512, 512),
                             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)

    def text():
        return CLIPTextModel(CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                            num_attention_heads=16, projection_dim=1024, hidden_act="gelu"))

    def denoise(model, backward=False):
        out = model(torch.randn(1, 4, latent, latent), torch.tensor([500]), torch.randn(1, 77, 1024)).sample
        if backward:
            out.sum().backward()

    return {
        "unet_forward": flops(unet, denoise),
        "unet_train": flops(unet, lambda m: denoise(m, backward=True)),
        "vae_decode": flops(vae, lambda m: m.decode(torch.randn(1, 4, latent, latent))),
        "vae_encode": flops(vae, lambda m: m.encode(torch.randn(1, 3, image_size, image_size))),
        "text_encode": flops(text, lambda m: m(torch.zeros(1, 77, dtype=torch.long))),
    }


def blip2_flops(new_tokens: int) -> float:
    """BLIP-2 OPT-2.7B captioning one 224 px image: the ViT-g vision tower and the Q-Former once, then OPT-2.7B over
    its 32 query embeddings, a short prompt and ``new_tokens`` generated tokens (one forward pass over the whole
    sequence: what a KV-cached generation costs). The three parts are counted apart, as BLIP-2 runs them."""
    from transformers import (
        Blip2QFormerConfig,
        Blip2QFormerModel,
        Blip2VisionConfig,
        Blip2VisionModel,
        OPTConfig,
        OPTForCausalLM,
    )

    vision = Blip2VisionConfig(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                               image_size=224, patch_size=14)
    patches = (224 // 14) ** 2 + 1
    language = OPTConfig(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32,
                         word_embed_proj_dim=2560, _attn_implementation="eager")
    sequence = 32 + 4 + new_tokens
    return (flops(lambda: Blip2VisionModel(vision), lambda m: m(pixel_values=torch.randn(1, 3, 224, 224)))
            + flops(lambda: Blip2QFormerModel(Blip2QFormerConfig(encoder_hidden_size=1408)),
                    lambda m: m(query_embeds=torch.randn(1, 32, 768),
                                encoder_hidden_states=torch.randn(1, patches, 1408)))
            + flops(lambda: OPTForCausalLM(language),
                    lambda m: m(inputs_embeds=torch.randn(1, sequence, 2560), attention_mask=None)))


@functools.cache  # the paper's student is the teacher's architecture: counted once
def classifier_flops(name: str, num_classes: int, image_size: int) -> dict[str, float]:
    """A timm classifier's forward pass, and a training step as three forwards (the backward computes gradients
    for activations and weights, each the forward's cost). Not the counter's backward: torch's conv backward
    formula ignores ``groups``, so it counts MobileNet's depthwise convolutions as dense ones (27x the forward)."""
    import timm

    forward = flops(lambda: timm.create_model(name, num_classes=num_classes),
                    lambda m: m(torch.randn(1, 3, image_size, image_size)))
    return {"train": 3 * forward, "forward": forward}


def stage_work(cfg, train_images: int, num_classes: int) -> tuple[dict, dict]:
    """Per stage: (items, FLOPs per item, what an item is, the model's size class); and the split sizes."""
    ingest = cfg.ingest
    private = int(train_images * (1 - ingest.validation_fraction - ingest.holdout_fraction - ingest.public_fraction))
    holdout = int(train_images * ingest.holdout_fraction)
    population = 2 * min(private, holdout)
    synthetic = int(round(cfg.generate.ratio * private)) // num_classes * num_classes
    sd2 = sd2_flops(cfg.image_size)
    teacher = classifier_flops(cfg.teacher.model, num_classes, cfg.image_size)
    student = classifier_flops(cfg.student.model, num_classes, cfg.image_size)
    guided = 2 if cfg.generate.guidance > 1 else 1
    queries = len(training_queries(cfg.attack.query_shift))
    targets = 2 + int(cfg.controls.positive) + int(cfg.controls.negative)
    shadow_epochs = cfg.teacher.epochs * population // 2
    work = {
        "caption": (private, blip2_flops(cfg.caption.max_new_tokens), "private image captioned", "large"),
        "finetune": (cfg.finetune.epochs * private,
                     sd2["unet_train"] + sd2["vae_encode"] + sd2["text_encode"], "LoRA training image", "large"),
        "generate": (synthetic, cfg.generate.steps * guided * sd2["unet_forward"] + sd2["vae_decode"]
                     + guided * sd2["text_encode"], "synthetic image", "large"),
        "teacher": (cfg.teacher.epochs * private, teacher["train"], "teacher training image", "small"),
        "student": (cfg.student.epochs * synthetic, student["train"] + teacher["forward"],
                    "student training image (and the teacher's soft label)", "small"),
        "positive_control": ((cfg.student.epochs * private if cfg.controls.positive else 0),
                             student["train"] + teacher["forward"], "control training image", "small"),
        "shadows": (cfg.attack.shadows * shadow_epochs, teacher["train"], "shadow training image", "small"),
        "attack": ((cfg.attack.shadows + targets) * population * queries, teacher["forward"],
                   "scored query (each model x population x augmentation)", "small"),
    }
    return work, {"private": private, "holdout": holdout, "population": population, "synthetic": synthetic}


def pods(cfg, synthetic: int) -> dict[str, int]:
    """The compiled pipeline's tasks, one pod each, with the fan-outs expanded as the plan stages expand them."""
    import yaml

    spec = next(yaml.safe_load_all((ROOT / "src" / "tckr" / "pipelines" / "tckr_pipeline.yaml").read_text()))
    shards = math.ceil(synthetic / cfg.generate.shard_size)
    groups = math.ceil(cfg.attack.shadows / cfg.attack.shadows_per_group)
    fanned = {"generate-shard": shards, "shadow-group": groups}  # KFP's task names
    counts = {}

    def walk(dag: dict) -> None:
        for task in dag.get("tasks", {}).values():
            component = spec["components"][task["componentRef"]["name"]]
            if "dag" in component:
                walk(component["dag"])
            else:
                name = task["taskInfo"]["name"]
                counts[name] = fanned.get(name, 1)

    walk(spec["root"]["dag"])
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="paper-cifar10")
    parser.add_argument("--train-images", type=int, default=50_000, help="the dataset's train split (CIFAR-10's)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    # Assumptions, not measurements (nothing here ran on a GPU): large dense transformers and UNets keep a GPU's
    # matrix units busy; MobileNetV3 (depthwise convolutions, ~1.3 GFLOPs a training image, AugMix on the CPU)
    # trains at a few thousand images/s on one datacenter GPU, about 1 % of its peak.
    parser.add_argument("--utilisation-large", type=float, default=0.3, help="assumed share of the peak: SD2, BLIP-2")
    parser.add_argument("--utilisation-small", type=float, default=0.01,
                        help="assumed share of the peak: MobileNetV3 training and scoring")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "cluster.json")
    args = parser.parse_args()
    cfg = load_config(args.profile)
    work, sizes = stage_work(cfg, args.train_images, args.classes)
    peak = args.peak_tflops * 1e12
    rows = []
    utilisation = {"large": args.utilisation_large, "small": args.utilisation_small}
    for stage, (items, per_item, unit, size) in work.items():
        total = items * per_item
        rows.append({"stage": stage, "items": items, "unit": unit, "gflops_per_item": round(per_item / 1e9, 2),
                     "pflops": round(total / 1e15, 1), "gpu_hours_at_peak": round(total / peak / 3600, 2),
                     "utilisation_assumed": utilisation[size],
                     "gpu_hours_assumed": round(total / (peak * utilisation[size]) / 3600, 2)})
    tasks = pods(cfg, sizes["synthetic"])
    result = {"profile": args.profile, "train_images": args.train_images, **sizes,
              "peak_tflops": args.peak_tflops, "stages": rows,
              "pods": tasks, "pods_total": sum(tasks.values()),
              "gpu_hours_at_peak": round(sum(r["gpu_hours_at_peak"] for r in rows), 1),
              "gpu_hours_assumed": round(sum(r["gpu_hours_assumed"] for r in rows), 1)}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.profile}: {sizes}; {result['pods_total']} pods "
          f"({tasks['generate-shard']} generation shards, {tasks['shadow-group']} shadow groups)")
    print(f"| {'stage':<16} | {'items':>13} | {'GFLOPs/item':>11} | {'PFLOPs':>7} | {'GPU-h at peak':>13} | "
          f"{'assumed share':>13} | {'GPU-h then':>10} |")
    print(f"|{'-' * 18}|{'-' * 15}|{'-' * 13}|{'-' * 9}|{'-' * 15}|{'-' * 15}|{'-' * 12}|")
    for r in rows:
        print(f"| {r['stage']:<16} | {r['items']:>13,} | {r['gflops_per_item']:>11.1f} | {r['pflops']:>7.1f} | "
              f"{r['gpu_hours_at_peak']:>13.2f} | {r['utilisation_assumed']:>13.0%} | "
              f"{r['gpu_hours_assumed']:>10.2f} |")
    print(f"total: {result['gpu_hours_at_peak']} GPU-hours at {args.peak_tflops:.0f} TFLOP/s peak, "
          f"{result['gpu_hours_assumed']} at the assumed shares")


if __name__ == "__main__":
    main()
