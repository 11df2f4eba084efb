"""The query stage's work: private votes -> noisy histogram -> selection -> the relabelled public subset.

Writes ``selection.json`` (the selection, each class's noisy counts, the query's privacy cost as a history
entry for the run's accountant) and ``subset.npz`` (pool rows and their sensitive labels).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tckr.core.atomic import write_text
from tckr.privacy.accounting import plan_privacy
from tckr.recipes.privimage.config import FinetuneConfig, QueryConfig
from tckr.recipes.privimage.pool import load_built_pool, semantic_classifier
from tckr.recipes.privimage.query import (
    Selection,
    chance_precision,
    semantic_precision,
    semantic_query,
    top_classes,
)


def run_query(cfg: QueryConfig, privacy: FinetuneConfig, data_dir: Path, pool_dir: Path, out_dir: Path,
              device: torch.device) -> dict:
    """The query over the private train split of ``data_dir``; returns its metrics. Plans the whole run's
    privacy first (:func:`plan_privacy` raises when the target cannot be met), so nothing private is spent on a
    run that would be refused at fine-tuning."""
    from tckr.data.ingest import DatasetInfo, load_prepared

    info = DatasetInfo.load(Path(data_dir) / "dataset.json")
    plan_privacy(target_epsilon=privacy.target_epsilon, delta=privacy.delta, num_private=info.splits["train"].count,
                 query_sigma=cfg.sigma, batch_size=privacy.batch_size, epochs=privacy.epochs, kind=privacy.accountant,
                 max_noise_multiplier=privacy.max_noise_multiplier)
    splits, info = load_prepared(data_dir)
    pool, card = load_built_pool(pool_dir)
    train = splits["train"]
    votes = top_classes(semantic_classifier(cfg, device).logits, train["image"], cfg.k, cfg.batch_size,
                        "query private votes")
    pool_labels = np.asarray(pool["label"])
    available = np.bincount(pool_labels, minlength=len(card["vocabulary"])) > 0  # public: the pool's own classes
    selection = semantic_query(votes, np.asarray(train["label"]), info.classes, card["vocabulary"], cfg.k, cfg.sigma,
                               cfg.seed, available)
    rows, labels = selection.relabel(pool_labels)
    categories = pool.select(rows)["category"] if len(rows) else []
    precision = semantic_precision(categories, labels, info.classes)
    chance = chance_precision(pool["category"], info.classes)
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez(out_dir / "subset.npz", rows=rows, labels=labels)
    record = selection.as_dict() | {"history": [[cfg.sigma, 1.0, 1]], "selected_images": int(len(rows)),
                                    "per_class_images": np.bincount(labels, minlength=len(info.classes)).tolist(),
                                    "semantic_precision": precision, "chance_precision": chance,
                                    "pool_fingerprint": card["fingerprint"]}
    write_text(out_dir / "selection.json", json.dumps(record, indent=2) + "\n")
    return {"query.selected_images": float(len(rows)), "query.selected_classes": float(sum(map(len, selection.chosen))),
            "privimage.selection_precision": precision, "privimage.selection_chance": chance}


def load_selection(directory: Path) -> tuple[Selection, dict, np.ndarray, np.ndarray]:
    """The saved selection, its full record, and the subset's pool rows and sensitive labels."""
    record = json.loads((Path(directory) / "selection.json").read_text())
    fields = {name: record[name] for name in Selection.__dataclass_fields__}
    subset = np.load(Path(directory) / "subset.npz")
    return Selection(**fields), record, subset["rows"], subset["labels"]
