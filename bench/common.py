"""What the benchmarks share: real Fashion-MNIST at a chosen resolution, the device, the demo generator and its two
ways of sampling, the shadow-training workload. The scripts import it as ``common`` (they run from ``bench/``)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from tckr.core.precision import autocast
from tckr.data.ingest import FASHION_MNIST_CLASSES, _read_idx, fashion_mnist_dir
from tckr.generators.config import GeneratorConfig
from tckr.generators.pixel import (
    PixelGenerator,
    TextEncoder,
    build_noise_scheduler,
    build_unet,
    sample_pixel_images,
    text_encoder_path,
)
from tckr.privacy.shadows import Population, train_shadow_group
from tckr.training.config import ClassifierConfig

# What train_classifier reads from dataset.json for Fashion-MNIST (ingest's measured statistics).
FASHION_MNIST_INFO = SimpleNamespace(mean=[0.286], std=[0.353], num_classes=10, channels=1,
                                     classes=FASHION_MNIST_CLASSES)


def pick_device(requested: str = "auto") -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if requested == "auto" else requested)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def in_turns(variants: dict[str, Callable[[int, int], list]], count: int,
             batch_size: int) -> tuple[dict[str, float], dict[str, list]]:
    """Each variant's items per second over items ``0 .. count`` and what it returned for them: every batch goes
    through each variant in turn (a shared CPU's speed drifts; turns spread the drift over all of them). A variant
    is called with a batch's ``start`` and ``stop`` and returns a list with one entry per item."""
    seconds = dict.fromkeys(variants, 0.0)
    outputs: dict[str, list] = {name: [] for name in variants}
    for start in range(0, count, batch_size):
        for name, variant in variants.items():
            started = time.perf_counter()
            outputs[name] += variant(start, min(start + batch_size, count))
            seconds[name] += time.perf_counter() - started
    return {name: count / spent for name, spent in seconds.items()}, outputs


def fashion_mnist(count: int, size: int | None = None, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Real train images ``offset .. offset + count`` as uint8 ``[N, 1, S, S]`` (area-downsampled to ``size`` px,
    as the pipeline's images are; ``None``: the native 28 px) and their labels (long ``[N]``)."""
    root = fashion_mnist_dir()
    rows = slice(offset, offset + count)
    images = torch.tensor(_read_idx(root / "train-images-idx3-ubyte.gz")[rows]).unsqueeze(1)
    if size is not None and size != images.shape[-1]:
        images = torch.nn.functional.interpolate(images.float(), size=size, mode="area").round().to(torch.uint8)
    labels = torch.tensor(_read_idx(root / "train-labels-idx1-ubyte.gz")[rows].astype(np.int64))
    return images, labels


# ------------------------------------------------------------------------------------------ generation
def demo_generator(cfg: GeneratorConfig, image_size: int, device: torch.device) -> PixelGenerator:
    """The demo's text-to-image generator (freshly initialised UNet, the packaged text encoder): the sampler's cost
    does not depend on the weights."""
    torch.manual_seed(0)
    encoder = TextEncoder(text_encoder_path(), cfg.max_text_tokens, device)
    unet = build_unet(cfg, 1, image_size, encoder.dim).to(device).eval()
    return PixelGenerator(unet, encoder, dict(build_noise_scheduler(cfg).config), image_size, 1)


def caption_prompts(count: int) -> list[str]:
    """Captions as the demo's captioner writes them: class name and a few attributes, repeating across images."""
    words = ["dark", "bright", "small", "large"]
    return [f"{FASHION_MNIST_CLASSES[i % 10]}: a {words[(i // 10) % 4]} item" for i in range(count)]


def sample_per_prompt(generator: PixelGenerator, prompts: list[str], seeds: list[int], steps: int, guidance: float,
                      device: torch.device) -> None:
    """The naive way: one fp32 sampler run per prompt, encoding its prompt afresh (a pipeline call per prompt)."""
    for prompt, seed in zip(prompts, seeds, strict=True):
        sample_pixel_images(generator, [prompt], [seed], steps, guidance, device, prompt_cache={})


def sample_batched(generator: PixelGenerator, prompts: list[str], seeds: list[int], steps: int, guidance: float,
                   device: torch.device, batch_size: int, dtype: torch.dtype | None) -> None:
    """tckr's way (generate_shards): ``batch_size`` prompts per sampler run, each distinct prompt encoded once, the
    UNet under autocast to ``dtype`` (``None``: fp32)."""
    cache: dict[str, torch.Tensor] = {}
    for start in range(0, len(prompts), batch_size):
        with torch.no_grad(), autocast(device, dtype):
            sample_pixel_images(generator, prompts[start:start + batch_size], seeds[start:start + batch_size], steps,
                                guidance, device, cache)


# --------------------------------------------------------------------------------------------- shadows
def shadow_population(size: int, image_size: int, validation: int = 1000
                      ) -> tuple[Population, tuple[torch.Tensor, torch.Tensor]]:
    """The first ``size`` real train images as the attack population (first half members), and the next
    ``validation`` ones for the shadows' epoch selection."""
    images, labels = fashion_mnist(size + validation, image_size)
    members = np.r_[np.ones(size // 2, bool), np.zeros(size - size // 2, bool)]
    return (Population(images[:size], labels[:size], members, np.arange(size)),
            (images[size:], labels[size:]))


def train_shadows(recipe: ClassifierConfig, groups: list[list[int]], keep: np.ndarray, population: Population,
                  validation: tuple[torch.Tensor, torch.Tensor], device: torch.device, vectorize: bool) -> None:
    """Train the shadows of ``groups`` (each group one stack) in a scratch directory, as the attack stage does."""
    with tempfile.TemporaryDirectory() as out_dir:
        for group in groups:
            train_shadow_group(recipe, group, keep, population, validation, FASHION_MNIST_INFO, Path(out_dir),
                               device, vectorize)
    synchronize(device)
