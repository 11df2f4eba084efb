"""The public pool as the query sees it: every image with a public class in one vocabulary.

A pool with its own labels (ImageNet32) keeps them, and its vocabulary must be the semantic classifier's (the
same 1,000 ImageNet classes, in order). A pool without (the demo's) is labelled by the classifier's top-1 class:
public data labelled by a public model, so it costs no privacy.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from tckr.core.atomic import write_text
from tckr.core.errors import ConfigError
from tckr.core.precision import autocast_dtype
from tckr.data.public_pool import PublicPoolConfig, load_pool
from tckr.recipes.privimage.config import QueryConfig
from tckr.recipes.privimage.query import top_classes
from tckr.training.semantic import ImageNetClassifier


def semantic_classifier(cfg: QueryConfig, device: torch.device) -> ImageNetClassifier:
    return ImageNetClassifier(device, cfg.input_size, autocast_dtype(device, cfg.mixed_precision))


def build_pool(pool_cfg: PublicPoolConfig, query: QueryConfig, data_dir: Path, out_dir: Path,
               device: torch.device) -> dict:
    """Load the pool, give every image a public class, and save it (``data/`` + ``pool.json``)."""
    import datasets

    from tckr.data.ingest import load_prepared

    splits, info = load_prepared(data_dir)
    pool = load_pool(pool_cfg, splits.get("public"))
    classifier = semantic_classifier(query, device)
    if "label" in pool.column_names:
        vocabulary = pool.features["label"].names
        if len(vocabulary) != len(classifier.categories):
            raise ConfigError(f"the public pool has {len(vocabulary)} classes, the semantic classifier "
                              f"{len(classifier.categories)}: the query needs one vocabulary for both")
        labelled_by = "the pool's own labels"
    else:
        vocabulary = classifier.categories
        labels = top_classes(classifier.logits, pool["image"], 1, query.batch_size, "label public pool")[:, 0]
        pool = pool.add_column("label", labels.tolist()).cast_column("label", datasets.ClassLabel(names=vocabulary))
        labelled_by = classifier.name
    out_dir.mkdir(parents=True, exist_ok=True)
    pool.save_to_disk(str(out_dir / "data"))
    labels = np.asarray(pool["label"])
    categories = pool["category"]
    names = set(info.classes)
    summary = {"images": len(pool), "vocabulary": list(vocabulary), "labelled_by": labelled_by,
               "public_classes_present": int(len(np.unique(labels))),
               "in_domain_images": int(sum(category in names for category in categories)),
               "fingerprint": _fingerprint(labels, categories, pool_cfg)}
    write_text(out_dir / "pool.json", json.dumps(summary, indent=2) + "\n")
    return summary


def load_built_pool(directory: Path):
    """The saved pool (``datasets.Dataset``: image, category, label) and its ``pool.json``."""
    import datasets

    directory = Path(directory)
    return datasets.load_from_disk(str(directory / "data")), json.loads((directory / "pool.json").read_text())


def _fingerprint(labels: np.ndarray, categories: list[str], cfg: PublicPoolConfig) -> str:
    digest = hashlib.sha256(cfg.model_dump_json().encode())
    digest.update(labels.astype(np.int64).tobytes())
    digest.update("\n".join(categories).encode())
    return digest.hexdigest()[:16]
