"""Stage 4: LoRA fine-tuning of the generator's UNet on the private (image, caption) pairs.

The recipe follows diffusers' ``train_text_to_image_lora.py``: a peft ``LoraConfig`` on the UNet's
attention projections only, the base frozen, the adapter kept in fp32 even when the forward pass
runs in fp16, and only the adapter saved (diffusers format, ``pytorch_lora_weights.safetensors``).
Both kinds of generator train through the same loop: the pixel UNet on pixels, Stable Diffusion's
UNet on VAE latents computed once up front.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tckr.core.errors import ConfigError
from tckr.core.volume import checkpoint_location
from tckr.generators import stable_diffusion
from tckr.generators.config import FinetuneConfig, GeneratorError
from tckr.generators.generate import ImageGenerator
from tckr.generators.pixel import (
    DenoiserData,
    PixelGenerator,
    PromptBank,
    encode_prompts,
    read_card,
    steps_for_epochs,
    train_denoiser,
)

ADAPTER_FILE = "pytorch_lora_weights.safetensors"


def add_lora(unet: nn.Module, cfg: FinetuneConfig) -> list[nn.Parameter]:
    """Freeze the UNet, attach the adapter, return its (fp32) parameters."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=cfg.target_modules,
                                init_lora_weights="gaussian" if cfg.init == "gaussian" else True))
    parameters = [p for p in unet.parameters() if p.requires_grad]
    if not parameters:
        raise ConfigError(f"no UNet module matches finetune.target_modules={cfg.target_modules}")
    for parameter in parameters:
        parameter.data = parameter.data.float()
    return parameters


def save_adapter(unet: nn.Module, out_dir: Path) -> Path:
    """Adapter-only safetensors in diffusers format (keys prefixed ``unet.``)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionLoraLoaderMixin.save_lora_weights(str(out_dir), unet_lora_layers=state, weight_name=ADAPTER_FILE,
                                                     safe_serialization=True)
    return Path(out_dir) / ADAPTER_FILE


def check_adapter_fits(unet: nn.Module, adapter_dir: Path, generator_dir: Path) -> None:
    """An adapter trained on another base model names modules this UNet lacks, or widths it does not have: loading
    it would fail deep inside diffusers with a screen of size mismatches. Checked from the file's shapes alone."""
    from safetensors import safe_open

    if not (Path(adapter_dir) / ADAPTER_FILE).is_file():
        raise GeneratorError(f"no LoRA adapter ({ADAPTER_FILE}) in {adapter_dir}")
    modules = dict(unet.named_modules())
    with safe_open(str(Path(adapter_dir) / ADAPTER_FILE), "pt") as weights:
        for key in weights.keys():  # noqa: SIM118 (a safetensors handle is not a mapping)
            name, _, part = key.removeprefix("unet.").rpartition(".lora.")
            side = "in" if part.startswith("down") else "out"  # down: [rank, in]; up: [out, rank]
            shape = weights.get_slice(key).get_shape()
            found = shape[-1] if side == "in" else shape[0]
            layer = modules.get(name)
            expected = getattr(layer, f"{side}_features", getattr(layer, f"{side}_channels", None))
            if found != expected:
                what = (f"this base has no module {name}" if layer is None else
                        f"its {name} has {found} {side}put features, this base's {expected}")
                raise GeneratorError(f"the LoRA adapter in {adapter_dir} was made for another base model than the "
                                     f"one in {generator_dir} ({what}): fine-tune an adapter on this base (tckr stage "
                                     "finetune), or give the base it was made for")


def finetune_generator(generator_dir: Path, images: torch.Tensor, texts: list[str], cfg: FinetuneConfig,
                       out_dir: Path, device: torch.device,
                       on_step: Callable[[int, float], None] | None = None) -> dict:
    """LoRA for whichever kind of base generator ``generator_dir`` holds (its card says)."""
    if read_card(generator_dir)["kind"] == stable_diffusion.KIND:
        return finetune_stable_diffusion(generator_dir, images, texts, cfg, out_dir, device, on_step)
    return finetune_pixel_generator(generator_dir, images, texts, cfg, out_dir, device, on_step)


