"""End-to-end (epsilon, delta) of PrivImage: the DP semantic query composed with DP-SGD.

The query is one full-batch Gaussian mechanism (noise multiplier ``sigma_q``, sample rate 1), DP-SGD is
``steps`` Poisson-subsampled Gaussian steps; both go into ONE Opacus history, and the DP-SGD noise multiplier
is bisected so that the *composed* epsilon hits the target (nothing is subtracted). Pure accounting maths on
Opacus 1.6's PRV and RDP accountants; the accountant :func:`make_accountant` builds is also the stateful one
training steps and checkpoints (its ``state_dict`` carries the history, query included).

Measured at delta = 1e-5: the query alone costs epsilon 0.0047 at sigma_q = 484 and 0.059 at sigma_q = 50
with PRV (the exact Gaussian mechanism: 0.0046 and 0.059; the classical bound ``sqrt(2 ln(1.25/delta)) /
sigma``: 0.010 and 0.097; RDP: 0.0053 and 0.066 with :data:`RDP_ORDERS`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis.prv import Domain
from scipy.fft import next_fast_len

from tckr.core.errors import ConfigError

Accountant = Literal["prv", "rdp"]
History = list[tuple[float, float, int]]  # (noise_multiplier, sample_rate, steps), Opacus's history format

# Opacus's default orders stop at 63, where the query alone at sigma_q = 484 is stuck at epsilon 0.10 (its
# optimal order is ~1500, which is also how far DP-ImaGen's accounting goes): half-octaves on to 4096, integers
# so that Opacus takes the closed-form path for them.
RDP_ORDERS = [*RDPAccountant.DEFAULT_ALPHAS, *(round(64 * 2 ** (i / 2)) for i in range(1, 13))]
# PRV's ``eps_error`` is absolute and added to the estimate it returns (an upper bound), so it is set relative
# to the size of epsilon: 0.1% keeps the solver's 1% window honest at epsilon 0.1 as at 10, and the grid (hence
# the cost) stays about the same size whatever epsilon is. The floor keeps the query alone fast (at 1e-5 its
# grid is 12x finer and takes 1.1 s); 1e-4 of epsilon is below anything a target can mean.
PRV_RELATIVE_ERROR = 1e-3
PRV_MIN_ERROR = 1e-4
# RDP at integer orders only: Opacus computes those in closed form (a few times faster than the fractional
# ones), and the result, a valid upper bound within ~2x, is all the PRV error and the solver's shortcut need.
_FAST_ORDERS = [order for order in RDP_ORDERS if float(order).is_integer()]


class PrivacyBudgetError(ConfigError):
    """A privacy target the run cannot meet as configured; the message says what to change."""


class _FFTFriendlyPRVAccountant(PRVAccountant):
    """Opacus's PRV accountant on a grid whose length the FFT likes.

    Opacus sizes the grid as 2L/mesh, an arbitrary even number, and pocketfft is up to 7x slower on lengths
    with large prime factors (1,300,444 = 4 * 83 * 3917: 0.83 s per rfft, against 0.11 s at 1,310,720). Widening
    the grid to the next fast even length keeps the mesh (the accuracy) and the symmetry ``t_min = -(size/2 - 1)
    * dt`` that Opacus's FFT self-composition and convolution rely on; it only truncates less of the PRVs.
    The mechanism stays "prv", so state dicts move freely to and from a stock ``PRVAccountant``.
    """

    def _get_domain(self, prvs, num_self_compositions, eps_error, delta_error) -> Domain:
        domain = super()._get_domain(
            prvs=prvs, num_self_compositions=num_self_compositions, eps_error=eps_error, delta_error=delta_error
        )
        size = next_fast_len(domain.size, real=True)
        while size % 2:
            size = next_fast_len(size + 1, real=True)
        half = size // 2 - 1
        return Domain(t_min=-half * domain.dt, t_max=(half + 1) * domain.dt, size=size)


def default_delta(num_private: int) -> float:
    """``1 / (N ln N)``, DPImageBench's choice: below ``1/N`` (a mechanism that leaks one record whole is not
    private) for every N >= 3; at N = 2 it is 0.72 > 1/2, so fewer than 3 private images are refused."""
    if num_private < 3:
        raise PrivacyBudgetError(f"{num_private} private images cannot make a delta below 1/N: use at least 3")
    return 1.0 / (num_private * math.log(num_private))


def query_history(query_sigma: float) -> History:
    """The semantic query as Opacus history: one Gaussian release of the whole private set (sample rate 1).

    Its noise std is ``sigma_q * sqrt(k)`` against an L2 sensitivity of ``sqrt(k)``, so sigma_q is the noise
    multiplier. PRV takes sample rate 1 as it is: the PRV is then the plain Gaussian one, N(1/(2 sigma^2),
    1/sigma^2), and its estimate matches the exact Gaussian mechanism (0.00455 at sigma 484, delta 1e-5).
    """
    return [(float(query_sigma), 1.0, 1)]


def make_accountant(kind: Accountant, history: Sequence[tuple[float, float, int]] = ()) -> IAccountant:
    """A fresh Opacus accountant holding a copy of ``history``, to step through training and checkpoint.

    PRV is Opacus's own on an FFT-friendly grid (same mechanism name, same state dict). Entries become plain
    ``(float, float, int)`` so that ``torch.load(weights_only=True)`` reads the state dict back (a numpy float
    in the history would be refused).
    """
    if kind == "prv":
        accountant = _FFTFriendlyPRVAccountant()
    elif kind == "rdp":
        accountant = RDPAccountant()
    else:
        raise ConfigError(f"accountant {kind!r} is not supported: use 'prv' or 'rdp'")
    accountant.history = list(_normalized(history))
    return accountant


def composed_epsilon(history: Sequence[tuple[float, float, int]], delta: float, kind: Accountant = "prv") -> float:
    """Epsilon at ``delta`` of every mechanism in ``history`` composed (an upper bound; 0 for no mechanism)."""
    return _composed_epsilon(_normalized(history), float(delta), kind)


def epsilon_spent(history: Sequence[tuple[float, float, int]], delta: float, kind: Accountant = "prv") -> float:
    """The live readout: what a training accountant's history has spent so far (0 before the first step)."""
    return composed_epsilon(history, delta, kind)


