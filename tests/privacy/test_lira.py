"""LiRA: the statistic by hand, the ROC figures, AOP against the paper, and the attack's sanity checks
on real models (a memorising target is caught; a target that never saw the population is not)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tckr.core.errors import ConfigError
from tckr.privacy.config import AttackConfig
from tckr.privacy.lira import (
    AttackError,
    aop,
    balanced_keep_matrix,
    logit_scores,
    membership_statistic,
    roc,
)
from tckr.privacy.shadows import ModelStack, Population, train_shadow_group
from tckr.recipes.config import load_config
from tckr.training.config import ClassifierConfig

CPU = torch.device("cpu")


@pytest.mark.unit
def test_logit_score_by_hand_and_stable_when_confident():
    logits = np.array([[2.0, 0.0, -1.0], [2.0, 0.0, -1.0], [200.0, 0.0, 0.0]])
    scores = logit_scores(logits, np.array([0, 2, 0]))
    assert scores[0] == pytest.approx(2.0 - math.log(1.0 + math.exp(-1.0)), abs=1e-12)
    assert scores[1] == pytest.approx(-1.0 - math.log(math.exp(2.0) + 1.0), abs=1e-12)
    assert scores[2] == pytest.approx(200.0 - math.log(2.0), abs=1e-9)  # p_y rounds to 1: naive log(1 - p) is -inf


@pytest.mark.unit
def test_online_and_offline_statistic_by_hand():
    # One query, two examples, four shadows: example 0 is IN for shadows 0 and 1.
    keep = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=bool)
    shadow = np.array([[2.0, 5.0], [4.0, 5.0], [0.0, 5.0], [-2.0, 5.0]])[:, None, :]
    target = np.array([[3.0, 5.0]])
    # IN: median 3, sd sqrt(2); OUT: median -1, sd sqrt(2) -> log N(3; 3, .) - log N(3; -1, .) = 16 / (2 * 2).
    online = membership_statistic(shadow, keep, target, "online", "per_example")
    assert online[0] == pytest.approx(4.0)
    offline = membership_statistic(shadow, keep, target, "offline", "per_example")
    z = 4.0 / math.sqrt(2.0)
    assert offline[0] == pytest.approx(-math.log(0.5 * math.erfc(z / math.sqrt(2.0))))


@pytest.mark.unit
def test_global_variance_pools_within_example_spread():
    keep = np.array([[1, 1], [1, 0], [0, 1], [0, 0]], dtype=bool)
    shadow = np.array([[1.0, 10.0], [3.0, 0.0], [0.0, 14.0], [2.0, 2.0]])[:, None, :]
    pooled = membership_statistic(shadow, keep, np.array([[2.0, 12.0]]), "online", "global")
    assert np.isfinite(pooled).all()
    with pytest.raises(AttackError, match="do not match"):
        membership_statistic(shadow, keep[:, :1], np.array([[2.0, 12.0]]))


@pytest.mark.unit
def test_roc_figures_by_hand():
    result = roc(np.array([3.0, 2.0, 1.0, 0.0]), np.array([1, 0, 1, 0], dtype=bool))
    assert result.auc == pytest.approx(0.75)
    assert result.balanced_accuracy == pytest.approx(0.75)
    assert result.tpr_at_1_fpr == pytest.approx(0.5)
    tied = roc(np.zeros(4), np.array([1, 0, 1, 0], dtype=bool))
    assert tied.auc == pytest.approx(0.5) and tied.tpr_at_1_fpr == 0.0
    with pytest.raises(AttackError, match="members and non-members"):
        roc(np.ones(3), np.ones(3, dtype=bool))


@pytest.mark.unit
def test_keep_matrix_is_balanced_both_ways():
    keep = balanced_keep_matrix(8, 1000, seed=3)
    assert (keep.sum(0) == 4).all() and (keep.sum(1) == 500).all()
    assert not np.array_equal(keep, balanced_keep_matrix(8, 1000, seed=4))
    with pytest.raises(AttackError, match="even"):
        balanced_keep_matrix(7, 1000, seed=0)


@pytest.mark.unit
@pytest.mark.parametrize(("accuracy", "auc", "published"), [
    (0.9752, 0.5389, 0.8395), (0.9733, 0.5281, 0.8725),  # CIFAR-10 teacher, student
    (0.8549, 0.7032, 0.4322), (0.8574, 0.6280, 0.5435),  # CIFAR-100 teacher, student
])
def test_aop_reproduces_paper_table_2(accuracy, auc, published):
    assert aop(accuracy, auc) == pytest.approx(published, abs=0.005)


@pytest.mark.unit
def test_attack_config_is_declared_and_checked():
    cfg = load_config("demo")
    assert cfg.attack.variant == "online" and cfg.attack.shadows % 2 == 0
    with pytest.raises(ConfigError, match="shadows must be even"):
        load_config("demo", ["attack.shadows=5"])
    derived = load_config("demo", ["student=null"]).student  # resolved from the teacher, as the reference does
    assert derived.mixup_alpha == 0.0 and derived.model == cfg.teacher.model and derived.epochs == cfg.teacher.epochs


# ------------------------------------------------------------------- the attack on real models
RECIPE = ClassifierConfig(model="tckr_cnn", epochs=12, batch_size=50, lr=3e-3, label_smoothing=0.0,
                          crop_padding=0, hflip=False, eval_batch_size=500, seed=0)
INFO = SimpleNamespace(mean=[0.29], std=[0.35], num_classes=10, channels=1)


@pytest.fixture(scope="module")
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


def _train(world, tmp_path, keep, indices, vectorize=False):
    population, validation, _ = world
    train_shadow_group(RECIPE, indices, keep, population, validation, INFO, tmp_path, CPU, vectorize)
    return np.stack([np.load(tmp_path / f"shadow-{i:04d}" / "logits.npy") for i in indices])


@pytest.fixture(scope="module")
def shadow_scores(world, tmp_path_factory):
    population, _, keep = world
    logits = _train(world, tmp_path_factory.mktemp("shadows"), keep, list(range(8)))
    return logit_scores(logits[:, :, :1000], population.labels[:1000].numpy())


def _attack_target(world, shadow_scores, tmp_path, trained_on: np.ndarray):
    """LiRA's figures for a target trained on the ``trained_on`` rows of the world."""
    population, _, keep = world
    target = _train(world, tmp_path, trained_on[None], [0])[0]
    statistic = membership_statistic(shadow_scores, keep[:, :1000],
                                     logit_scores(target[:, :1000], population.labels[:1000].numpy()))
    return roc(statistic, population.is_member[:1000])


