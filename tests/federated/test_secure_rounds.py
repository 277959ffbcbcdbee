"""Secure aggregation in real rounds: the aggregator holds only masked updates, and the sum is FedAvg."""

from __future__ import annotations

import pytest
import torch

import replica_agent.federated.participant as participant_module
from collm_control import rounds as R
from collm_rpc.driver import RoundDriver, StrategyConfig
from replica_agent.config import AgentConfig
from replica_agent.engine.data import stdlib_package_dir
from replica_agent.federated.aggregation import FedAvg
from replica_agent.federated.secure import MaskedUpdate
from replica_agent.federated.update import apply_delta
from replica_agent.local.in_process import LocalCluster

PARTICIPANTS = {"agent-0": "json", "agent-1": "http", "agent-2": "email"}


@pytest.fixture
def secure_cluster(tiny_base, tmp_path):
    secret = tmp_path / "round-secret"
    secret.write_bytes(b"0123456789abcdef0123456789abcdef")
    common = dict(
        model="tiny", eval_batches=2, max_total_tokens=256, learning_rate=5e-3, revision_every_seconds=0
    )  # no local revisions: replicas serve the global
    configs = [
        AgentConfig(**common, replica_id=name, data=str(stdlib_package_dir(pkg)), secure_aggregation_secret_file=str(secret))
        for name, pkg in PARTICIPANTS.items()
    ]
    configs.append(AgentConfig(**common, replica_id="aggregator"))  # holds no secret and no data
    with LocalCluster(configs, base=tiny_base) as cluster:
        yield cluster


def spec(round_id, **kw):
    return R.RoundSpec(
        round_id=round_id,
        replicas=(*PARTICIPANTS, "aggregator"),
        participants=tuple(PARTICIPANTS),
        aggregator="aggregator",
        local_steps=3,
        deadline_s=60,
        min_participants=2,
        eval_tolerance=0.5,
        **kw,
    )


@pytest.fixture
def plain_updates(monkeypatch):
    """What each participant masked, captured on the participant's side (the aggregator never sees it)."""
    seen = {}
    original = participant_module.mask_update

    def capture(update, participants, seeds, **kw):
        seen[update.participant] = update
        return original(update, participants, seeds, **kw)

    monkeypatch.setattr(participant_module, "mask_update", capture)
    return seen


def test_secure_round_publishes_fedavg_and_the_aggregator_sees_only_masked_updates(secure_cluster, plain_updates):
    base = secure_cluster["aggregator"].agent.store.current
    state = RoundDriver(spec("secure-1"), secure_cluster.addresses, strategy=StrategyConfig("fedavg", secure=True), round_number=1).run(timeout_s=120)
    assert state.succeeded, state.conditions[R.Condition.SUCCEEDED]
    hosted = secure_cluster["aggregator"].service.aggregator.round("secure-1")
    assert set(hosted.uploads) == set(PARTICIPANTS)
    for name, upload in hosted.uploads.items():
        assert isinstance(upload.update, MaskedUpdate)
        plain = plain_updates[name]
        for key, masked in upload.update.masked.items():  # nothing like the update itself
            assert masked.dtype == torch.int64
            assert (masked.double() / 2**24 / plain.num_samples - plain.delta[key].double()).abs().max() > 1.0
    expected = apply_delta(dict(base.tensors), FedAvg().aggregate(list(plain_updates.values())).delta)
    published = secure_cluster["agent-1"].agent.store.global_version
    assert published.sha256 == state.version_sha256 and published.label == "1.0"
    assert max((published.tensors[k] - expected[k]).abs().max().item() for k in expected) < 1e-5


def test_a_participant_dropping_after_masking_is_recovered_from_the_survivors_seeds(secure_cluster, plain_updates, monkeypatch):
    original = participant_module.Participant._upload

    def drop_agent_2(self, rnd, snapshot, address, only_b):
        if self.agent.config.replica_id == "agent-2":  # its seeds are in everyone's masks, but it never uploads
            rnd.state, rnd.message = "Failed", "simulated crash before its upload"
            return
        original(self, rnd, snapshot, address, only_b)

    monkeypatch.setattr(participant_module.Participant, "_upload", drop_agent_2)
    base = secure_cluster["aggregator"].agent.store.current
    state = RoundDriver(spec("secure-drop"), secure_cluster.addresses, strategy=StrategyConfig("fedavg", secure=True), round_number=2).run(timeout_s=120)
    assert state.succeeded, state.conditions[R.Condition.SUCCEEDED]
    assert state.participants["agent-2"].outcome is R.Outcome.DROPPED
    survivors = [plain_updates[p] for p in ("agent-0", "agent-1")]
    expected = apply_delta(dict(base.tensors), FedAvg().aggregate(survivors).delta)
    published = secure_cluster["agent-0"].agent.store.global_version
    assert max((published.tensors[k] - expected[k]).abs().max().item() for k in expected) < 1e-5


def test_secure_rounds_refuse_an_aggregator_that_participates(secure_cluster):
    bad = R.RoundSpec(
        round_id="x", replicas=tuple(PARTICIPANTS), participants=tuple(PARTICIPANTS), aggregator="agent-0", local_steps=1, deadline_s=10, min_participants=2
    )
    with pytest.raises(ValueError, match="not a participant"):
        RoundDriver(bad, secure_cluster.addresses, strategy=StrategyConfig("fedavg", secure=True))


def test_secure_aggregation_refuses_dp_noise_it_would_not_add(secure_cluster):
    """The unmask path skips clipping and noise: a noise multiplier with secure aggregation once passed silently."""
    with pytest.raises(ValueError, match="not supported"):
        RoundDriver(spec("secure-dp"), secure_cluster.addresses, strategy=StrategyConfig("fedavg", secure=True, clip_norm=1.0, noise_multiplier=0.5))
    from replica_agent.federated.aggregator import AggregatorError

    aggregator = secure_cluster.replicas["aggregator"].service.aggregator
    with pytest.raises(AggregatorError, match="noise multiplier is not supported"):
        aggregator.aggregate("secure-dp", ["agent-0"], strategy="fedavg", base_sha256="0" * 64, noise_multiplier=0.5, invited=["agent-0", "agent-1"])
