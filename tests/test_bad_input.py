"""The bad-input matrix: what a user can get wrong, and what the CLI then says. An error is one line naming the
problem (an image as the user knows it: its path in an imagefolder, its row in a source split), a non-zero exit
code, and no output written; data that is legal but degenerate is prepared, with a warning that says what the
figures will then mean."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tckr.cli import main
from tckr.data.ingest import FASHION_MNIST_CLASSES, load_prepared
from tckr.generators.config import FinetuneConfig, GeneratorConfig
from tckr.generators.lora import finetune_pixel_generator
from tckr.generators.pixel import pretrain_pixel_generator
from tests.conftest import make_dataset_dict, write_imagefolder

pytestmark = pytest.mark.unit

Arrays = dict[str, tuple[np.ndarray, np.ndarray]]


def _folder(label: int) -> str:
    """The class folder write_imagefolder makes for ``label``."""
    return FASHION_MNIST_CLASSES[label].replace("/", "-")


def _ingest(source: str, name: Path | str, *overrides: str) -> list[str]:
    settings = [f"ingest.source={source}", f"ingest.name={name}", "ingest.train_limit=null", "ingest.test_limit=null",
                *overrides]
    return ["stage", "ingest", "--profile", "smoke", *(arg for s in settings for arg in ("--set", s))]


def _imagefolder(tmp_path: Path, arrays: Arrays, change: Callable[[Path], None] = lambda root: None,
                 *overrides: str) -> list[str]:
    root = write_imagefolder(tmp_path / "photos", arrays)
    change(root)
    return _ingest("imagefolder", root, *overrides)


def _saved(tmp_path: Path, dataset, *overrides: str) -> list[str]:
    dataset.save_to_disk(str(tmp_path / "saved"))
    return _ingest("disk", tmp_path / "saved", *overrides)


def _first(root: Path) -> Path:
    """The first private-train candidate of class 4 (Coat)."""
    return sorted((root / "train" / _folder(4)).iterdir())[0]


def _add(root: Path, image: Image.Image, name: str, label: int = 4) -> None:
    image.save(root / "train" / _folder(label) / name)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _one_class(arrays: Arrays):
    return {split: (images, np.zeros_like(labels)) for split, (images, labels) in arrays.items()}


def _unseen_test_label(arrays: Arrays):
    import datasets

    dataset = make_dataset_dict(arrays, string_labels=True)
    test = dataset["test"].to_dict()
    test["label"][0] = "Parka"
    dataset["test"] = datasets.Dataset.from_dict(test, features=dataset["test"].features)
    return dataset


def _missing_image(arrays: Arrays):
    import datasets

    dataset = make_dataset_dict(arrays, string_labels=True)
    train = dataset["train"].cast_column("image", datasets.Image(decode=False)).to_dict()
    train["image"][3] = None
    dataset["train"] = datasets.Dataset.from_dict(train, features=datasets.Features(
        {"image": datasets.Image(), "label": datasets.Value("string")}))
    return dataset


def _rare_class(arrays: Arrays, keep: int) -> Arrays:
    images, labels = arrays["train"]
    drop = np.flatnonzero(labels == 4)[keep:]
    mask = np.ones(len(labels), bool)
    mask[drop] = False
    return arrays | {"train": (images[mask], labels[mask])}


def _teacher(prepared: Path, tmp_path: Path, *overrides: str, before: Callable[[Path], None] = lambda out: None,
             ) -> list[str]:
    before(tmp_path / "out")
    return ["stage", "teacher", "--profile", "smoke", *(arg for s in overrides for arg in ("--set", s)),
            "--data", str(prepared), "--model", str(tmp_path / "out")]


def _foreign_checkpoint(out: Path) -> None:
    """What another trainer left where this one would write."""
    import torch

    out.mkdir(parents=True)
    torch.save({"recipe": "privimage.pretrain", "settings": {}, "objects": {}}, out / "checkpoint.pt")


def _odd_names(arrays: Arrays):
    import datasets

    dataset = make_dataset_dict(arrays)
    return datasets.DatasetDict({split: part.cast_column("label", datasets.ClassLabel(names=ODD_NAMES))
                                 for split, part in dataset.items()})


ODD_NAMES = ["T-shirt/top", "trousers & jeans", "pull over", "Kleid", "manteau d'hiver", "sandale", "Hemd",
             "👟 sneaker", "bag (leather)", "ankle boot"]


TINY = GeneratorConfig(block_out_channels=[8, 16], attention_head_dim=4, steps=2, batch_size=8, max_text_tokens=12)


@dataclass(frozen=True)
class Generation:
    base: Path  # a tiny pixel generator
    adapter: Path  # a LoRA adapter trained on it
    foreign_adapter: Path  # one trained on a base of other widths
    captions: Path  # the prepared dataset's captions, as the caption stage lays them out


class Given:
    """What the cases of later stages start from: the smoke profile's prepared dataset and, built on first use,
    tiny generators and captions for it."""

    def __init__(self, prepared: Path, root: Path):
        self.prepared, self.root = prepared, root

    @functools.cached_property
    def generation(self) -> Generation:
        splits, info = load_prepared(self.prepared)
        labels = [int(label) for label in splits["train"]["label"]]
        captions = self.root / "captions"
        _write_captions(captions / "train", labels, info.classes)
        texts = [f"{info.classes[label]}: an item" for label in labels[:24]]
        pixels = torch.randint(0, 256, (24, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        paths = {}
        for name, widths in (("base", [8, 16]), ("other", [16, 32])):
            pretrain_pixel_generator(TINY.model_copy(update={"block_out_channels": widths}), pixels, texts,
                                     self.root / name, torch.device("cpu"))
            finetune_pixel_generator(self.root / name, pixels, texts, FinetuneConfig(rank=2, alpha=2, epochs=1,
                                     batch_size=8, grad_accum=1), self.root / f"{name}-lora", torch.device("cpu"))
            paths[name] = self.root / name
        return Generation(paths["base"], self.root / "base-lora", self.root / "other-lora", captions)


def _write_captions(split_dir: Path, labels: list[int], classes: list[str]) -> None:
    """A split's captions as the caption stage writes them (``run.json``, ``captions.jsonl``, by class)."""
    split_dir.mkdir(parents=True, exist_ok=True)
    (split_dir / "run.json").write_text(json.dumps({"captioner": "test", "template": "{class_name}: {caption}",
                                                    "classes": classes, "images": len(labels)}))
    records = [{"index": i, "label": label, "class_name": classes[label], "caption": "an item",
                "text": f"{classes[label]}: an item"} for i, label in enumerate(labels)]
    (split_dir / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    by_class = {name: [r["text"] for r in records if r["class_name"] == name] for name in classes}
    (split_dir / "captions_by_class.json").write_text(json.dumps(by_class))


def _finetune_on_captions(t: Path, p: Given, change: Callable[[list[int]], list[int]]) -> list[str]:
    """The LoRA stage given captions whose labels ``change`` made from the dataset's own."""
    splits, info = load_prepared(p.prepared)
    _write_captions(t / "captions" / "train", change([int(x) for x in splits["train"]["label"]]), info.classes)
    return ["stage", "finetune", "--profile", "smoke", "--data", str(p.prepared), "--captions", str(t / "captions"),
            "--base-model", str(p.generation.base), "--adapter", str(t / "out")]


def _rolled(labels: list[int]) -> list[int]:
    return labels[1:] + labels[:1]


def _generate(p: Given, adapter: Path, images: Path) -> list[str]:
    g = p.generation
    return ["stage", "generate_shard", "--profile", "smoke", "--captions", str(g.captions), "--base-model",
            str(g.base), "--adapter", str(adapter), "--shard", "0", "--images", str(images)]


@dataclass(frozen=True)
class Case:
    name: str
    argv: Callable[[Path, Arrays, Given], list[str]]  # (tmp_path, Fashion-MNIST arrays, what stages start from) -> CLI
    exit_code: int
    says: str  # a fragment of the error line, or of a warning when exit_code is 0 ("": prepared, nothing to say)
    prepared: Callable[[dict], bool] = lambda info: True  # what dataset.json must then hold
    left: Callable[[Path], bool] = lambda out: not out.exists()  # what a failure leaves in the output directory
    cpu_only: bool = False  # meaningful only where no GPU is visible


CASES = [
    # -- images that cannot be read: the file named as the user knows it
    Case("zero-byte image", lambda t, a, p: _imagefolder(t, a, lambda r: _first(r).write_bytes(b"")), 1,
         f"tckr: train/{_folder(4)}/00160.png: empty file (0 bytes)"),
    Case("truncated image", lambda t, a, p: _imagefolder(t, a, lambda r: _truncate(_first(r))), 1,
         f"tckr: train/{_folder(4)}/00160.png: truncated or corrupt image"),
    Case("not an image", lambda t, a, p: _imagefolder(t, a, lambda r: (r / "train" / _folder(4) / "notes.png")
                                                   .write_text("shopping list")), 1,
         f"tckr: train/{_folder(4)}/notes.png: not an image file PIL can read (13 bytes)"),
    Case("floating-point image", lambda t, a, p: _imagefolder(t, a, lambda r: _add(
        r, Image.fromarray(np.ones((28, 28), np.float32)), "float.tiff")), 1,
        f"tckr: train/{_folder(4)}/float.tiff: a floating-point image (PIL mode F)"),
    Case("row without an image", lambda t, a, p: _saved(t, _missing_image(a)), 1,
         "tckr: train row 3: no image (the image column is empty there)"),
    # -- columns and labels
    Case("image column named wrong", lambda t, a, p: _saved(t, make_dataset_dict(a, string_labels=True),
                                                         "ingest.image_column=photo"), 1,
         "tckr: image column 'photo' not in the dataset; columns: ['image', 'label']"),
    Case("no image column", lambda t, a, p: _saved(t, make_dataset_dict(a, string_labels=True).map(
        lambda row: {"pixels": str(row["image"].size)}, remove_columns=["image"])), 1,
        "tckr: dataset has no image column (columns: ['label', 'pixels']); set ingest.image_column"),
    Case("label column named wrong", lambda t, a, p: _saved(t, make_dataset_dict(a, string_labels=True),
                                                         "ingest.label_column=target"), 1,
         "tckr: label column 'target' not in the dataset"),
    Case("labels of the wrong type", lambda t, a, p: _saved(t, make_dataset_dict(a, string_labels=True).map(
        lambda row: {"label": 0.5})), 1, "tckr: label column 'label' has type Value('float64')"),
    Case("one class", lambda t, a, p: _saved(t, make_dataset_dict(_one_class(a), string_labels=True)), 1,
         "tckr: only one class ('T-shirt/top') in the train split: a classifier needs at least two"),
    Case("images outside any class folder", lambda t, a, p: _imagefolder(t, a, lambda r: [
        shutil.rmtree(folder) for folder in (r / "train").iterdir() if folder.name != _folder(0)]), 1,
        f"tckr: train/{_folder(0)}/00000.png has no label"),
    Case("test label the train split lacks", lambda t, a, p: _saved(t, _unseen_test_label(a)), 1,
         "tckr: split 'test' has label 'Parka' that the train split does not have"),
    Case("class with no private-train image after the split", lambda t, a, p: _imagefolder(
        t, _rare_class(a, keep=2), lambda r: None, "ingest.holdout_fraction=0.4"), 1,
        "tckr: classes with no image in the private train split: ['Coat']"),
    # -- where the data is
    Case("no test split", lambda t, a, p: _imagefolder(t, a, lambda r: shutil.rmtree(r / "test")), 1,
         "tckr: source has no 'test' test split; splits: ['train'] (set ingest.test_split: null"),
    Case("imagefolder missing", lambda t, a, p: _ingest("imagefolder", t / "nowhere"), 1,
         f"tckr: imagefolder directory '{'{tmp}'}/nowhere' does not exist"),
    Case("saved dataset missing", lambda t, a, p: _ingest("disk", t / "nowhere"), 1,
         "tckr: no dataset saved at '{tmp}/nowhere' (source: disk)"),
    Case("unknown hub id, offline", lambda t, a, p: _ingest("hub", "nobody/no-such-dataset"), 1,
         "tckr: cannot load dataset 'nobody/no-such-dataset' from the Hugging Face hub (offline mode is on)"),
    # -- legal but degenerate: prepared, with a warning that says what the figures then mean
    Case("RGBA among grey", lambda t, a, p: _imagefolder(t, a, lambda r: _add(
        r, Image.new("RGBA", (28, 28), (10, 20, 30, 128)), "alpha.png")), 0,
        "tckr: warning: 1 images were not 8-bit grey or RGB (RGBA: 1): converted"),
    Case("CMYK JPEG among grey", lambda t, a, p: _imagefolder(t, a, lambda r: _add(
        r, Image.new("CMYK", (28, 28), (0, 50, 100, 0)), "print.jpg")), 0, "(CMYK: 1): converted"),
    Case("16-bit PNG among 8-bit", lambda t, a, p: _imagefolder(t, a, lambda r: _add(
        r, Image.fromarray(np.full((28, 28), 40000, np.uint16)), "scan.png")), 0, "(I;16: 1): converted"),
    Case("palette PNG", lambda t, a, p: _imagefolder(t, a, lambda r: _add(
        r, Image.new("P", (28, 28), 3), "indexed.png")), 0, "(P: 1): converted"),
    Case("image far smaller than the profile's", lambda t, a, p: _imagefolder(t, a, lambda r: _add(
        r, Image.new("L", (1, 1), 128), "dot.png")), 0,
        f"tckr: warning: train/{_folder(4)}/dot.png is 1 px on its shorter side"),
    Case("image far larger than the profile's", lambda t, a, p: _imagefolder(t, a, lambda r: _add(
        r, Image.new("L", (3000, 2000), 128), "poster.png")), 0, "", lambda info: info["warnings"] == []),
    Case("class with one private-train image", lambda t, a, p: _imagefolder(t, _rare_class(a, keep=3)), 0,
         "tckr: warning: classes with fewer than 10 private-train images: {'Coat': 1}"),
    Case("class absent from the test split", lambda t, a, p: _imagefolder(t, a, lambda r: shutil.rmtree(
        r / "test" / _folder(4))), 0, "tckr: warning: classes with no test image: ['Coat']; test accuracy says"),
    Case("images duplicated across splits", lambda t, a, p: _imagefolder(t, a, lambda r: shutil.copytree(
        r / "train" / _folder(4), r / "test" / _folder(4), dirs_exist_ok=True)), 0,
        "of the test split are byte-identical to private-train images"),
    Case("odd and unicode class names", lambda t, a, p: _saved(t, _odd_names(a)), 0, "",
         lambda info: info["classes"] == ODD_NAMES and info["warnings"] == []),
    # -- stages past ingest: the teacher on a prepared dataset, its model directory as the output
    Case("no GPU where the profile asks for one", lambda t, a, p: _teacher(p.prepared, t, "runtime.device=cuda"), 1,
         "tckr: runtime.device is 'cuda' but no CUDA GPU is visible: run on a GPU node", cpu_only=True),
    Case("checkpoint of another recipe in the output",
         lambda t, a, p: _teacher(p.prepared, t, before=_foreign_checkpoint), 1,
         "checkpoint.pt is a checkpoint of 'privimage.pretrain', not of",
         left=lambda out: [path.name for path in out.iterdir()] == ["checkpoint.pt"]),
    # -- artifacts of earlier stages that do not belong together: refused before any model loads
    Case("captions in another order than the dataset", lambda t, a, p: _finetune_on_captions(t, p, _rolled), 1,
         "were not made for this dataset's train split (caption 0 describes a"),
    Case("captions of another dataset", lambda t, a, p: _finetune_on_captions(t, p, lambda labels: labels[:-5]), 1,
         "captions for"),
    Case("LoRA adapter made for another base model",
         lambda t, a, p: _generate(p, p.generation.foreign_adapter, t / "out"), 1,
         "was made for another base model than the one in"),
    # -- settings: exit code 2, the setting named, nothing run
    Case("setting typo", lambda t, a, p: ["config", "--profile", "smoke", "--set", "teacher.epohcs=3"], 2,
         "tckr: invalid profile 'smoke': teacher.epohcs: unknown setting (did you mean 'epochs'?)"),
    Case("epsilon <= 0", lambda t, a, p: [
        "config", "--profile", "smoke-privimage", "--set", "privacy.target_epsilon=0"], 2,
        "privacy.target_epsilon: Input should be greater than 0 (got 0)"),
    Case("delta >= 1", lambda t, a, p: ["config", "--profile", "smoke-privimage", "--set", "privacy.delta=1"], 2,
         "privacy.delta: Input should be less than 1 (got 1)"),
    Case("delta >= 1/N for the private set", lambda t, a, p: [
        "stage", "query", "--profile", "smoke-privimage", "--set", "privacy.delta=0.01", "--data", str(p.prepared),
        "--public", str(t / "pool"), "--selection", str(t / "out")], 2,
         "delta 0.01 is not in (0, 1/N = 0.0033) for N = 300 private images"),
    Case("synthetic ratio <= 0", lambda t, a, p: ["config", "--profile", "smoke", "--set", "generate.ratio=0"], 2,
         "generate.ratio: Input should be greater than 0 (got 0)"),
    Case("odd shadow count", lambda t, a, p: ["config", "--profile", "smoke", "--set", "attack.shadows=3"], 2,
         "attack: Value error, shadows must be even, so every example is IN for exactly half (got 3)"),
    Case("fewer than 2 shadows", lambda t, a, p: ["config", "--profile", "smoke", "--set", "attack.shadows=0"], 2,
         "attack.shadows: Input should be greater than or equal to 2 (got 0)"),
    Case("fractions that leave no private data", lambda t, a, p: [
        "config", "--profile", "smoke", "--set", "ingest.holdout_fraction=0.9"], 2,
        "leaves less than 5% of the train split for private training"),
    Case("unknown profile", lambda t, a, p: ["config", "--profile", "smoek"], 2, "tckr: unknown profile 'smoek'"),
]


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """One MLflow store for the module's stage runs (a new sqlite store costs seconds of migrations)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlruns.db'}"


@pytest.fixture(scope="module")
def given(tmp_path_factory, tracking_uri) -> Given:
    """The smoke profile's dataset, prepared once, for the cases of later stages."""
    root = tmp_path_factory.mktemp("given")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        assert main(["stage", "ingest", "--profile", "smoke", "--data", str(root / "data")]) == 0
    return Given(root / "data", root)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(case, tmp_path, fmnist_arrays, given, capsys, monkeypatch, tracking_uri):
    if case.cpu_only and torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    argv = case.argv(tmp_path, fmnist_arrays, given)
    out = tmp_path / "out"
    if argv[:2] == ["stage", "ingest"]:
        argv += ["--data", str(out)]
    code = main(argv)
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tckr:")]
    errors = [line for line in ours if not line.startswith("tckr: warning:")]
    says = case.says.replace("{tmp}", str(tmp_path))
    assert code == case.exit_code, ours
    if code:
        assert len(errors) == 1 and says in errors[0], ours
        assert "(got {" not in errors[0] and "Traceback" not in errors[0]
        assert case.left(out)  # nothing half-written
    else:
        assert errors == [] and (not says or any(says in line for line in ours)), ours
        if argv[:2] == ["stage", "ingest"]:
            info = json.loads((out / "dataset.json").read_text())
            assert says.removeprefix("tckr: warning: ") in " ".join(info["warnings"]) and case.prepared(info)


def test_images_of_other_modes_are_prepared_as_8_bit_grey_or_rgb(tmp_path, fmnist_arrays, monkeypatch, tracking_uri):
    """A 16-bit scan is scaled into 8 bits (PIL's own conversion would clip it to white) and an RGBA image loses
    its alpha; the dataset, grey otherwise, becomes RGB because one image is colour."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)

    def add(root: Path) -> None:
        for label in range(10):  # one of each in every class, so some land in the private train split
            _add(root, Image.fromarray(np.full((28, 28), 40000, np.uint16)), "scan.png", label)
            _add(root, Image.new("RGBA", (28, 28), (200, 100, 50, 7)), "alpha.png", label)

    assert main([*_imagefolder(tmp_path, fmnist_arrays, add), "--data", str(tmp_path / "out")]) == 0
    splits, info = load_prepared(tmp_path / "out")
    assert info.channels == 3 and "(I;16: 10, RGBA: 10): converted" in info.warnings[0]
    first_pixels = {tuple(np.asarray(image.convert("RGB"))[0, 0]) for split in splits.values()
                    for image in split["image"]}
    assert {image.mode for split in splits.values() for image in split["image"]} <= {"L", "RGB"}
    assert (156, 156, 156) in first_pixels and (200, 100, 50) in first_pixels  # 40000 / 65535 * 255 = 155.6


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (mounting one needs root, as in CI's container); skipped where the mount is refused."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_during_generation_is_one_line_and_the_shard_is_made_once_there_is_room(
        given, small_disk, capsys, monkeypatch, tracking_uri):
    """The disk fills while a shard's images are written: one line, exit 1, no shard (complete or not) published;
    with room again the same command makes the shard."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    filler = small_disk / "filler"
    filler.write_bytes(bytes(256 * 1024 - 24 * 1024))  # room for about 5 of the shard's 16 images
    out = small_disk / "images"
    argv = _generate(given, given.generation.adapter, out)
    assert main(argv) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tckr:")]
    assert len(errors) == 1 and errors[0].startswith("tckr: no space left on the device") \
        and "during stage generate_shard" in errors[0], errors
    assert not list(out.rglob("*.arrow")) and not list(out.rglob("*.partial"))
    filler.unlink()
    assert main(argv) == 0
    assert [path.name for path in (out / "shards").iterdir()] == ["shard-00000.arrow"]  # the staged images are gone
