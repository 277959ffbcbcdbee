"""A participant's adapter update, and its bytes on the wire.

An update is the shadow adapter a replica trained during the round minus the global adapter the
round started from, with the number of training samples behind it (FedAvg's weight). It travels
as one safetensors blob (tensors plus string metadata), streamed in chunks, and carries the
sha256 of its tensors so the receiver can tell a corrupt or swapped upload from a good one.

With FFA-LoRA (A frozen at its shared init, only B trained) the A deltas are zero by construction
and are left out: half the bytes for q/v projections, and the aggregate stays exact.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import safetensors.torch
import torch

from replica_agent.engine.adapter_store import adapter_sha256

if TYPE_CHECKING:
    from collm_rpc.client import AgentClient

FORMAT = "collm-adapter-update/1"


class UpdateError(ValueError):
    """Bytes or tensors that cannot be a valid update (corrupt, truncated, wrong hash, wrong shape)."""


@dataclass(frozen=True)
class AdapterUpdate:
    participant: str
    round_id: str
    base_sha256: str
    num_samples: int
    delta: dict[str, torch.Tensor]
    sha256: str  # adapter_sha256(delta)


def is_lora_a(key: str) -> bool:
    return key.endswith(".lora_A.weight")


def make_update(
    participant: str,
    round_id: str,
    shadow: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    num_samples: int,
    *,
    only_b: bool = False,
) -> AdapterUpdate:
    """`shadow - base` in float32; with `only_b` (FFA-LoRA) the A keys are left out."""
    if set(shadow) != set(base):
        missing, extra = sorted(set(base) - set(shadow)), sorted(set(shadow) - set(base))
        raise UpdateError(f"shadow and base adapters differ in keys: missing {missing[:3]}, unexpected {extra[:3]}")
    if num_samples < 0:
        raise UpdateError(f"num_samples must be >= 0, got {num_samples}")
    delta: dict[str, torch.Tensor] = {}
    for key in sorted(shadow):
        s, b = shadow[key].detach(), base[key].detach()
        if s.shape != b.shape:
            raise UpdateError(f"{key}: shadow shape {tuple(s.shape)} differs from base shape {tuple(b.shape)}")
        d = s.to(torch.float32) - b.to(torch.float32)
        if only_b and is_lora_a(key):
            if torch.count_nonzero(d):
                raise UpdateError(
                    f"{key} changed during training, but FFA-LoRA (only_b) requires lora_A to stay frozen: freeze A in the trainer or send full updates"
                )
            continue
        delta[key] = d.cpu().contiguous()
    return AdapterUpdate(participant, round_id, adapter_sha256(base), int(num_samples), delta, adapter_sha256(delta))


def apply_delta(base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`base + delta` in base's dtypes; keys missing from delta (e.g. A under FFA-LoRA) stay unchanged."""
    unknown = sorted(set(delta) - set(base))
    if unknown:
        raise UpdateError(f"delta has keys the base adapter lacks: {unknown[:3]}")
    out = {}
    for key, b in base.items():
        if key not in delta:
            out[key] = b.detach().clone()
            continue
        d = delta[key]
        if d.shape != b.shape:
            raise UpdateError(f"{key}: delta shape {tuple(d.shape)} differs from base shape {tuple(b.shape)}")
        out[key] = (b.detach().to(torch.float32) + d.to(b.device, torch.float32)).to(b.dtype)
    return out


def encode(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """One safetensors blob; metadata values must be strings (safetensors' rule)."""
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata values must be str; not for {bad}")
    return safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, dict(metadata))


def decode(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a blob from `encode`; UpdateError when it is not a whole safetensors file."""
    try:
        header_len = int.from_bytes(blob[:8], "little")
        if len(blob) < 8 or header_len > len(blob) - 8:
            raise ValueError(f"header length {header_len} exceeds the {len(blob)} bytes received")
        metadata = json.loads(bytes(blob[8 : 8 + header_len])).get("__metadata__") or {}
        tensors = safetensors.torch.load(bytes(blob))
    except Exception as exc:  # safetensors raises its own error type; json and slicing raise others
        raise UpdateError(f"update bytes are corrupt or truncated ({exc}); the sender should upload it again") from None
    return tensors, dict(metadata)


def fetch_adapter(peer: AgentClient, sha256: str) -> dict[str, torch.Tensor]:
    """An adapter fetched from `peer` by content hash, decoded and verified; UpdateError on any mismatch."""
    tensors, _ = decode(peer.fetch_bytes(sha256))
    actual = adapter_sha256(tensors)
    if actual != sha256:
        raise UpdateError(f"adapter fetched from {peer.address} has sha256 {actual}, expected {sha256}")
    return tensors


def encode_update(update: AdapterUpdate) -> bytes:
    return encode(
        update.delta,
        {
            "format": FORMAT,
            "participant": update.participant,
            "round_id": update.round_id,
            "base_sha256": update.base_sha256,
            "num_samples": str(update.num_samples),
            "sha256": update.sha256,
        },
    )


def decode_update(blob: bytes, *, expected_sha256: str | None = None) -> AdapterUpdate:
    """The update in `blob`, after checking its tensors hash to the declared (and expected) sha256."""
    tensors, meta = decode(blob)
    if meta.get("format") != FORMAT:
        raise UpdateError(f"not an adapter update: format {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        num_samples = int(meta["num_samples"])
        participant, round_id, base_sha256, declared = (meta["participant"], meta["round_id"], meta["base_sha256"], meta["sha256"])
    except (KeyError, ValueError) as exc:
        raise UpdateError(f"update metadata is incomplete or malformed ({exc!r})") from None
    actual = adapter_sha256(tensors)
    if actual != declared:
        raise UpdateError(
            f"update from {participant!r}: sha256 mismatch, tensors hash to {actual} but the update declares "
            f"{declared}; the bytes were corrupted in transit, upload again"
        )
    if expected_sha256 is not None and actual != expected_sha256:
        raise UpdateError(f"update from {participant!r}: sha256 mismatch, received {actual} but {expected_sha256} was announced")
    return AdapterUpdate(participant, round_id, base_sha256, num_samples, tensors, actual)
