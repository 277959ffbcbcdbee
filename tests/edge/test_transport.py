"""Edge sessions over the agent's real gRPC port (mutual TLS, loopback): what the edge gets, what
crosses the wire, and what happens when the replica is slow, gone, full, idle or publishes."""

from __future__ import annotations

import dataclasses
import threading
import time

import grpc
import pytest

from collm_rpc import tls
from collm_rpc.proto import collm_pb2 as pb
from replica_agent.edge.client import EdgeLink, LinkSettings
from replica_agent.edge.cloud_service import EdgeLimits, admit, deep_kv_bytes
from replica_agent.edge.collab import HEADER_BYTES, encode_state, generate, state_bytes
from replica_agent.edge.link import LinkConditions, LinkEmulator, delivery_time
from replica_agent.serving.grpc_service import serve_grpc

from ..helpers import eventually
from .conftest import CLUSTER, NS, SPLIT, connect, exit_argmax_after_each_position, nonzero_adapter, whole_model_greedy, whole_model_logits

NEW_TOKENS = 64


def all_closed(agent) -> bool:
    return not agent.edge.sessions() and agent.edge.kv_bytes == 0 and agent.store.pins() == {}


class Hooked:
    """A link that runs `hooks[k]()` just before the k-th cloud request (k from 0)."""

    def __init__(self, link: EdgeLink, hooks: dict) -> None:
        self.link, self.hooks, self.requests = link, hooks, 0

    def receive(self, payload: bytes) -> None:
        self.link.receive(payload)

    def request(self, payload: bytes) -> int | None:
        if self.requests in self.hooks:
            self.hooks[self.requests]()
        self.requests += 1
        return self.link.request(payload)


def assert_each_token_is_its_choosers(runtime, adapter, edge, prompt, result) -> None:
    """Cloud tokens are the whole model's greedy token after the sequence as produced (so the deep KV
    the session holds was complete and exact); edge and standalone tokens are the exit head's."""
    seq = prompt + result.tokens
    logits, _ = whole_model_logits(runtime, adapter, seq)
    whole = logits[len(prompt) - 1 : -1].argmax(-1).tolist()
    exit_ = exit_argmax_after_each_position(runtime, adapter, edge, seq)[len(prompt) - 1 : -1]
    for i, (token, source) in enumerate(zip(result.tokens, result.routes)):
        assert token == (whole[i] if source == "cloud" else exit_[i]), (i, source)


def test_over_grpc_cloud_tokens_are_the_whole_models_fp32_exactly_fp16_at_99_percent(runtime, adapter, halves, prompts, agent, address, edge_creds):
    edge, _ = halves
    agree = total = 0
    with connect(address, adapter, edge_creds) as cloud:
        for prompt in prompts:
            with cloud.link(len(prompt) + NEW_TOKENS) as link:
                result = generate(edge, link, prompt, max_new_tokens=NEW_TOKENS, threshold=1.01, state_dtype="fp32")
            assert result.tokens == whole_model_greedy(runtime, adapter, prompt, NEW_TOKENS)[0]
            assert result.routes == ["cloud"] * NEW_TOKENS and link.stats.answered == NEW_TOKENS and link.stats.sessions == 1
            assert link.stats.adapter_version == agent.store.current.label
            with cloud.link(len(prompt) + NEW_TOKENS) as link:
                result = generate(edge, link, prompt, max_new_tokens=NEW_TOKENS, threshold=1.01, state_dtype="fp16")
            assert result.standalone_tokens == 0
            logits, _ = whole_model_logits(runtime, adapter, prompt + result.tokens)
            agree += sum(a == b for a, b in zip(result.tokens, logits[len(prompt) - 1 : -1].argmax(-1).tolist()))
            total += NEW_TOKENS
    print(f"\nover gRPC with fp16 states the cloud chose the whole model's greedy token on {agree} of {total} tokens")
    assert agree / total >= 0.99
    assert eventually(lambda: all_closed(agent))  # every session ended with its stream: no KV held, no pin


