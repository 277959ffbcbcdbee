"""The slow timescale's rules on replicas that differ (docs/scheduling.md): each rule driven through
the one decision function, `decide()`, with stats as the agents report them.

The synthetic stats below are shaped like the recorded ones (tests/control/recorded/hetero.json:
replica-1 a device half as fast, 60% of the home users at it), which test_decide.py replays."""

from __future__ import annotations

import pytest

from collm_control.decide import ControlSettings, Observation, decide, straggler
from collm_control.planning import Planner, PlanningSettings
from collm_control.stats import AdapterRef, AgentStats, CapacityPoint

FAST = ((0, 8.0, 0.0), (64, 6.0, 500.0), (128, 4.0, 900.0))  # (cap, req/s within the SLO, training tokens/s)
SLOW = tuple((cap, rps / 2, tps / 2) for cap, rps, tps in FAST)  # the same device at half the speed


def agent(name, profile=FAST, *, finished=0, steps=0, data_tokens=50_000, eval_loss=2.0) -> AgentStats:
    ref = AdapterRef("1.0", 1, "s1")
    return AgentStats(
        name,
        adapter=ref,
        global_adapter=ref,
        capacity_profile=tuple(CapacityPoint(*p) for p in profile),
        requests_finished=finished,
        training_steps=steps,
        data_tokens=data_tokens,
        eval_loss=eval_loss,
    )


PLANNING = PlanningSettings(slow_interval_s=5.0, profile_spread=4.0)
DEFAULT = ControlSettings()


def replay(ticks, settings=DEFAULT, planning=PLANNING):
    """Feed (now, arrivals, stats) ticks through one planner; the last decision."""
    planner = Planner(planning, now=ticks[0][0] - 5.0)
    actions = None
    for now, arrivals, stats in ticks:
        actions = decide(planner, Observation(now=now, arrivals=arrivals, stats=stats, last_round_at=0.0), settings)
    return actions


def test_a_slower_replica_gets_less_traffic():
    stats = {"fast": agent("fast"), "slow": agent("slow", SLOW)}
    actions = replay([(t, 20, stats) for t in (5.0, 10.0, 15.0)])
    w = actions.plan.allocation.weights
    assert w["slow"] < w["fast"] and w["fast"] + w["slow"] == pytest.approx(1.0)
    assert w["slow"] == pytest.approx(w["fast"] / 2, rel=0.05)  # in proportion to measured capacity


def test_a_replica_whose_users_are_idle_gets_a_higher_cap():
    """Alike replicas, but 90% of the requests are served at b: the load (6 req/s, 6.7 with
    headroom) needs capacity where it arrives, so b yields training and a keeps its full cap."""
    ticks = []
    for i in range(1, 6):
        ticks.append((5.0 * i, 30, {"a": agent("a", finished=3 * i), "b": agent("b", finished=27 * i)}))
    actions = replay(ticks)
    assert actions.cap("a") == 128 and actions.cap("b") < actions.cap("a")
    # Without the rule (home_caps off) the cluster-wide fill spreads the cut over both alike.
    flat = replay(ticks, planning=PlanningSettings(slow_interval_s=5.0, profile_spread=4.0, home_caps=False))
    assert flat.cap("a") <= actions.cap("a") and flat.cap("b") >= actions.cap("b")


def test_a_straggler_is_not_chosen_for_a_round_it_cannot_finish():
    """10 local steps within 60 s: 0.05 steps/s gives 3, so `slow` would hold the round to its deadline."""
    settings = ControlSettings(round_interval_s=30.0, local_steps=10, round_deadline_s=60.0)
    ticks = [(5.0 * i, 5, {"fast": agent("fast", steps=5 * i), "slow": agent("slow", SLOW, steps=i // 4)}) for i in range(1, 9)]
    actions = replay(ticks, settings)
    assert actions.round is not None and actions.round.participants == ("fast",)
    assert straggler(0.05, settings) and not straggler(1.0, settings) and not straggler(None, settings)
    # Its speed unknown yet (one reading), it is not left out.
    first = replay([(40.0, *ticks[-1][1:])], settings)
    assert first.round is not None and set(first.round.participants) == {"fast", "slow"}


def test_a_due_round_waits_for_a_trough_at_most_one_more_interval():
    settings = ControlSettings(round_interval_s=30.0)
    busy = [(5.0 * i, 200, {"fast": agent("fast"), "slow": agent("slow", SLOW)}) for i in range(1, 8)]  # 40 req/s: overloaded
    actions = replay(busy, settings)
    assert actions.plan.allocation.overloaded and actions.round is None  # 35 s since the last round: it waits
    late = replay([*busy, *((5.0 * i, 200, busy[0][2]) for i in range(8, 14))], settings)
    assert late.round is not None  # 65 s > two intervals: it starts anyway
    assert replay(busy, ControlSettings(round_interval_s=30.0, slow_timescale=False)).round is not None


def test_the_ablations_take_away_one_timescale_each():
    stats = {"fast": agent("fast"), "slow": agent("slow", SLOW)}
    ticks = [(t, 40, stats) for t in (5.0, 10.0, 15.0)]
    fast_only = replay(ticks, ControlSettings(slow_timescale=False))
    assert fast_only.plan.allocation.weights == {"fast": 0.5, "slow": 0.5}
    assert {fast_only.cap(n) for n in stats} == {128} and not fast_only.fixed_training
    slow_only = replay(ticks, ControlSettings(fast_timescale=False))
    assert slow_only.fixed_training and slow_only.plan.allocation.weights["slow"] < 0.5
