import json

import datasets
import numpy as np
import pytest

from tckr.data.ingest import FASHION_MNIST_CLASSES, DatasetError, IngestConfig, load_prepared, prepare, stratified_split
from tests.conftest import make_dataset_dict

pytestmark = pytest.mark.unit  # starts no server, trains nothing beyond a few steps

FRACTIONS = {"validation_fraction": 0.1, "holdout_fraction": 0.3}


def _check_prepared(out, expected_train_total, classes=FASHION_MNIST_CLASSES):
    splits, info = load_prepared(out)
    assert info.classes == list(classes)
    assert set(splits) == {"train", "validation", "holdout", "test"}
    assert splits["train"].features["label"].names == list(classes)
    total = sum(info.splits[name].count for name in ("train", "validation", "holdout"))
    assert total == expected_train_total
    assert info.channels == 1 and len(info.mean) == 1
    image = splits["train"][0]["image"]
    assert image.size == (28, 28)
    # The statistics describe the private train split.
    pixels = np.stack([np.asarray(item["image"], dtype=np.float64) / 255 for item in splits["train"]])
    assert info.mean[0] == pytest.approx(pixels.mean(), abs=1e-5)
    assert info.std[0] == pytest.approx(pixels.std(), abs=1e-5)
    stored = json.loads((out / "dataset.json").read_text())
    assert stored["num_classes"] == len(classes) and set(stored["split_fingerprints"]) == set(splits)
    return splits, info


def test_fashion_mnist_source_from_debian_package(tmp_path):
    cfg = IngestConfig(source="fashion-mnist", train_limit=500, test_limit=200, public_fraction=0.2, **FRACTIONS)
    info = prepare(cfg, tmp_path / "out", "fashion-mnist", min_train_images=32)
    splits, _ = load_prepared(tmp_path / "out")
    assert info.splits["test"].count == 200 and info.splits["test"].per_class == [20] * 10
    assert info.splits["public"].count == 100
    assert sum(s.count for n, s in info.splits.items() if n != "test") == 500
    # Splits of the train pool are disjoint: compare image bytes.
    raw = {name: {row["bytes"] for row in splits[name].cast_column("image", datasets.Image(decode=False))["image"]}
           for name in ("train", "validation", "holdout", "public")}
    names = list(raw)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not raw[a] & raw[b], f"{a} and {b} overlap"


def test_imagefolder_source(tmp_path, imagefolder_dir):
    cfg = IngestConfig(source="imagefolder", name=str(imagefolder_dir), **FRACTIONS)
    prepare(cfg, tmp_path / "out", "fm-folder", min_train_images=32)
    # Folder names are the classes, in case-insensitive order; "/" was replaced on disk.
    expected = sorted((c.replace("/", "-") for c in FASHION_MNIST_CLASSES), key=lambda s: (s.casefold(), s))
    _check_prepared(tmp_path / "out", 400, expected)


def test_save_to_disk_source_with_string_labels(tmp_path, saved_dataset_dir):
    cfg = IngestConfig(source="disk", name=str(saved_dataset_dir), **FRACTIONS)
    prepare(cfg, tmp_path / "out", "fm-disk", min_train_images=32)
    expected = sorted(FASHION_MNIST_CLASSES, key=lambda s: (s.casefold(), s))
    splits, info = _check_prepared(tmp_path / "out", 400, expected)
    assert info.splits["test"].count == 100


def test_hub_source_uses_load_dataset(tmp_path, fmnist_arrays):
    """A hub dataset repo laid out locally (data/<split>-*.parquet) goes through load_dataset(id)."""
    repo = tmp_path / "org" / "fashion"
    for split, dataset in make_dataset_dict(fmnist_arrays, image_column="img", label_column="fine_label").items():
        (repo / "data").mkdir(parents=True, exist_ok=True)
        dataset.to_parquet(str(repo / "data" / f"{split}-00000-of-00001.parquet"))
    cfg = IngestConfig(source="hub", name=str(repo), class_name_fixes={"Bag": "Handbag"}, **FRACTIONS)
    info = prepare(cfg, tmp_path / "out", "fm-hub", min_train_images=32)
    assert info.source["image_column"] == "img" and info.source["label_column"] == "fine_label"
    assert "Handbag" in info.classes and "Bag" not in info.classes
    # ClassLabel order is kept as the source defines it.
    assert info.classes[:3] == FASHION_MNIST_CLASSES[:3]


def test_carved_test_split_when_source_has_none(tmp_path, fmnist_arrays):
    only_train = make_dataset_dict({"train": fmnist_arrays["train"]})
    only_train.save_to_disk(str(tmp_path / "saved"))
    cfg = IngestConfig(source="disk", name=str(tmp_path / "saved"), test_split=None, test_fraction=0.25,
                       **FRACTIONS)
    info = prepare(cfg, tmp_path / "out", "carved", min_train_images=16)
    assert info.splits["test"].count == 100 and info.splits["test"].per_class == [10] * 10


