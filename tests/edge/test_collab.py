"""Collaborative decoding: routing, the wire format, and the cloud's deep KV from boundary states."""

from __future__ import annotations

import pytest
import torch

from replica_agent.edge.collab import HEADER_BYTES, CloudSession, NoCloud, StateRejected, decode_state, encode_state, generate, route, state_bytes

from .conftest import PROMPTS, SPLIT, exit_argmax_after_each_position, nonzero_adapter, whole_model_greedy, whole_model_logits

NEW_TOKENS = 64


def session_for(cloud, adapter, prompt: list[int]) -> CloudSession:
    return CloudSession(cloud, adapter.sha256, max_len=len(prompt) + NEW_TOKENS)


def run(halves, adapter, prompt, threshold: float, dtype: str):
    edge, cloud = halves
    session = session_for(cloud, adapter, prompt)
    return generate(edge, session, prompt, max_new_tokens=NEW_TOKENS, threshold=threshold, state_dtype=dtype), session


@pytest.mark.parametrize(
    ("confidence", "threshold", "expected"), [(0.9, 0.8, "edge"), (0.8, 0.8, "edge"), (0.79, 0.8, "cloud"), (1.0, 1.01, "cloud"), (0.0, 0.0, "edge")]
)
def test_route(confidence, threshold, expected):
    assert route(confidence, threshold) == expected


def test_a_state_on_the_wire_is_the_header_plus_hidden_values(runtime):
    hidden = runtime.dims.hidden
    state = torch.randn(hidden, generator=torch.Generator().manual_seed(0)) * 10
    sha = "ab" * 32
    assert HEADER_BYTES == 16
    for dtype, width in (("fp32", 4), ("fp16", 2)):
        payload = encode_state(state, 41, sha, dtype)
        assert len(payload) == state_bytes(hidden, dtype) == HEADER_BYTES + hidden * width
        decoded = decode_state(payload)
        assert (decoded.position, decoded.adapter_tag, decoded.dtype) == (41, bytes.fromhex(sha[:16]), dtype)
        assert torch.allclose(decoded.values, state, rtol=0 if dtype == "fp32" else 1e-3, atol=0)
    with pytest.raises(StateRejected, match="takes"):
        decode_state(payload[:-1])
    with pytest.raises(ValueError, match="does not fit fp16"):
        encode_state(torch.full((hidden,), 1e5), 0, sha, "fp16")


def test_threshold_above_one_sends_every_token_to_the_cloud_and_equals_the_whole_model_with_fp32_states(runtime, adapter, halves, prompts):
    hidden = runtime.dims.hidden
    for prompt in prompts:
        result, session = run(halves, adapter, prompt, threshold=1.01, dtype="fp32")
        expected, _ = whole_model_greedy(runtime, adapter, prompt, NEW_TOKENS)
        assert result.tokens == expected
        assert result.routes == ["cloud"] * NEW_TOKENS and session.requests == NEW_TOKENS
        # Every state went up once (the last token's state is never needed), at header + 4 bytes per value.
        assert session.states_received == result.states_up == len(prompt) + NEW_TOKENS - 1
        assert session.bytes_received == result.bytes_up == session.states_received * (HEADER_BYTES + hidden * 4)


def test_with_fp16_states_the_cloud_picks_the_whole_models_token_on_99_percent_of_tokens(runtime, adapter, halves, prompts):
    """Per token: the cloud's choice against the whole model's greedy token after the same prefix
    (the sequence the split produced), so one early difference does not count every later token."""
    agree = total = 0
    for prompt in prompts:
        result, session = run(halves, adapter, prompt, threshold=1.01, dtype="fp16")
        assert session.bytes_received == session.states_received * (HEADER_BYTES + runtime.dims.hidden * 2)
        logits, _ = whole_model_logits(runtime, adapter, prompt + result.tokens)
        expected = logits[len(prompt) - 1 : -1].argmax(-1).tolist()
        agree += sum(a == b for a, b in zip(result.tokens, expected))
        total += len(expected)
    assert total == len(PROMPTS) * NEW_TOKENS
    print(f"\nfp16 boundary states: the cloud chose the whole model's greedy token on {agree} of {total} tokens")
    assert agree / total >= 0.99, f"{agree} of {total}"