def test_on_the_wire_a_token_is_its_state_plus_the_header_and_the_framing_is_measured(runtime, adapter, halves, prompts, address, edge_creds):
    edge, _ = halves
    prompt = prompts[3]
    with LinkEmulator(address) as wire, connect(wire.address, adapter, edge_creds) as cloud:
        for _ in range(2):  # the first pays the TCP and TLS handshakes; the second is measured
            before = wire.bytes_up
            with cloud.link(len(prompt) + NEW_TOKENS) as link:
                result = generate(edge, link, prompt, max_new_tokens=NEW_TOKENS, threshold=1.01, state_dtype="fp16")
            wire_up, wire_down = wire.bytes_up - before, wire.bytes_down
    states = len(prompt) + NEW_TOKENS - 1  # the last token's state is never needed
    assert result.states_up == link.stats.states_sent == states
    assert result.bytes_up == link.stats.bytes_sent == states * state_bytes(runtime.dims.hidden, "fp16") == states * (HEADER_BYTES + 2 * runtime.dims.hidden)
    overhead = (wire_up - result.bytes_up) / states
    size = state_bytes(runtime.dims.hidden, "fp16")
    print(f"\n{states} fp16 states of {size} bytes: {wire_up / states:.1f} bytes each up the wire (mutual TLS, gRPC); {wire_down} bytes down in all")
    assert 0 < overhead < 96  # HTTP/2, gRPC and TLS framing, window updates, the open message and the stream's headers (about 60)


def test_killing_the_replica_mid_generation_fails_no_request(runtime, adapter, halves, prompts, agent, ca, edge_creds):
    edge, _ = halves
    server, _, port = serve_grpc(agent, "127.0.0.1", 0, credentials=ca.issue(tls.Identity.replica(NS, CLUSTER, "tiny-0")))
    prompt = prompts[4]
    with connect(f"127.0.0.1:{port}", adapter, edge_creds, LinkSettings(latency_budget_s=10.0, retry_s=60.0)) as cloud:
        with cloud.link(len(prompt) + NEW_TOKENS) as link:
            hooked = Hooked(link, {10: lambda: server.stop(grace=0).wait()})
            result = generate(edge, hooked, prompt, max_new_tokens=NEW_TOKENS, threshold=1.01, state_dtype="fp32")
    assert len(result.tokens) == NEW_TOKENS
    assert result.routes == ["cloud"] * 10 + ["standalone"] * (NEW_TOKENS - 10)
    assert link.stats.last_error is not None and "UNAVAILABLE" in link.stats.last_error
    assert_each_token_is_its_choosers(runtime, adapter, edge, prompt, result)
    assert eventually(lambda: all_closed(agent))


def test_after_an_outage_the_new_session_is_caught_up_and_answers_exactly(runtime, adapter, halves, prompts, agent, address, edge_creds):
    edge, _ = halves
    prompt = prompts[5]
    settings = LinkSettings(latency_budget_s=10.0, retry_s=0.05)

    def restore() -> None:
        wire.restore()
        time.sleep(0.5)  # time passes: the channel reconnects (its backoff is 100 ms)

    with LinkEmulator(address) as wire, connect(wire.address, adapter, edge_creds, settings) as cloud:
        with cloud.link(len(prompt) + NEW_TOKENS) as link:
            result = generate(edge, Hooked(link, {8: wire.outage, 16: restore}), prompt, max_new_tokens=NEW_TOKENS, threshold=1.01, state_dtype="fp32")
    assert result.routes[:8] == ["cloud"] * 8 and result.routes[8:16] == ["standalone"] * 8
    assert result.routes[16:] == ["cloud"] * (NEW_TOKENS - 16)  # the link is back: collaboration resumes at once
    assert link.stats.sessions >= 2 and link.stats.states_sent > result.states_up  # the new session got every state again
    assert_each_token_is_its_choosers(runtime, adapter, edge, prompt, result)
    assert eventually(lambda: all_closed(agent))


