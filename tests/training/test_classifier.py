import json

import pytest
import torch

from tckr.core.device import resolve_device
from tckr.data.images import BatchAugment, ImageSplit
from tckr.data.ingest import IngestConfig, load_prepared, prepare
from tckr.training.classifier import load_classifier, predict_logits, train_classifier
from tckr.training.config import ClassifierConfig
from tckr.training.models import create_classifier

pytestmark = pytest.mark.unit  # starts no server, trains nothing beyond a few steps


@pytest.fixture
def prepared(tmp_path, saved_dataset_dir):
    cfg = IngestConfig(source="disk", name=str(saved_dataset_dir), validation_fraction=0.1, holdout_fraction=0.2)
    prepare(cfg, tmp_path / "prepared", "fm", min_train_images=32)
    return load_prepared(tmp_path / "prepared")


def _recipe(**changes):
    values = {"model": "tckr_cnn", "epochs": 2, "batch_size": 32, "lr": 3e-3, "crop_padding": 1, "seed": 3}
    return ClassifierConfig(**(values | changes))


def test_batch_augment_normalises_and_crops():
    augment = BatchAugment([0.5], [0.25], crop_padding=2, hflip=True)
    images = torch.full((4, 1, 8, 8), 255, dtype=torch.uint8)
    plain = augment(images)
    assert torch.allclose(plain, torch.full_like(plain, 2.0))
    torch.manual_seed(0)
    cropped = augment(images, train=True)
    assert cropped.shape == plain.shape
    # Padding is zero after normalisation (the dataset mean); at most 2 rows/cols of it per side.
    for sample in cropped:
        content = (sample == 2.0).sum()
        assert (8 - 2) ** 2 <= content <= 64
        assert set(sample.unique().tolist()) <= {0.0, 2.0}


def test_image_split_resizes_to_pipeline_resolution(prepared):
    splits, info = prepared
    items = ImageSplit(splits["train"], 16, info.channels)
    image, label = items[0]
    assert image.dtype == torch.uint8 and image.shape == (1, 16, 16)
    assert int(label) == splits["train"][0]["label"]
    augmix = ImageSplit(splits["train"], 16, info.channels, augmix=True)[0][0]
    assert augmix.shape == (1, 16, 16) and augmix.dtype == torch.uint8


def test_train_select_test_and_reload(tmp_path, prepared):
    splits, info = prepared
    records = []
    result = train_classifier(_recipe(epochs=3), splits, info, 16, tmp_path / "teacher", torch.device("cpu"),
                              on_epoch=records.append)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert result.best_epoch == max(range(1, 4), key=lambda e: (records[e - 1]["val_accuracy"], -e))
    assert result.val_accuracy == max(r["val_accuracy"] for r in records)
    assert result.test_accuracy > 0.3  # 10 classes, 240 training images: well above chance (0.1)
    card = json.loads((tmp_path / "teacher" / "model.json").read_text())
    assert card["image_size"] == 16 and card["classes"] == info.classes
    model = load_classifier(tmp_path / "teacher")
    test = ImageSplit(splits["test"], 16, info.channels)
    logits = predict_logits(model, BatchAugment(info.mean, info.std), test, 64, torch.device("cpu"))
    assert float((logits.argmax(1) == test.labels).float().mean()) == pytest.approx(result.test_accuracy)


def test_resume_after_kill_continues_not_restarts(tmp_path, prepared):
    splits, info = prepared
    uninterrupted = train_classifier(_recipe(epochs=2), splits, info, 16, tmp_path / "full", torch.device("cpu"))
    # "Kill" after epoch 1: the checkpoint of a 2-epoch recipe stops at epoch 1 ...
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train_classifier(_recipe(epochs=2), splits, info, 16, cut, torch.device("cpu"),
                         on_epoch=lambda record: _raise_after(record, 1))
    resumed_epochs = []
    resumed = train_classifier(_recipe(epochs=2), splits, info, 16, cut, torch.device("cpu"),
                               on_epoch=resumed_epochs.append)
    assert [r["epoch"] for r in resumed_epochs] == [1, 2]  # epoch 1's report, cut short by the kill, again
    assert resumed.epochs_run == 2
    # ... and the resumed run ends exactly where the uninterrupted one did.
    assert resumed.history[-1]["train_loss"] == pytest.approx(uninterrupted.history[-1]["train_loss"], rel=1e-5)
    assert resumed.test_accuracy == pytest.approx(uninterrupted.test_accuracy)


def _raise_after(record, epoch):
    if record["epoch"] == epoch:
        raise KeyboardInterrupt


def test_changed_recipe_does_not_resume(tmp_path, prepared):
    splits, info = prepared
    with pytest.raises(KeyboardInterrupt):
        train_classifier(_recipe(epochs=2), splits, info, 16, tmp_path / "t", torch.device("cpu"),
                         on_epoch=lambda record: _raise_after(record, 1))
    epochs = []
    train_classifier(_recipe(epochs=2, lr=1e-3), splits, info, 16, tmp_path / "t", torch.device("cpu"),
                     on_epoch=epochs.append)
    assert [r["epoch"] for r in epochs] == [1, 2]


def test_finished_training_leaves_no_checkpoint_and_retrains_once_its_outputs_are_gone(tmp_path, prepared):
    """`dvc repro` deletes a stage's outputs before running it: a checkpoint of the finished run left beside them
    would resume at "nothing to do" and then find no model to test."""
    splits, info = prepared
    first = train_classifier(_recipe(epochs=1), splits, info, 16, tmp_path / "t", torch.device("cpu"))
    assert sorted(path.name for path in (tmp_path / "t").iterdir()) == ["history.csv", "model.json",
                                                                        "model.safetensors"]
    for path in (tmp_path / "t").iterdir():
        path.unlink()
    epochs = []
    again = train_classifier(_recipe(epochs=1), splits, info, 16, tmp_path / "t", torch.device("cpu"),
                             on_epoch=epochs.append)
    assert [r["epoch"] for r in epochs] == [1] and again.test_accuracy == pytest.approx(first.test_accuracy)


def test_mixup_teacher_trains(tmp_path, prepared):
    splits, info = prepared
    result = train_classifier(_recipe(epochs=1, mixup_alpha=0.8), splits, info, 16, tmp_path / "m",
                              torch.device("cpu"))
    assert 0.0 <= result.test_accuracy <= 1.0 and result.epochs_run == 1


def test_factory_errors():
    with pytest.raises(ValueError, match="unknown classifier 'resnet_nope'"):
        create_classifier("resnet_nope", 10, 1)
    with pytest.raises(ValueError, match="no pretrained weights"):
        create_classifier("tckr_cnn", 10, 1, pretrained=True)
    with pytest.raises(RuntimeError, match="not in the local Hugging Face cache.*pretrained: false"):
        create_classifier("mobilenetv3_small_100", 10, 1, pretrained=True)  # tests run with HF_HUB_OFFLINE=1
    model = create_classifier("mobilenetv3_small_100", 10, 1)
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_missing_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no CUDA GPU is visible.*runtime.device=auto"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


@pytest.mark.gpu
def test_amp_training_on_gpu(tmp_path, prepared):
    splits, info = prepared
    result = train_classifier(_recipe(epochs=1), splits, info, 16, tmp_path / "g", torch.device("cuda"))
    assert result.epochs_run == 1
