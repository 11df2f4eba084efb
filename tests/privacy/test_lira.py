"""LiRA: the statistic by hand, the ROC figures, AOP against the paper, and the attack's sanity checks
on real models (a memorising target is caught; a target that never saw the population is not)."""

import math

import numpy as np
import pytest
import torch

from tckr.core.errors import ConfigError
from tckr.data.images import BatchAugment, shift_images
from tckr.privacy.attack import collect_shadows, shadow_recipe
from tckr.privacy.config import AttackConfig
from tckr.privacy.lira import (
    AttackError,
    _weighted_figures,
    aop,
    aop_interval,
    balanced_keep_matrix,
    bootstrap_intervals,
    logit_scores,
    membership_statistic,
    null_band,
    roc,
    score_spreads,
    training_queries,
)
from tckr.privacy.shadows import ModelStack, Population, query_logits, train_shadow_group
from tckr.recipes.config import load_config
from tests.privacy.conftest import CPU, INFO, RECIPE, train_target


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
def test_aop_never_rewards_an_attack_below_chance():
    assert aop(0.9, 0.4) == aop(0.9, 0.6) < aop(0.9, 0.5) == 0.9  # a flipped attack leaks as much
    assert aop_interval(0.9, (0.48, 0.53)) == (pytest.approx(aop(0.9, 0.53)), 0.9)  # straddles chance: leak-free
    low, high = aop_interval(0.9, (0.55, 0.6))
    assert (low, high) == (pytest.approx(aop(0.9, 0.6)), pytest.approx(aop(0.9, 0.55)))


# ------------------------------------------------------------------- uncertainty
def _separated_gaussians(rng, members=200, non_members=200, gap=1.0):
    statistic = np.r_[rng.normal(gap, 1.0, members), rng.normal(0.0, 1.0, non_members)]
    return statistic, np.r_[np.ones(members, bool), np.zeros(non_members, bool)]


@pytest.mark.unit
def test_weighted_figures_at_unit_weights_are_the_roc_figures():
    rng = np.random.default_rng(0)
    statistic, member = _separated_gaussians(rng)
    statistic = np.round(statistic, 1)  # ties, broken as one step by both
    exact = roc(statistic, member)
    figures = _weighted_figures(statistic, member, np.ones((1, len(member))))
    assert figures["auc"][0] == pytest.approx(exact.auc)
    assert figures["balanced_accuracy"][0] == pytest.approx(exact.balanced_accuracy)
    assert figures["tpr_at_1pct_fpr"][0] == pytest.approx(exact.tpr_at_1_fpr)
    assert figures["tpr_at_0.1pct_fpr"][0] == pytest.approx(exact.tpr_at_0_1_fpr)


@pytest.mark.unit
def test_bootstrap_interval_covers_the_true_auc_at_its_stated_rate():
    """Two unit Gaussians one apart: AUC = Phi(1 / sqrt 2). Over 60 populations the 95% interval covers it
    57 times on average (binomial sd 1.7): at least 51 here."""
    truth = 0.5 * math.erfc(-0.5)
    covered = 0
    for seed in range(60):
        statistic, member = _separated_gaussians(np.random.default_rng(seed))
        low, high = bootstrap_intervals({"target": statistic}, member, resamples=300, seed=seed)["target"]["auc"]
        covered += low <= truth <= high
    assert 51 <= covered <= 60


@pytest.mark.unit
def test_bootstrap_is_paired_and_seeded():
    statistic, member = _separated_gaussians(np.random.default_rng(1))
    noisy = statistic + np.random.default_rng(2).normal(0, 0.3, len(statistic))
    intervals = bootstrap_intervals({"a": statistic, "b": statistic, "c": noisy}, member,
                                    {"a-b": ("a", "b"), "c-a": ("c", "a")}, resamples=200, seed=5)
    assert intervals["a-b"]["auc"] == (0.0, 0.0)  # the same resamples for every target
    assert intervals["a"] == intervals["b"]
    # Pairing: the difference's interval is narrower than the two targets' own intervals side by side.
    spread = intervals["c-a"]["auc"][1] - intervals["c-a"]["auc"][0]
    assert spread < (intervals["a"]["auc"][1] - intervals["a"]["auc"][0]) + (
        intervals["c"]["auc"][1] - intervals["c"]["auc"][0])
    assert bootstrap_intervals({"a": statistic}, member, resamples=200, seed=5)["a"] == intervals["a"]


