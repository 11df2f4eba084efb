"""Stage 1: turn a labelled image dataset into tckr's prepared form.

Output (``prepare``): ``<out>/data`` — a ``datasets.DatasetDict`` (``save_to_disk``) with columns
``image`` (Image, encoded bytes embedded) and ``label`` (ClassLabel) and splits

* ``train``      private training data (the data whose privacy we protect),
* ``validation`` model selection only,
* ``holdout``    drawn from the same distribution, never trained on: LiRA's non-member population,
* ``public``     optional, disjoint stand-in for public pretraining data,
* ``test``       the source's test split, untouched (final accuracy only);

and ``<out>/dataset.json`` (classes, counts, channels, per-channel mean/std of ``train``, fingerprint, and
the warnings about data that is legal but makes some figures mean less).

Every image is 8-bit grey or RGB once prepared: other modes (16-bit, CMYK, palette, with alpha) are converted
at ingest and counted, so no later stage decodes them its own way. An error about an image names it as the
user knows it: its path under an imagefolder, its row in a source split.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image as PILImage
from pydantic import Field, model_validator

from tckr.core.config import Section
from tckr.core.errors import TckrError, warn
from tckr.core.progress import progress, quiet_datasets


class IngestConfig(Section):
    """Where the private dataset comes from and how its train split is divided."""

    source: Literal["fashion-mnist", "hub", "disk", "imagefolder"] = Field(
        description="fashion-mnist: Debian package files; hub: datasets.load_dataset(name); "
        "disk: datasets.load_from_disk(name); imagefolder: a class-per-folder directory")
    name: str = Field("", description="hub id, or a local path for disk/imagefolder/fashion-mnist")
    hub_config: str | None = Field(None, description="second argument of load_dataset, e.g. 'full_size'")
    train_split: str = "train"
    test_split: str | None = Field(
        "test", description="the source's test split; null carves one from train (test_fraction)")
    image_column: str | None = Field(None, description="null: detect (an Image feature)")
    label_column: str | None = Field(None, description="null: detect (ClassLabel, or label/class/...)")
    class_name_fixes: dict[str, str] = Field(default_factory=dict, description="e.g. {cra: crab}")
    validation_fraction: float = Field(0.05, gt=0, lt=1, description="model selection only")
    holdout_fraction: float = Field(
        0.3, ge=0, lt=1, description="never trained on by the target: LiRA's non-member population")
    public_fraction: float = Field(
        0.0, ge=0, lt=1, description="disjoint public split (offline stand-in for public pretraining data)")
    test_fraction: float = Field(0.0, ge=0, lt=1, description="only used when test_split is null")
    train_limit: int | None = Field(
        None, gt=0, description="stratified cap on the source train split (quick runs); null: all")
    test_limit: int | None = Field(None, gt=0, description="stratified cap on the test split; null: all")
    seed: int = 0

    @model_validator(mode="after")
    def _fractions_leave_a_train_split(self) -> IngestConfig:
        taken = self.validation_fraction + self.holdout_fraction + self.public_fraction
        if taken >= 0.95:
            raise ValueError(
                f"validation_fraction + holdout_fraction + public_fraction = {taken:.2f} leaves "
                "less than 5% of the train split for private training")
        if self.test_split is None and self.test_fraction <= 0:
            raise ValueError("test_split is null, so test_fraction must be > 0 to carve a test split")
        if self.source != "fashion-mnist" and not self.name:
            raise ValueError(f"source '{self.source}' needs a name (hub id or path)")
        return self


FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_LABEL_COLUMN_NAMES = ("label", "labels", "fine_label", "class", "category", "target")
_IMAGE_COLUMN_NAMES = ("image", "img", "picture", "pixel_values")
SPLITS = ("train", "validation", "holdout", "public", "test")


class DatasetError(TckrError, ValueError):
    """The input dataset cannot be used; the message says why and what to change."""


@dataclass
class SplitSummary:
    count: int
    per_class: list[int]


@dataclass
class DatasetInfo:
    """What later stages need to know about a prepared dataset (``dataset.json``)."""

    name: str
    classes: list[str]
    channels: int
    mean: list[float]
    std: list[float]
    splits: dict[str, SplitSummary]
    fingerprint: str
    source: dict[str, Any] = field(default_factory=dict)
    split_fingerprints: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def save(self, path: Path) -> None:
        data = asdict(self) | {"num_classes": self.num_classes}
        path.write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> DatasetInfo:
        data = json.loads(Path(path).read_text())
        data.pop("num_classes", None)
        data["splits"] = {k: SplitSummary(**v) for k, v in data["splits"].items()}
        return cls(**data)


# ----------------------------------------------------------------------------------------- sources
def fashion_mnist_dir(explicit: str = "") -> Path:
    """Where the Debian package put Fashion-MNIST (system-wide, or the no-root user cache)."""
    candidates = [explicit, os.environ.get("TCKR_FASHION_MNIST_DIR", ""),
                  "/usr/share/datasets/fashion-mnist",
                  str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                      / "tckr/debian/usr/share/datasets/fashion-mnist")]
    for candidate in filter(None, candidates):
        if (Path(candidate) / "train-images-idx3-ubyte.gz").is_file():
            return Path(candidate)
    raise DatasetError(
        "Fashion-MNIST files not found (looked in: "
        + ", ".join(filter(None, candidates))
        + "). Install the Debian package with `make data` (scripts/install-fashion-mnist.sh).")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _load_fashion_mnist(cfg: IngestConfig):
    """Build the splits from the idx files; the stratified caps apply before PNG encoding (speed)."""
    import datasets

    root = fashion_mnist_dir(cfg.name)
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=FASHION_MNIST_CLASSES)})
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
        labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
        kept = _stratified_cap(labels, cfg.train_limit if split == "train" else cfg.test_limit, cfg.seed)
        if kept is not None:
            images, labels = images[kept], labels[kept]
        encoded = [{"bytes": png_bytes(image), "path": None} for image in images]
        splits[split] = datasets.Dataset.from_dict(
            {"image": encoded, "label": labels.astype(np.int64)}, features=features)
    return datasets.DatasetDict(splits)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def load_source(cfg: IngestConfig):
    """Return the source as a ``DatasetDict`` (real ``datasets`` loaders for hub/disk/imagefolder)."""
    import datasets

    if cfg.source == "fashion-mnist":
        return _load_fashion_mnist(cfg)
    if cfg.source == "disk":
        if not Path(cfg.name).exists():
            raise DatasetError(f"no dataset saved at '{cfg.name}' (source: disk)")
        loaded = datasets.load_from_disk(cfg.name)
        if isinstance(loaded, datasets.Dataset):
            loaded = datasets.DatasetDict({cfg.train_split: loaded})
        return loaded
    if cfg.source == "imagefolder":
        if not Path(cfg.name).is_dir():
            raise DatasetError(f"imagefolder directory '{cfg.name}' does not exist")
        return datasets.load_dataset("imagefolder", data_dir=cfg.name)
    try:
        return datasets.load_dataset(cfg.name, cfg.hub_config)
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as error:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        raise DatasetError(
            f"cannot load dataset '{cfg.name}' from the Hugging Face hub"
            + (" (offline mode is on)" if offline else " (unknown id, or the hub is unreachable)")
            + f": {type(error).__name__}: {error}. Offline, use ingest.source=disk (a save_to_disk "
            "directory), imagefolder, or fashion-mnist.") from error


# ----------------------------------------------------------------------------------------- columns
def resolve_columns(dataset, image_column: str | None, label_column: str | None) -> tuple[str, str]:
    """Find the image and label columns (explicit names win; otherwise by feature type, then name)."""
    import datasets

    features = dataset.features
    columns = list(features)

    def pick(explicit, kind, by_type, names):
        if explicit:
            if explicit not in features:
                raise DatasetError(f"{kind} column '{explicit}' not in the dataset; columns: {columns}")
            return explicit
        typed = [name for name in columns if by_type(features[name])]
        named = [name for name in columns if name.lower() in names]
        found = typed or named
        if not found:
            raise DatasetError(
                f"dataset has no {kind} column (columns: {columns}); set ingest.{kind}_column")
        return found[0]

    image = pick(image_column, "image", lambda f: isinstance(f, datasets.Image), _IMAGE_COLUMN_NAMES)
    label = pick(label_column, "label", lambda f: isinstance(f, datasets.ClassLabel), _LABEL_COLUMN_NAMES)
    label_feature = features[label]
    if not (isinstance(label_feature, datasets.ClassLabel)
            or (isinstance(label_feature, datasets.Value)
                and (label_feature.dtype == "string" or "int" in label_feature.dtype))):
        raise DatasetError(f"label column '{label}' has type {label_feature}: expected string, integer "
                           "or ClassLabel")
    return image, label


def _class_names(dataset, label: str) -> list[str]:
    import datasets

    feature = dataset.features[label]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    values = {str(value) for value in dataset.unique(label)}
    if feature.dtype != "string":
        return [str(v) for v in sorted(int(v) for v in values)]
    # Case-insensitive order: "cat" and "Dog" must not depend on capitalisation.
    return sorted(values, key=lambda name: (name.casefold(), name))


def _normalise(dataset, image: str, label: str, classes: list[str], split: str, root: str | None):
    """Keep ``image`` (embedded 8-bit grey or RGB bytes), ``label`` (ClassLabel over ``classes``), ``origin``
    (the image as the user knows it: its path under ``root``, else its row of ``split``) and ``mode`` (the
    source image's PIL mode, for the conversion count). Origin and mode are dropped before the data is saved."""
    import datasets

    feature = dataset.features[label]
    raw = list(dataset[label])
    unlabelled = [row for row, value in enumerate(raw) if value is None]
    if isinstance(feature, datasets.ClassLabel) and not unlabelled:
        raw = [feature.names[value] for value in raw]
    dataset = dataset.select_columns([image]).rename_column(image, "image") if image != "image" \
        else dataset.select_columns(["image"])
    dataset = dataset.cast_column("image", datasets.Image(decode=False))
    dataset = dataset.map(_embed_image_bytes, batched=True, batch_size=256, with_indices=True,
                          fn_kwargs={"split": split, "root": root}, desc=f"embed {split}")
    if unlabelled:
        raise DatasetError(f"{dataset[unlabelled[0]]['origin']} has no label ({len(unlabelled)} images of split "
                           f"'{split}' have none; an imagefolder needs one folder per class, two classes at least)")
    index = {name: i for i, name in enumerate(classes)}
    try:
        labels = np.fromiter((index[str(value)] for value in raw), dtype=np.int64, count=len(raw))
    except KeyError as error:
        raise DatasetError(f"split '{split}' has label {error} that the train split does not have") from None
    dataset = dataset.add_column("label", labels.tolist())
    return dataset.cast(datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes),
                                           "origin": datasets.Value("string"), "mode": datasets.Value("string")}))


