"""Secure aggregation in real rounds: the aggregator holds only masked updates, and the sum is FedAvg."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import grpc
import pytest
import torch

import replica_agent.federated.aggregator as aggregator_module
import replica_agent.federated.participant as participant_module
from collm_control import rounds as R
from collm_rpc import tls
from collm_rpc.client import AgentClient
from collm_rpc.driver import RoundDriver, StrategyConfig
from collm_rpc.proto import collm_pb2 as pb
from replica_agent.config import AgentConfig
from replica_agent.engine.data import stdlib_package_dir
from replica_agent.federated.aggregation import FedAvg
from replica_agent.federated.secure import MaskedUpdate, new_key_pair
from replica_agent.federated.update import apply_delta
from replica_agent.local.in_process import LocalCluster

PARTICIPANTS = {"agent-0": "json", "agent-1": "http", "agent-2": "email"}


def secure_configs(tmp_path) -> list[AgentConfig]:
    common = dict(
        model="tiny", eval_batches=2, max_total_tokens=256, learning_rate=5e-3, revision_every_seconds=0
    )  # no local revisions: replicas serve the global
    configs = [AgentConfig(**common, replica_id=name, data=str(stdlib_package_dir(pkg))) for name, pkg in PARTICIPANTS.items()]
    configs.append(AgentConfig(**common, replica_id="aggregator"))  # no data; no key of the round ever reaches it
    return configs


@pytest.fixture
def secure_cluster(tiny_base, tmp_path):
    with LocalCluster(secure_configs(tmp_path), base=tiny_base) as cluster:
        yield cluster


def spec(round_id, deadline_s=60, **kw):
    return R.RoundSpec(
        round_id=round_id,
        replicas=(*PARTICIPANTS, "aggregator"),
        participants=tuple(PARTICIPANTS),
        aggregator="aggregator",
        local_steps=3,
        deadline_s=deadline_s,
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


def test_secure_round_publishes_fedavg_and_the_aggregator_sees_only_masked_updates(secure_cluster, plain_updates, monkeypatch):
    received: dict[str, object] = {}  # what the aggregator decoded from each upload
    decode = aggregator_module._decode_masked
    monkeypatch.setattr(aggregator_module, "_decode_masked", lambda blob, sha: received.setdefault(sha, decode(blob, sha)))
    base = secure_cluster["aggregator"].agent.store.current
    state = RoundDriver(spec("secure-1"), secure_cluster.addresses, strategy=StrategyConfig("fedavg", secure=True), round_number=1).run(timeout_s=120)
    assert state.succeeded, state.conditions[R.Condition.SUCCEEDED]
    hosted = secure_cluster["aggregator"].service.aggregator.round("secure-1")
    assert set(hosted.uploads) == set(PARTICIPANTS)
    assert all(upload.update is None for upload in hosted.uploads.values())  # released once aggregated
    for name, upload in hosted.uploads.items():
        update = received[upload.sha256]
        assert isinstance(update, MaskedUpdate)
        plain = plain_updates[name]
        for key, masked in update.masked.items():  # nothing like the update itself
            assert masked.dtype == torch.int64
            assert (masked.double() / 2**24 / plain.num_samples - plain.delta[key].double()).abs().max() > 1.0
    expected = apply_delta(dict(base.tensors), FedAvg().aggregate(list(plain_updates.values())).delta)
    published = secure_cluster["agent-1"].agent.store.global_version
    assert published.sha256 == state.version_sha256 and published.label == "1.0"
    assert max((published.tensors[k] - expected[k]).abs().max().item() for k in expected) < 1e-5
    # The driver relayed every participant's public key; each took the same map, agreed on its pair
    # seeds with every peer and dropped its private key. The aggregator holds no round keys at all.
    rounds = {name: secure_cluster[name].service.participant.status("secure-1") for name in PARTICIPANTS}
    assert state.key_holders == tuple(PARTICIPANTS)
    assert dict(state.public_keys()) == {name: rnd.public_key.hex() for name, rnd in rounds.items()}
    for name, rnd in rounds.items():
        assert rnd.public_keys == {n: r.public_key for n, r in rounds.items()} and rnd.private_key is None
        assert all(rnd.seeds[peer] == rounds[peer].seeds[name] for peer in rnd.seeds)
    assert secure_cluster["aggregator"].service.participant.status("secure-1") is None


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
    # The survivors announced to each other before uploading; agent-2 announced nothing, so its seeds were revealed...
    for survivor, other in (("agent-0", "agent-1"), ("agent-1", "agent-0")):
        record = secure_cluster[survivor].service.participant.status("secure-drop")
        assert record.announced == {other} and record.revealed == {"agent-2"}
    # ...and an upload it tried now would not be acknowledged, so it could not be unmasked alone either.
    with AgentClient(secure_cluster["agent-0"].address) as survivor, pytest.raises(grpc.RpcError) as refused:
        survivor.announce_upload("secure-drop", "agent-2")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "already revealed" in refused.value.details()


def test_an_aggregator_that_names_a_received_update_dropped_gets_no_seed_to_unmask_it(secure_cluster, plain_updates, monkeypatch):
    """The finding: the aggregator held agent-2's masked update, told the driver it never came, and the
    survivors revealed the seeds that unmasked that update alone."""
    aggregator = secure_cluster["aggregator"].service.aggregator
    honest = aggregator.round

    def without_agent_2(round_id):  # what the lying aggregator's GetRoundStatus reports
        rnd = honest(round_id)
        return rnd and replace(rnd, uploads={p: u for p, u in rnd.uploads.items() if p != "agent-2"})

    monkeypatch.setattr(aggregator, "round", without_agent_2)
    driver = RoundDriver(spec("secure-lie", deadline_s=6), secure_cluster.addresses, strategy=StrategyConfig("fedavg", secure=True), round_number=3, poll_s=0.1)
    state = driver.run(timeout_s=60)
    assert isinstance(honest("secure-lie").uploads["agent-2"].update, MaskedUpdate)  # the aggregator does hold it
    assert state.participants["agent-2"].outcome is not R.Outcome.UPLOADED  # and agent-2 was named dropped
    assert not state.succeeded and honest("secure-lie").result is None
    assert "announced their upload" in " ".join(c.message for c in state.conditions.values())
    for name in ("agent-0", "agent-1"):
        with AgentClient(secure_cluster[name].address) as survivor, pytest.raises(grpc.RpcError) as refused:
            survivor.reveal_seeds("secure-lie", ["agent-2"])
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "['agent-2']" in refused.value.details() and "announced their upload" in refused.value.details()
        assert secure_cluster[name].service.participant.status("secure-lie").revealed == set()


def test_a_participant_whose_announcement_fails_does_not_upload_and_the_round_goes_on(secure_cluster, plain_updates, monkeypatch):
    refuser = secure_cluster["agent-1"].service.participant
    honest = refuser.take_announcement

    def refuse_agent_2(round_id, announcer, *, withdraw=False):
        if announcer == "agent-2" and not withdraw:
            raise participant_module.Refused("simulated: agent-1 does not acknowledge agent-2")
        honest(round_id, announcer, withdraw=withdraw)

    monkeypatch.setattr(refuser, "take_announcement", refuse_agent_2)
    base = secure_cluster["aggregator"].agent.store.current
    state = RoundDriver(spec("secure-unheard"), secure_cluster.addresses, strategy=StrategyConfig("fedavg", secure=True), round_number=4).run(timeout_s=120)
    assert "agent-2" in plain_updates  # it masked its update...
    assert "agent-2" not in secure_cluster["aggregator"].service.aggregator.round("secure-unheard").uploads  # ...and never sent it
    own = secure_cluster["agent-2"].service.participant.status("secure-unheard")
    assert own.state == "Failed" and own.message.startswith("NotAnnounced: agent-1: FAILED_PRECONDITION: simulated")
    # agent-0 had acknowledged; agent-2 withdrew that, so agent-0 could reveal its seeds and the round completed.
    assert state.succeeded, state.conditions[R.Condition.SUCCEEDED]
    assert state.participants["agent-2"].outcome is R.Outcome.DROPPED
    expected = apply_delta(dict(base.tensors), FedAvg().aggregate([plain_updates[p] for p in ("agent-0", "agent-1")]).delta)
    published = secure_cluster["agent-1"].agent.store.global_version
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


def test_a_secure_round_over_mutual_tls_announces_in_each_participants_own_name(tiny_base, tmp_path):
    ca = tls.CertificateAuthority.create()
    with LocalCluster(secure_configs(tmp_path), base=tiny_base, ca=ca) as cluster:
        operator = ca.issue(tls.Identity.operator())
        state = RoundDriver(spec("secure-tls"), cluster.addresses, strategy=StrategyConfig("fedavg", secure=True), credentials=operator, round_number=1).run(
            timeout_s=120
        )
        assert state.succeeded, state.conditions[R.Condition.SUCCEEDED]
        for name in PARTICIPANTS:  # each heard the other two, named by their certificates
            assert cluster[name].service.participant.status("secure-tls").announced == set(PARTICIPANTS) - {name}


def start_secure(cluster, name: str, round_id: str) -> bytes:
    """StartRound of a secure round on one participant (no driver): its public key."""
    request = pb.StartRoundRequest(
        round_id=round_id,
        local_steps=10_000,  # it never gets to upload here
        deadline_unix=time.time() + 60,
        base_sha256=cluster[name].agent.trainer.global_version.sha256,
        aggregator_address=cluster.addresses["aggregator"],
        secure=True,
        participants=list(PARTICIPANTS),
        peer_addresses={p: cluster.addresses[p] for p in PARTICIPANTS},
    )
    with AgentClient(cluster.addresses[name]) as client:
        status = client.start_round(request)
    assert status.state == "Training" and len(status.public_key) == 32
    return status.public_key


def test_a_participant_refuses_a_key_map_that_swapped_its_own_public_key(secure_cluster):
    keys = {name: start_secure(secure_cluster, name, "secure-swap") for name in ("agent-0", "agent-1")}
    keys["agent-2"] = new_key_pair()[1]
    swapped = {**keys, "agent-0": new_key_pair()[1]}  # someone put a key of its own in agent-0's place
    with AgentClient(secure_cluster.addresses["agent-0"]) as client, pytest.raises(grpc.RpcError) as refused:
        client.share_public_keys("secure-swap", swapped)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "own public key unchanged" in refused.value.details()
    own = secure_cluster["agent-0"].service.participant.status("secure-swap")
    assert own.state == "Failed" and own.message.startswith("KeysRefused") and own.seeds is None and own.private_key is None
    with AgentClient(secure_cluster.addresses["agent-1"]) as client:  # its own key is in place: taken, and again unchanged
        assert client.share_public_keys("secure-swap", keys).state == "Training"
        assert client.share_public_keys("secure-swap", keys).state == "Training"
        with pytest.raises(grpc.RpcError) as changed:  # a second, other map is refused: it masks with the first
            client.share_public_keys("secure-swap", {**keys, "agent-2": new_key_pair()[1]})
    assert changed.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "already took other public keys" in changed.value.details()
    assert set(secure_cluster["agent-1"].service.participant.status("secure-swap").seeds) == {"agent-0", "agent-2"}


class OperatorCrashed(Exception):
    pass


@pytest.mark.parametrize("restarted", [("agent-2",), tuple(PARTICIPANTS)])
def test_an_operator_restarted_mid_exchange_resumes_and_a_participant_that_lost_its_keys_is_dropped(secure_cluster, plain_updates, restarted):
    """The operator persisted the key map and died before handing it out; meanwhile `restarted` lost their
    round (and keys). The resumed round drops them (KeysLost) and goes on with the others, or fails at once."""
    round_id = f"secure-resume-{len(restarted)}"
    persisted = []

    def persist(state_dict):
        persisted.append(state_dict)
        if state_dict["keysSharedAt"] is not None:
            raise OperatorCrashed

    first = RoundDriver(spec(round_id), secure_cluster.addresses, strategy=StrategyConfig("fedavg", secure=True), round_number=5, persist=persist)
    with pytest.raises(OperatorCrashed):
        first.run(timeout_s=60)
    saved = R.RoundState.from_dict(json.loads(json.dumps(persisted[-1])))
    assert saved.key_holders == tuple(PARTICIPANTS)
    assert all(secure_cluster[p].service.participant.status(round_id).seeds is None for p in PARTICIPANTS)  # no map went out
    for name in restarted:  # an agent restart: the round, its key pair and its seeds are gone
        secure_cluster[name].service.participant._rounds.pop(round_id)
    base = secure_cluster["aggregator"].agent.store.current
    resumed = RoundDriver(spec(round_id), secure_cluster.addresses, strategy=StrategyConfig("fedavg", secure=True), round_number=5, state=saved)
    state = resumed.run(timeout_s=120)
    lost = [p for p, record in state.participants.items() if record.outcome is R.Outcome.DROPPED and record.reason.startswith("KeysLost")]
    if len(restarted) == len(PARTICIPANTS):  # ends as soon as too few are left, not at the deadline
        assert not state.succeeded and state.conditions[R.Condition.SUCCEEDED].reason == "NotEnoughParticipants"
        assert len(lost) >= 2 and state.finished_at - state.started_at < 30
        return
    assert lost == list(restarted)
    assert state.succeeded, state.conditions[R.Condition.SUCCEEDED]
    survivors = [p for p in PARTICIPANTS if p not in restarted]
    assert set(plain_updates) == set(survivors)  # the restarted one never got keys, so never masked
    expected = apply_delta(dict(base.tensors), FedAvg().aggregate([plain_updates[p] for p in survivors]).delta)
    published = secure_cluster["agent-0"].agent.store.global_version
    assert max((published.tensors[k] - expected[k]).abs().max().item() for k in expected) < 1e-5
    for name in survivors:  # they masked with the persisted map, the lost key included, and revealed those seeds
        assert secure_cluster[name].service.participant.status(round_id).revealed == set(restarted)
