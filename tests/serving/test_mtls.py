"""Mutual TLS on the agent's gRPC port: who may call what (the findings of the trust review).

Each rogue call below once succeeded on a plaintext port: Publish made an agent fetch and serve an
adapter from a server of the caller's choosing, StartRound made it train and upload to a rogue
aggregator, FetchAdapter, Evaluate, ApplyPlan and Rollback needed nothing.
"""

from __future__ import annotations

import grpc
import pytest

from collm_rpc import tls
from collm_rpc.client import AgentClient
from collm_rpc.proto import collm_pb2 as pb
from collm_rpc.proto import collm_pb2_grpc as pb_grpc
from replica_agent.agent import Agent
from replica_agent.config import AgentConfig
from replica_agent.serving.grpc_service import serve_grpc

NS, CLUSTER = "team-a", "tiny"


@pytest.fixture(scope="module")
def ca():
    return tls.CertificateAuthority.create()


@pytest.fixture(scope="module")
def agent(json_data, tiny_base):
    agent = Agent(AgentConfig(model="tiny", data=str(json_data), replica_id="tiny-0", max_total_tokens=256, eval_batches=1, train_cap_tokens=0), base=tiny_base)
    agent.start()
    yield agent
    agent.stop()


@pytest.fixture(scope="module")
def served(agent, ca):
    server, service, port = serve_grpc(agent, "127.0.0.1", 0, credentials=ca.issue(tls.Identity.replica(NS, CLUSTER, "tiny-0")))
    yield f"127.0.0.1:{port}", service
    server.stop(grace=0)


@pytest.fixture(scope="module")
def address(served):
    return served[0]


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code()


def test_the_operator_controls_the_replica(address, ca):
    with AgentClient(address, credentials=ca.issue(tls.Identity.operator())) as operator:
        assert operator.stats().replica_id == "tiny-0"
        assert operator.apply_plan(0, 1000, 100).ok


def test_a_caller_without_a_certificate_of_this_ca_gets_no_connection(address):
    plain = pb_grpc.AgentStub(grpc.insecure_channel(address))
    assert _code(lambda: plain.GetStats(pb.StatsRequest(), timeout=5)) == grpc.StatusCode.UNAVAILABLE
    rogue_ca = tls.CertificateAuthority.create("rogue")
    with AgentClient(address, credentials=rogue_ca.issue(tls.Identity.operator()), timeout=5) as rogue:
        assert _code(rogue.stats) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    "who",
    [tls.Identity.replica(NS, CLUSTER, "tiny-1"), tls.Identity.replica(NS, "other", "other-0"), tls.Identity.replica("team-b", CLUSTER, "tiny-1")],
    ids=["a peer replica", "another cluster", "another namespace"],
)
def test_control_calls_from_anyone_but_the_operator_are_refused(address, ca, who):
    with AgentClient(address, credentials=ca.issue(who), timeout=5) as caller:
        rogue_publish = pb.PublishRequest(sha256="0" * 64, source="203.0.113.9:50051", cluster_version=2**63 - 1)
        calls = {
            "Publish": lambda: caller.stub.Publish(rogue_publish, timeout=5),
            "StartRound": lambda: caller.stub.StartRound(pb.StartRoundRequest(round_id="r", local_steps=1, aggregator_address="203.0.113.9:1"), timeout=5),
            "RevealSeeds": lambda: caller.stub.RevealSeeds(pb.RevealRequest(round_id="r", dropped=["tiny-2"]), timeout=5),
            "Evaluate": lambda: caller.stub.Evaluate(pb.EvaluateRequest(candidate_sha256="0" * 64, source="203.0.113.9:1"), timeout=5),
            "ApplyPlan": lambda: caller.apply_plan(0, 1, 1),
            "Rollback": lambda: caller.stub.Rollback(pb.RollbackRequest(sha256="0" * 64), timeout=5),
            "GetStats": caller.stats,
        }
        for name, call in calls.items():
            assert _code(call) == grpc.StatusCode.PERMISSION_DENIED, name


