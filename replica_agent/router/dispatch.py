"""Which replica serves the next request: weighted power of two choices (pure; no I/O).

The operator's allocation gives each replica a routing weight (its share of the traffic); the
router's own count of outstanding requests corrects it for the queue a replica has now. Two distinct
candidates are drawn with probability proportional to weight and the one with the lower
outstanding/weight wins (a tie goes to the first drawn). With an idle cluster this sends traffic in
proportion to the weights; under load it keeps each replica's queue proportional to its weight,
and it never piles onto one replica that a stale weight overrates (Mitzenmacher's two choices).

A replica gets no traffic while it is unhealthy, has weight 0 (drained, e.g. a training-only
replica), already failed this request, holds `max_outstanding` requests, or is shedding: it
answered 429 because a request would have missed its TTFT SLO, and said in how many milliseconds
it expects to admit one again (engine/admission.py). The last two count as saturated.

Home affinity: a request may name its home replica (the one whose users it comes from, whose
private data is its domain, so whose local revisions serve it best). The home replica takes it
while it has room: routable, not saturated, and holding at most `AFFINITY_FACTOR` times the
outstanding requests of the replica two choices would pick instead, plus `AFFINITY_SLACK`, both
counted relative to their weights (a replica planned for a third of the traffic has room for a
third of the queue: a slower device spills sooner). Past that the request spills to the other one:
quality is worth little to a request that misses its SLO.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ReplicaLoad:
    """What dispatch needs to know about one replica at the moment of a choice."""

    name: str
    weight: float
    healthy: bool
    outstanding: int
    max_outstanding: int
    shedding: bool = False

    @property
    def saturated(self) -> bool:
        return self.shedding or self.outstanding >= self.max_outstanding


def eligible(replicas: Sequence[ReplicaLoad], exclude: Collection[str] = ()) -> list[ReplicaLoad]:
    """Replicas that may take traffic now, saturated ones included."""
    return [r for r in replicas if r.healthy and r.weight > 0 and r.name not in exclude]


AFFINITY_FACTOR = 2.0
AFFINITY_SLACK = 4


def choose(replicas: Sequence[ReplicaLoad], rng: random.Random, exclude: Collection[str] = (), home: str | None = None) -> ReplicaLoad | None:
    """The replica for the next request, or None when every eligible one is saturated (or none is eligible)."""
    candidates = [r for r in eligible(replicas, exclude) if not r.saturated]
    mine = next((r for r in candidates if r.name == home), None) if home else None
    if mine is not None:
        others = [r for r in candidates if r is not mine]
        alternative = _two_choices(others, rng) if others else None
        if alternative is None or relative_queue(mine, candidates) <= AFFINITY_FACTOR * relative_queue(alternative, candidates) + AFFINITY_SLACK:
            return mine
        return alternative
    return _two_choices(candidates, rng)


def relative_queue(replica: ReplicaLoad, candidates: Sequence[ReplicaLoad]) -> float:
    """Outstanding requests over the replica's share of the weight, times the number of candidates:
    the plain count when the weights are equal."""
    total = sum(r.weight for r in candidates)
    return replica.outstanding * total / (replica.weight * len(candidates)) if total > 0 else float(replica.outstanding)


def _two_choices(candidates: Sequence[ReplicaLoad], rng: random.Random) -> ReplicaLoad | None:
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    first = _draw(candidates, rng)
    second = _draw([r for r in candidates if r is not first], rng)
    return second if second.outstanding / second.weight < first.outstanding / first.weight else first


def why_none(replicas: Sequence[ReplicaLoad], exclude: Collection[str] = ()) -> Literal["saturated", "unavailable"]:
    """After `choose` returned None: "saturated" (shed load, 429) or "unavailable" (no replica can serve, 503)."""
    return "saturated" if eligible(replicas, exclude) else "unavailable"


def _draw(candidates: Sequence[ReplicaLoad], rng: random.Random) -> ReplicaLoad:
    return rng.choices(candidates, weights=[r.weight for r in candidates])[0]
