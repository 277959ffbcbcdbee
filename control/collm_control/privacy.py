"""Participant-level privacy accounting of a cluster's DP rounds (docs/federated.md, Privacy accounting).

A DP round (`Robust` with `noise_multiplier` in replica_agent/federated/aggregation.py) clips every
update to clip_norm and adds N(0, (z * clip_norm)^2) to their sum, so it is a Gaussian mechanism with
noise multiplier z with respect to adding or removing one participant's whole update. The operator
picks participants by allocation, not at random, so no amplification by subsampling is claimed:
every round is a full Gaussian mechanism, and rounds compose. The ledger counts every DP round for
every replica (a replica that sat a round out spent nothing in it, so this over-counts, never under).

Epsilon comes from dp_accounting's RDP accountant rather than our own formula: the conversion from
RDP to (epsilon, delta) is easy to get subtly wrong, and a kept library is checked by others.
Everything here is pure; the ledger is an immutable tuple with a JSON form for the CollmCluster status.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import dp_accounting
from dp_accounting.rdp import RdpAccountant


@dataclass(frozen=True)
class Spend:
    """`rounds` DP rounds run with noise multiplier `noise_multiplier`."""

    noise_multiplier: float
    rounds: int


# Sorted by noise multiplier, one entry per multiplier: the canonical form, so that equal histories
# compare equal and the status stays a few entries long however many rounds have run.
Ledger = tuple[Spend, ...]

EMPTY: Ledger = ()


def _check_multiplier(noise_multiplier: float) -> float:
    if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, int | float):
        raise ValueError(f"noise_multiplier must be a number, got {noise_multiplier!r}")
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be finite and > 0 (a round without noise has no DP guarantee), got {noise_multiplier}")
    return float(noise_multiplier)


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def _check_budget(budget_epsilon: float) -> None:
    if not budget_epsilon >= 0:  # also refuses NaN
        raise ValueError(f"budget_epsilon must be >= 0, got {budget_epsilon}")


def _add(ledger: Ledger, noise_multiplier: float, rounds: int) -> Ledger:
    z = _check_multiplier(noise_multiplier)
    counts = {s.noise_multiplier: s.rounds for s in ledger}
    counts[z] = counts.get(z, 0) + rounds
    return tuple(Spend(m, n) for m, n in sorted(counts.items()) if n > 0)


def record(ledger: Ledger, noise_multiplier: float) -> Ledger:
    """The ledger after one more DP round with this noise multiplier (merged into its entry)."""
    return _add(ledger, noise_multiplier, 1)


def to_json(ledger: Ledger) -> list[dict[str, Any]]:
    """The status form: `[{"noiseMultiplier": z, "rounds": n}, ...]`."""
    return [{"noiseMultiplier": s.noise_multiplier, "rounds": s.rounds} for s in ledger]


def from_json(entries: Iterable[Mapping[str, Any]] | None) -> Ledger:
    """The ledger from its status form (None or [] for none yet); entries are validated and merged,
    since a status is written by hand at times and a bad one must not read as a smaller spend."""
    ledger = EMPTY
    for entry in entries or ():
        if not isinstance(entry, Mapping) or set(entry) != {"noiseMultiplier", "rounds"}:
            raise ValueError(f"a ledger entry is {{'noiseMultiplier': z, 'rounds': n}}, got {entry!r}")
        rounds = entry["rounds"]
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
        ledger = _add(ledger, entry["noiseMultiplier"], rounds)
    return ledger


def epsilon(ledger: Ledger, delta: float) -> float:
    """The (epsilon, delta)-DP epsilon of all the ledger's rounds composed: 0.0 for none, math.inf
    where the accountant finds no finite bound."""
    _check_delta(delta)
    if not ledger:
        return 0.0
    event = dp_accounting.ComposedDpEvent(
        [dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(_check_multiplier(s.noise_multiplier)), s.rounds) for s in ledger]
    )
    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    eps = float(accountant.compose(event).get_epsilon(delta))
    return eps if math.isfinite(eps) else math.inf


def allows(ledger: Ledger, noise_multiplier: float, delta: float, budget_epsilon: float) -> bool:
    """Whether one more round with this multiplier keeps epsilon within the budget; the operator
    asks before it starts a DP round, so the budget is never overrun, not even by one round."""
    _check_budget(budget_epsilon)
    return epsilon(record(ledger, noise_multiplier), delta) <= budget_epsilon


def rounds_left(ledger: Ledger, noise_multiplier: float, delta: float, budget_epsilon: float, cap: int = 100_000) -> int:
    """How many more rounds with this multiplier fit the budget, at most `cap` (for the status).

    Binary search: epsilon grows with every round (RDP adds up, and each order's bound grows with it)."""
    _check_budget(budget_epsilon)
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
        raise ValueError(f"cap must be an integer >= 0, got {cap!r}")
    _check_multiplier(noise_multiplier)

    def fits(k: int) -> bool:
        return epsilon(_add(ledger, noise_multiplier, k), delta) <= budget_epsilon

    if not fits(0):
        return 0
    lo, hi = 0, cap  # fits(lo) holds; the answer is in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