def test_adapters_and_uploads_stay_inside_the_cluster(address, ca, agent):
    sha = agent.store.current.sha256
    with AgentClient(address, credentials=ca.issue(tls.Identity.replica(NS, CLUSTER, "tiny-1"))) as peer:
        assert len(peer.fetch_bytes(sha)) > 0  # a peer of the same cluster fetches
        # ...and uploads in its own name only
        assert _code(lambda: peer.upload("r", "tiny-0", b"x", "0" * 64)) == grpc.StatusCode.PERMISSION_DENIED
        assert peer.upload("r", "tiny-1", b"x", "0" * 64).accepted is False  # its own name: heard, judged on content
    with AgentClient(address, credentials=ca.issue(tls.Identity.replica(NS, "other", "other-0"))) as outsider:
        assert _code(lambda: outsider.fetch_bytes(sha)) == grpc.StatusCode.PERMISSION_DENIED
        assert _code(lambda: outsider.upload("r", "other-0", b"x", "0" * 64)) == grpc.StatusCode.PERMISSION_DENIED
    with AgentClient(address, credentials=ca.issue(tls.Identity.operator())) as operator:
        assert len(operator.fetch_bytes(sha)) > 0


def test_upload_announcements_come_from_a_peer_of_the_cluster_in_its_own_name(address, ca):
    """An acknowledged announcement stops a secure round's seeds from being revealed: nobody may make one for another."""
    denied = grpc.StatusCode.PERMISSION_DENIED
    with AgentClient(address, credentials=ca.issue(tls.Identity.replica(NS, CLUSTER, "tiny-1")), timeout=5) as peer:
        assert _code(lambda: peer.announce_upload("r", "tiny-2")) == denied
        assert _code(lambda: peer.announce_upload("r", "tiny-1")) == grpc.StatusCode.NOT_FOUND  # its own name: heard; no such round here
        assert peer.announce_upload("r", "", withdraw=True).replica == "tiny-0"  # its certificate names it
    with AgentClient(address, credentials=ca.issue(tls.Identity.replica(NS, "other", "other-0")), timeout=5) as outsider:
        assert _code(lambda: outsider.announce_upload("r", "other-0")) == denied
    with AgentClient(address, credentials=ca.issue(tls.Identity.operator()), timeout=5) as operator:
        assert _code(lambda: operator.announce_upload("r", "tiny-1")) == denied


def test_authorize_is_a_pure_decision():
    me = tls.Identity.replica(NS, CLUSTER, "tiny-0")
    assert tls.authorize("Publish", tls.Identity.operator(), me) is None
    assert "operator's" in tls.authorize("Publish", tls.Identity.replica(NS, CLUSTER, "tiny-1"), me)
    assert "client certificate" in tls.authorize("GetStats", None, me)
    assert "not a known method" in tls.authorize("Shutdown", tls.Identity.operator(), me)
    # Only the operator hands out a secure round's public keys: a peer could put its own key in another's place.
    assert tls.authorize("SharePublicKeys", tls.Identity.operator(), me) is None
    assert "operator's" in tls.authorize("SharePublicKeys", tls.Identity.replica(NS, CLUSTER, "tiny-1"), me)
    assert tls.Identity.from_uri(me.uri) == me and tls.Identity.from_uri("spiffe://other/x") is None


def test_an_edge_device_may_open_edge_sessions_on_its_clusters_replicas_and_nothing_else(ca):
    me = tls.Identity.replica(NS, CLUSTER, "tiny-0")
    edge = tls.Identity.edge(NS, CLUSTER, "phone-1")
    assert edge.uri == f"spiffe://collm.io/ns/{NS}/cluster/{CLUSTER}/edge/phone-1" and tls.Identity.from_uri(edge.uri) == edge
    assert ca.issue(edge).identity == edge
    assert tls.authorize("EdgeSession", edge, me) is None
    for method in sorted(tls.OPERATOR_METHODS | tls.PEER_METHODS):
        assert tls.authorize(method, edge, me) is not None, method
    for caller in (tls.Identity.edge(NS, "other", "phone-1"), tls.Identity.edge("team-b", CLUSTER, "phone-1"), tls.Identity.replica(NS, CLUSTER, "tiny-1")):
        assert "edge devices of team-a/tiny only" in tls.authorize("EdgeSession", caller, me), caller
    assert tls.authorize("EdgeSession", tls.Identity.operator(), me) is not None
    assert not edge.same_cluster(me) and not tls.Identity.edge(NS, CLUSTER, "phone-2").edge_of(edge)  # edges are no one's peers
    with pytest.raises(ValueError, match="edge identity parts"):
        tls.Identity.edge(NS, CLUSTER, "a/b")


