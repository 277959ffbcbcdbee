"""Adapter updates: delta arithmetic, bytes on the wire, sha256 checks.

The small helpers here (`global_adapter`, `trained`, `updates_for`) also build the rounds of the
aggregation and secure-aggregation tests.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from collm_rpc.client import chunks
from replica_agent.engine.adapter_store import adapter_sha256
from replica_agent.engine.lora import LoraSpec, ModelDims, init_adapter
from replica_agent.federated.update import (
    UpdateError,
    apply_delta,
    decode,
    decode_update,
    encode,
    encode_update,
    make_update,
)

DIMS = ModelDims(layers=2, hidden=32, heads=4, kv_heads=2, head_dim=8, intermediate=64)


def global_adapter(seed: int = 0) -> dict[str, torch.Tensor]:
    """PEFT's init (A random, B zero), plus a random B, as a round's starting adapter."""
    gen = torch.Generator().manual_seed(1000 + seed)
    return {k: torch.randn(v.shape, generator=gen) * 0.1 if "lora_B" in k else v for k, v in init_adapter(LoraSpec(), DIMS, seed=seed).items()}


def trained(base, seed: int, *, scale: float = 0.1, train_a: bool = True, common_seed: int | None = None, spread: float = 0.0):
    """`base` after some local training: a random step (plus a shared direction when common_seed is set)."""
    gen = torch.Generator().manual_seed(seed)
    common = torch.Generator().manual_seed(common_seed) if common_seed is not None else None
    out = {}
    for key, value in sorted(base.items()):
        if not train_a and "lora_A" in key:
            out[key] = value.clone()
            continue
        step = torch.randn(value.shape, generator=gen) * (spread if common else scale)
        if common is not None:
            step += torch.randn(value.shape, generator=common) * scale
        out[key] = value + step
    return out


def updates_for(base, samples: list[int], *, only_b: bool = False, round_id: str = "r1", **kwargs):
    kwargs.setdefault("train_a", not only_b)
    return [make_update(f"p{i}", round_id, trained(base, seed=i, **kwargs), base, n, only_b=only_b) for i, n in enumerate(samples)]


def test_update_is_shadow_minus_base_and_apply_delta_restores_the_shadow():
    base = global_adapter()
    shadow = trained(base, seed=1)
    update = make_update("p0", "r1", shadow, base, 7)
    assert update.base_sha256 == adapter_sha256(base)
    assert update.sha256 == adapter_sha256(update.delta)
    assert update.num_samples == 7 and set(update.delta) == set(base)
    restored = apply_delta(base, update.delta)
    for key in base:
        torch.testing.assert_close(restored[key], shadow[key], rtol=0, atol=1e-6)


def test_only_b_leaves_out_a_and_refuses_a_trained_a():
    base = global_adapter()
    update = make_update("p0", "r1", trained(base, seed=1, train_a=False), base, 3, only_b=True)
    assert update.delta and all(k.endswith(".lora_B.weight") for k in update.delta)
    restored = apply_delta(base, update.delta)
    assert all(torch.equal(restored[k], base[k]) for k in base if "lora_A" in k)
    with pytest.raises(UpdateError, match="lora_A to stay frozen"):
        make_update("p0", "r1", trained(base, seed=1), base, 3, only_b=True)


def test_mismatched_adapters_are_refused():
    base = global_adapter()
    shadow = dict(trained(base, seed=1))
    shadow.pop(next(iter(shadow)))
    with pytest.raises(UpdateError, match="differ in keys"):
        make_update("p0", "r1", shadow, base, 1)
    update = make_update("p0", "r1", trained(base, seed=1), base, 1)
    with pytest.raises(UpdateError, match="lacks"):
        apply_delta({k: v for k, v in base.items() if "lora_A" in k}, update.delta)


def test_encode_decode_round_trip():
    base = global_adapter()
    update = make_update("p0", "r1", trained(base, seed=1), base, 12)
    tensors, meta = decode(encode(update.delta, {"hello": "world"}))
    assert meta == {"hello": "world"}
    assert set(tensors) == set(update.delta) and all(torch.equal(tensors[k], update.delta[k]) for k in tensors)

    blob = encode_update(update)
    back = decode_update(b"".join(chunks(blob, 1000)), expected_sha256=update.sha256)
    assert (back.participant, back.round_id, back.base_sha256, back.num_samples, back.sha256) == ("p0", "r1", update.base_sha256, 12, update.sha256)
    assert all(torch.equal(back.delta[k], update.delta[k]) for k in update.delta)


def test_corrupt_bytes_and_wrong_sha_are_refused_with_a_clear_message():
    base = global_adapter()
    update = make_update("p0", "r1", trained(base, seed=1), base, 12)
    blob = bytearray(encode_update(update))
    with pytest.raises(UpdateError, match="corrupt or truncated"):
        decode_update(bytes(blob[: len(blob) // 2]))
    with pytest.raises(UpdateError, match="corrupt or truncated"):
        decode_update(b"not safetensors at all")
    flipped = bytearray(blob)
    flipped[-5] ^= 0x40  # a bit in the last tensor's data: still parses, hashes differently
    with pytest.raises(UpdateError, match="sha256 mismatch.*corrupted in transit"):
        decode_update(bytes(flipped))
    with pytest.raises(UpdateError, match="sha256 mismatch.*announced"):
        decode_update(bytes(blob), expected_sha256="0" * 64)
    with pytest.raises(UpdateError, match="not an adapter update"):
        decode_update(encode(update.delta, {"format": "something else"}))


def test_ffa_update_is_about_half_the_bytes():
    base = global_adapter()
    full = encode_update(make_update("p0", "r1", trained(base, seed=1, train_a=False), base, 1))
    ffa = encode_update(make_update("p0", "r1", trained(base, seed=1, train_a=False), base, 1, only_b=True))
    # q_proj B is as big as its A; v_proj B is half of its A here (2 KV heads of 4), so 0.43 + headers.
    assert 0.35 < len(ffa) / len(full) < 0.55


@settings(max_examples=50, deadline=None)
@given(blob=st.binary(max_size=300), size=st.integers(1, 64))
def test_chunks_reassemble(blob, size):
    parts = list(chunks(blob, size))
    assert b"".join(parts) == blob and all(0 < len(p) <= size for p in parts)


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError):
        list(chunks(b"abc", 0))
