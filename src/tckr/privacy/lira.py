"""The Likelihood Ratio Attack (LiRA, Carlini et al. 2022) and the figures it is judged by.

Everything here is a pure function of arrays, so the statistic can be checked by hand and reused by
any trainer of shadow models. The conventions follow the reference implementation
(tensorflow/privacy ``mi_lira_2021``) with its documented choices made explicit:

* the score of a model on ``(x, y)`` is the logit-scaled confidence ``log p_y - log sum_{y'!=y} p_y'``,
  computed from the logits in float64 as ``z_y - logsumexp_{y'!=y} z_y'`` (the same number, without
  ever forming ``1 - p_y``, which rounds to 0 for confident models);
* per example and per query, IN and OUT scores of the shadow models are fitted with Gaussians
  centred on their medians; the spread is either the example's own or one *pooled within-example*
  standard deviation (``variance: global``, what LiRA recommends with few shadows);
* online: ``log N(s; mu_in, sd_in) - log N(s; mu_out, sd_out)``; offline (no IN models needed):
  ``-log P(S_out >= s)``, one-sided; either way averaged over the queries, larger = "member".

Only the variant named in the configuration is computed and reported, never the best of several.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from tckr.core.errors import TckrError

QUERIES = ("identity", "flip")


class AttackError(TckrError, ValueError):
    """Inputs that cannot make a sound attack (too few shadows, an unbalanced keep-matrix, ...)."""


def balanced_keep_matrix(num_models: int, population: int, seed: int) -> np.ndarray:
    """``keep[m, i]``: is example ``i`` in shadow ``m``'s training set.

    Balanced both ways: every example is IN for exactly half the models (so each gets as many IN as
    OUT scores) and every model trains on exactly half the population (so every shadow sees as many
    examples as the others, and as a target trained on a same-sized half). The population is split
    into random pairs; per pair, a random half of the models takes the first example, the rest the
    second.
    """
    if num_models < 2 or num_models % 2:
        raise AttackError(f"LiRA needs an even number of shadow models >= 2 (got {num_models})")
    if population < 2 or population % 2:
        raise AttackError(f"the population must hold an even number >= 2 of examples (got {population})")
    rng = np.random.default_rng(seed)
    order = rng.permutation(population).reshape(-1, 2)
    takes_first = np.argsort(rng.random((len(order), num_models)), axis=1) < num_models // 2
    keep = np.zeros((num_models, population), dtype=bool)
    keep[:, order[:, 0]] = takes_first.T
    keep[:, order[:, 1]] = ~takes_first.T
    return keep


def logit_scores(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> np.ndarray:
    """``log p_y - log(sum_{y' != y} p_y')`` for each row, stable in float64. Shape ``[..., N]``."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long).expand(z.shape[:-1])
    true = z.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    others = z.scatter(-1, y.unsqueeze(-1), -math.inf).logsumexp(-1)
    return (true - others).numpy()


def _normal_logpdf(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return -0.5 * ((x - mean) / std) ** 2 - np.log(std) - 0.5 * math.log(2 * math.pi)


def _spread(scores: np.ndarray, members: np.ndarray, centre: np.ndarray, variance: str) -> np.ndarray:
    """Standard deviation per (query, example) of the masked shadow scores about ``centre``."""
    count = members.sum(0)
    squared = np.where(members[:, None, :], (scores - centre[None]) ** 2, 0.0).sum(0)  # [Q, P]
    if variance == "global":
        pooled = squared.sum(-1, keepdims=True) / max(count.sum() - np.count_nonzero(count), 1)
        return np.broadcast_to(np.sqrt(pooled), squared.shape) + 1e-30
    return np.sqrt(squared / np.maximum(count - 1, 1)) + 1e-30


def _masked_median(scores: np.ndarray, members: np.ndarray) -> np.ndarray:
    masked = np.where(members[:, None, :], scores, np.nan)
    with np.errstate(all="ignore"):
        return np.nanmedian(masked, axis=0)  # [Q, P]


def membership_statistic(shadow_scores: np.ndarray, keep: np.ndarray, target_scores: np.ndarray,
                         variant: str = "online", variance: str = "global") -> np.ndarray:
    """LiRA's per-example statistic, larger = more likely a member of the target's training set.

    ``shadow_scores``: ``[M, Q, P]`` (models, queries, population); ``keep``: ``[M, P]``;
    ``target_scores``: ``[Q, P]``. Returns ``[P]``.
    """
    shadow_scores, keep, target_scores = np.asarray(shadow_scores), np.asarray(keep), np.asarray(target_scores)
    if shadow_scores.ndim != 3 or keep.shape != (shadow_scores.shape[0], shadow_scores.shape[2]):
        raise AttackError(f"shadow scores {shadow_scores.shape} do not match keep {keep.shape}")
    if target_scores.shape != shadow_scores.shape[1:]:
        raise AttackError(f"target scores {target_scores.shape} do not match shadows {shadow_scores.shape[1:]}")
    out = ~keep
    if not out.any(0).all():
        raise AttackError("some examples are IN every shadow model: no OUT scores to fit")
    mean_out = _masked_median(shadow_scores, out)
    std_out = _spread(shadow_scores, out, mean_out, variance)
    if variant == "offline":
        z = torch.as_tensor((target_scores - mean_out) / std_out)
        return (-torch.special.log_ndtr(-z)).numpy().mean(0)  # -log P(S_out >= s)
    if variant != "online":
        raise AttackError(f"unknown LiRA variant {variant!r} (online or offline)")
    if not keep.any(0).all():
        raise AttackError("some examples are OUT of every shadow model: no IN scores to fit (online)")
    mean_in = _masked_median(shadow_scores, keep)
    std_in = _spread(shadow_scores, keep, mean_in, variance)
    ratio = _normal_logpdf(target_scores, mean_in, std_in) - _normal_logpdf(target_scores, mean_out, std_out)
    return ratio.mean(0)


# ------------------------------------------------------------------------------------------ figures
@dataclass(frozen=True)
class AttackResult:
    """The figures of one target, and the ROC they come from."""

    auc: float
    balanced_accuracy: float
    tpr_at_0_1_fpr: float
    tpr_at_1_fpr: float
    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray  # point i: "member if statistic >= thresholds[i]" (+inf first: nobody)

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}.auc": self.auc, f"{prefix}.balanced_accuracy": self.balanced_accuracy,
                f"{prefix}.tpr_at_0.1pct_fpr": self.tpr_at_0_1_fpr, f"{prefix}.tpr_at_1pct_fpr": self.tpr_at_1_fpr}