_PREPARED_MODES = ("L", "RGB")


def _embed_image_bytes(batch: dict[str, list], indices: list[int], split: str, root: str | None) -> dict[str, list]:
    """Embed each image's bytes (an imagefolder's are read from its file), converted to 8-bit grey or RGB when
    the source mode is another; the PIL mode it had (empty when the header cannot be read: the scan says why)."""
    embedded, origins, modes = [], [], []
    for item, index in zip(batch["image"], indices, strict=True):
        path = (item or {}).get("path")
        origins.append(str(Path(path).relative_to(root)) if path and root and Path(path).is_relative_to(root)
                       else path or f"{split} row {index}")
        data = None if item is None else item["bytes"] if item.get("bytes") is not None else Path(path).read_bytes()
        mode = ""
        if data:
            try:
                with PILImage.open(io.BytesIO(data)) as opened:
                    mode = opened.mode
                    if mode not in _PREPARED_MODES:
                        data = png_bytes(_eight_bit(opened, origins[-1]))
            except DatasetError:
                raise
            except Exception:  # unreadable: left as it is for the scan to report with its origin
                pass
        embedded.append(None if data is None else {"bytes": data, "path": None})
        modes.append(mode)
    return {"image": embedded, "origin": origins, "mode": modes}


def _eight_bit(image: PILImage.Image, origin: str) -> np.ndarray:
    """An image of any PIL mode as 8-bit grey or RGB pixels: 16/32-bit integer grey scaled from its 16-bit range
    (PIL's own conversion clips at 255, which turns such an image white), alpha dropped, the rest converted."""
    if image.mode.startswith("I"):
        pixels = np.asarray(image, dtype=np.float64)
        return np.clip(np.round(pixels * 255.0 / 65535.0), 0, 255).astype(np.uint8)
    if image.mode == "F":
        raise DatasetError(f"{origin}: a floating-point image (PIL mode F) has no defined grey levels; save it "
                           "as 8- or 16-bit")
    grey = image.mode in ("1", "L", "LA", "La")
    return np.asarray(image.convert("L" if grey else "RGB"))


