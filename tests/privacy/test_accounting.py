"""PrivImage's end-to-end accounting: the query and DP-SGD composed, against Opacus and the exact Gaussian."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from scipy.stats import norm

from tckr.core.errors import ConfigError
from tckr.privacy.accounting import (
    PrivacyBudgetError,
    composed_epsilon,
    default_delta,
    epsilon_spent,
    make_accountant,
    plan_privacy,
    query_history,
    solve_noise_multiplier,
)

pytestmark = pytest.mark.unit

DELTA = 1e-5
OPACUS = {"prv": PRVAccountant, "rdp": RDPAccountant}


def exact_gaussian_delta(epsilon: float, noise_multiplier: float) -> float:
    """delta(epsilon) of one Gaussian release (Balle & Wang 2018): the truth the q = 1 query must match."""
    mu = 1 / noise_multiplier
    return norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * norm.cdf(-epsilon / mu - mu / 2)


def test_default_delta_is_below_one_over_n():
    for num_private in (3, 10, 1_000, 60_000):
        assert default_delta(num_private) == pytest.approx(1 / (num_private * math.log(num_private)))
        assert default_delta(num_private) < 1 / num_private
    with pytest.raises(PrivacyBudgetError, match="at least 3"):
        default_delta(2)  # 1 / (2 ln 2) = 0.72 > 1/2


@pytest.mark.parametrize("query_sigma", [484.0, 50.0])
def test_query_alone_is_the_exact_gaussian_mechanism(query_sigma):
    assert query_history(query_sigma) == [(query_sigma, 1.0, 1)]
    epsilon = composed_epsilon(query_history(query_sigma), DELTA, "prv")
    # An upper bound (delta holds at it) and a tight one (not at 97% of it); far below the classical bound.
    assert exact_gaussian_delta(epsilon, query_sigma) <= DELTA < exact_gaussian_delta(0.97 * epsilon, query_sigma)
    assert epsilon < math.sqrt(2 * math.log(1.25 / DELTA)) / query_sigma
    assert epsilon <= composed_epsilon(query_history(query_sigma), DELTA, "rdp") < 1.2 * epsilon


@pytest.mark.parametrize("kind", ["prv", "rdp"])
@pytest.mark.filterwarnings("ignore:Optimal order is the", "ignore:divide by zero")  # stock Opacus on the query
def test_composed_epsilon_matches_an_independent_opacus_accountant(kind):
    history = [*query_history(50.0), (1.0, 0.05, 300)]
    independent = OPACUS[kind]()
    independent.step(noise_multiplier=50.0, sample_rate=1.0)
    for _ in range(300):
        independent.step(noise_multiplier=1.0, sample_rate=0.05)
    assert independent.history == history
    assert composed_epsilon(history, DELTA, kind) == pytest.approx(independent.get_epsilon(DELTA), rel=0.01)


def test_composition_costs_more_than_each_part_and_rises_with_steps():
    query = query_history(50.0)
    dp_sgd = [(1.0, 0.05, 200)]
    composed = composed_epsilon([*query, *dp_sgd], DELTA)
    assert composed > composed_epsilon(dp_sgd, DELTA) > composed_epsilon(query, DELTA) > 0
    by_steps = [composed_epsilon([*query, (1.0, 0.05, steps)], DELTA) for steps in (100, 200, 400)]
    assert by_steps[0] < composed < by_steps[2] and by_steps == sorted(by_steps)
    assert epsilon_spent([], DELTA) == 0.0


@pytest.mark.parametrize("kind", ["prv", "rdp"])
def test_solver_hits_the_composed_target_from_below(kind):
    prior = query_history(50.0)
    sigma = solve_noise_multiplier(target_epsilon=3.0, delta=DELTA, sample_rate=0.1, steps=200, prior=prior, kind=kind)
    epsilon = composed_epsilon([*prior, (sigma, 0.1, 200)], DELTA, kind)
    assert 0.99 * 3.0 <= epsilon <= 3.0
    assert composed_epsilon([*prior, (0.97 * sigma, 0.1, 200)], DELTA, kind) > 3.0  # the smallest, near enough


def test_plan_composes_the_query_with_poisson_dp_sgd():
    plan = plan_privacy(
        target_epsilon=10.0, delta=None, num_private=60_000, query_sigma=484.0, batch_size=6_000, epochs=20
    )
    assert plan.delta == default_delta(60_000)
    assert (plan.sample_rate, plan.steps) == (0.1, 200)
    assert plan.history() == [(484.0, 1.0, 1), (plan.noise_multiplier, 0.1, 200)]
    assert plan.query_epsilon == composed_epsilon(query_history(484.0), plan.delta)
    assert plan.epsilon == composed_epsilon(plan.history(), plan.delta)
    assert 0.99 * 10.0 <= plan.epsilon <= 10.0
    assert plan.as_dict()["noise_multiplier"] == plan.noise_multiplier


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"target_epsilon": 0.0}, "set an epsilon > 0"),
        ({"delta": 1e-3}, r"delta 0.001 is not in \(0, 1/N = 0.0001\)"),
        ({"delta": 0.0}, "use a smaller delta, or leave it unset"),
        ({"batch_size": 20_000}, "batch size 20000 is not in"),
        ({"query_sigma": 0.0}, "use sigma_q > 0"),
        ({"query_sigma": 0.5}, "already spend epsilon .* raise the query's noise multiplier or the target"),
    ],
)
def test_plan_refuses_budgets_it_cannot_meet(overrides, message):
    settings = dict(target_epsilon=1.0, delta=None, num_private=10_000, query_sigma=50.0, batch_size=100, epochs=1)
    with pytest.raises(PrivacyBudgetError, match=message) as refusal:
        plan_privacy(**{**settings, **overrides})
    assert refusal.value.exit_code == 2 and "\n" not in str(refusal.value)


@pytest.mark.parametrize("kind", ["prv", "rdp"])
def test_too_many_steps_for_the_largest_noise_is_refused_with_what_to_change(kind):
    with pytest.raises(PrivacyBudgetError, match="above 50: train fewer epochs .*smaller batch.* raise the target"):
        solve_noise_multiplier(
            target_epsilon=1.0, delta=DELTA, sample_rate=0.5, steps=100_000, prior=query_history(484.0), kind=kind
        )


@pytest.mark.parametrize("kind", ["prv", "rdp"])
def test_accountant_checkpoints_its_history_query_included(kind):
    given = [(np.float64(484.0), np.float64(1.0), np.int64(1))]  # numpy scalars would not survive weights_only
    accountant = make_accountant(kind, given)
    for _ in range(3):
        accountant.step(noise_multiplier=1.0, sample_rate=0.1)
    assert accountant.history == [(484.0, 1.0, 1), (1.0, 0.1, 3)] and len(given) == 1

    buffer = io.BytesIO()
    torch.save({"accountant": accountant.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["accountant"]
    for restored in (make_accountant(kind), OPACUS[kind]()):  # the stock accountant reads it too
        restored.load_state_dict(state)
        assert restored.history == accountant.history
    assert epsilon_spent(state["history"], DELTA, kind) == epsilon_spent(accountant.history, DELTA, kind)


def test_unknown_accountant_is_a_config_error():
    with pytest.raises(ConfigError, match="use 'prv' or 'rdp'"):
        make_accountant("gdp")