def solve_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    prior: Sequence[tuple[float, float, int]] = (),
    kind: Accountant = "prv",
    max_noise_multiplier: float = 50.0,
    tolerance: float = 0.01,
) -> float:
    """The smallest DP-SGD noise multiplier whose steps, composed after ``prior``, stay within the target.

    Geometric bracket down from ``max_noise_multiplier``, then bisection in log sigma until the composed epsilon
    lies in ``[(1 - tolerance) * target, target]``; the returned sigma is the bracket's private end, so its
    epsilon never exceeds the target. Two savings keep PRV (~0.3-0.8 s an epsilon) to a handful of calls:
    points whose cheap RDP bound is already below the window are private and not close, so they need no PRV;
    and the bracket is split where log epsilon, nearly linear in log sigma, crosses the middle of the window.
    """
    prior = list(_normalized(prior))
    prior_epsilon = composed_epsilon(prior, delta, kind)
    if prior_epsilon >= target_epsilon:
        raise PrivacyBudgetError(
            f"the mechanisms before DP-SGD (the semantic query) already spend epsilon {prior_epsilon:.3g} >= "
            f"target {target_epsilon:g}: raise the query's noise multiplier or the target"
        )
    window_floor = (1 - tolerance) * target_epsilon

    def epsilon_at(noise_multiplier: float) -> float:
        history = (*prior, (float(noise_multiplier), float(sample_rate), int(steps)))
        bound = _fast_rdp_bound(history, float(delta))
        return bound if bound < window_floor else _composed_epsilon(history, float(delta), kind)

    private_sigma, private_epsilon = max_noise_multiplier, epsilon_at(max_noise_multiplier)
    if private_epsilon > target_epsilon:
        raise PrivacyBudgetError(
            f"target epsilon {target_epsilon:g} at delta {delta:.3g} needs a noise multiplier above "
            f"{max_noise_multiplier:g}: train fewer epochs ({steps} steps at sample rate {sample_rate:.3g}), "
            "use a smaller batch, or raise the target"
        )
    leaky_sigma = private_sigma / 2
    while (leaky_epsilon := epsilon_at(leaky_sigma)) <= target_epsilon:
        private_sigma, private_epsilon = leaky_sigma, leaky_epsilon
        leaky_sigma /= 2
    aim = (1 - tolerance / 2) * target_epsilon
    # Stops early only if epsilon jumps across the whole window (it is continuous in sigma, so it should not);
    # the private end is still a sound answer then.
    while private_epsilon < window_floor and private_sigma / leaky_sigma > 1 + 1e-9:
        crossing = math.log(leaky_epsilon / aim) / math.log(leaky_epsilon / private_epsilon)
        # Kept off the ends, so that each split cuts at least a tenth of the bracket however bent the curve is.
        middle = leaky_sigma * (private_sigma / leaky_sigma) ** min(max(crossing, 0.1), 0.9)
        middle_epsilon = epsilon_at(middle)
        if middle_epsilon <= target_epsilon:
            private_sigma, private_epsilon = middle, middle_epsilon
        else:
            leaky_sigma, leaky_epsilon = middle, middle_epsilon
    return private_sigma