# ------------------------------------------------------------------------------------------ splits
def stratified_split(labels: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Deterministically divide indices per class; what the fractions leave goes to ``"train"``.

    Each class is shuffled with its own stream derived from ``seed`` and cut by cumulative
    fractions, so a split's content never depends on the order classes are visited.
    """
    parts: dict[str, list[np.ndarray]] = {name: [] for name in ("train", *fractions)}
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        members = members[np.random.default_rng([seed, int(cls)]).permutation(len(members))]
        start = 0
        for name, fraction in fractions.items():
            size = int(round(fraction * len(members)))
            parts[name].append(members[start:start + size])
            start += size
        parts["train"].append(members[start:])
    return {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}


def _stratified_cap(labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray | None:
    if limit is None or limit >= len(labels):
        return None
    return stratified_split(labels, {"kept": limit / len(labels)}, seed)["kept"]


# --------------------------------------------------------------------------------------- scanning
@dataclass
class _ScanResult:
    digest: str
    grey: bool
    channel_sum: np.ndarray
    channel_sq_sum: np.ndarray
    pixels: int
    image_digests: dict[bytes, str]  # each distinct image's content digest -> the first image with it
    smallest: tuple[int, str]  # the shortest side seen, and the image that has it


def _scan(dataset, split: str) -> _ScanResult:
    """Decode every image once: refuses unreadable ones by name, hashes content, sums pixel statistics."""
    digest = hashlib.sha256()
    total = np.zeros(3)
    total_sq = np.zeros(3)
    pixels = 0
    grey = True
    images: dict[bytes, str] = {}
    smallest = (2**31, "")
    raw = dataset.cast_column("image", dataset.features["image"].__class__(decode=False))
    for start in progress(range(0, len(raw), 1024), desc=f"scan {split}", unit="batch"):
        batch = raw[start:start + 1024]
        for item, label, origin in zip(batch["image"], batch["label"], batch["origin"], strict=True):
            data = (item or {}).get("bytes")
            if data is None:
                raise DatasetError(f"{origin}: no image (the image column is empty there)")
            if not data:
                raise DatasetError(f"{origin}: empty file (0 bytes)")
            try:
                with PILImage.open(io.BytesIO(data)) as image:
                    image.load()
                    grey &= image.mode == "L"
                    array = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
            except PILImage.UnidentifiedImageError:
                raise DatasetError(f"{origin}: not an image file PIL can read ({len(data)} bytes)") from None
            except Exception as error:  # PIL raises many types for damaged data
                raise DatasetError(f"{origin}: truncated or corrupt image ({error})") from None
            digest.update(data)
            digest.update(label.to_bytes(4, "little"))
            images.setdefault(hashlib.sha256(data).digest(), origin)
            smallest = min(smallest, (min(array.shape[:2]), origin))
            total += array.sum(axis=(0, 1))
            total_sq += np.square(array).sum(axis=(0, 1))
            pixels += array.shape[0] * array.shape[1]
    return _ScanResult(digest.hexdigest(), grey, total, total_sq, pixels, images, smallest)


SMALLEST_USEFUL_SIDE = 8  # px: below this an image holds almost nothing at any resolution the profiles use
FEW_IMAGES = 10  # a class with fewer private-train images gets a warning


def _warnings(counts: dict[str, np.ndarray], scans: dict[str, _ScanResult], classes: list[str],
              modes: Counter[str]) -> list[str]:
    """What is legal but makes some figures mean less than they seem, each said once, in words."""
    found = []
    converted = {mode: count for mode, count in modes.items() if mode not in _PREPARED_MODES}
    if converted:
        found.append(f"{sum(converted.values())} images were not 8-bit grey or RGB ("
                     + ", ".join(f"{mode}: {count}" for mode, count in sorted(converted.items()))
                     + "): converted (16-bit scaled to 8, alpha dropped)")
    few = {classes[i]: int(count) for i, count in enumerate(counts["train"]) if count < FEW_IMAGES}
    if few:
        found.append(f"classes with fewer than {FEW_IMAGES} private-train images: {few}; the generator, the student "
                     "and the shadows learn them from that alone, and their per-class figures are noise")
    absent = [classes[i] for i in np.flatnonzero(counts["test"] == 0)]
    if absent:
        found.append(f"classes with no test image: {absent}; test accuracy says nothing about them")
    members = scans["train"].image_digests
    for name, scan in scans.items():
        shared = [(members[key], origin) for key, origin in scan.image_digests.items() if key in members]
        if name != "train" and shared:
            found.append(f"{len(shared)} images of the {name} split are byte-identical to private-train images "
                         f"(e.g. {shared[0][1]} = {shared[0][0]}); "
                         + ("LiRA counts each as a member and as a non-member" if name == "holdout"
                            else f"the {name} figures see them as unseen images"))
    side, origin = min(scan.smallest for scan in scans.values())
    if side < SMALLEST_USEFUL_SIDE:
        found.append(f"{origin} is {side} px on its shorter side (under {SMALLEST_USEFUL_SIDE} px): resized to the "
                     "profile's image_size it carries almost nothing")
    return found


# ------------------------------------------------------------------------------------------ prepare
def prepare(cfg: IngestConfig, out_dir: Path, dataset_name: str, min_train_images: int = 1) -> DatasetInfo:
    """Load, validate, split and write the dataset. ``min_train_images`` is the largest batch size."""
    import datasets

    quiet_datasets()
    source = load_source(cfg)
    if cfg.train_split not in source:
        raise DatasetError(f"source has no '{cfg.train_split}' split; splits: {list(source)}")
    train = source[cfg.train_split]
    image, label = resolve_columns(train, cfg.image_column, cfg.label_column)
    classes = [cfg.class_name_fixes.get(name, name) for name in _class_names(train, label)]
    if len(classes) < 2:
        raise DatasetError(f"only one class ({classes[0]!r}) in the train split: a classifier needs "
                           "at least two" if classes else "the train split has no labelled images")
    if len(set(classes)) != len(classes):
        raise DatasetError(f"class names collide after class_name_fixes: {classes}")
    raw_classes = _class_names(train, label)
    root = cfg.name if cfg.source == "imagefolder" else None
    train = _normalise(train, image, label, raw_classes, cfg.train_split, root)

    if cfg.test_split is not None:
        if cfg.test_split not in source:
            raise DatasetError(f"source has no '{cfg.test_split}' test split; splits: {list(source)} "
                               "(set ingest.test_split: null and ingest.test_fraction to carve one)")
        test = _normalise(source[cfg.test_split], image, label, raw_classes, cfg.test_split, root)
    else:
        carved = stratified_split(np.asarray(train["label"]), {"test": cfg.test_fraction}, cfg.seed + 1)
        test, train = train.select(carved["test"]), train.select(carved["train"])

    kept = _stratified_cap(np.asarray(train["label"]), cfg.train_limit, cfg.seed)
    train = train if kept is None else train.select(kept)
    kept = _stratified_cap(np.asarray(test["label"]), cfg.test_limit, cfg.seed)
    test = test if kept is None else test.select(kept)
    rename = datasets.ClassLabel(names=classes)
    train, test = train.cast_column("label", rename), test.cast_column("label", rename)

    fractions = {"validation": cfg.validation_fraction, "holdout": cfg.holdout_fraction,
                 "public": cfg.public_fraction}
    indices = stratified_split(np.asarray(train["label"]),
                               {k: v for k, v in fractions.items() if v > 0}, cfg.seed)
    splits = {name: train.select(indices[name]) for name in SPLITS if name in indices}
    splits["test"] = test
    counts = {name: np.bincount(np.asarray(split["label"], dtype=np.int64), minlength=len(classes))
              for name, split in splits.items()}
    _check_sizes(counts, classes, min_train_images)

    scans = {name: _scan(split, name) for name, split in splits.items()}
    warnings = _warnings(counts, scans, classes, Counter(train["mode"]) + Counter(test["mode"]))
    for warning in warnings:
        warn(warning)
    splits = {name: split.remove_columns(["origin", "mode"]) for name, split in splits.items()}
    private = scans["train"]
    grey = all(scan.grey for scan in scans.values())
    mean = private.channel_sum / private.pixels
    std = np.sqrt(np.maximum(private.channel_sq_sum / private.pixels - mean**2, 1e-12))
    channels = 1 if grey else 3
    fingerprint = hashlib.sha256(
        json.dumps({name: scan.digest for name, scan in sorted(scans.items())}).encode()).hexdigest()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    datasets.DatasetDict(splits).save_to_disk(str(out_dir / "data"))
    info = DatasetInfo(
        name=dataset_name, classes=classes, channels=channels,
        mean=[round(float(v), 6) for v in mean[:channels]],
        std=[round(float(v), 6) for v in std[:channels]],
        splits={name: SplitSummary(int(count.sum()), count.tolist()) for name, count in counts.items()},
        fingerprint=fingerprint[:16],
        split_fingerprints={name: scan.digest[:16] for name, scan in sorted(scans.items())}, warnings=warnings,
        source={"source": cfg.source, "name": cfg.name, "hub_config": cfg.hub_config,
                "image_column": image, "label_column": label, "seed": cfg.seed})
    info.save(out_dir / "dataset.json")
    return info


def _check_sizes(counts: dict[str, np.ndarray], classes: list[str], min_train_images: int) -> None:
    """Each split's images per class (``counts``) make a dataset the recipes can train and evaluate on."""
    if counts["train"].sum() < min_train_images:
        raise DatasetError(
            f"the private train split has {counts['train'].sum()} images, fewer than one batch "
            f"({min_train_images}); use more data, smaller split fractions or a smaller batch_size")
    empty = [classes[i] for i in np.flatnonzero(counts["train"] == 0)]
    if empty:
        raise DatasetError(f"classes with no image in the private train split: {empty}")
    for name in ("validation", "test"):
        if counts[name].sum() == 0:
            raise DatasetError(f"the {name} split is empty: the dataset is too small for the fractions")


def load_prepared(directory: Path):
    """Open a prepared dataset: ``(DatasetDict, DatasetInfo)``."""
    import datasets

    directory = Path(directory)
    if not (directory / "dataset.json").is_file():
        raise DatasetError(f"{directory} is not a prepared tckr dataset (no dataset.json)")
    return datasets.load_from_disk(str(directory / "data")), DatasetInfo.load(directory / "dataset.json")