def test_past_the_latency_budget_the_edge_goes_standalone_and_resumes_when_fast_again(runtime, adapter, halves, prompts, agent, address, edge_creds):
    edge, _ = halves
    prompt = prompts[6]
    settings = LinkSettings(latency_budget_s=0.4, retry_s=0.0)
    with LinkEmulator(address) as wire, connect(wire.address, adapter, edge_creds, settings) as cloud:
        slow, fast = LinkConditions(latency_s=0.5), LinkConditions()
        with cloud.link(len(prompt) + NEW_TOKENS) as link:
            hooked = Hooked(link, {6: lambda: wire.set(slow), 12: lambda: wire.set(fast)})
            result = generate(edge, hooked, prompt, max_new_tokens=40, threshold=1.01, state_dtype="fp32")
    routes = result.routes
    assert routes[6:12] == ["standalone"] * 6  # a round trip of 1 s against a budget of 0.4 s
    assert routes[20:] == ["cloud"] * 20  # the late answers drained, the same session answers in time again
    assert link.stats.sessions == 1 and link.stats.last_error is None  # slow is not broken
    assert_each_token_is_its_choosers(runtime, adapter, edge, prompt, result)
    assert eventually(lambda: all_closed(agent))


def test_a_publish_during_a_session_does_not_change_its_version(runtime, adapter, halves, prompts, agent, address, edge_creds):
    edge, _ = halves
    prompt = prompts[7]
    old = agent.store.current
    newer = nonzero_adapter(runtime, seed=8)
    try:
        with connect(address, adapter, edge_creds) as cloud:
            with cloud.link(len(prompt) + NEW_TOKENS) as link:
                publish = {5: lambda: agent.store.publish(dict(newer.tensors), cluster_version=2)}
                result = generate(edge, Hooked(link, publish), prompt, max_new_tokens=NEW_TOKENS, threshold=1.01, state_dtype="fp32")
                assert agent.store.current.sha256 == newer.sha256 and agent.store.find(old.sha256) is old  # retain=1, but pinned
            # Every token, before and after the publish, came from the version the session opened with.
            assert result.tokens == whole_model_greedy(runtime, adapter, prompt, NEW_TOKENS)[0]
            assert link.stats.adapter_version == old.label and link.stats.answered == NEW_TOKENS
            assert eventually(lambda: agent.store.find(old.sha256) is None)  # released at the end: pruned
            with cloud.link(len(prompt) + 4) as late:  # a new session for the old version: refused, the edge answers alone
                late_result = generate(edge, late, prompt, max_new_tokens=4, threshold=1.01)
            assert late_result.routes == ["standalone"] * 4
            assert "FAILED_PRECONDITION" in late.stats.last_error and "is not held" in late.stats.last_error
    finally:
        agent.store.publish(dict(adapter.tensors), cluster_version=3)
    assert eventually(lambda: all_closed(agent))


class RawSession:
    """A raw EdgeSession call that opened (`reply`) or failed to (`error`); `end()` hangs up."""

    def __init__(self, stub, adapter, max_len: int, *, model: str = "tiny") -> None:
        self._done = threading.Event()

        def messages():
            yield pb.EdgeMessage(open=pb.EdgeOpen(model=model, split=SPLIT, adapter_sha256=adapter.sha256, max_len=max_len))
            self._done.wait(30)

        self._call = stub.EdgeSession(messages())  # held: a call nobody holds is cancelled
        self.reply: pb.CloudMessage | None = None
        self.error: grpc.RpcError | None = None
        try:
            self.reply = next(self._call)
        except grpc.RpcError as exc:
            self.error = exc
            self.end()

    def end(self) -> None:
        self._done.set()