@dataclass(frozen=True)
class PrivacyPlan:
    """The privacy of one PrivImage run, fixed before it starts: the query, then DP-SGD at the solved sigma."""

    target_epsilon: float
    delta: float
    accountant: str
    query_sigma: float
    query_epsilon: float  # the query alone
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon: float  # composed: the query and all DP-SGD steps

    def history(self) -> History:
        """What the training accountant starts from (the query) plus what training will add to it."""
        return [*query_history(self.query_sigma), (self.noise_multiplier, self.sample_rate, self.steps)]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def plan_privacy(
    *,
    target_epsilon: float,
    delta: float | None,
    num_private: int,
    query_sigma: float,
    batch_size: int,
    epochs: float,
    kind: Accountant = "prv",
    max_noise_multiplier: float = 50.0,
) -> PrivacyPlan:
    """Check the budget, then solve the DP-SGD sigma for the query + ``ceil(epochs / q)`` Poisson steps.

    ``q = batch_size / N`` is the Poisson rate whose *expected* batch is ``batch_size``; ``delta`` None means
    :func:`default_delta`.
    """
    if target_epsilon <= 0:
        raise PrivacyBudgetError(f"target epsilon {target_epsilon:g} is not positive: set an epsilon > 0")
    if delta is None:
        delta = default_delta(num_private)
    if not 0 < delta < 1 / num_private:
        raise PrivacyBudgetError(
            f"delta {delta:g} is not in (0, 1/N = {1 / num_private:.2g}) for N = {num_private} private images: "
            f"use a smaller delta, or leave it unset for 1/(N ln N) = {default_delta(num_private):.2g}"
        )
    if not 0 < batch_size <= num_private:
        raise PrivacyBudgetError(
            f"batch size {batch_size} is not in [1, N = {num_private}]: use a batch of at most the private set"
        )
    if epochs <= 0:
        raise PrivacyBudgetError(f"{epochs:g} epochs of DP-SGD: train for a positive number of epochs")
    if query_sigma <= 0:
        raise PrivacyBudgetError(
            f"query noise multiplier {query_sigma:g} is not positive: use sigma_q > 0 (PrivImage: 484)"
        )
    sample_rate = batch_size / num_private
    steps = math.ceil(epochs * num_private / batch_size)  # = ceil(epochs / q), without 1/q rounding up a step
    query = query_history(query_sigma)
    noise_multiplier = solve_noise_multiplier(
        target_epsilon=target_epsilon,
        delta=delta,
        sample_rate=sample_rate,
        steps=steps,
        prior=query,
        kind=kind,
        max_noise_multiplier=max_noise_multiplier,
    )
    return PrivacyPlan(
        target_epsilon=float(target_epsilon),
        delta=float(delta),
        accountant=kind,
        query_sigma=float(query_sigma),
        query_epsilon=composed_epsilon(query, delta, kind),
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
        epsilon=composed_epsilon([*query, (noise_multiplier, sample_rate, steps)], delta, kind),
    )


def _normalized(history: Sequence[tuple[float, float, int]]) -> tuple[tuple[float, float, int], ...]:
    """Plain, hashable entries: the history may hold numpy or torch scalars, and it keys the cache."""
    return tuple((float(sigma), float(rate), int(steps)) for sigma, rate, steps in history)


@functools.lru_cache(maxsize=256)
def _composed_epsilon(history: tuple[tuple[float, float, int], ...], delta: float, kind: Accountant) -> float:
    """Cached: a plan asks again for epsilons the solver has just computed (the query's, the final sigma's)."""
    if not history:
        return 0.0
    if kind == "rdp":
        with warnings.catch_warnings():
            # An optimum at the edge of the orders (tiny sigmas while bracketing) is still a valid bound.
            warnings.filterwarnings("ignore", message="Optimal order is the")
            return float(make_accountant("rdp", history).get_epsilon(delta, alphas=RDP_ORDERS))
    eps_error = max(PRV_RELATIVE_ERROR * _fast_rdp_bound(history, delta), PRV_MIN_ERROR)
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        # Opacus sizes the PRV grid with RDP at its default orders, which warns for the query (optimum past 63),
        # and log(1 - q) = -inf at q = 1 is right there (full support): neither is a problem.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        return float(make_accountant(kind, history).get_epsilon(delta, eps_error=eps_error))


@functools.lru_cache(maxsize=256)
def _fast_rdp_bound(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """A sound epsilon, looser than PRV's and than RDP's at all of :data:`RDP_ORDERS` (its orders are a subset)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        return float(make_accountant("rdp", history).get_epsilon(delta, alphas=_FAST_ORDERS))
