"""Collaborative greedy decoding: the edge emits what its exit head is sure of, the cloud the rest.

Per token the edge runs its layers and asks the exit head; `route` sends the token to the cloud when
the head's top probability is under the threshold. Every boundary state streams up as it is made
(one token's worth of bytes: `HEADER_BYTES` + hidden x 2 or x 4), so a cloud request carries only
the state of the token asked about. The cloud session queues the states of tokens that exited at
the edge and, on the next request, computes their deep KV exactly in one batch with the requested
one (as LayerSkip and EE-LLM fill the KV of deferred tokens), then answers with its greedy token.
The session is a plain object (`receive`, `request`) so that a transport can wrap it
(cloud_service.py on the replica, client.py on the edge). A link that gives no answer (the cloud
missed the edge's latency budget, or the link is down) makes the edge emit its exit head's token
anyway: a "standalone" token, so that no request waits on or fails with the cloud.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import torch

from .split import CloudPartition, EdgePartition

Route = Literal["edge", "cloud"]
# Who chose a token: the exit head, the cloud, or the exit head because the cloud did not answer.
Source = Literal["edge", "cloud", "standalone"]


def route(confidence: float, threshold: float) -> Route:
    """The edge emits its exit's token iff the top probability reaches the threshold: a threshold
    above 1 sends every token to the cloud, a threshold of 0 none."""
    return "edge" if confidence >= threshold else "cloud"


# A boundary state on the wire: this header, then `hidden` little-endian floats.
# Header: format version (u8), dtype code (u8), hidden size (u16), absolute position (u32),
# the first 8 bytes of the adapter version's sha256 (so a state for another version is refused).
HEADER = struct.Struct("<BBHI8s")
HEADER_BYTES = HEADER.size  # 16
STATE_FORMAT = 1
STATE_DTYPES: dict[str, tuple[int, str]] = {"fp32": (0, "<f4"), "fp16": (1, "<f2")}
_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
_DTYPE_OF_CODE = {code: name for name, (code, _) in STATE_DTYPES.items()}


class StateRejected(ValueError):
    """A boundary state the session cannot use: malformed, another adapter version, out of order."""


def adapter_tag(sha256: str) -> bytes:
    return bytes.fromhex(sha256[:16])


def state_bytes(hidden: int, dtype: str) -> int:
    """Bytes one token's boundary state takes on the wire."""
    return HEADER_BYTES + hidden * np.dtype(STATE_DTYPES[dtype][1]).itemsize


@dataclass(frozen=True)
class BoundaryState:
    position: int
    adapter_tag: bytes
    dtype: str
    values: torch.Tensor = field(repr=False)  # [hidden], float32


def encode_state(state: torch.Tensor, position: int, adapter_sha256: str, dtype: str = "fp16") -> bytes:
    """One token's boundary state ([hidden]) as bytes; refuses values the dtype cannot hold (fp16
    overflows past 65504) rather than sending infinities."""
    code, np_dtype = STATE_DTYPES[dtype]
    values = state.detach().to("cpu", _TORCH_DTYPES[dtype])
    if not torch.isfinite(values).all():
        raise ValueError(f"the boundary state at position {position} does not fit {dtype}")
    header = HEADER.pack(STATE_FORMAT, code, values.shape[0], position, adapter_tag(adapter_sha256))
    return header + values.numpy().astype(np_dtype, copy=False).tobytes()


def decode_state(payload: bytes) -> BoundaryState:
    if len(payload) < HEADER_BYTES:
        raise StateRejected(f"a boundary state needs at least {HEADER_BYTES} bytes, got {len(payload)}")
    version, code, hidden, position, tag = HEADER.unpack_from(payload)
    if version != STATE_FORMAT or code not in _DTYPE_OF_CODE:
        raise StateRejected(f"unknown boundary state format {version} / dtype code {code}")
    dtype = _DTYPE_OF_CODE[code]
    if len(payload) != state_bytes(hidden, dtype):
        raise StateRejected(f"a {dtype} state of {hidden} values takes {state_bytes(hidden, dtype)} bytes, got {len(payload)}")
    values = np.frombuffer(payload, dtype=STATE_DTYPES[dtype][1], offset=HEADER_BYTES).astype(np.float32)
    return BoundaryState(position, tag, dtype, torch.from_numpy(values))


class CloudLink(Protocol):
    """What the edge needs of the cloud: an in-process `CloudSession`, or a transport's link
    (client.EdgeLink). `request` answers the cloud's token, or None when there is no answer to wait
    for (the edge then emits its own)."""

    def receive(self, payload: bytes) -> None: ...

    def request(self, payload: bytes) -> int | None: ...


class NoCloud:
    """The edge alone (no cloud to reach): states go nowhere and requests get no answer, so every
    token the router would send up is the exit head's, marked "standalone"."""

    def receive(self, payload: bytes) -> None:
        pass

    def request(self, payload: bytes) -> int | None:
        return None