@pytest.mark.unit
def test_null_band_is_what_a_target_that_learnt_nothing_scores():
    band = null_band(1000, 1000, draws=2000, seed=0)
    half_width = 1.96 * math.sqrt((1000 + 1000 + 1) / (12 * 1000 * 1000))  # Mann-Whitney under H0
    assert band["auc"][0] == pytest.approx(0.5 - half_width, abs=0.004)
    assert band["auc"][1] == pytest.approx(0.5 + half_width, abs=0.004)
    for figure, chance in (("tpr_at_0.1pct_fpr", 0.001), ("tpr_at_1pct_fpr", 0.01)):
        assert band[figure][0] <= chance <= band[figure][1], figure
    # Balanced accuracy is the best over thresholds, so even no signal scores above 0.5: the band, not 0.5, is
    # what a figure must beat.
    assert 0.5 < band["balanced_accuracy"][0] < band["balanced_accuracy"][1] < 0.53
    rng = np.random.default_rng(3)  # and a real target's interval with no signal sits inside it
    no_signal = bootstrap_intervals({"t": rng.normal(size=2000)}, np.r_[np.ones(1000, bool), np.zeros(1000, bool)],
                                    resamples=300, seed=0)["t"]["auc"]
    assert no_signal[0] <= 0.5 <= no_signal[1]


# ------------------------------------------------------------------- the statistic's shape
def _shadow_world(rng, examples=400, shadows=16, in_sd=3.0, out_sd=1.0):
    keep = balanced_keep_matrix(shadows, examples, seed=0)
    mean_in, mean_out = 3.0 + rng.normal(0, 0.5, examples), rng.normal(0, 0.5, examples)
    noise = rng.normal(size=keep.shape)
    scores = np.where(keep, mean_in + in_sd * noise, mean_out + out_sd * noise)
    return scores[:, None, :], keep


@pytest.mark.unit
def test_shared_spread_statistic_is_monotone_in_the_target_score():
    rng = np.random.default_rng(0)
    shadow, keep = _shadow_world(rng)
    target = rng.normal(0, 4, (1, keep.shape[1]))
    lower = membership_statistic(shadow, keep, target, "online", "global")
    higher = membership_statistic(shadow, keep, target + 0.5, "online", "global")
    in_above_out = np.nanmedian(np.where(keep, shadow[:, 0], np.nan), 0) > np.nanmedian(
        np.where(~keep, shadow[:, 0], np.nan), 0)
    assert in_above_out.mean() > 0.95 and (higher[in_above_out] > lower[in_above_out]).all()
    spreads = score_spreads(shadow, keep)
    assert spreads["sigma_in"] > 2 * spreads["sigma_out"]
    assert spreads["sigma_out"] < spreads["sigma_shared"] < spreads["sigma_in"]


@pytest.mark.unit
def test_an_under_confident_target_that_leaks_is_ranked_the_right_way_round():
    """Members score -1 and non-members -3 (a target less confident than the shadows, still higher on members).
    With IN and OUT spreads apart the statistic is quadratic and ranks the members lower; with one shared
    spread it is linear in the score and catches them."""
    rng = np.random.default_rng(1)
    shadow, keep = _shadow_world(rng)
    member = rng.random(keep.shape[1]) < 0.5
    target = np.where(member, -1.0, -3.0)[None] + rng.normal(0, 0.3, (1, keep.shape[1]))
    shared = roc(membership_statistic(shadow, keep, target, "online", "global"), member)
    separate = roc(membership_statistic(shadow, keep, target, "online", "per_example"), member)
    assert shared.auc > 0.65 and separate.auc < 0.3  # 0.75 and 0.18 at this seed


@pytest.mark.unit
def test_attack_config_is_declared_and_checked():
    cfg = load_config("demo")
    assert cfg.attack.variant == "online" and cfg.attack.shadows % 2 == 0
    with pytest.raises(ConfigError, match="shadows must be even"):
        load_config("demo", ["attack.shadows=5"])
    derived = load_config("demo", ["student=null"]).student  # resolved from the teacher, as the reference does
    assert derived.mixup_alpha == 0.0 and derived.model == cfg.teacher.model and derived.epochs == cfg.teacher.epochs


# ------------------------------------------------------------------- the attack on real models
@pytest.fixture(scope="module")
def shadow_scores(world, shadow_logits):
    population, _, _ = world
    return logit_scores(shadow_logits[:, :, :1000], population.labels[:1000].numpy())


def _attack_target(world, shadow_scores, tmp_path, trained_on: np.ndarray):
    """LiRA's figures for a target trained on the ``trained_on`` rows of the world."""
    population, _, keep = world
    target = train_target(world, tmp_path, trained_on)
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


