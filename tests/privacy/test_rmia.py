"""RMIA: the score by hand, and on real models beside LiRA's world (a memorising target is caught; a target that
never saw the population scores chance)."""

import numpy as np
import pytest

from tckr.privacy.lira import AttackError, balanced_keep_matrix, roc
from tckr.privacy.rmia import label_probability, rmia_statistic
from tests.privacy.conftest import train_target


@pytest.mark.unit
def test_label_probability_is_the_softmax_of_the_label():
    logits = np.array([[2.0, 0.0, -1.0], [500.0, 0.0, 0.0]])
    expected = np.exp(2.0) / (np.exp(2.0) + 1 + np.exp(-1.0))
    assert label_probability(logits, np.array([0, 1])) == pytest.approx([expected, np.exp(-500.0)], rel=1e-12)


@pytest.mark.unit
def test_rmia_score_by_hand():
    # Two references (one IN, one OUT for each x), one query, three population samples z; binary fractions only.
    keep = np.array([[1, 0], [0, 1]], dtype=bool)
    shadow = np.array([[0.75, 0.25], [0.25, 0.75]])[:, None, :]  # online Pr(x0) = Pr(x1) = 0.5
    target = np.array([[0.75, 0.25]])  # LR(x0) = 1.5, LR(x1) = 0.5
    shadow_z = np.array([[0.5, 0.25, 0.5], [0.5, 0.25, 0.5]])[:, None, :]
    target_z = np.array([[0.25, 0.25, 0.75]])  # LR(z) = 0.5, 1.0, 1.5
    online = rmia_statistic(shadow, keep, target, shadow_z, target_z, "online", gamma=1.0)
    assert online.tolist() == [1.0, 1 / 3]  # x0 beats every z; x1 only the first (ties count: LR(x)/LR(z) >= 1)
    assert rmia_statistic(shadow, keep, target, shadow_z, target_z, "online", gamma=2.0).tolist() == [1 / 3, 0.0]
    # Offline: Pr(x) from the OUT reference only, corrected by a: ((1 + a) Pr_OUT + 1 - a) / 2 (= Pr_OUT at a = 1).
    offline = rmia_statistic(shadow, keep, target, shadow_z, target_z, "offline", gamma=1.0, offline_a=1.0)
    assert offline.tolist() == [1.0, 2 / 3]  # Pr_OUT(x0) = Pr_OUT(x1) = 0.25: LR 3.0 and 1.0
    with pytest.raises(AttackError, match="gamma"):
        rmia_statistic(shadow, keep, target, shadow_z, target_z, gamma=0.0)
    with pytest.raises(AttackError, match="same reference models"):
        rmia_statistic(shadow, keep, target, shadow_z[:1], target_z)


def _rmia(world, shadow_logits, tmp_path, trained_on: np.ndarray):
    """RMIA's ROC for a target trained on the ``trained_on`` rows: challenge rows 0-999 against the eight shadows,
    population samples z = rows 1250-1499 (which neither the shadows nor these targets train on)."""
    population, _, keep = world
    labels = population.labels.numpy()
    target = label_probability(train_target(world, tmp_path, trained_on), labels)
    shadows = label_probability(shadow_logits, labels)
    z = slice(1250, 1500)
    statistic = rmia_statistic(shadows[:, :, :1000], keep[:, :1000], target[:, :1000], shadows[:, :, z], target[:, z])
    return roc(statistic, population.is_member[:1000])


def test_memorising_target_is_caught(world, shadow_logits, tmp_path):
    result = _rmia(world, shadow_logits, tmp_path, np.r_[np.ones(500, bool), np.zeros(1000, bool)])
    assert result.auc >= 0.7 and result.tpr_at_1_fpr >= 0.05


def test_target_that_never_saw_the_population_scores_chance(world, shadow_logits, tmp_path):
    result = _rmia(world, shadow_logits, tmp_path, np.r_[np.zeros(1000, bool), np.ones(250, bool), np.zeros(250, bool)])
    assert result.auc == pytest.approx(0.5, abs=0.04)


@pytest.mark.unit
def test_keep_matrix_shapes_are_checked():
    keep = balanced_keep_matrix(2, 4, seed=0)
    with pytest.raises(AttackError, match="do not match keep"):
        rmia_statistic(np.ones((2, 1, 3)), keep, np.ones((1, 3)), np.ones((2, 1, 2)), np.ones((1, 2)))
