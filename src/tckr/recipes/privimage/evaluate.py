"""What the synthetic set is worth downstream: the accuracy of a classifier trained on it alone (its FID is
:func:`tckr.generators.fid.synthetic_fid`, shared with TCKR).

The classifier is selected on a held-out synthetic split by default: selecting on real data would spend privacy
that the accountant does not count.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from tckr.data.ingest import DatasetInfo
from tckr.generators.pixel import digest_files
from tckr.recipes.privimage.config import DownstreamConfig
from tckr.training.classifier import TrainResult, train_classifier
from tckr.training.config import ClassifierConfig


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
