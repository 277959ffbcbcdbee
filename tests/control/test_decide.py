"""The control core's one decision (collm_control.decide), on fake and on recorded agent stats.

The recorded stats (recorded/*.json, written by tests/control/record_stats.py) are what real
agents answered GetStats with: in the local mode (replica processes on this machine) and under the
operator on the dev cluster. The operator's step and the local controller both call `decide()`;
these tests drive it with either recording.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from collm_control.decide import Adapter, ControlSettings, Observation, assign_roles, decide
from collm_control.planning import Planner, PlanningSettings
from collm_control.stats import AdapterRef, AgentStats

RECORDED = Path(__file__).parent / "recorded"


def agent(sha="s1", version=1, revision=0, eval_loss=2.0, finished=0, name="r"):
    """Stats as GetStats returns them, reduced to what the decision reads."""
    return AgentStats(
        replica_id=name,
        adapter=AdapterRef(f"{version}.{revision}", version, f"{sha}.r{revision}" if revision else sha, revision),
        global_adapter=AdapterRef(f"{version}.0", version, sha),
        eval_loss=eval_loss,
        requests_finished=finished,
    )


def recorded(name: str) -> list[dict]:
    """A decision log (tests/control/record_stats.py): what decide() was given at every step."""
    steps = json.loads((RECORDED / f"{name}.json").read_text())["steps"]
    assert len(steps) >= 3, "re-record with `python -m tests.control.record_stats`"
    return steps


def replay(steps: list[dict]):
    """Each step's inputs through one planner, as the adapter that logged them did: (observation, actions) per step."""
    first = Observation.from_dict(steps[0]["observation"])
    planner = Planner(PlanningSettings(**steps[0]["planning"]), now=first.now)
    out = []
    for step in steps:
        observation = Observation.from_dict(step["observation"])
        out.append((observation, decide(planner, observation, ControlSettings(**step["settings"]))))
    return out


def run(observation: Observation, settings: ControlSettings | None = None, planner: Planner | None = None):
    settings = settings or ControlSettings()
    planner = planner or Planner(PlanningSettings(policy=settings.policy, slow_interval_s=5.0), now=0.0)
    return decide(planner, observation, settings)