def test_shadows_made_for_another_attack_are_refused(world, tmp_path):
    population, validation, _ = world
    cfg = AttackConfig(shadows=2, seed=0)
    recipe = RECIPE.model_copy(update={"epochs": 1})
    keep = balanced_keep_matrix(2, len(population), seed=0)
    train_shadow_group(recipe, [0, 1], keep, population, validation, INFO, tmp_path, CPU, False)
    logits, summaries = collect_shadows([tmp_path], recipe, cfg, population)
    assert logits.shape[:3] == (2, 2, len(population)) and summaries[1]["provenance"]["seed"] == "0"
    with pytest.raises(AttackError, match=r"2 shadow model\(s\) were made for another attack .* another keep_row"):
        collect_shadows([tmp_path], recipe, cfg.model_copy(update={"seed": 1}), population)
    with pytest.raises(AttackError, match="another recipe"):
        collect_shadows([tmp_path], recipe.model_copy(update={"lr": 1e-2}), cfg, population)
    relabelled = Population(population.images, population.labels.roll(1), population.is_member, population.split_rows)
    with pytest.raises(AttackError, match="another population"):
        collect_shadows([tmp_path], recipe, cfg, relabelled)
    with pytest.raises(AttackError, match="another query_set"):  # logits answer the queries they were made for
        collect_shadows([tmp_path], recipe, cfg.model_copy(update={"query_shift": 1}), population)
    # Training for the new attack redoes the stale shadows in place; then they are used.
    other = balanced_keep_matrix(2, len(population), seed=1)
    assert train_shadow_group(recipe, [0, 1], other, population, validation, INFO, tmp_path, CPU, False) == [0, 1]
    collect_shadows([tmp_path], recipe, cfg.model_copy(update={"seed": 1}), population)


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


@pytest.mark.parametrize("overrides", [[], ["teacher.mixup_alpha=0.8", "teacher.augmix=true"]],
                         ids=["crops-flips-dropout", "mixup-augmix"])
def test_a_shadow_is_the_same_model_whichever_group_trains_it(world, tmp_path, overrides):
    """Every random draw of a shadow is its own stream, so neither attack.shadows_per_group nor the processes a group
    is split over (GPUs, runtime.cpu_processes: tests/core/test_distributed.py) change a shadow."""
    from tckr.privacy.shadows import keep_matrix

    population, validation, _ = world
    cfg = load_config("smoke", ["runtime.device=cpu", *overrides])
    recipe, keep = shadow_recipe(cfg.teacher, cfg.attack), keep_matrix(cfg.attack, len(population))
    train_shadow_group(recipe, [0, 1], keep, population, validation, INFO, tmp_path / "pair", CPU, vectorize=False)
    for index in (0, 1):
        train_shadow_group(recipe, [index], keep, population, validation, INFO, tmp_path / "alone", CPU,
                           vectorize=False)
        name = f"shadow-{index:04d}/logits.npy"
        assert np.array_equal(np.load(tmp_path / "pair" / name), np.load(tmp_path / "alone" / name)), name


@pytest.mark.unit
def test_queries_are_the_training_augmentations():
    assert training_queries(0) == ((0, 0, False), (0, 0, True))  # identity and mirror
    queries = training_queries(2)
    assert len(queries) == len(set(queries)) == 18 and (0, 0, False) in queries and (-2, 2, True) in queries
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    shifted = shift_images(x, 1, -2)  # content moves by (-1, +2): what the padded crop at (pad + 1, pad - 2) shows
    assert torch.equal(shifted[..., :4, 2:], x[..., 1:, :3])
    assert not shifted[..., 4, :].any() and not shifted[..., :, :2].any()  # the gap is the (normalised) mean
    # Each query is the model on the shifted, then mirrored, images.
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(75, 4))
    augment = BatchAugment([0.5] * 3, [0.25] * 3)
    images = torch.randint(0, 256, (6, 3, 5, 5), dtype=torch.uint8)
    logits = query_logits(model, augment, images, 4, CPU, queries)
    assert logits.shape == (18, 6, 4)
    for index, (dy, dx, mirrored) in enumerate(queries):
        view = shift_images(augment(images), dy, dx)
        expected = model(view.flip(-1) if mirrored else view)
        torch.testing.assert_close(logits[index], expected.detach())


@pytest.mark.unit
def test_a_query_shift_beyond_the_training_crop_is_refused():
    cfg = load_config("demo", ["attack.query_shift=2"])
    with pytest.raises(ConfigError, match="query_shift 2 exceeds the targets' crop_padding 1"):
        shadow_recipe(cfg.teacher, cfg.attack)
    assert shadow_recipe(cfg.teacher, cfg.attack.model_copy(update={"query_shift": 1})).crop_padding == 1


@pytest.mark.unit
def test_attack_config_rejects_bad_values():
    with pytest.raises(ValueError):
        AttackConfig(shadows=0)
