"""The one resumable training loop: kill and resume bit for bit, whose checkpoint it is, atomic writes."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tckr.core.errors import TckrError
from tckr.training.loop import CheckpointMismatchError, Loop

pytestmark = pytest.mark.unit
CPU = torch.device("cpu")


class Killed(Exception):
    """A kill -9 between two steps or epochs, as a callback can simulate it."""


def toy_run(path: Path, unit: str, *, length: int = 4, recipe: str = "tckr.toy", settings: str = "a", every: int = 1,
            kill_epoch: int | None = None, kill_step: int | None = None) -> tuple[Loop, nn.Module, list]:
    """A small model trained for ``length`` epochs (3 batches each) or steps, drawing on every RNG a real
    trainer does (a DataLoader's generator, torch's and NumPy's global ones), killed by a callback after
    ``kill_epoch`` epochs or ``kill_step`` steps. Returns the loop, the model and the epochs (or steps) reported."""
    torch.manual_seed(0)
    np.random.seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))
    data = TensorDataset(torch.randn(24, 4), torch.randint(0, 3, (24,)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    generator = torch.Generator().manual_seed(1)
    loader = DataLoader(data, batch_size=8, shuffle=True, generator=generator)
    loop = Loop(path, recipe, settings,
                {"model": model, "optimizer": optimizer, "scheduler": scheduler, "generator": generator},
                {"history": []}, desc="toy")
    reported = []

    def step(batch) -> float:
        x, y = data[torch.randint(0, len(data), (8,))] if unit == "step" else batch
        x = x + torch.randn_like(x) * float(np.random.rand())
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loop.extra["history"].append(loss.item())
        return loss.item()

    def end_epoch(epoch: int, loss: float) -> dict:
        scheduler.step()
        return {"epoch": epoch, "train_loss": loss}

    def on_step(count: int, _loss: float) -> None:
        if unit == "step":
            reported.append(count)
        if count == kill_step:
            raise Killed

    def on_epoch(record: dict) -> None:
        reported.append(record["epoch"])
        if record["epoch"] == kill_epoch:
            raise Killed

    if unit == "epoch":
        loop.run_epochs(length, lambda epoch: loader, step, end_epoch, on_step=on_step, on_epoch=on_epoch)
    else:
        loop.run_steps(length, step, every=every, on_step=on_step)
    return loop, model, reported


def assert_same_run(a: tuple[Loop, nn.Module, list], b: tuple[Loop, nn.Module, list]) -> None:
    assert a[0].extra == b[0].extra and (a[0].done, a[0].steps) == (b[0].done, b[0].steps)
    for (name, left), right in zip(a[1].state_dict().items(), b[1].state_dict().values(), strict=True):
        assert torch.equal(left, right), name


@pytest.mark.parametrize(("unit", "kill", "rerun"), [
    # killed while epoch 2 was reported, after its checkpoint: its report again (at least once), then epochs 3 and 4
    ("epoch", {"kill_epoch": 2}, [2, 3, 4]),
    ("epoch", {"kill_step": 5}, [1, 2, 3, 4]),  # mid-epoch 2: redone from epoch 1's checkpoint, whose report repeats
    ("step", {"kill_step": 7}, [7, 8, 9, 10]),  # every 3 steps: the checkpoint of step 6 survives
])
def test_killed_run_resumes_bit_identical(tmp_path, unit, kill, rerun):
    length, every = (4, 1) if unit == "epoch" else (10, 3)
    whole = toy_run(tmp_path / "whole.pt", unit, length=length, every=every)
    with pytest.raises(Killed):
        toy_run(tmp_path / "cut.pt", unit, length=length, every=every, **kill)
    resumed = toy_run(tmp_path / "cut.pt", unit, length=length, every=every)
    assert resumed[2] == rerun
    assert_same_run(resumed, whole)


def test_foreign_recipe_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "checkpoint.pt"
    toy_run(path, "epoch", length=1, recipe="privimage.dp-sgd")
    before = path.read_bytes()
    with pytest.raises(CheckpointMismatchError, match=r"'privimage\.dp-sgd', not of 'tckr\.classifier'") as error:
        toy_run(path, "epoch", recipe="tckr.classifier")
    assert isinstance(error.value, TckrError)
    assert path.read_bytes() == before


def test_other_settings_start_over(tmp_path, capsys):
    toy_run(tmp_path / "fresh.pt", "epoch", settings="b")
    toy_run(tmp_path / "checkpoint.pt", "epoch", length=2, settings="a")
    capsys.readouterr()
    restarted = toy_run(tmp_path / "checkpoint.pt", "epoch", settings="b")
    assert "other settings" in capsys.readouterr().out
    assert restarted[2] == [1, 2, 3, 4]
    assert_same_run(restarted, toy_run(tmp_path / "fresh.pt", "epoch", settings="b", length=4))


def test_checkpoint_is_replaced_atomically(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    toy_run(path, "epoch", length=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]

    def torn_save(obj, file):
        Path(file).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        toy_run(path, "epoch", length=2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert torch.load(path, weights_only=False)["done"] == 1


# --------------------------------------------------------------- each trainer refuses another's checkpoint
def denoise_one_step(checkpoint: Path, recipe: str) -> list[float]:
    """One step of a tiny pixel UNet on noise, prompts made up (no text encoder to load)."""
    from tckr.generators.config import GeneratorConfig
    from tckr.generators.pixel import DenoiserData, PromptBank, build_noise_scheduler, build_unet, train_denoiser

    cfg = GeneratorConfig(block_out_channels=[8, 16], attention_head_dim=4)
    torch.manual_seed(0)
    unet = build_unet(cfg, 1, 8, text_dim=16)
    data = DenoiserData(torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8),
                        PromptBank(torch.zeros(2, 4, 16, dtype=torch.half), torch.ones(8, dtype=torch.long)))
    return train_denoiser(unet, list(unet.parameters()), data, build_noise_scheduler(cfg), steps=1, batch_size=8,
                          grad_accum=1, lr=1e-3, weight_decay=0.0, max_grad_norm=1.0, caption_dropout=0.0,
                          random_flip=False, seed=0, device=CPU, checkpoint=checkpoint, recipe=recipe)


def test_lora_refuses_a_pretraining_checkpoint(tmp_path):
    denoise_one_step(tmp_path / "lora-checkpoint.pt", "tckr.pretrain")
    with pytest.raises(CheckpointMismatchError, match=r"'tckr\.pretrain', not of 'tckr\.lora'"):
        denoise_one_step(tmp_path / "lora-checkpoint.pt", "tckr.lora")


def test_classifier_refuses_a_denoiser_checkpoint(tmp_path, saved_dataset_dir):
    from tckr.data.ingest import IngestConfig, load_prepared, prepare
    from tckr.training.classifier import train_classifier
    from tckr.training.config import ClassifierConfig

    prepare(IngestConfig(source="disk", name=str(saved_dataset_dir), validation_fraction=0.1), tmp_path / "data",
            "fm", min_train_images=32)
    splits, info = load_prepared(tmp_path / "data")
    (tmp_path / "teacher").mkdir()
    denoise_one_step(tmp_path / "teacher" / "checkpoint.pt", "tckr.pretrain")
    with pytest.raises(CheckpointMismatchError, match=r"'tckr\.pretrain', not of 'tckr\.classifier'"):
        train_classifier(ClassifierConfig(model="tckr_cnn", epochs=1, batch_size=32), splits, info, 16,
                         tmp_path / "teacher", CPU)
    assert not (tmp_path / "teacher" / "model.safetensors").exists()


def test_shadow_group_refuses_a_checkpoint_of_another_recipe(tmp_path):
    from types import SimpleNamespace

    from tckr.privacy.shadows import Population, train_shadow_group
    from tckr.training.config import ClassifierConfig

    images, labels = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8), torch.arange(40) % 10
    population = Population(images, labels, np.r_[np.ones(20, bool), np.zeros(20, bool)], np.arange(40))
    keep = np.zeros((2, 40), dtype=bool)
    keep[0, ::2] = keep[1, 1::2] = True
    info = SimpleNamespace(mean=[0.5], std=[0.25], num_classes=10, channels=1)
    Loop(tmp_path / "group-0000-0001.pt", "privimage.dp-sgd", "", {}).run_steps(1, lambda index: 0.0)
    with pytest.raises(CheckpointMismatchError, match=r"'privimage\.dp-sgd', not of 'tckr\.shadows'"):
        train_shadow_group(ClassifierConfig(model="tckr_cnn", epochs=1, batch_size=10), [0, 1], keep, population,
                           (images[:10], labels[:10]), info, tmp_path, CPU, vectorize=False)
    assert not list(tmp_path.glob("shadow-*"))


def test_a_retried_pod_resumes_from_the_shared_volume(tmp_path, monkeypatch):
    """KFP retries a dead pod as a new one with new output paths: with the pipeline's volume, the checkpoint
    is in the task's folder there (named by what the task is), so the retry resumes; without, it starts over."""
    from tckr.core.volume import CHECKPOINT_DIR_ENV, VOLUME_ENV, enter_task

    whole = toy_run(tmp_path / "whole.pt", "epoch")
    identity = {"data": "s3://mlpipeline/v2/artifacts/run-1/ingest/data", "teacher": '{"epochs": 4}'}
    monkeypatch.setenv(CHECKPOINT_DIR_ENV, "")  # enter_task sets it: recorded here so that it is undone after
    monkeypatch.setenv(VOLUME_ENV, str(tmp_path / "volume"))
    folder = enter_task("tckr", "teacher", identity)
    with pytest.raises(Killed):
        toy_run(tmp_path / "pod-1" / "checkpoint.pt", "epoch", kill_epoch=2)
    assert not (tmp_path / "pod-1").exists() and (folder / "checkpoint.pt").is_file()
    assert enter_task("tckr", "teacher", dict(identity)) == folder  # the retry: same task, a new pod
    retried = toy_run(tmp_path / "pod-2" / "checkpoint.pt", "epoch")
    assert retried[2] == [2, 3, 4]  # epoch 2, whose report the kill cut short, reported again
    assert_same_run(retried, whole)
    # Another task (another input) has its own folder; a pod without the volume keeps its checkpoint beside it.
    assert enter_task("tckr", "teacher", identity | {"data": "s3://other"}) != folder
    monkeypatch.delenv(VOLUME_ENV)
    monkeypatch.delenv(CHECKPOINT_DIR_ENV)
    assert enter_task("tckr", "teacher", identity) is None
    (tmp_path / "pod-3").mkdir()
    toy_run(tmp_path / "pod-3" / "checkpoint.pt", "epoch", length=1)
    assert (tmp_path / "pod-3" / "checkpoint.pt").is_file()