def test_prepare_is_deterministic(tmp_path, saved_dataset_dir):
    cfg = IngestConfig(source="disk", name=str(saved_dataset_dir), **FRACTIONS)
    first = prepare(cfg, tmp_path / "a", "x", 8)
    second = prepare(cfg, tmp_path / "b", "x", 8)
    third = prepare(cfg.model_copy(update={"seed": 1}), tmp_path / "c", "x", 8)
    assert first.fingerprint == second.fingerprint != third.fingerprint


def test_stratified_split_properties():
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    parts = stratified_split(labels, {"validation": 0.1, "holdout": 0.3}, seed=7)
    everything = np.concatenate(list(parts.values()))
    assert len(everything) == len(labels) == len(np.unique(everything))
    for name, fraction in (("validation", 0.1), ("holdout", 0.3)):
        counts = np.bincount(labels[parts[name]], minlength=4)
        np.testing.assert_array_equal(counts, np.round(np.array([100, 50, 30, 20]) * fraction))
    again = stratified_split(labels, {"validation": 0.1, "holdout": 0.3}, seed=7)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)


# ------------------------------------------------------------------------------------- bad input
def _save(tmp_path, columns, features):
    path = tmp_path / "bad"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(columns, features=features),
                          "test": datasets.Dataset.from_dict(columns, features=features)}).save_to_disk(str(path))
    return IngestConfig(source="disk", name=str(path), **FRACTIONS)


def test_no_image_column(tmp_path):
    cfg = _save(tmp_path, {"pixels": [[0, 1]] * 20, "label": [0, 1] * 10},
                datasets.Features({"pixels": datasets.Sequence(datasets.Value("int64")),
                                   "label": datasets.ClassLabel(names=["a", "b"])}))
    with pytest.raises(DatasetError, match=r"no image column \(columns: \['pixels', 'label'\]\)"):
        prepare(cfg, tmp_path / "out", "x")


def test_no_label_column(tmp_path, fmnist_arrays):
    images = [np.zeros((8, 8), np.uint8)] * 20
    cfg = _save(tmp_path, {"image": images, "caption": ["a shoe"] * 20},
                datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}))
    with pytest.raises(DatasetError, match="no label column.*set ingest.label_column"):
        prepare(cfg, tmp_path / "out", "x")


def test_explicit_column_must_exist(tmp_path, saved_dataset_dir):
    cfg = IngestConfig(source="disk", name=str(saved_dataset_dir), label_column="species", **FRACTIONS)
    with pytest.raises(DatasetError, match="label column 'species' not in the dataset"):
        prepare(cfg, tmp_path / "out", "x")


def test_one_class(tmp_path, fmnist_arrays):
    images, _ = fmnist_arrays["train"]
    cfg = _save(tmp_path, {"image": list(images[:30]), "label": ["shoe"] * 30},
                datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")}))
    with pytest.raises(DatasetError, match=r"only one class \('shoe'\).*at least two"):
        prepare(cfg, tmp_path / "out", "x")


def test_fewer_images_than_a_batch(tmp_path, saved_dataset_dir):
    cfg = IngestConfig(source="disk", name=str(saved_dataset_dir), **FRACTIONS)
    with pytest.raises(DatasetError, match=r"has 240 images, fewer than one batch \(256\)"):
        prepare(cfg, tmp_path / "out", "x", min_train_images=256)


def test_unknown_hub_id_offline(tmp_path):
    cfg = IngestConfig(source="hub", name="no-such-org/no-such-dataset", **FRACTIONS)
    with pytest.raises(DatasetError, match="cannot load dataset 'no-such-org/no-such-dataset'.*offline mode is on"):
        prepare(cfg, tmp_path / "out", "x")


def test_missing_paths_and_splits(tmp_path, saved_dataset_dir):
    with pytest.raises(DatasetError, match="no dataset saved at"):
        prepare(IngestConfig(source="disk", name=str(tmp_path / "nowhere")), tmp_path / "o", "x")
    with pytest.raises(DatasetError, match="imagefolder directory .* does not exist"):
        prepare(IngestConfig(source="imagefolder", name=str(tmp_path / "nowhere")), tmp_path / "o", "x")
    with pytest.raises(DatasetError, match="source has no 'valid' test split"):
        prepare(IngestConfig(source="disk", name=str(saved_dataset_dir), test_split="valid"), tmp_path / "o", "x")
    with pytest.raises(DatasetError, match="not a prepared tckr dataset"):
        load_prepared(tmp_path)