def test_the_control_core_imports_neither_kubernetes_nor_torch_nor_grpc():
    script = textwrap.dedent("""
        import sys
        import collm_control.decide, collm_control.allocation, collm_control.planning, collm_control.predictor, collm_control.rounds, collm_control.stats
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"kubernetes", "kopf", "torch", "grpc", "transformers", "replica_agent", "collm_operator"})
        print(heavy)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


def test_no_replica_answered_means_no_plan_and_nothing_to_do():
    actions = run(Observation(now=10.0, arrivals=5, stats={"a": None, "b": None}))
    assert actions.plan is None and actions.round is None and actions.republish == () and actions.cap("a") == 0


def test_a_replica_behind_the_published_adapter_gets_it_from_one_that_holds_it():
    stats = {"a": agent("s3", 3), "b": agent("s2", 2), "c": agent("s3", 3, revision=4)}
    published = Adapter(3, "s3", "round-3", "1.5")
    actions = run(Observation(now=10.0, arrivals=5, stats=stats, published=published, round_running=True))
    assert actions.adapter == published and actions.republish == ("b",) and actions.republish_source == "a"
    # ... but not while a round publishes: its own publish would be rolled back
    publishing = run(Observation(now=10.0, arrivals=5, stats=stats, published=published, round_running=True, round_publishing=True))
    assert publishing.republish == () and publishing.republish_source is None


def test_an_adapter_nobody_holds_any_more_is_lost_and_not_republished():
    actions = run(Observation(now=10.0, arrivals=5, stats={"a": agent("s2", 2)}, published=Adapter(3, "s3")))
    assert actions.adapter_lost and actions.republish == ()


def test_before_any_round_the_adapter_every_replica_agrees_on_is_current():
    actions = run(Observation(now=10.0, arrivals=5, stats={"a": agent("base", 0), "b": agent("base", 0)}))
    assert actions.adapter == Adapter(0, "base") and not actions.adapter_lost


def test_a_round_starts_when_the_interval_passed_and_none_runs():
    stats = {"a": agent(), "b": agent(), "c": agent(eval_loss=None)}  # c has no data
    settings = ControlSettings(round_interval_s=60.0, min_participants=2)
    due = run(Observation(now=100.0, arrivals=50, stats=stats, last_round_at=30.0, rounds_started=4), settings)
    assert due.round is not None and due.round.number == 5
    assert set(due.round.participants) == {"a", "b"} and due.round.aggregator in due.round.participants
    assert run(Observation(now=80.0, arrivals=50, stats=stats, last_round_at=30.0), settings).round is None  # interval not over
    assert run(Observation(now=100.0, arrivals=50, stats=stats, last_round_at=30.0, round_running=True), settings).round is None
    assert run(Observation(now=100.0, arrivals=50, stats=stats), ControlSettings(policy="inferenceOnly")).round is None
    assert run(Observation(now=100.0, arrivals=50, stats=stats), ControlSettings(federation=False)).round is None
    assert run(Observation(now=100.0, arrivals=50, stats=stats), ControlSettings(min_participants=3)).round is None  # only two have data


def test_a_secure_round_is_aggregated_outside_its_participants():
    stats = {"a": agent(), "b": agent(), "c": agent()}
    actions = run(Observation(now=100.0, arrivals=50, stats=stats), ControlSettings(secure_aggregation=True, min_participants=2))
    assert actions.round is not None and actions.round.aggregator not in actions.round.participants
    assert len(actions.round.participants) == 2


def test_roles_for_hand_made_and_scheduled_rounds_follow_one_rule():
    assert assign_roles(["a", "b"], ["a", "b"]) == (("a", "b"), "a")
    assert assign_roles(["a", "b", "c"], ["a", "b"], secure=True) == (("a", "b"), "c")
    assert assign_roles(["a", "b"], ["a", "b"], secure=True) == (("a",), "b")  # the last one aggregates instead
    with pytest.raises(ValueError, match="every serving replica"):
        assign_roles(["a", "b"], ["a", "b"], secure=True, fixed=True)  # a round's own list is kept as given
    with pytest.raises(ValueError, match="nobody can train"):
        assign_roles(["a"], [])


@pytest.mark.parametrize("name", ["local", "hetero", "operator"])
def test_recorded_decisions_replay(name):
    """A logged run (the goodput benchmark's local mode, on identical and on heterogeneous replicas,
    and the operator's e2e scenario), replayed step by step through decide(): every answering replica
    gets a plan, routing weights sum to 1, caps stay in range, and the adapter is known."""
    steps = recorded(name)
    assert steps[0]["source"].startswith("operator:" if name == "operator" else "local:")
    replayed = replay(steps)
    assert sum(1 for o, _ in replayed if any(st is not None for st in o.stats.values())) >= 3
    for observation, actions in replayed:
        answering = {n for n, st in observation.stats.items() if st is not None}
        if not answering:  # the operator's first steps, before the agents' pods are up
            assert actions.plan is None and actions.round is None and actions.republish == ()
            continue
        assert actions.plan is not None and set(actions.plan.allocation.caps) == answering
        assert sum(actions.plan.allocation.weights.values()) == pytest.approx(1.0)
        assert all(0 <= actions.cap(n) <= 1 << 16 for n in answering)
        assert actions.adapter is not None  # the agents agree on the global adapter they started from (or a round's)
    if name == "operator":
        # The operator acted on these decisions: a round replay chooses is the round it created next.
        for (now, actions), (after, _) in zip(replayed, replayed[1:]):
            started = after.rounds_started - now.rounds_started
            assert started == (1 if actions.round is not None else 0), (now.now, actions.round, started)
        assert any(a.round is not None for _, a in replayed), "the recording holds no round start"


def test_the_slower_replica_of_the_recorded_heterogeneous_cluster_gets_less_traffic():
    """replica-1 ran at half the speed of its core (collm bench goodput --cluster hetero)."""
    _, last = replay(recorded("hetero"))[-1]
    w = last.plan.allocation.weights
    assert w["replica-1"] < w["replica-0"], w