def test_credentials_round_trip_through_a_secret_layout(tmp_path, ca):
    creds = ca.issue(tls.Identity.replica(NS, CLUSTER, "tiny-3"))
    creds.write(tmp_path, "tiny-3")
    assert tls.Credentials.read(tmp_path, "tiny-3") == creds and creds.identity.name == "tiny-3"
    assert (tmp_path / "tiny-3.key").stat().st_mode & 0o077 == 0
    with pytest.raises(ValueError, match="lacks"):
        tls.Credentials.read(tmp_path / "missing")


def test_a_round_runs_end_to_end_over_mutual_tls(tiny_base, ca):
    """Uploads, candidate fetches, evaluation and publishing, each between certified parties."""
    from collm_control import rounds as R
    from collm_rpc.driver import RoundDriver
    from replica_agent.engine.data import stdlib_package_dir
    from replica_agent.local.in_process import LocalCluster

    configs = [
        AgentConfig(model="tiny", replica_id=name, data=str(stdlib_package_dir(pkg)), eval_batches=1, max_total_tokens=256, revision_every_seconds=0)
        for name, pkg in (("agent-0", "json"), ("agent-1", "http"))
    ]
    spec = R.RoundSpec(
        round_id="tls-1",
        replicas=("agent-0", "agent-1"),
        participants=("agent-0", "agent-1"),
        aggregator="agent-0",
        local_steps=2,
        deadline_s=60,
        min_participants=2,
        eval_tolerance=1.0,
    )
    with LocalCluster(configs, base=tiny_base, ca=ca, namespace=NS, cluster="fed") as cluster:
        plain = RoundDriver(spec, cluster.addresses, rpc_timeout_s=5, poll_s=0.1)  # no certificate: the replicas refuse it
        assert not plain.run(timeout_s=20).succeeded
        operator = ca.issue(tls.Identity.operator())
        retry = R.RoundSpec(**{**spec.__dict__, "round_id": "tls-2"})
        state = RoundDriver(retry, cluster.addresses, credentials=operator, round_number=1).run(timeout_s=120)
        assert state.succeeded, state.conditions[R.Condition.SUCCEEDED]
        assert {r.agent.store.current.sha256 for r in cluster.replicas.values()} == {state.version_sha256}


def test_a_junk_upload_is_dropped_as_it_streams_and_made_up_rounds_are_forgotten(served, ca):
    """A 96 MiB junk upload to a made-up round was once held in memory, and every round id kept forever."""
    from replica_agent.federated.aggregator import ROUNDS_KEPT

    address, service = served
    with AgentClient(address, credentials=ca.issue(tls.Identity.replica(NS, CLUSTER, "tiny-1")), timeout=60) as peer:
        reply = peer.upload("made-up", "tiny-1", b"\0" * (96 << 20), "0" * 64)
        assert not reply.accepted and reply.reason == "TooLarge" and str(service.aggregator.max_upload_bytes) in reply.message
        for i in range(3 * ROUNDS_KEPT):
            assert peer.upload(f"junk-{i}", "tiny-1", b"junk", "0" * 64).reason == "Corrupt"
    rounds = service.aggregator._rounds
    assert len(rounds) <= ROUNDS_KEPT and "junk-0" not in rounds and "made-up" not in rounds
    assert all(not r.uploads for r in rounds.values())