def test_memorising_target_is_caught(world, shadow_scores, tmp_path):
    result = _attack_target(world, shadow_scores, tmp_path, np.r_[np.ones(500, bool), np.zeros(1000, bool)])
    assert result.auc >= 0.7
    assert result.tpr_at_1_fpr >= 0.05  # five times chance


def test_target_that_never_saw_the_population_is_not(world, shadow_scores, tmp_path):
    result = _attack_target(world, shadow_scores, tmp_path, np.r_[np.zeros(1000, bool), np.ones(500, bool)])
    assert result.auc == pytest.approx(0.5, abs=0.03)


def test_stack_runs_alike_with_and_without_vmap(world):
    population, _, _ = world
    models = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)) for _ in range(3)]
    x = population.images[:12].float().view(3, 4, 1, 8, 8)
    looped, mapped = ModelStack(models, vectorize=False), ModelStack(models, vectorize=True)
    assert torch.allclose(looped(x), mapped(x), atol=1e-5)
    assert torch.allclose(looped(x), torch.stack([m(x[i]) for i, m in enumerate(models)]), atol=1e-5)


def test_killed_shadow_group_resumes_to_the_same_models(world, tmp_path, monkeypatch):
    population, validation, keep = world
    recipe = RECIPE.model_copy(update={"epochs": 2})
    whole = tmp_path / "whole"
    train_shadow_group(recipe, [0, 1], keep, population, validation, INFO, whole, CPU, False)

    def die(record):
        raise KeyboardInterrupt

    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        train_shadow_group(recipe, [0, 1], keep, population, validation, INFO, killed, CPU, False, on_epoch=die)
    assert list(killed.glob("group-*.pt")) and not list(killed.glob("shadow-*"))
    assert train_shadow_group(recipe, [0, 1], keep, population, validation, INFO, killed, CPU, False) == [0, 1]
    for index in (0, 1):
        name = f"shadow-{index:04d}/logits.npy"
        assert np.array_equal(np.load(whole / name), np.load(killed / name))
    assert train_shadow_group(recipe, [0, 1], keep, population, validation, INFO, killed, CPU, False) == []


def _train_shadow_group_0(*, cfg, population, validation, out_dir) -> list[int]:
    """What each rank of a shadow_group task given two GPUs runs (its share of group 0)."""
    from tckr.privacy.attack import shadow_recipe, train_shadows

    return train_shadows(shadow_recipe(cfg.teacher, cfg.attack), cfg.attack, population, validation, INFO, out_dir,
                         CPU, groups=[0])


def test_two_ranks_split_a_shadow_group_and_each_shadow_is_the_one_trained_alone(world, tmp_path, monkeypatch):
    from pathlib import Path

    from tckr.core.distributed import run_stage
    from tckr.privacy.attack import shadow_recipe
    from tckr.privacy.shadows import keep_matrix

    population, validation, _ = world
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))  # the ranks unpickle the helper
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # the same float arithmetic as here
    cfg = load_config("smoke", ["runtime.device=cpu"])
    assert cfg.attack.shadows_per_group == 2
    trained_by_rank_0 = run_stage("shadow_group", _train_shadow_group_0, {
        "cfg": cfg, "population": population, "validation": validation, "out_dir": tmp_path / "ranks"},
        count=2, device="cpu")
    assert trained_by_rank_0 == [0]
    keep = keep_matrix(cfg.attack, len(population))
    for index in (0, 1):  # rank 0 trained shadow 0, rank 1 shadow 1: each from its own seeds
        train_shadow_group(shadow_recipe(cfg.teacher, cfg.attack), [index], keep, population, validation, INFO,
                           tmp_path / "alone", CPU, vectorize=False)
        name = f"shadow-{index:04d}/logits.npy"
        assert np.array_equal(np.load(tmp_path / "ranks" / name), np.load(tmp_path / "alone" / name))


@pytest.mark.unit
def test_attack_config_rejects_bad_values():
    with pytest.raises(ValueError):
        AttackConfig(shadows=0)
