"""The Likelihood Ratio Attack (LiRA, Carlini et al. 2022) and the figures it is judged by.

Everything here is a pure function of arrays, so the statistic can be checked by hand and reused by
any trainer of shadow models. The conventions follow the reference implementation
(tensorflow/privacy ``mi_lira_2021``) with its documented choices made explicit:

* the score of a model on ``(x, y)`` is the logit-scaled confidence ``log p_y - log sum_{y'!=y} p_y'``,
  computed from the logits in float64 as ``z_y - logsumexp_{y'!=y} z_y'`` (the same number, without
  ever forming ``1 - p_y``, which rounds to 0 for confident models);
* per example and per query, IN and OUT scores of the shadow models are fitted with Gaussians
  centred on their medians; the spread is either each example's own IN and OUT spreads
  (``variance: per_example``) or **one** spread per query, pooled within examples over the IN *and* OUT
  scores alike (``variance: global``, the reference's fixed-variance mode and LiRA's advice with few shadows);
* online: ``log N(s; mu_in, sd_in) - log N(s; mu_out, sd_out)``; offline (no IN models needed):
  ``-log P(S_out >= s)``, one-sided; either way averaged over the queries, larger = "member".

With one shared spread the online statistic is ``(mu_in - mu_out)(2s - mu_in - mu_out) / (2 sd^2)``: linear, and
increasing in the target's score wherever IN scores exceed OUT ones, so a target whose scale differs from the
shadows' (a distilled student) is still ranked the right way round. Separate IN and OUT spreads make it
quadratic in ``s`` and can rank an under-confident member below non-members (``per_example`` keeps that form
for many shadows, where LiRA uses it). Only the variant named in the configuration is computed and reported,
never the best of several.

Every figure comes with a 95% interval from a paired, stratified bootstrap over the population
(:func:`bootstrap_intervals`), and beside it the band a target that learnt nothing about membership would
score (:func:`null_band`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from tckr.core.errors import TckrError

Query = tuple[int, int, bool]
"""``(dy, dx, mirrored)``: the image shifted by ``dy`` rows and ``dx`` columns (the gap filled with the dataset
mean, as training's padded crop fills it), then mirrored or not."""


def training_queries(shift: int) -> tuple[Query, ...]:
    """LiRA's queries, the augmentations the targets trained with: identity and mirror when ``shift`` is 0; else
    every ``(dy, dx)`` in ``{-shift, 0, shift}^2``, each plain and mirrored (18 queries, as LiRA's paper)."""
    offsets = (0,) if shift == 0 else (-shift, 0, shift)
    return tuple((dy, dx, mirrored) for dy in offsets for dx in offsets for mirrored in (False, True))


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


def _squared_residuals(scores: np.ndarray, members: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Sum over the masked shadows of ``(score - centre)^2``, per (query, example): ``[Q, P]``."""
    return np.where(members[:, None, :], (scores - centre[None]) ** 2, 0.0).sum(0)


def _degrees_of_freedom(members: np.ndarray) -> int:
    """Masked scores less one per example that has any (its centre was fitted to them)."""
    count = members.sum(0)
    return max(int(count.sum()) - int(np.count_nonzero(count)), 1)


def _own_spread(scores: np.ndarray, members: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Each example's own standard deviation about ``centre``, per query: ``[Q, P]``."""
    count = members.sum(0)
    return np.sqrt(_squared_residuals(scores, members, centre) / np.maximum(count - 1, 1)) + 1e-30


def _pooled_spread(scores: np.ndarray, masks: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """One within-example standard deviation per query over every ``(mask, centre)`` given: ``[Q, 1]``."""
    squared = sum(_squared_residuals(scores, mask, centre).sum(-1, keepdims=True) for mask, centre in masks)
    return np.sqrt(squared / sum(_degrees_of_freedom(mask) for mask, _ in masks)) + 1e-30


def score_spreads(shadow_scores: np.ndarray, keep: np.ndarray) -> dict[str, float]:
    """The pooled within-example spreads of the shadows' IN scores, OUT scores and both (mean over queries):
    how far apart the two are says how much a shared spread assumes."""
    shadow_scores, keep = np.asarray(shadow_scores), np.asarray(keep)
    members, others = (keep, _masked_median(shadow_scores, keep)), (~keep, _masked_median(shadow_scores, ~keep))
    return {"sigma_in": float(_pooled_spread(shadow_scores, [members]).mean()),
            "sigma_out": float(_pooled_spread(shadow_scores, [others]).mean()),
            "sigma_shared": float(_pooled_spread(shadow_scores, [members, others]).mean())}


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
    if variance not in ("global", "per_example"):
        raise AttackError(f"unknown LiRA variance {variance!r} (global or per_example)")
    out = ~keep
    if not out.any(0).all():
        raise AttackError("some examples are IN every shadow model: no OUT scores to fit")
    mean_out = _masked_median(shadow_scores, out)
    if variant == "offline":
        std_out = (_pooled_spread(shadow_scores, [(out, mean_out)]) if variance == "global"
                   else _own_spread(shadow_scores, out, mean_out))
        z = torch.as_tensor((target_scores - mean_out) / std_out)
        return (-torch.special.log_ndtr(-z)).numpy().mean(0)  # -log P(S_out >= s)
    if variant != "online":
        raise AttackError(f"unknown LiRA variant {variant!r} (online or offline)")
    if not keep.any(0).all():
        raise AttackError("some examples are OUT of every shadow model: no IN scores to fit (online)")
    mean_in = _masked_median(shadow_scores, keep)
    if variance == "global":
        std_in = std_out = _pooled_spread(shadow_scores, [(keep, mean_in), (out, mean_out)])
    else:
        std_in, std_out = _own_spread(shadow_scores, keep, mean_in), _own_spread(shadow_scores, out, mean_out)
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
    """Accuracy Over Privacy (TCKR): ``accuracy x (0.5 / AUC_MIA)^2``; 1.0 = perfect and leak-free.

    The AUC is taken as ``max(AUC, 1 - AUC)``: an attack below chance is as informative once its decision is
    flipped, so it never earns a score above a leak-free model's."""
    if not 0 <= auc <= 1:
        raise AttackError(f"AUC must lie in [0, 1] (got {auc})")
    return accuracy * (0.5 / max(auc, 1 - auc)) ** 2


def aop_interval(accuracy: float, auc_interval: tuple[float, float]) -> tuple[float, float]:
    """AOP over an AUC interval (at a fixed accuracy): its image under :func:`aop`, lowest first. AOP depends on
    ``|AUC - 0.5|``, so an interval that straddles chance reaches the leak-free AOP (``accuracy``)."""
    low, high = auc_interval
    farthest = max(abs(low - 0.5), abs(high - 0.5))
    closest = 0.0 if low <= 0.5 <= high else min(abs(low - 0.5), abs(high - 0.5))
    return aop(accuracy, 0.5 + farthest), aop(accuracy, 0.5 + closest)


# ------------------------------------------------------------------------------------------ uncertainty
FIGURES = ("auc", "tpr_at_0.1pct_fpr", "tpr_at_1pct_fpr", "balanced_accuracy")


def _curve_figures(positives: np.ndarray, negatives: np.ndarray) -> dict[str, np.ndarray]:
    """The figures of ROC curves given as running (weighted) counts of members and non-members above each
    threshold, highest threshold first: one curve per row of ``[B, T]``."""
    zero = np.zeros((len(positives), 1))
    tpr = np.hstack([zero, positives / positives[:, -1:]])
    fpr = np.hstack([zero, negatives / negatives[:, -1:]])
    return {"auc": ((fpr[:, 1:] - fpr[:, :-1]) * (tpr[:, 1:] + tpr[:, :-1]) / 2).sum(1),
            "tpr_at_0.1pct_fpr": np.where(fpr <= 0.001, tpr, 0.0).max(1),
            "tpr_at_1pct_fpr": np.where(fpr <= 0.01, tpr, 0.0).max(1),
            "balanced_accuracy": (1 - (fpr + (1 - tpr)) / 2).max(1)}


def _weighted_figures(statistic: np.ndarray, is_member: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`roc`'s figures for each row of ``weights`` ``[B, P]`` (how often each example is drawn), at once."""
    order = np.argsort(-statistic, kind="stable")
    last_of_tie = np.r_[np.diff(statistic[order]) != 0, True]
    drawn = weights[:, order].astype(np.float64)
    member = is_member[order]
    return _curve_figures(np.cumsum(np.where(member, drawn, 0.0), axis=1)[:, last_of_tie],
                          np.cumsum(np.where(member, 0.0, drawn), axis=1)[:, last_of_tie])


def _stratified_draws(is_member: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``[count, P]`` multiplicities: members resampled among members, non-members among non-members."""
    weights = np.zeros((count, len(is_member)), dtype=np.int32)
    for group in (is_member, ~is_member):
        size = int(group.sum())
        weights[:, group] = rng.multinomial(size, np.full(size, 1.0 / size), size=count)
    return weights


def bootstrap_intervals(statistics: dict[str, np.ndarray], is_member: np.ndarray,
                        differences: dict[str, tuple[str, str]] | None = None, resamples: int = 1000, seed: int = 0,
                        level: float = 0.95, chunk: int = 50) -> dict[str, dict[str, tuple[float, float]]]:
    """Percentile intervals of every figure of every target, and of each named difference ``a - b``.

    Paired: each resample draws one set of population indices and scores every target on it, so a difference
    between targets keeps their correlation. Stratified: members and non-members are resampled separately, so
    every resample holds as many of each as the population. Keys: the targets' and the differences' names.
    """
    if resamples < 1:
        raise AttackError(f"the bootstrap needs at least one resample (got {resamples})")
    is_member = np.asarray(is_member, dtype=bool)
    rng = np.random.default_rng(seed)
    drawn: dict[str, dict[str, list[np.ndarray]]] = {name: {f: [] for f in FIGURES} for name in statistics}
    for start in range(0, resamples, chunk):
        weights = _stratified_draws(is_member, min(chunk, resamples - start), rng)
        for name, statistic in statistics.items():
            for figure, values in _weighted_figures(np.asarray(statistic, dtype=np.float64), is_member,
                                                    weights).items():
                drawn[name][figure].append(values)
    samples = {name: {f: np.concatenate(v) for f, v in figures.items()} for name, figures in drawn.items()}
    for name, (first, second) in (differences or {}).items():
        samples[name] = {f: samples[first][f] - samples[second][f] for f in FIGURES}
    return {name: {f: _interval(values, level) for f, values in figures.items()} for name, figures in samples.items()}


def null_band(members: int, non_members: int, draws: int = 1000, seed: int = 0, level: float = 0.95,
              chunk: int = 50) -> dict[str, tuple[float, float]]:
    """The central ``level`` range of every figure for a target whose statistic is independent of membership
    (random ranks), at this population's member and non-member counts: what "no leak" scores by chance."""
    rng = np.random.default_rng(seed)
    values: dict[str, list[np.ndarray]] = {f: [] for f in FIGURES}
    for start in range(0, draws, chunk):
        ranked = np.argsort(rng.random((min(chunk, draws - start), members + non_members)), axis=1) < members
        for figure, value in _curve_figures(np.cumsum(ranked, axis=1), np.cumsum(~ranked, axis=1)).items():
            values[figure].append(value)
    return {f: _interval(np.concatenate(v), level) for f, v in values.items()}


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)