def test_threshold_zero_is_the_edge_alone_and_a_late_catch_up_builds_the_whole_models_deep_kv(runtime, adapter, halves, prompts):
    edge, _ = halves
    prompt = prompts[0]
    result, session = run(halves, adapter, prompt, threshold=0.0, dtype="fp32")
    seq = prompt + result.tokens
    assert result.routes == ["edge"] * NEW_TOKENS
    assert result.tokens == exit_argmax_after_each_position(runtime, adapter, edge, seq)[len(prompt) - 1 : -1]
    assert session.requests == 0 and session.cached == 0  # nothing computed in the cloud yet
    session.catch_up()  # every deferred state's deep KV in one batch
    n = session.cached
    assert n == len(seq) - 1
    _, whole = whole_model_logits(runtime, adapter, seq)
    assert torch.allclose(session.cache.k[:, 0, :, :n], whole.k[SPLIT:, 0, :, :n], atol=1e-4)
    assert torch.allclose(session.cache.v[:, 0, :, :n], whole.v[SPLIT:, 0, :, :n], atol=1e-4)


def test_mixed_routing_each_token_is_its_deciders_choice_and_the_deep_kv_is_exact(runtime, adapter, halves, prompts):
    edge, _ = halves
    prompt = prompts[1]
    result, session = run(halves, adapter, prompt, threshold=0.5, dtype="fp32")
    assert 0 < result.cloud_tokens < NEW_TOKENS, result.confidences
    seq = prompt + result.tokens
    logits, whole = whole_model_logits(runtime, adapter, seq)
    cloud_choice = logits[len(prompt) - 1 : -1].argmax(-1).tolist()
    edge_choice = exit_argmax_after_each_position(runtime, adapter, edge, seq)[len(prompt) - 1 : -1]
    for token, where, by_cloud, by_edge in zip(result.tokens, result.routes, cloud_choice, edge_choice):
        assert token == (by_cloud if where == "cloud" else by_edge)
    # The deep KV of the tokens that exited at the edge was caught up at the following cloud requests.
    n = session.cached
    assert n >= len(prompt)
    assert torch.allclose(session.cache.k[:, 0, :, :n], whole.k[SPLIT:, 0, :, :n], atol=1e-4)
    assert torch.allclose(session.cache.v[:, 0, :, :n], whole.v[SPLIT:, 0, :, :n], atol=1e-4)


def test_a_session_is_pinned_to_its_adapter_version_and_to_position_order(runtime, adapter, halves):
    _, cloud = halves
    other = nonzero_adapter(runtime, seed=8)
    with pytest.raises(StateRejected, match="this replica runs adapter"):
        CloudSession(cloud, other.sha256, max_len=8)
    session = CloudSession(cloud, adapter.sha256, max_len=8)
    assert session.adapter_sha256 == adapter.sha256
    state = torch.zeros(runtime.dims.hidden)
    with pytest.raises(StateRejected, match="pinned"):
        session.receive(encode_state(state, 0, other.sha256))
    with pytest.raises(StateRejected, match="expected 0"):
        session.receive(encode_state(state, 1, adapter.sha256))
    session.receive(encode_state(state, 0, adapter.sha256))
    assert (session.states_received, session.bytes_received, session.next_position) == (1, HEADER_BYTES + runtime.dims.hidden * 2, 1)


def test_without_answers_every_token_is_the_exit_heads_and_until_ends_decoding(runtime, adapter, halves, prompts):
    edge, _ = halves
    prompt = prompts[2]
    result = generate(edge, NoCloud(), prompt, max_new_tokens=NEW_TOKENS, threshold=0.5)
    assert set(result.routes) == {"edge", "standalone"}  # the tokens the cloud should have chosen, chosen alone
    assert [r == "standalone" for r in result.routes] == [c < 0.5 for c in result.confidences]
    assert result.standalone_tokens == result.routes.count("standalone") and result.cloud_tokens == 0
    assert result.tokens == exit_argmax_after_each_position(runtime, adapter, edge, prompt + result.tokens)[len(prompt) - 1 : -1]
    seen: list[int] = []
    short = generate(edge, NoCloud(), prompt, max_new_tokens=NEW_TOKENS, threshold=0.5, until=lambda t: seen.append(t) or len(seen) == 3)
    assert short.tokens == seen == result.tokens[:3]
