"""The Robust Membership Inference Attack (RMIA, Zarifzadeh et al. 2024, "Low-Cost High-Power Membership
Inference Attacks"): the second attack, always reported beside LiRA, never merged with it.

RMIA compares the target's probability of an example's label with the reference models' (here: LiRA's shadows),
``LR(x) = Pr(x | target) / Pr(x)``, and asks how often that ratio beats the same ratio on population samples
``z`` that no model trained on (a slice of the test split): the score is the fraction of ``z`` with
``LR(x) / LR(z) >= gamma``. ``Pr(x)`` is the mean over the reference models: all of them (online: half trained on
``x``), or the OUT ones corrected by the offline parameter ``a`` as in the paper,
``Pr(x) = ((1 + a) Pr_OUT(x) + (1 - a)) / 2``, fixed in the config. Probabilities are averaged over the queries
(:func:`tckr.privacy.lira.training_queries`) before the ratios. Pure functions of arrays, like :mod:`tckr.privacy.lira`.
"""

from __future__ import annotations

import numpy as np
import torch

from tckr.privacy.lira import AttackError


def label_probability(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> np.ndarray:
    """``softmax(logits)[y]`` per row, in float64: ``[..., N]``."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long).expand(z.shape[:-1])
    return z.log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1).exp().numpy()


def _reference_probability(probabilities: np.ndarray, out: np.ndarray | None, variant: str,
                           offline_a: float) -> np.ndarray:
    """``Pr(.)`` per example from the reference models' probabilities ``[M, N]`` (queries averaged already)."""
    if variant == "online":
        return probabilities.mean(0)
    if out is not None and not out.any(0).all():
        raise AttackError("some examples are IN every reference model: no OUT probabilities (offline RMIA)")
    out_mean = (probabilities.mean(0) if out is None
                else np.where(out, probabilities, 0.0).sum(0) / out.sum(0))
    return ((1 + offline_a) * out_mean + (1 - offline_a)) / 2


def rmia_statistic(shadow_probabilities: np.ndarray, keep: np.ndarray, target_probabilities: np.ndarray,
                   shadow_reference: np.ndarray, target_reference: np.ndarray, variant: str = "online",
                   gamma: float = 2.0, offline_a: float = 0.3) -> np.ndarray:
    """RMIA's per-example score in [0, 1], larger = more likely a member.

    ``shadow_probabilities``: ``[M, Q, P]``; ``keep``: ``[M, P]``; ``target_probabilities``: ``[Q, P]``;
    ``shadow_reference``: ``[M, Q, Z]`` and ``target_reference``: ``[Q, Z]`` on the population samples ``z``
    (which no model trained on). Returns ``[P]``.
    """
    shadow_probabilities, keep = np.asarray(shadow_probabilities), np.asarray(keep)
    if shadow_probabilities.ndim != 3 or keep.shape != (shadow_probabilities.shape[0], shadow_probabilities.shape[2]):
        raise AttackError(f"reference probabilities {shadow_probabilities.shape} do not match keep {keep.shape}")
    if np.asarray(shadow_reference).shape[:2] != shadow_probabilities.shape[:2]:
        raise AttackError("the population samples were not scored by the same reference models and queries")
    if variant not in ("online", "offline"):
        raise AttackError(f"unknown RMIA variant {variant!r} (online or offline)")
    if gamma <= 0:
        raise AttackError(f"RMIA's gamma must be positive (got {gamma})")
    tiny = np.finfo(np.float64).tiny
    prior_x = _reference_probability(shadow_probabilities.mean(1), ~keep, variant, offline_a)
    prior_z = _reference_probability(np.asarray(shadow_reference).mean(1), None, variant, offline_a)
    ratio_x = np.asarray(target_probabilities).mean(0) / np.maximum(prior_x, tiny)
    ratio_z = np.sort(np.asarray(target_reference).mean(0) / np.maximum(prior_z, tiny))
    # Pr_z[LR(x) / LR(z) >= gamma] = the share of z with LR(z) <= LR(x) / gamma.
    return np.searchsorted(ratio_z, ratio_x / gamma, side="right") / len(ratio_z)
