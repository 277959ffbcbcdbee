"""The privacy accountant (collm_control.privacy): epsilon checked against dp_accounting reached by
other paths (the RDP curve of the Gaussian written out, and the exact epsilon of composed Gaussians),
the ledger's merging and JSON form, and allows/rounds_left against epsilon itself."""

from __future__ import annotations

import json
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant
from hypothesis import given, settings
from hypothesis import strategies as st

from collm_control.privacy import EMPTY, Spend, allows, epsilon, from_json, record, rounds_left, to_json

DELTA = 1e-5


def ledger_of(*multipliers: float):
    ledger = EMPTY
    for z in multipliers:
        ledger = record(ledger, z)
    return ledger


def rdp_epsilon(spends: dict[float, int], delta: float = DELTA) -> float:
    """Independent path: the Gaussian's RDP at order a is a / (2 z^2) per round, summed over rounds,
    converted by the library's compute_epsilon (no DpEvent, no accountant)."""
    orders = np.array(rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
    rdp = sum(n * orders / (2 * z**2) for z, n in spends.items())
    return float(rdp_privacy_accountant.compute_epsilon(orders, rdp, delta)[0])


def test_z1_ten_rounds_matches_the_library_by_other_paths():
    eps = epsilon(ledger_of(*[1.0] * 10), DELTA)
    assert eps == pytest.approx(rdp_epsilon({1.0: 10}), rel=1e-12)
    # Composing the event ten times, one round at a time, as a naive driver would.
    accountant = rdp_privacy_accountant.RdpAccountant()
    for _ in range(10):
        accountant.compose(dp_accounting.GaussianDpEvent(1.0))
    assert eps == pytest.approx(accountant.get_epsilon(DELTA), rel=1e-12)
    # The figure in docs/federated.md (dp-accounting 0.6.0).
    assert eps == pytest.approx(19.0536, abs=1e-4)


@pytest.mark.parametrize("z,n", [(0.5, 1), (1.0, 10), (2.0, 100), (5.0, 1000)])
def test_rdp_is_an_upper_bound_close_to_the_exact_epsilon(z, n):
    """n Gaussian rounds at z are exactly one Gaussian at z / sqrt(n); the library's analytic
    epsilon for that is the true one. RDP may only be looser, and not by much."""
    exact = dp_accounting.get_epsilon_gaussian(z / math.sqrt(n), DELTA)
    eps = epsilon(ledger_of(*[z] * n), DELTA)
    assert exact <= eps <= 1.2 * exact


def test_mixed_multipliers_compose():
    ledger = ledger_of(1.0, 2.0, 1.0, 2.0, 2.0)
    assert epsilon(ledger, DELTA) == pytest.approx(rdp_epsilon({1.0: 2, 2.0: 3}), rel=1e-12)
    assert epsilon(ledger_of(1.0, 1.0), DELTA) < epsilon(ledger, DELTA) < epsilon(ledger_of(*[1.0] * 5), DELTA)


def test_more_rounds_cost_more_and_more_noise_costs_less():
    by_rounds = [epsilon(ledger_of(*[1.0] * n), DELTA) for n in (1, 2, 10, 100)]
    assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == 4
    by_noise = [epsilon(ledger_of(*[z] * 10), DELTA) for z in (0.5, 1.0, 2.0, 4.0)]
    assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == 4
    assert epsilon(ledger_of(1.0), 1e-3) < epsilon(ledger_of(1.0), 1e-9)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the library's z**2 underflows to 0
def test_empty_ledger_and_unbounded_epsilon():
    assert epsilon(EMPTY, DELTA) == 0.0
    assert epsilon(ledger_of(1e-200), DELTA) == math.inf  # the RDP overflows: no finite bound


def test_ledger_merges_equal_multipliers_and_stays_small():
    ledger = ledger_of(*[2.0, 0.5, 2.0] * 1000)
    assert ledger == (Spend(0.5, 1000), Spend(2.0, 2000))
    assert record(ledger, 1.0) == (Spend(0.5, 1000), Spend(1.0, 1), Spend(2.0, 2000))
    assert ledger_of(1, 1.0) == (Spend(1.0, 2),)  # an int multiplier is the same entry
    assert record(EMPTY, 1.0) == (Spend(1.0, 1),) and EMPTY == ()  # pure: the input is not changed


def test_json_round_trip_through_text():
    ledger = ledger_of(0.7, 1.3, 0.7)
    status = to_json(ledger)
    assert status == [{"noiseMultiplier": 0.7, "rounds": 2}, {"noiseMultiplier": 1.3, "rounds": 1}]
    assert from_json(json.loads(json.dumps(status))) == ledger
    assert from_json(None) == from_json([]) == EMPTY
    # Hand-written duplicates are merged (summed), never read as a smaller spend.
    assert from_json([{"noiseMultiplier": 1.0, "rounds": 2}, {"noiseMultiplier": 1.0, "rounds": 3}]) == (Spend(1.0, 5),)


@pytest.mark.parametrize(
    "entries,message",
    [
        ([{"noiseMultiplier": 1.0}], "a ledger entry"),
        ([{"noiseMultiplier": 1.0, "rounds": 1, "extra": 0}], "a ledger entry"),
        (["1.0"], "a ledger entry"),
        ([{"noiseMultiplier": 1.0, "rounds": 0}], "rounds must be an integer >= 1"),
        ([{"noiseMultiplier": 1.0, "rounds": 2.0}], "rounds must be an integer >= 1"),
        ([{"noiseMultiplier": 1.0, "rounds": True}], "rounds must be an integer >= 1"),
        ([{"noiseMultiplier": 0.0, "rounds": 1}], "noise_multiplier must be finite and > 0"),
        ([{"noiseMultiplier": "1.0", "rounds": 1}], "noise_multiplier must be a number"),
    ],
)
def test_from_json_refuses_bad_entries(entries, message):
    with pytest.raises(ValueError, match=message):
        from_json(entries)


def test_allows_and_rounds_left_agree_with_epsilon():
    ledger = ledger_of(*[1.0] * 10)
    budget = epsilon(ledger_of(*[1.0] * 14), DELTA)  # exactly 4 more rounds fit
    assert rounds_left(ledger, 1.0, DELTA, budget) == 4
    assert allows(ledger, 1.0, DELTA, budget) and allows(ledger_of(*[1.0] * 13), 1.0, DELTA, budget)
    assert not allows(ledger_of(*[1.0] * 14), 1.0, DELTA, budget)
    assert rounds_left(ledger_of(*[1.0] * 14), 1.0, DELTA, budget) == 0
    assert rounds_left(ledger_of(*[1.0] * 20), 1.0, DELTA, budget) == 0  # already over: nothing left
    assert rounds_left(ledger, 2.0, DELTA, budget) > 4  # more noise, more rounds
    assert rounds_left(EMPTY, 100.0, DELTA, 10.0, cap=50) == 50
    assert rounds_left(EMPTY, 1.0, DELTA, 0.0) == 0 and not allows(EMPTY, 1.0, DELTA, 0.0)
    assert allows(EMPTY, 1.0, DELTA, math.inf) and rounds_left(EMPTY, 1.0, DELTA, math.inf, cap=7) == 7


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0, math.nan])
def test_delta_outside_zero_one_is_refused(delta):
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
        epsilon(ledger_of(1.0), delta)
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
        epsilon(EMPTY, delta)
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
        allows(EMPTY, 1.0, delta, 1.0)
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
        rounds_left(EMPTY, 1.0, delta, 1.0)