class CloudSession:
    """One edge session on a replica: the deep KV cache of its sequence, pinned to one adapter version.

    States arrive in position order; `cached` positions have deep KV, the rest wait for the next
    request. Nothing here is thread-safe: a transport serialises the calls of a session."""

    def __init__(self, cloud: CloudPartition, adapter_sha256: str, *, max_len: int) -> None:
        if adapter_sha256 != cloud.adapter.sha256:
            raise StateRejected(f"this replica runs adapter {cloud.adapter.sha256[:12]}, not {adapter_sha256[:12]}")
        self.cloud, self.adapter_sha256 = cloud, adapter_sha256
        self._tag = adapter_tag(adapter_sha256)
        self.cache = cloud.new_cache(max_len)
        self.cached = 0  # positions [0, cached) have deep KV
        self._pending: list[torch.Tensor] = []
        self.bytes_received = 0
        self.states_received = 0
        self.requests = 0

    @property
    def next_position(self) -> int:
        return self.cached + len(self._pending)

    def receive(self, payload: bytes) -> None:
        """Queue the next position's boundary state; no compute until a request needs it."""
        state = decode_state(payload)
        if state.adapter_tag != self._tag:
            raise StateRejected(f"a state for adapter {state.adapter_tag.hex()}, but this session pinned {self.adapter_sha256[:16]}")
        if state.values.shape[0] != self.cloud.runtime.dims.hidden:
            raise StateRejected(f"a state of {state.values.shape[0]} values, but the model's hidden size is {self.cloud.runtime.dims.hidden}")
        if state.position != self.next_position:
            raise StateRejected(f"a state for position {state.position}, expected {self.next_position}")
        if state.position >= self.cache.max_len:
            raise StateRejected(f"position {state.position} is past the session's {self.cache.max_len}")
        self._pending.append(state.values)
        self.bytes_received += len(payload)
        self.states_received += 1

    def catch_up(self) -> torch.Tensor | None:
        """Deep KV for every queued state, in one batch; the next-token logits after the last (None
        when nothing was queued)."""
        if not self._pending:
            return None
        states = torch.stack(self._pending)
        logits = self.cloud.forward(states, self.cached, self.cache)
        self.cached += len(self._pending)
        self._pending.clear()
        return logits

    def request(self, payload: bytes) -> int:
        """Receive one state and answer the greedy token that follows it."""
        self.receive(payload)
        self.requests += 1
        logits = self.catch_up()
        assert logits is not None  # receive() queued one
        return int(logits.argmax())


@dataclass
class CollabResult:
    tokens: list[int]
    routes: list[Source]
    confidences: list[float]  # the exit head's top probability for each token
    states_up: int  # boundary states sent to the cloud
    bytes_up: int

    @property
    def cloud_tokens(self) -> int:
        return self.routes.count("cloud")

    @property
    def standalone_tokens(self) -> int:
        return self.routes.count("standalone")

    @property
    def bytes_per_state(self) -> float:
        return self.bytes_up / self.states_up if self.states_up else 0.0


def generate(
    edge: EdgePartition,
    cloud: CloudLink,
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    threshold: float,
    state_dtype: str = "fp16",
    until: Callable[[int], bool] | None = None,
) -> CollabResult:
    """Greedy decoding of `prompt` from position 0, on a fresh cloud session for the same adapter.
    `until` sees each token as it is chosen; True ends decoding with it (an EOS, a stop sequence)."""
    if not prompt:
        raise ValueError("the prompt is empty")
    sha = edge.adapter.sha256
    cache = edge.new_cache(len(prompt) + max_new_tokens)
    boundary = edge.forward(prompt, 0, cache)
    result = CollabResult([], [], [], 0, 0)

    def upload(state: torch.Tensor, position: int, ask: bool) -> int | None:
        payload = encode_state(state, position, sha, state_dtype)
        result.states_up += 1
        result.bytes_up += len(payload)
        if ask:
            return cloud.request(payload)
        cloud.receive(payload)
        return None

    for position, state in enumerate(boundary[:-1]):
        upload(state, position, ask=False)
    state, position = boundary[-1], len(prompt) - 1
    for _ in range(max_new_tokens):
        probs = torch.softmax(edge.exit_logits(state), dim=-1)
        confidence, guess = probs.max(dim=-1)
        where = route(float(confidence), threshold)
        answer = upload(state, position, ask=where == "cloud")
        token = int(guess) if answer is None else answer
        result.tokens.append(token)
        result.routes.append("standalone" if where == "cloud" and answer is None else where)
        result.confidences.append(float(confidence))
        if (until is not None and until(token)) or len(result.tokens) == max_new_tokens:
            break
        position += 1
        state = edge.forward([token], position, cache)[0]
    return result