def finetune_pixel_generator(generator_dir: Path, images: torch.Tensor, texts: list[str], cfg: FinetuneConfig,
                             out_dir: Path, device: torch.device,
                             on_step: Callable[[int, float], None] | None = None) -> dict:
    """Train a LoRA adapter for the saved base generator on (image, caption) pairs; resumable."""
    from diffusers import DDPMScheduler

    _check_pairs(images, texts)
    generator = PixelGenerator.load(generator_dir, device)
    data = DenoiserData(images, encode_prompts(generator.text_encoder, texts, device, cfg.mixed_precision))
    return train_adapter(generator.unet, data, DDPMScheduler.from_config(generator.scheduler_config), cfg, out_dir,
                         device, on_step)


def finetune_stable_diffusion(generator_dir: Path, images: torch.Tensor, texts: list[str], cfg: FinetuneConfig,
                              out_dir: Path, device: torch.device,
                              on_step: Callable[[int, float], None] | None = None) -> dict:
    """LoRA on a Stable Diffusion UNet in latent space (diffusers' ``train_text_to_image_lora.py``).

    ``images`` are uint8 RGB at the pipeline resolution (resized and centre-cropped when decoded).
    Latents of the images and of their mirror images, and the states of each distinct caption, are
    computed once, so each step runs the UNet only; random flip picks a precomputed latent per sample.
    """
    from diffusers import DDPMScheduler

    _check_pairs(images, texts)
    pipe = stable_diffusion.load_card_pipeline(read_card(generator_dir), device,
                                               stable_diffusion.weights_dtype(device, cfg.mixed_precision))
    mirrored = stable_diffusion.encode_latents(pipe.vae, images, cfg.seed, mirror=True) if cfg.random_flip else None
    data = DenoiserData(stable_diffusion.encode_latents(pipe.vae, images, cfg.seed, mirror=False),
                        PromptBank.build(stable_diffusion.PipelinePromptEncoder(pipe), texts), mirrored)
    return train_adapter(pipe.unet, data, DDPMScheduler.from_config(pipe.scheduler.config), cfg, out_dir, device,
                         on_step)


def train_adapter(unet: nn.Module, data: DenoiserData, noise_scheduler, cfg: FinetuneConfig, out_dir: Path,
                  device: torch.device, on_step: Callable[[int, float], None] | None = None) -> dict:
    """Attach a LoRA to ``unet``, train it on ``data`` (resumable), save the adapter, loss curve and summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)  # the adapter's initial weights
    parameters = add_lora(unet, cfg)
    steps = steps_for_epochs(len(data), cfg.epochs, cfg.batch_size, cfg.grad_accum)
    started = time.perf_counter()
    losses = train_denoiser(
        unet, parameters, data, noise_scheduler, steps=steps, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
        lr=cfg.lr, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, caption_dropout=0.0,
        random_flip=cfg.random_flip, seed=cfg.seed, device=device, checkpoint=out_dir / "lora-checkpoint.pt",
        mixed_precision=cfg.mixed_precision, desc="LoRA fine-tune", on_step=on_step, recipe="tckr.lora",
        resume_key=cfg.model_dump_json())
    save_adapter(unet, out_dir)
    with open(out_dir / "loss.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "loss"])
        writer.writerows(enumerate(losses, start=1))
    summary = {"steps": steps, "final_loss": float(np.mean(losses[-20:])), "seconds": time.perf_counter() - started,
               "trainable_parameters": sum(p.numel() for p in parameters), "train_images": len(data)}
    (out_dir / "adapter.json").write_text(json.dumps({"finetune": cfg.model_dump(mode="json")} | summary, indent=2))
    checkpoint_location(out_dir / "lora-checkpoint.pt").unlink(missing_ok=True)
    return summary


def _check_pairs(images: torch.Tensor, texts: list[str]) -> None:
    if len(images) != len(texts):
        raise GeneratorError(f"{len(images)} images but {len(texts)} captions")


def load_finetuned(generator_dir: Path, adapter_dir: Path, device: torch.device) -> ImageGenerator:
    """The base generator (of the card's kind) with the trained adapter loaded, ready to sample."""
    card = read_card(generator_dir)
    if card["kind"] == stable_diffusion.KIND:
        generator = stable_diffusion.StableDiffusionGenerator.load(card, device)
        check_adapter_fits(generator.pipe.unet, adapter_dir, generator_dir)
        generator.pipe.load_lora_weights(str(adapter_dir), weight_name=ADAPTER_FILE, adapter_name="tckr")
        return generator
    generator = PixelGenerator.load(generator_dir, device)
    check_adapter_fits(generator.unet, adapter_dir, generator_dir)
    generator.unet.load_lora_adapter(str(adapter_dir), weight_name=ADAPTER_FILE, prefix="unet", adapter_name="tckr")
    generator.unet.eval()
    return generator
