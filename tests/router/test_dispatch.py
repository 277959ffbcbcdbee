"""Weighted power of two choices, driven with plain numbers."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from replica_agent.router.dispatch import ReplicaLoad, choose, why_none


def load(name, weight=1.0, outstanding=0, healthy=True, max_outstanding=8):
    return ReplicaLoad(name, weight, healthy, outstanding, max_outstanding)


def shares(replicas, n=20000, seed=1):
    rng = random.Random(seed)
    counts = Counter(choose(replicas, rng).name for _ in range(n))
    return {name: c / n for name, c in counts.items()}


def test_idle_replicas_share_traffic_by_weight():
    got = shares([load("a", 3), load("b", 1)])
    assert got["a"] == pytest.approx(0.75, abs=0.02)
    got = shares([load("a", 1), load("b", 2), load("c", 1)])
    assert got == pytest.approx({"a": 0.25, "b": 0.5, "c": 0.25}, abs=0.02)


def test_lower_outstanding_per_weight_wins():
    rng = random.Random(0)
    # Two replicas: both are always drawn, so the less loaded one (per unit of weight) always wins.
    assert {choose([load("a", 1, outstanding=5), load("b", 1, outstanding=1)], rng).name for _ in range(50)} == {"b"}
    # a has 3x the weight: 5/3 < 2/1, so a wins although it holds more requests.
    assert choose([load("a", 3, outstanding=5), load("b", 1, outstanding=2)], rng).name == "a"


def test_load_feedback_keeps_queues_proportional_to_weight():
    """Simulate: each step one request arrives and the oldest one finishes once 8 are in flight."""
    rng = random.Random(3)
    outstanding = {"a": 0, "b": 0}
    weights = {"a": 3.0, "b": 1.0}
    inflight: list[str] = []
    served = Counter()
    for _ in range(4000):
        chosen = choose([load(n, weights[n], outstanding[n], max_outstanding=100) for n in outstanding], rng).name
        outstanding[chosen] += 1
        served[chosen] += 1
        inflight.append(chosen)
        if len(inflight) >= 8:
            outstanding[inflight.pop(0)] -= 1
    assert served["a"] / 4000 == pytest.approx(0.75, abs=0.05)


def test_excluded_unhealthy_zero_weight_and_saturated_replicas_get_nothing():
    rng = random.Random(0)
    replicas = [load("tried"), load("sick", healthy=False), load("drained", weight=0), load("full", outstanding=8), load("ok")]
    assert {choose(replicas, rng, exclude={"tried"}).name for _ in range(100)} == {"ok"}
    assert choose(replicas, rng, exclude={"tried", "ok"}) is None
    assert why_none(replicas, exclude={"tried", "ok"}) == "saturated"  # "full" could serve later: shed with 429


def test_none_when_no_replica_is_routable():
    rng = random.Random(0)
    assert choose([], rng) is None and why_none([]) == "unavailable"
    replicas = [load("a", healthy=False), load("b", weight=0)]
    assert choose(replicas, rng) is None and why_none(replicas) == "unavailable"


def test_seeded_choices_are_reproducible():
    replicas = [load("a", 1), load("b", 2), load("c", 3, outstanding=2)]
    first = [choose(replicas, random.Random(42)).name for _ in range(1)]
    rng1, rng2 = random.Random(7), random.Random(7)
    assert [choose(replicas, rng1).name for _ in range(100)] == [choose(replicas, rng2).name for _ in range(100)]
    assert first == [choose(replicas, random.Random(42)).name]


def test_a_request_goes_home_while_home_has_room():
    rng = random.Random(5)
    replicas = [load("a", outstanding=3), load("b", outstanding=1)]
    assert {choose(replicas, rng, home="a").name for _ in range(50)} == {"a"}  # 3 <= 2 x 1 + 4
    busy = [load("a", outstanding=7), load("b", outstanding=1)]
    assert {choose(busy, rng, home="a").name for _ in range(50)} == {"b"}  # 7 > 2 x 1 + 4: spill over
    # A home that is saturated, drained (weight 0) or failed this request takes nothing.
    assert choose([load("a", outstanding=8), load("b")], rng, home="a").name == "b"
    assert choose([load("a", weight=0), load("b")], rng, home="a").name == "b"
    assert choose([load("a"), load("b")], rng, exclude=["a"], home="a").name == "b"
    assert choose([load("a")], rng, home="nobody").name == "a"  # an unknown home is no preference


def test_home_room_is_counted_relative_to_the_planned_weights():
    """A replica planned for a third of the traffic (a slower device) has room for a third of the
    queue: with 3 requests outstanding against 1 elsewhere it spills, where an equal one would not."""
    rng = random.Random(0)
    equal = [load("a", 1, outstanding=3), load("b", 1, outstanding=1)]
    assert {choose(equal, rng, home="a").name for _ in range(20)} == {"a"}  # 3 <= 2 x 1 + 4
    slow = [load("a", 1, outstanding=5), load("b", 2, outstanding=1)]  # a: 5 x 3 / 2 = 7.5 > 2 x 0.75 + 4
    assert {choose(slow, rng, home="a").name for _ in range(20)} == {"b"}
    fast = [load("a", 2, outstanding=7), load("b", 1, outstanding=1)]  # a: 7 x 3 / 4 = 5.25 <= 2 x 1.5 + 4
    assert {choose(fast, rng, home="a").name for _ in range(20)} == {"a"}