@pytest.mark.parametrize("z", [0.0, -1.0, math.nan, math.inf])
def test_a_multiplier_that_is_not_positive_and_finite_is_refused(z):
    for call in (lambda: record(EMPTY, z), lambda: allows(EMPTY, z, DELTA, 1.0), lambda: rounds_left(EMPTY, z, DELTA, 1.0)):
        with pytest.raises(ValueError, match="noise_multiplier must be finite and > 0"):
            call()


@pytest.mark.parametrize("budget", [-0.1, math.nan])
def test_a_negative_budget_is_refused(budget):
    with pytest.raises(ValueError, match="budget_epsilon must be >= 0"):
        allows(EMPTY, 1.0, DELTA, budget)
    with pytest.raises(ValueError, match="budget_epsilon must be >= 0"):
        rounds_left(EMPTY, 1.0, DELTA, budget)


def test_a_negative_cap_is_refused():
    with pytest.raises(ValueError, match="cap must be an integer >= 0"):
        rounds_left(EMPTY, 1.0, DELTA, 1.0, cap=-1)


multipliers = st.sampled_from([0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 4.0])


@settings(max_examples=40, deadline=None)
@given(history=st.lists(multipliers, max_size=30), z=multipliers, budget=st.floats(0.0, 60.0))
def test_properties(history, z, budget):
    ledger = ledger_of(*history)
    # Merged, sorted, order-free, and its JSON form reads back.
    assert ledger == ledger_of(*reversed(history)) and sum(s.rounds for s in ledger) == len(history)
    assert [s.noise_multiplier for s in ledger] == sorted({*history})
    assert from_json(json.loads(json.dumps(to_json(ledger)))) == ledger
    # One more round never lowers epsilon; allows is exactly epsilon-after-the-round within budget.
    before, after = epsilon(ledger, DELTA), epsilon(record(ledger, z), DELTA)
    assert after > before
    assert allows(ledger, z, DELTA, budget) == (after <= budget)
    # rounds_left is the largest k that fits.
    k = rounds_left(ledger, z, DELTA, budget, cap=200)
    with_k = ledger
    for _ in range(k):
        with_k = record(with_k, z)
    assert (k == 0 and before > budget) or epsilon(with_k, DELTA) <= budget
    assert k == 200 or epsilon(record(with_k, z), DELTA) > budget
    assert (k > 0) == allows(ledger, z, DELTA, budget)
