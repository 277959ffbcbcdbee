"""Rounds over real gRPC between three agents on loopback, each with its own non-IID data.

Local revisions are off here (revision_every_seconds=0): each replica serves exactly the global
adapter its last round published, so the tests can compare what replicas serve. The agents still
train continuously; rounds snapshot and upload what they learnt.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from collm_control import rounds as R
from collm_rpc.driver import RoundDriver, StrategyConfig
from replica_agent.config import AgentConfig
from replica_agent.engine.data import stdlib_package_dir
from replica_agent.engine.requests import FinishReason, SamplingParams
from replica_agent.local.in_process import LocalCluster
from tests.helpers import eventually

PACKAGES = {"agent-0": "json", "agent-1": "http", "agent-2": "email"}


def configs(**overrides):
    return [
        AgentConfig(
            model="tiny",
            replica_id=name,
            data=str(stdlib_package_dir(pkg)),
            eval_batches=2,
            max_total_tokens=256,
            learning_rate=5e-3,
            revision_every_seconds=0,
            **overrides,
        )
        for name, pkg in PACKAGES.items()
    ]


def spec(round_id, *, participants=tuple(PACKAGES), aggregator="agent-0", min_participants=2, local_steps=6, deadline_s=60.0, tolerance=0.05):
    return R.RoundSpec(
        round_id=round_id,
        replicas=tuple(PACKAGES),
        participants=participants,
        aggregator=aggregator,
        local_steps=local_steps,
        deadline_s=deadline_s,
        min_participants=min_participants,
        eval_tolerance=tolerance,
    )


@pytest.fixture(scope="module")
def cluster(tiny_base):
    with LocalCluster(configs(), base=tiny_base) as c:
        yield c


def serving_shas(cluster):
    return {name: r.agent.store.current.sha256 for name, r in cluster.replicas.items() if r.agent.engine._thread.is_alive()}


def global_shas(cluster):
    return {name: r.agent.store.global_version.sha256 for name, r in cluster.replicas.items() if r.agent.engine._thread.is_alive()}


def test_rounds_publish_everywhere_and_lower_the_loss_under_load(cluster):
    assert len(set(serving_shas(cluster).values())) == 1, "every replica starts from the same global adapter"
    finals, stop = [], threading.Event()

    def client():  # requests keep flowing through every publish
        i = 0
        while not stop.is_set():
            i += 1
            for r in cluster.replicas.values():
                _, final = r.agent.engine.generate(r.agent.engine.encode(f"def f{i}("), SamplingParams(max_new_tokens=8, ignore_eos=True))
                finals.append(final)

    load = threading.Thread(target=client)
    load.start()
    try:
        losses = []
        for n in (1, 2):
            driver = RoundDriver(spec(f"r{n}"), cluster.addresses, round_number=n)
            state = driver.run(timeout_s=180)
            assert state.succeeded, state.conditions[R.Condition.SUCCEEDED]
            assert [state.conditions[c].status for c in R.STAGES] == ["True"] * 4
            assert len(set(serving_shas(cluster).values())) == 1 and state.version_sha256 in serving_shas(cluster).values()
            assert state.freshness_s is not None and state.freshness_s < 5
            losses.append((state.eval_loss_before, state.eval_loss_after))
    finally:
        stop.set()
        load.join(60)
    assert losses[0][1] < losses[0][0] and losses[1][1] < losses[1][0], losses
    assert losses[1][1] < losses[0][1], "the published adapters' held-out loss falls round after round"
    assert finals and all(f.finish_reason is FinishReason.LENGTH for f in finals)
    current = cluster["agent-1"].agent.store.current
    assert current.label == "2.0" and current.eval_loss == pytest.approx(losses[1][1])
    assert len(set(global_shas(cluster).values())) == 1


def test_retried_round_uploads_the_same_update_and_publishes_the_same_version(cluster):
    driver = RoundDriver(spec("r-idem", local_steps=3), cluster.addresses, round_number=3)
    first = driver.run(timeout_s=120)
    uploads = {p: r.sha256 for p, r in first.participants.items()}
    again = RoundDriver(spec("r-idem", local_steps=3), cluster.addresses, round_number=3).run(timeout_s=60)
    assert first.succeeded and again.version_sha256 == first.version_sha256
    assert {p: r.sha256 for p, r in again.participants.items()} == uploads
    assert {r.agent.store.global_version.label for r in cluster.replicas.values()} == {"3.0"}


def test_gate_rejects_a_worse_adapter_and_the_current_one_stays(cluster):
    before = serving_shas(cluster)
    # A learning rate this high makes the round's adapter worse than the current one: train some
    # steps with it before the round takes its snapshot.
    steps = {n: r.agent.trainer.step for n, r in cluster.replicas.items()}
    for r in cluster.replicas.values():
        for group in r.agent.trainer.optimizer.param_groups:
            group["lr"] = 5.0
    try:
        assert eventually(lambda: all(r.agent.trainer.step >= steps[n] + 5 for n, r in cluster.replicas.items()), timeout=60)
        state = RoundDriver(spec("r-bad", local_steps=3, tolerance=0.0), cluster.addresses, round_number=4).run(timeout_s=120)
    finally:
        for r in cluster.replicas.values():
            for group in r.agent.trainer.optimizer.param_groups:
                group["lr"] = 5e-3
    assert not state.succeeded and state.conditions[R.Condition.SUCCEEDED].reason == "EvalGateFailed"
    assert serving_shas(cluster) == before


def test_a_dead_participant_is_dropped_and_a_dead_aggregator_ends_the_round_cleanly(tiny_base):
    with LocalCluster(configs(), base=tiny_base) as c:
        c["agent-2"].kill()
        # A short publish deadline: the dead replica is never acked, the round ends PartiallyPublished at it.
        state = RoundDriver(replace(spec("r-dead-participant", local_steps=3), publish_deadline_s=5.0), c.addresses, round_number=1).run(timeout_s=120)
        assert state.succeeded
        assert state.participants["agent-2"].outcome is R.Outcome.DROPPED
        assert R.laggards(state) == ("agent-2",)  # it could not be published to; the operator re-publishes later

        before = {n: c[n].agent.store.global_version.sha256 for n in ("agent-0", "agent-1")}
        # agent-0 trains and aggregates; kill it while the round collects uploads.
        driver = RoundDriver(spec("r-dead-aggregator", participants=("agent-0", "agent-1"), min_participants=1, local_steps=400), c.addresses, round_number=2)
        threading.Timer(1.5, c["agent-0"].kill).start()
        state = driver.run(timeout_s=120)
        assert not state.succeeded and state.conditions[R.Condition.SUCCEEDED].reason == "AggregatorLost"
        assert c["agent-1"].agent.store.global_version.sha256 == before["agent-1"], "no replica serves a half-applied version"


def test_poisoned_and_nan_updates_are_screened_and_the_round_still_publishes(tiny_base, monkeypatch):
    import math

    import replica_agent.federated.participant as participant_module
    from replica_agent.federated.update import make_update as honest

    def hostile(participant, round_id, shadow, base, num_samples, **kw):
        update = honest(participant, round_id, shadow, base, num_samples, **kw)
        if participant == "agent-1":  # a poisoned update: 100x the norm
            shadow = {k: base[k] + (shadow[k] - base[k]) * 100 for k in shadow}
        elif participant == "agent-2":  # a broken one: NaN
            shadow = {k: v.clone().fill_(math.nan) if "lora_B" in k else v for k, v in shadow.items()}
        else:
            return update
        return honest(participant, round_id, shadow, base, num_samples, **kw)

    monkeypatch.setattr(participant_module, "make_update", hostile)
    with LocalCluster(configs(), base=tiny_base) as c:
        driver = RoundDriver(
            spec("r-poison", local_steps=3, min_participants=1, tolerance=0.5),
            c.addresses,
            strategy=StrategyConfig("fedavg", clip_norm=1.0, outlier_factor=5.0),
            round_number=1,
        )
        state = driver.run(timeout_s=120)
        assert state.succeeded, state.conditions[R.Condition.SUCCEEDED]
        outcomes = {p: (r.outcome, r.reason) for p, r in state.participants.items()}
        assert outcomes["agent-0"][0] is R.Outcome.ACCEPTED
        assert outcomes["agent-2"][0] is R.Outcome.REJECTED and "NonFinite" in outcomes["agent-2"][1]
        poisoned_screened = outcomes["agent-1"][0] is R.Outcome.REJECTED or "agent-1" in driver.aggregate_record
        assert poisoned_screened, (outcomes, driver.aggregate_record)
        assert len({r.agent.store.current.sha256 for r in c.replicas.values()}) == 1


def test_rollback_returns_every_replica_to_a_retained_version(cluster):
    from collm_rpc.client import AgentClient

    first = cluster["agent-0"].agent.store.get(1).sha256  # the initial global "0.0", the same on every replica
    for address in cluster.addresses.values():
        with AgentClient(address) as peer:
            assert peer.rollback(first).adapter.sha256 == first
    assert set(serving_shas(cluster).values()) == {first} and set(global_shas(cluster).values()) == {first}