def test_sessions_beyond_the_count_or_the_deep_kv_limit_are_refused_and_memory_is_counted(runtime, adapter, agent, address, ca, edge_creds):
    with connect(address, adapter, edge_creds) as cloud:
        stub = cloud.stub
        first, second = RawSession(stub, adapter, 512), RawSession(stub, adapter, 512)
        try:
            assert first.reply.opened.kv_bytes == second.reply.opened.kv_bytes == deep_kv_bytes(runtime.dims, SPLIT, 512, runtime.dtype) == 1 << 20
            assert agent.edge.kv_bytes == 2 << 20 and agent.store.pins() == {agent.store.current.number: 2}
            refused = RawSession(stub, adapter, 8).error
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "edge_max_sessions 2" in refused.details()
        finally:
            second.end()
        assert eventually(lambda: len(agent.edge.sessions()) == 1)
        try:
            too_big = RawSession(stub, adapter, 1024).error  # 2 MiB beside 1 MiB: over the 2.5 MiB limit
            assert too_big.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "edge_max_kv_mb" in too_big.details()
        finally:
            first.end()
        assert eventually(lambda: all_closed(agent))
        bad = RawSession(stub, adapter, 100_000).error
        assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_len" in bad.details()
        other = RawSession(stub, adapter, 8, model="smollm2").error
        assert other.code() == grpc.StatusCode.FAILED_PRECONDITION and "serves model 'tiny'" in other.details()
        assert agent.edge.summary()["refused"] >= 4 and all_closed(agent)
        with pytest.raises(grpc.RpcError) as raised:  # an edge certificate opens edge sessions and nothing else
            stub.GetStats(pb.StatsRequest(), timeout=10)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Only the cluster's edge devices: a replica of the cluster or an edge of another one is refused.
    for identity in (tls.Identity.replica(NS, CLUSTER, "tiny-1"), tls.Identity.edge(NS, "other", "phone-1")):
        with connect(address, adapter, ca.issue(identity)) as outsider:
            refused = RawSession(outsider.stub, adapter, 8).error
            assert refused.code() == grpc.StatusCode.PERMISSION_DENIED, identity


def test_an_idle_session_expires_frees_its_memory_and_the_edge_catches_a_new_one_up(runtime, adapter, halves, prompts, agent, address, edge_creds, monkeypatch):
    edge, _ = halves
    monkeypatch.setattr(agent.edge, "limits", dataclasses.replace(agent.edge.limits, idle_s=0.3))
    expired = agent.edge.expired
    prompt = prompts[0]
    with connect(address, adapter, edge_creds) as cloud, cloud.link(len(prompt) + 1) as link:
        states = edge.forward(prompt, 0, edge.new_cache(len(prompt) + 1))
        for position, state in enumerate(states[:-1]):
            link.receive(encode_state(state, position, adapter.sha256, "fp32"))
        assert eventually(lambda: agent.edge.kv_bytes > 0)
        assert eventually(lambda: agent.edge.expired == expired + 1, timeout=5)
        assert all_closed(agent)  # the deep KV and the adapter pin went with the session
        assert eventually(lambda: not link.connected)
        token = link.request(encode_state(states[-1], len(prompt) - 1, adapter.sha256, "fp32"))
        assert "DEADLINE_EXCEEDED" in link.stats.last_error and link.stats.sessions == 2
    assert token == whole_model_greedy(runtime, adapter, prompt, 1)[0][0]  # the new session was caught up from position 0
    assert eventually(lambda: all_closed(agent))


@pytest.mark.parametrize(
    ("sessions", "used", "new", "words"),
    [(0, 0, 10, None), (1, 90, 10, None), (2, 0, 1, "edge_max_sessions 2"), (1, 91, 10, "edge_max_kv_mb"), (0, 0, 101, "edge_max_kv_mb")],
)
def test_admission_counts_sessions_and_deep_kv_bytes(sessions, used, new, words):
    reason = admit(sessions, used, new, EdgeLimits(max_sessions=2, max_kv_bytes=100))
    assert reason is None if words is None else words in reason
    assert "opens no edge sessions" in admit(0, 0, 1, EdgeLimits(max_sessions=0))


def test_the_deep_kv_count_is_what_a_session_allocates(runtime, halves):
    _, cloud = halves
    cache = cloud.new_cache(77)
    assert deep_kv_bytes(runtime.dims, SPLIT, 77, runtime.dtype) == cache.k.nbytes + cache.v.nbytes
    with pytest.raises(ValueError, match="split"):
        deep_kv_bytes(runtime.dims, runtime.dims.layers, 8, runtime.dtype)


def test_the_link_emulator_queues_bytes_behind_the_bandwidth_then_adds_the_latency():
    slow = LinkConditions(latency_s=0.1, bandwidth_bytes_per_s=1000)
    assert delivery_time(5.0, 500, 0.0, slow) == (5.6, 5.5)
    assert delivery_time(5.2, 500, 5.5, slow) == (6.1, 6.0)  # waits for the bytes ahead of it
    assert delivery_time(5.0, 500, 9.0, LinkConditions(latency_s=0.1)) == (5.1, 5.0)  # no cap: no queue
