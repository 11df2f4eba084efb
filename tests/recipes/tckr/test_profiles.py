"""The paper-<dataset> profiles: every dataset of the TCKR paper, its hub schema, and split fractions that let
LiRA's shadows train on as many images as the target; and the attack's refusal when they could not.

The schema tests build a tiny local ``DatasetDict`` shaped like each hub dataset (column names and feature
types, extra columns, split names, a few real class names including the ones a profile fixes) from crops of
real photographs, save it, and run the profile's own ingest settings on it with only the source switched to
disk."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
from PIL import Image

from tckr.data.ingest import prepare, stratified_split
from tckr.privacy.lira import AttackError
from tckr.privacy.shadows import build_population, check_population
from tckr.recipes.config import load_config

PAPER = ["cifar10", "cifar100", "pets", "tinyimagenet", "stanfordcars", "food101", "stl10", "imagenette",
         "imagewoof", "caltech101"]
HUB_IDS = {"cifar10": "uoft-cs/cifar10", "cifar100": "uoft-cs/cifar100", "pets": "Isamu136/oxford_pets_with_l14_emb",
           "tinyimagenet": "zh-plus/tiny-imagenet", "stanfordcars": "Multimodal-Fatima/StanfordCars_train",
           "food101": "Multimodal-Fatima/Food101_train", "stl10": "tanganke/stl10",
           "imagenette": "Multimodal-Fatima/Imagenette_train", "imagewoof": "frgfm/imagewoof",
           "caltech101": "dpdl-benchmark/caltech101"}
# Everything but these is the paper-cifar10 recipe (the profiles extend it).
DATASET_SETTINGS = {"profile", "dataset", "ingest", "generate"}


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """Real colour photographs shipped with scikit-learn (no download)."""
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)


def _crop(photos: list[np.ndarray], index: int, size: tuple[int, int]) -> Image.Image:
    """A different real crop per index, resized to ``size`` (width, height)."""
    photo = photos[index % len(photos)]
    height, width = photo.shape[:2]
    side = 96 + 16 * (index % 5)
    top = (37 * index) % (height - side)
    left = (61 * index) % (width - side)
    return Image.fromarray(photo[top:top + side, left:left + side]).resize(size, Image.BICUBIC)


# ------------------------------------------------------------------------------------------- hub schemas
# Per dataset: the hub's features (label feature built from the class names below), split names with images
# per class, a few real class names as the hub spells them, extra column values, image sizes, greyscale rows.
def _class_label(names):
    return datasets.ClassLabel(names=names)


SCHEMAS = {
    "cifar10": dict(
        columns=lambda names: {"img": datasets.Image(), "label": _class_label(names)},
        splits={"train": 14, "test": 2}, names=["airplane", "automobile", "bird"], size=(32, 32)),
    "cifar100": dict(
        columns=lambda names: {"img": datasets.Image(), "fine_label": _class_label(names),
                               "coarse_label": _class_label(CIFAR100_COARSE)},
        splits={"train": 14, "test": 2}, names=["aquarium_fish", "cra", "maple_tree"], size=(32, 32),
        extra=lambda cls, i: {"coarse_label": [1, 13, 17][cls]}),
    "pets": dict(
        columns=lambda names: {"path": datasets.Value("string"), "label": datasets.Value("string"),
                               "dog": datasets.Value("bool"), "image": datasets.Image(),
                               "embeddings": datasets.Sequence(datasets.Value("float32"))},
        splits={"train": 14}, names=["Abyssinian", "american bulldog", "Siamese"], size=(50, 40), string=True,
        extra=lambda cls, i: {"path": f"{['Abyssinian', 'american_bulldog', 'Siamese'][cls]}_{i}.jpg",
                              "dog": cls == 1, "embeddings": np.linspace(-1, 1, 768, dtype=np.float32).tolist()}),
    "tinyimagenet": dict(
        columns=lambda names: {"image": datasets.Image(), "label": _class_label(names)},
        splits={"train": 14, "valid": 2}, names=["n01443537", "n01629819", "n01641577"], size=(64, 64),
        grey_rows=(3,)),
    "stanfordcars": dict(
        columns=lambda names: {"image": datasets.Image(), "label": _class_label(names), "id": datasets.Value("int64"),
                               "clip_tags_ViT_L_14": datasets.Sequence(datasets.Value("string"))},
        splits={"train": 14}, names=["am general hummer suv 2000", "acura rl sedan 2012", "audi tts coupe 2012"],
        size=(60, 40), extra=lambda cls, i: {"id": 100 * cls + i, "clip_tags_ViT_L_14": ["car", "road"]}),
    "food101": dict(
        columns=lambda names: {"image": datasets.Image(), "label": _class_label(names), "id": datasets.Value("int64"),
                               "clip_tags_ViT_L_14_with_openai_classes": datasets.Sequence(datasets.Value("string")),
                               "clip_tags_ViT_L_14_simple_specific": datasets.Value("string")},
        splits={"train": 14}, names=["apple pie", "beignets", "prime rib"], size=(48, 48),
        extra=lambda cls, i: {"id": 100 * cls + i, "clip_tags_ViT_L_14_with_openai_classes": ["dessert", "fork"],
                              "clip_tags_ViT_L_14_simple_specific": ["apple pie", "beignets", "prime rib"][cls]}),
    "stl10": dict(
        columns=lambda names: {"image": datasets.Image(), "label": _class_label(names)},
        splits={"train": 14, "test": 2}, names=["airplane", "bird", "car"], size=(96, 96)),
    "imagenette": dict(
        columns=lambda names: {"image": datasets.Image(), "label": _class_label(names), "id": datasets.Value("int64")},
        splits={"train": 14}, names=["tench", "English springer", "cassette player"], size=(56, 48),
        extra=lambda cls, i: {"id": 100 * cls + i}),
    "imagewoof": dict(
        columns=lambda names: {"image": datasets.Image(), "label": _class_label(names)},
        splits={"train": 14, "validation": 2}, names=["Australian terrier", "Border terrier", "Shih-Tzu"],
        size=(48, 56)),
    "caltech101": dict(
        columns=lambda names: {"image": datasets.Image(), "label": _class_label(names)},
        splits={"train": 14, "test": 2}, names=["accordion", "background_google", "faces"], size=(60, 44),
        grey_rows=(5,)),
}
CIFAR100_COARSE = ["aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
                   "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
                   "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "large_omnivores_and_herbivores",
                   "medium_mammals", "non-insect_invertebrates", "people", "reptiles", "small_mammals", "trees",
                   "vehicles_1", "vehicles_2"]


def _hub_like(name: str, photos) -> datasets.DatasetDict:
    schema = SCHEMAS[name]
    names = schema["names"]
    features = datasets.Features(schema["columns"](names))
    image_column = next(column for column, feature in features.items() if isinstance(feature, datasets.Image))
    label_column = next(column for column in features if column in ("label", "fine_label"))
    splits, index = {}, 0
    for split, per_class in schema["splits"].items():
        rows = {column: [] for column in features}
        for cls in range(len(names)):
            for i in range(per_class):
                image = _crop(photos, index, schema["size"])
                if i in schema.get("grey_rows", ()):
                    image = image.convert("L")  # as in the real dataset: a few greyscale images among colour ones
                row = {image_column: image, label_column: names[cls] if schema.get("string") else cls}
                row |= schema.get("extra", lambda c, j: {})(cls, i)
                for column in features:
                    rows[column].append(row[column])
                index += 1
        splits[split] = datasets.Dataset.from_dict(rows, features=features)
    return datasets.DatasetDict(splits)


@pytest.mark.unit
@pytest.mark.parametrize("name", PAPER)
def test_paper_profile_resolves_to_the_paper_recipe_on_its_dataset(name):
    cfg = load_config(f"paper-{name}")
    reference = load_config("paper-cifar10")
    assert cfg.dataset == name and cfg.profile == f"paper-{name}"
    assert cfg.ingest.source == "hub" and cfg.ingest.name == HUB_IDS[name]
    assert cfg.ingest.image_column and cfg.ingest.label_column  # explicit, never guessed
    assert cfg.ingest.hub_config == ("full_size" if name == "imagewoof" else None)
    assert cfg.generate.ratio == (10 if name == "caltech101" else 20)
    assert cfg.ingest.validation_fraction == 0.05 and cfg.ingest.holdout_fraction in (0.475, 0.485)
    assert cfg.ingest.public_fraction == 0 and cfg.ingest.seed == reference.ingest.seed
    assert cfg.ingest.test_split is not None or cfg.ingest.test_fraction > 0
    mine, theirs = cfg.model_dump(), reference.model_dump()
    assert {key: mine[key] for key in mine if key not in DATASET_SETTINGS} == {
        key: theirs[key] for key in theirs if key not in DATASET_SETTINGS}
    assert {k: v for k, v in mine["generate"].items() if k != "ratio"} == {
        k: v for k, v in theirs["generate"].items() if k != "ratio"}


@pytest.mark.unit
@pytest.mark.parametrize("name", PAPER)
def test_paper_profile_prepares_a_dataset_of_its_hub_schema(name, photos, tmp_path):
    hub = _hub_like(name, photos)
    hub.save_to_disk(str(tmp_path / "hub"))
    cfg = load_config(f"paper-{name}", ["ingest.source=disk", f"ingest.name={tmp_path / 'hub'}"])
    schema = SCHEMAS[name]

    info = prepare(cfg.ingest, tmp_path / "prepared", cfg.dataset)

    fixes = cfg.ingest.class_name_fixes
    expected = [fixes.get(n, n) for n in schema["names"]]
    if schema.get("string"):  # string labels: case-insensitive order
        expected = sorted(expected, key=lambda n: (n.casefold(), n))
    assert info.classes == expected
    if name == "cifar100":
        assert "crab" in info.classes and "cra" not in info.classes
    assert info.channels == 3
    assert info.source["image_column"] == cfg.ingest.image_column
    assert info.source["label_column"] == cfg.ingest.label_column
    assert set(hub) == {cfg.ingest.train_split} | ({cfg.ingest.test_split} if cfg.ingest.test_split else set())
    counts = {split: summary.count for split, summary in info.splits.items()}
    if cfg.ingest.test_split:
        assert counts["test"] == len(hub[cfg.ingest.test_split])
    else:
        assert counts["test"] > 0
    assert sum(counts.values()) == sum(len(split) for split in hub.values())
    assert counts["validation"] > 0
    assert counts["holdout"] >= counts["train"] > 0


# ---------------------------------------------------------------------------------- real dataset sizes
IMAGENETTE_TRAIN = [963, 955, 993, 858, 941, 956, 961, 931, 951, 960]  # fastai imagenette2, 9,469 in all
# (test, validation, holdout, train) for the hub train split's real class sizes; None: class sizes uneven or
# not known exactly here, covered by the per-class guarantee below.
REAL = {
    "cifar10": ([5000] * 10, (10000, 2500, 23750, 23750)),
    "cifar100": ([500] * 100, (10000, 2500, 23800, 23700)),
    "tinyimagenet": ([500] * 200, (10000, 5000, 47600, 47400)),
    "stl10": ([500] * 10, (8000, 250, 2380, 2370)),
    "caltech101": ([30] * 102, (None, 204, 1428, 1428)),
    "food101": ([750] * 101, (11312, 3232, 30603, 30603)),
    "imagenette": (IMAGENETTE_TRAIN, (1420, 403, 3904, 3742)),
    "pets": None, "stanfordcars": None, "imagewoof": None,
}


def _split_sizes(ingest, class_sizes):
    """(carved test, validation, holdout, train) exactly as ``prepare`` divides these class sizes."""
    labels = np.repeat(np.arange(len(class_sizes)), class_sizes)
    test = None
    if ingest.test_split is None:
        carved = stratified_split(labels, {"test": ingest.test_fraction}, ingest.seed + 1)
        test, labels = len(carved["test"]), labels[carved["train"]]
    parts = stratified_split(labels, {"validation": ingest.validation_fraction,
                                      "holdout": ingest.holdout_fraction}, ingest.seed)
    return test, len(parts["validation"]), len(parts["holdout"]), len(parts["train"])


@pytest.mark.unit
@pytest.mark.parametrize("name", PAPER)
def test_holdout_is_at_least_the_private_train_split_at_real_size(name):
    ingest = load_config(f"paper-{name}").ingest
    if REAL[name] is not None:
        class_sizes, (test, validation, holdout, train) = REAL[name]
        carved, *rest = _split_sizes(ingest, class_sizes)
        assert rest == [validation, holdout, train]
        assert carved == (test if ingest.test_split is None else None)
        assert holdout >= train
    else:  # per class, for every class size: then in total, whatever the sizes
        assert ingest.holdout_fraction == 0.485
        for size in range(12, 2001):
            _, _, holdout, train = _split_sizes(ingest, [size])
            assert holdout >= train, f"a class of {size} images: holdout {holdout} < train {train}"


# ---------------------------------------------------------------------------------------------- refusal
def _splits(photos, train: int, holdout: int) -> dict[str, datasets.Dataset]:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})

    def split(count, offset):
        return datasets.Dataset.from_dict({"image": [_crop(photos, offset + i, (16, 16)) for i in range(count)],
                                           "label": [i % 2 for i in range(count)]}, features=features)

    return {"train": split(train, 0), "holdout": split(holdout, 100)}


@pytest.mark.unit
def test_attack_refuses_a_holdout_smaller_than_the_train_split(photos):
    with pytest.raises(AttackError, match=r"holdout split has 5 images, fewer than the 6 private train") as caught:
        build_population(_splits(photos, 6, 5), image_size=8, channels=3, seed=0)
    message = str(caught.value)
    assert "\n" not in message and "ingest.holdout_fraction" in message


@pytest.mark.unit
def test_population_holds_every_train_image_and_as_many_non_members(photos):
    population = build_population(_splits(photos, 6, 9), image_size=8, channels=3, seed=0)
    assert len(population) == 12 and population.is_member.sum() == 6
    assert population.split_rows[population.is_member].tolist() == list(range(6))  # every image the target saw
    non_members = population.split_rows[~population.is_member]
    assert len(set(non_members.tolist())) == 6 and non_members.max() < 9
    assert population.images.shape == (12, 3, 8, 8)


@pytest.mark.unit
def test_check_population_compares_with_the_images_the_target_trained_on():
    check_population(trained=10_000, holdout=10_000)  # the demo profile
    check_population(trained=300, holdout=300)  # the smoke profile
    with pytest.raises(AttackError, match="holdout split has 14999 images"):
        check_population(trained=32_500, holdout=14_999)  # the old paper-cifar10 fractions