def roc(statistic: np.ndarray, is_member: np.ndarray) -> AttackResult:
    """ROC of "member if statistic >= t" over every threshold; ties are broken as one step.

    AUC is the probability a random member outscores a random non-member (ties count half);
    balanced accuracy is the best (TPR + TNR) / 2 over thresholds; TPR at x% FPR is the highest
    TPR among thresholds whose FPR does not exceed x%.
    """
    statistic, is_member = np.asarray(statistic, dtype=np.float64), np.asarray(is_member, dtype=bool)
    positives, negatives = int(is_member.sum()), int((~is_member).sum())
    if positives == 0 or negatives == 0:
        raise AttackError(f"an ROC needs members and non-members (got {positives} and {negatives})")
    if not np.isfinite(statistic).all():
        raise AttackError("the membership statistic has non-finite values")
    order = np.argsort(-statistic, kind="stable")
    sorted_stat, sorted_member = statistic[order], is_member[order]
    last_of_tie = np.r_[np.diff(sorted_stat) != 0, True]
    tpr = np.r_[0.0, np.cumsum(sorted_member)[last_of_tie] / positives]
    fpr = np.r_[0.0, np.cumsum(~sorted_member)[last_of_tie] / negatives]
    auc = float(np.trapezoid(tpr, fpr))
    return AttackResult(auc=auc, balanced_accuracy=float(np.max(1 - (fpr + (1 - tpr)) / 2)),
                        tpr_at_0_1_fpr=float(tpr[fpr <= 0.001].max()), tpr_at_1_fpr=float(tpr[fpr <= 0.01].max()),
                        fpr=fpr, tpr=tpr, thresholds=np.r_[np.inf, sorted_stat[last_of_tie]])


def aop(accuracy: float, auc: float) -> float:
    """Accuracy Over Privacy (TCKR): ``accuracy x (0.5 / AUC_MIA)^2``; 1.0 = perfect and leak-free."""
    if not 0 < auc <= 1:
        raise AttackError(f"AUC must lie in (0, 1] (got {auc})")
    return accuracy * (0.5 / auc) ** 2
