"""The attack's world, shared by LiRA's and RMIA's tests: real 8 px Fashion-MNIST images and eight shadows."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tckr.privacy.lira import balanced_keep_matrix
from tckr.privacy.shadows import Population, train_shadow_group
from tckr.training.config import ClassifierConfig

CPU = torch.device("cpu")
# fp32 on every machine (amp off): the attack's figures on this world must not depend on whether a CPU has bf16.
RECIPE = ClassifierConfig(model="tckr_cnn", epochs=12, batch_size=50, lr=3e-3, label_smoothing=0.0,
                          crop_padding=0, hflip=False, amp=False, eval_batch_size=500, seed=0)
INFO = SimpleNamespace(mean=[0.29], std=[0.35], num_classes=10, channels=1)


@pytest.fixture(scope="session")
def world(fmnist_head):
    """1,000 real 8 px images: 500 members, 500 non-members, then 500 outsiders; 8 shadows."""
    images, labels = fmnist_head
    pixels = torch.nn.functional.interpolate(torch.tensor(images[:1500]).float().unsqueeze(1), size=8,
                                             mode="area").round().to(torch.uint8)
    challenge = np.r_[np.ones(500, bool), np.zeros(500, bool), np.zeros(500, bool)]
    population = Population(pixels, torch.from_numpy(labels[:1500]).long(), challenge, np.arange(1500))
    validation = (pixels[1000:1100], population.labels[1000:1100])
    keep = np.zeros((8, 1500), dtype=bool)
    keep[:, :1000] = balanced_keep_matrix(8, 1000, seed=0)
    return population, validation, keep


def train_models(world, out_dir, keep, indices, vectorize=False) -> np.ndarray:
    """Query logits ``[M, Q, 1500, K]`` of models trained on the given rows of ``keep``."""
    population, validation, _ = world
    train_shadow_group(RECIPE, indices, keep, population, validation, INFO, out_dir, CPU, vectorize)
    return np.stack([np.load(out_dir / f"shadow-{i:04d}" / "logits.npy") for i in indices])


def train_target(world, out_dir, trained_on: np.ndarray) -> np.ndarray:
    """Query logits ``[Q, 1500, K]`` of one model of the shadows' recipe trained on the ``trained_on`` rows."""
    return train_models(world, out_dir, trained_on[None], [0])[0]


@pytest.fixture(scope="session")
def shadow_logits(world, tmp_path_factory) -> np.ndarray:
    """The eight shadows' query logits over all 1,500 images: ``[8, 2, 1500, 10]``."""
    _, _, keep = world
    return train_models(world, tmp_path_factory.mktemp("shadows"), keep, list(range(8)))
