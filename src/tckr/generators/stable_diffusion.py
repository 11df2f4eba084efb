"""The paper's generator (``generator.kind: stable-diffusion``): a diffusers Stable Diffusion pipeline.

Nothing is pretrained here: SD2 was pretrained on public data. The base generator stage writes a card
(``generator.json``) naming the model, so later stages load the same weights (hub id + revision, or a
local pipeline directory) without gigabytes being copied between them. Fine-tuning trains a LoRA on
the UNet in latent space, following diffusers' ``train_text_to_image_lora.py``; generation runs the
pipeline itself with the adapter loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from tckr.core.errors import ConfigError, TckrError
from tckr.core.progress import progress
from tckr.generators.config import GeneratorConfig

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

KIND = "stable-diffusion"
ENCODE_BATCH_SIZE = 32  # images per VAE / text-encoder call while preparing the training data


class GeneratorUnavailableError(TckrError, RuntimeError):
    """The Stable Diffusion pipeline named by ``generator.model`` cannot be loaded here."""


def weights_dtype(device: torch.device, half: bool = True) -> torch.dtype:
    """fp16 weights on CUDA (the paper's setting), fp32 on CPU where half precision is slow or missing."""
    return torch.float16 if half and device.type == "cuda" else torch.float32


def load_pipeline(model: str, revision: str | None, variant: str | None,
                  dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """``StableDiffusionPipeline.from_pretrained`` without a safety checker: SD2 ships none, and a false
    positive would silently blank a synthetic image."""
    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            model, revision=revision, variant=variant, dtype=dtype, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    except (OSError, ValueError) as error:  # offline and not cached, no such directory, or no such variant
        raise GeneratorUnavailableError(
            f"cannot load the Stable Diffusion pipeline generator.model={model!r} (revision={revision}, "
            f"variant={variant}): {error}. Without the Hugging Face hub, pre-populate the HF cache (HF_HOME) where "
            "the hub is reachable (`hf download <model>`), or set generator.model to a local directory saved with "
            "`save_pretrained`") from error
    pipe.set_progress_bar_config(disable=True)  # generation reports progress per image itself
    return pipe


def save_card(cfg: GeneratorConfig, image_size: int, out_dir: Path) -> dict:
    """Check the pipeline loads and fits the configuration, then write ``generator.json`` naming it."""
    pipe = load_pipeline(cfg.model, cfg.revision, cfg.variant, dtype=torch.float16)  # loaded to be checked only
    prediction_type = pipe.scheduler.config.prediction_type
    if prediction_type != cfg.prediction_type:
        raise ConfigError(f"{cfg.model}'s scheduler predicts {prediction_type!r} but generator.prediction_type is "
                          f"{cfg.prediction_type!r}: set generator.prediction_type={prediction_type}")
    if image_size % pipe.vae_scale_factor:
        raise ConfigError(f"image_size {image_size} is not a multiple of the VAE's downsampling factor "
                          f"{pipe.vae_scale_factor}")
    local = Path(cfg.model).is_dir()
    card = {"kind": KIND, "model": str(Path(cfg.model).resolve()) if local else cfg.model,
            "revision": cfg.revision, "variant": cfg.variant, "prediction_type": prediction_type,
            "image_size": image_size, "channels": pipe.vae.config.in_channels,
            "latent_size": image_size // pipe.vae_scale_factor}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "generator.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def load_card_pipeline(card: dict, device: torch.device, dtype: torch.dtype) -> StableDiffusionPipeline:
    """The pipeline a base generator's card names, on ``device``."""
    return load_pipeline(card["model"], card["revision"], card["variant"], dtype).to(device)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, seed: int, mirror: bool) -> torch.Tensor:
    """Scaled VAE latents (fp16 storage) of uint8 RGB ``images``, or of their mirror images.

    Encoding once before training takes the VAE out of the training loop; the latent distribution is
    sampled once, seeded, where the reference script resamples it every epoch.
    """
    rng = torch.Generator().manual_seed(seed)
    latents = []
    for start in progress(range(0, len(images), ENCODE_BATCH_SIZE), desc="encode latents", unit="batch"):
        pixels = images[start:start + ENCODE_BATCH_SIZE]
        pixels = (pixels.flip(-1) if mirror else pixels).float().div(127.5).sub(1.0).to(vae.device, vae.dtype)
        sample = vae.encode(pixels).latent_dist.sample(generator=rng)
        latents.append((sample * vae.config.scaling_factor).half().cpu())
    return torch.cat(latents)


class PipelinePromptEncoder:
    """Prompts encoded by the pipeline's own ``encode_prompt`` (CLIP, padded to the tokenizer's length,
    no attention mask), so the adapter is trained on exactly the conditioning generation gives it."""

    def __init__(self, pipe: StableDiffusionPipeline) -> None:
        self.pipe = pipe

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        states = []
        for start in progress(range(0, len(texts), ENCODE_BATCH_SIZE), desc="encode prompts", unit="batch"):
            prompt_states, _ = self.pipe.encode_prompt(texts[start:start + ENCODE_BATCH_SIZE], self.pipe.device,
                                                       num_images_per_prompt=1, do_classifier_free_guidance=False)
            states.append(prompt_states.float().cpu())
        return torch.cat(states)


@dataclass
class StableDiffusionGenerator:
    """A loaded pipeline sampling with DPM-Solver++ (the paper's 20-step sampler)."""

    pipe: StableDiffusionPipeline
    image_size: int

    @classmethod
    def load(cls, card: dict, device: torch.device) -> StableDiffusionGenerator:
        from diffusers import DPMSolverMultistepScheduler

        pipe = load_card_pipeline(card, device, weights_dtype(device))
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
        return cls(pipe, card["image_size"])

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    def sample(self, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> np.ndarray:
        """uint8 ``[B, S, S, 3]``; each image's starting latent comes from its own CPU generator: it does
        not depend on the image's batch, and is the same on any device."""
        images = self.pipe(prompts, height=self.image_size, width=self.image_size, num_inference_steps=steps,
                           guidance_scale=guidance, output_type="np",
                           generator=[torch.Generator().manual_seed(seed) for seed in seeds]).images
        return (images * 255).round().astype(np.uint8)
