"""The slow-timescale allocation: properties over random clusters (hypothesis) and worked cases."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collm_control.allocation import POLICIES, Allocation, CapacityProfile, ReplicaState, allocate

TOL = 1e-9


@st.composite
def profiles(draw):
    count = draw(st.integers(1, 5))
    caps = sorted(draw(st.sets(st.integers(0, 1024), min_size=count, max_size=count)))
    capacity = sorted(draw(st.lists(st.floats(0.1, 50.0), min_size=count, max_size=count)), reverse=True)
    training = sorted(draw(st.lists(st.floats(0.0, 9000.0), min_size=count, max_size=count)))
    return CapacityProfile(tuple(zip(caps, capacity, training)))


@st.composite
def clusters(draw):
    count = draw(st.integers(1, 8))
    return [
        ReplicaState(
            f"r{i}",
            draw(st.booleans()) if i else True,  # at least one healthy replica
            draw(profiles()),
            draw(st.floats(0.0, 1e-6)),
            draw(st.integers(0, 10**7)),
        )
        for i in range(count)
    ]


def capacity_at_min(replicas) -> float:
    return sum(r.profile.capacity_at(r.profile.min_cap) for r in replicas if r.healthy)


def plan(load, replicas, **kwargs) -> Allocation:
    return allocate(load, replicas, **kwargs)


@settings(max_examples=150, deadline=None)
@given(clusters(), st.floats(0.0, 2.0), st.sampled_from(POLICIES), st.floats(0.5, 1.0))
def test_no_replica_is_routed_more_than_headroom_times_its_capacity_unless_overloaded(replicas, share, policy, headroom):
    load = share * headroom * capacity_at_min(replicas)
    a = plan(load, replicas, policy=policy, headroom=headroom)
    by_name = {r.name: r for r in replicas}
    for name, cap in a.caps.items():
        profile = by_name[name].profile
        assert profile.min_cap <= cap <= profile.max_cap
        if not a.overloaded:
            assert a.weights[name] * load <= headroom * profile.capacity_at(cap) * (1 + 1e-7) + 1e-7
    if policy == "coexec":
        assert a.overloaded == (share > 1 + 1e-6) or abs(share - 1) < 1e-6


@settings(max_examples=150, deadline=None)
@given(clusters(), st.floats(0.0, 1.5), st.floats(0.0, 1.5))
def test_a_load_spike_lowers_and_never_raises_training_caps(replicas, low, high):
    low, high = sorted((low, high))
    total = 0.9 * capacity_at_min(replicas)
    before, after = plan(low * total, replicas), plan(high * total, replicas)
    for name in before.caps:
        assert after.caps[name] <= before.caps[name]
    assert after.objective <= before.objective + TOL


@settings(max_examples=100, deadline=None)
@given(clusters())
def test_zero_load_gives_every_healthy_replica_its_full_cap(replicas):
    a = plan(0.0, replicas)
    for r in replicas:
        assert a.caps[r.name] == (r.profile.max_cap if r.healthy else r.profile.min_cap)
    assert not a.overloaded


@settings(max_examples=150, deadline=None)
@given(clusters(), st.floats(0.0, 1.5), st.sampled_from(POLICIES), st.integers(0, 4), st.floats(0.0, 1.0))
def test_unhealthy_replicas_get_no_traffic_and_no_round_role(replicas, share, policy, min_participants, fraction):
    a = plan(share * capacity_at_min(replicas), replicas, policy=policy, min_participants=min_participants, participation_fraction=fraction)
    for r in replicas:
        if not r.healthy:
            assert a.weights[r.name] == 0.0
            assert r.name not in a.participants and a.aggregator != r.name
    if a.participants:
        assert a.aggregator in a.participants
    else:
        assert a.aggregator is None


@settings(max_examples=150, deadline=None)
@given(clusters(), st.floats(0.0, 1.5), st.sampled_from(POLICIES), st.randoms(use_true_random=False))
def test_weights_sum_to_one_and_the_plan_is_deterministic(replicas, share, policy, rng):
    load = share * capacity_at_min(replicas)
    a = plan(load, replicas, policy=policy)
    assert sum(a.weights.values()) == pytest.approx(1.0)
    assert all(w >= 0 for w in a.weights.values())
    shuffled = list(replicas)
    rng.shuffle(shuffled)
    assert plan(load, shuffled, policy=policy) == a, "same input in another order must give the same plan"


@settings(max_examples=100, deadline=None)
@given(clusters(), st.integers(0, 8), st.floats(0.0, 1.0))
def test_participants_are_the_replicas_with_the_highest_expected_gain(replicas, min_participants, fraction):
    a = plan(0.0, replicas, min_participants=min_participants, participation_fraction=fraction)
    eligible = [r for r in replicas if r.healthy and r.data_tokens > 0]
    assert len(a.participants) >= min(min_participants, len(eligible))
    chosen = [r for r in eligible if r.name in a.participants]
    others = [r for r in eligible if r.name not in a.participants]
    if chosen and others:
        assert min(r.expected_gain for r in chosen) >= max(r.expected_gain for r in others)


def linear_profile(capacity_alone: float, training_full: float, *, cap: int = 8) -> CapacityProfile:
    return CapacityProfile(((0, capacity_alone, 0.0), (cap, capacity_alone / 2, training_full)))


def test_water_filling_matches_brute_force_on_small_clusters():
    """Profiles concave in (capacity, training): the greedy is optimal up to one cap unit."""
    rng = random.Random(3)
    for _ in range(30):
        replicas = []
        for i in range(3):
            c0, r = rng.uniform(2, 10), rng.uniform(100, 1000)
            profile = CapacityProfile(((0, c0, 0.0), (4, c0 * 0.8, r * 0.7), (8, c0 * 0.5, r)))
            replicas.append(ReplicaState(f"r{i}", True, profile, rng.uniform(1e-7, 1e-6), 1000))
        load = rng.uniform(0.0, 0.9 * capacity_at_min(replicas))
        a = plan(load, replicas)
        best = 0.0
        for caps in itertools.product(range(9), repeat=3):
            if sum(r.profile.capacity_at(c) for r, c in zip(replicas, caps)) * 0.9 >= load:
                best = max(best, sum(r.loss_slope_per_token * r.profile.training_rate_at(c) for r, c in zip(replicas, caps)))
        one_unit = max(r.loss_slope_per_token * r.profile.training_rate_at(8) / 4 for r in replicas)
        assert best - one_unit <= a.objective <= best + TOL


def test_an_overloaded_cluster_serves_with_every_cap_at_zero_and_weights_by_capacity():
    replicas = [ReplicaState("a", True, linear_profile(10.0, 100.0), 1e-6, 10), ReplicaState("b", True, linear_profile(30.0, 100.0), 1e-6, 10)]
    a = plan(100.0, replicas)
    assert a.overloaded and a.caps == {"a": 0, "b": 0}
    assert a.weights == pytest.approx({"a": 0.25, "b": 0.75})


def test_cheapest_capacity_is_taken_first():
    # Same profiles, "cheap" has a lower loss slope: its training gives way first.
    replicas = [ReplicaState("dear", True, linear_profile(10.0, 100.0), 1e-6, 10), ReplicaState("cheap", True, linear_profile(10.0, 100.0), 1e-7, 10)]
    a = plan(0.9 * 12.0, replicas)  # needs 2 of the 10 req/s the caps can give back
    assert a.caps["dear"] == 8 and a.caps["cheap"] < 8
    assert sum(r.profile.capacity_at(a.caps[r.name]) for r in replicas) * 0.9 >= 0.9 * 12.0 - TOL


def test_the_baseline_policies():
    replicas = [ReplicaState(n, True, linear_profile(10.0, 100.0), 1e-6, 10 + i) for i, n in enumerate("abcd")]
    static = plan(5.0, replicas, policy="static", static_cap=4)
    assert set(static.caps.values()) == {4} and set(static.weights.values()) == {0.25}
    separated = plan(5.0, replicas, policy="separated")
    trainers = {n for n, c in separated.caps.items() if c == 8}
    assert trainers == {"c", "d"}, "the half with the highest expected gain trains"
    assert all(separated.weights[n] == 0 for n in trainers) and set(separated.participants) == trainers
    assert all(separated.caps[n] == 0 for n in "ab") and sum(separated.weights.values()) == pytest.approx(1)
    only = plan(5.0, replicas, policy="inferenceOnly")
    assert set(only.caps.values()) == {0} and only.participants == () and only.aggregator is None
    assert only.objective == 0.0


def test_the_aggregator_is_the_participant_with_the_most_spare_capacity():
    replicas = [ReplicaState("a", True, linear_profile(10.0, 100.0), 1e-6, 10), ReplicaState("b", True, linear_profile(30.0, 100.0), 1e-6, 10)]
    assert plan(1.0, replicas).aggregator == "b"
    assert plan(1.0, replicas, participation_fraction=0.5, min_participants=0).participants == ("a",)  # name breaks the tie


def test_capacity_profile_interpolates_clamps_and_cleans_measurements():
    p = CapacityProfile(((0, 10.0, 0.0), (100, 6.0, 1000.0), (200, 4.0, 1500.0)))
    assert p.capacity_at(50) == pytest.approx(8.0) and p.training_rate_at(150) == pytest.approx(1250.0)
    assert p.capacity_at(-5) == 10.0 and p.capacity_at(999) == 4.0
    with pytest.raises(ValueError, match="from_measurements"):
        CapacityProfile(((0, 5.0, 0.0), (100, 6.0, 10.0)))
    with pytest.raises(ValueError, match="strictly increase"):
        CapacityProfile(((0, 5.0, 0.0), (0, 4.0, 10.0)))
    noisy = CapacityProfile.from_measurements([(100, 6.0, 900.0), (0, 10.0, 0.0), (100, 7.0, 1100.0), (200, 6.9, 950.0)])
    assert noisy.points == ((0, 10.0, 0.0), (100, 6.5, 1000.0), (200, 6.5, 1000.0))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(policy="greedy"), "unknown scheduling policy"),
        (dict(headroom=0), "headroom"),
        (dict(participation_fraction=2), "participation_fraction"),
        (dict(static_cap=-1), "static_cap"),
    ],
)
def test_invalid_arguments_say_what_to_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        allocate(1.0, [ReplicaState("a", True, linear_profile(10.0, 1.0))], **kwargs)
    with pytest.raises(ValueError, match="unique"):
        allocate(1.0, [ReplicaState("a", True, linear_profile(10.0, 1.0))] * 2)
