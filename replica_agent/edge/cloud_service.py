"""The replica's side of edge sessions: `collab.CloudSession`s behind the agent's EdgeSession RPC.

A session holds a deep KV cache for its whole sequence (layers [S, L) x max_len positions) and a
gRPC worker thread, so a replica takes only so many: `EdgeLimits` bounds the open sessions and the
bytes of their deep KV together (`admit`, counted before anything is allocated), and a session idle
past `idle_s` is closed (the RPC layer reads its stream with that limit), which frees both. Each
session pins the adapter version it opened with in the agent's `AdapterStore`, so a publish while it
runs changes neither what it computes nor whether that version is retained; closing releases it.

The cloud partitions run on the agent's own runtime: the base weights that serve and train are
the ones edge sessions read, never a copy. Sessions of one (split, version) share one partition.
This module speaks collm.proto's messages but not gRPC: grpc_service.py maps its exceptions to
status codes (`SessionLimit` RESOURCE_EXHAUSTED, `SessionRefused` FAILED_PRECONDITION, ValueError
INVALID_ARGUMENT).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from collm_rpc.proto import collm_pb2 as pb

from ..engine.adapter_store import AdapterStore, AdapterVersion
from ..engine.llama import LlamaRuntime
from ..engine.lora import LoraSpec, ModelDims
from .collab import CloudSession
from .split import CloudPartition, PinnedAdapter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EdgeLimits:
    max_sessions: int = 4  # 0: this replica opens no edge session
    max_kv_bytes: int = 256 << 20  # the deep KV of all open sessions together
    idle_s: float = 60.0  # a session without a message for this long is closed

    def __post_init__(self) -> None:
        if self.max_sessions < 0 or self.max_kv_bytes < 0 or not self.idle_s > 0:
            raise ValueError(f"edge limits must be >= 0 (idle_s > 0), got {self}")


class SessionLimit(Exception):
    """The replica is at its session or memory limit: try later or another replica."""


class SessionRefused(Exception):
    """This replica cannot serve the session as asked: another model, or an adapter it does not hold."""


def deep_kv_bytes(dims: ModelDims, split: int, max_len: int, dtype: torch.dtype) -> int:
    """Bytes of one session's deep KV cache: keys and values of layers [split, L) for max_len
    positions, what `CloudPartition.new_cache` allocates."""
    if not 1 <= split < dims.layers:
        raise ValueError(f"split {split} must be in [1, {dims.layers - 1}] for a model of {dims.layers} layers")
    return 2 * (dims.layers - split) * dims.kv_heads * max_len * dims.head_dim * dtype.itemsize


def admit(open_sessions: int, kv_bytes: int, new_bytes: int, limits: EdgeLimits) -> str | None:
    """None when one more session of `new_bytes` fits beside `open_sessions` holding `kv_bytes`;
    otherwise why not, in words for the edge's operator."""
    if limits.max_sessions == 0:
        return "this replica opens no edge sessions (edge_max_sessions is 0)"
    if open_sessions >= limits.max_sessions:
        return f"{open_sessions} edge sessions are open, the replica's limit (edge_max_sessions {limits.max_sessions}); retry later or on another replica"
    if kv_bytes + new_bytes > limits.max_kv_bytes:
        return (
            f"a session of this max_len needs {new_bytes} bytes of deep KV and open sessions hold {kv_bytes} of the replica's "
            f"{limits.max_kv_bytes} (edge_max_kv_mb); ask for a shorter max_len, retry later or on another replica"
        )
    return None


@dataclass(eq=False)
class OpenSession:
    id: str
    caller: str
    version: AdapterVersion
    split: int
    session: CloudSession
    kv_bytes: int
    opened_at: float = field(default_factory=time.time)


class EdgeSessions:
    """The edge sessions of one replica (`Agent.edge`): admission, adapter pins, shared partitions."""

    def __init__(self, runtime: LlamaRuntime, store: AdapterStore, spec: LoraSpec, *, model: str, replica: str, limits: EdgeLimits) -> None:
        self.runtime, self.store, self.spec = runtime, store, spec
        self.model, self.replica, self.limits = model, replica, limits
        self._lock = threading.Lock()
        self._open: dict[str, OpenSession] = {}
        self._partitions: dict[tuple[int, int], tuple[CloudPartition, int]] = {}  # (split, version number) -> (partition, sessions)
        self._ids = itertools.count(1)
        self.opened = self.refused = self.expired = 0

    @property
    def kv_bytes(self) -> int:
        with self._lock:
            return sum(s.kv_bytes for s in self._open.values())

    def sessions(self) -> list[OpenSession]:
        with self._lock:
            return list(self._open.values())

    @property
    def open_count(self) -> int:
        with self._lock:
            return len(self._open)

    def summary(self) -> dict:
        """What the agent's stats show of its edge sessions."""
        with self._lock:
            return {
                "open": len(self._open),
                "kv_bytes": sum(s.kv_bytes for s in self._open.values()),
                "opened": self.opened,
                "refused": self.refused,
                "expired": self.expired,
                "limits": {"max_sessions": self.limits.max_sessions, "max_kv_bytes": self.limits.max_kv_bytes, "idle_s": self.limits.idle_s},
            }

    def open(self, *, model: str, split: int, adapter_sha256: str, max_len: int, caller: str) -> OpenSession:
        """A new session pinned to the version with `adapter_sha256`; raises SessionLimit,
        SessionRefused or ValueError (a bad split or max_len) without holding anything."""
        with self._lock:
            try:
                return self._open_locked(model, split, adapter_sha256, max_len, caller)
            except (SessionLimit, SessionRefused, ValueError) as exc:
                self.refused += 1
                log.info("edge session of %s refused: %s", caller, exc)
                raise

    def _open_locked(self, model: str, split: int, adapter_sha256: str, max_len: int, caller: str) -> OpenSession:
        if model != self.model:
            raise SessionRefused(f"this replica serves model {self.model!r}, not {model!r}")
        if not 1 <= max_len <= self.runtime.max_context:
            raise ValueError(f"max_len {max_len} must be in [1, {self.runtime.max_context}] (the model's context)")
        need = deep_kv_bytes(self.runtime.dims, split, max_len, self.runtime.dtype)
        reason = admit(len(self._open), sum(s.kv_bytes for s in self._open.values()), need, self.limits)
        if reason is not None:
            raise SessionLimit(reason)
        version = self.store.pin(adapter_sha256)
        if version is None:
            current = self.store.current
            raise SessionRefused(
                f"adapter {adapter_sha256[:12]} is not held by {self.replica} (it serves {current.label}, {current.sha256[:12]}); "
                "fetch the adapter version this replica serves and the exit head trained for it"
            )
        key = (split, version.number)
        try:
            partition, users = self._partitions.get(key) or (CloudPartition(self.runtime, split, PinnedAdapter.from_version(version, self.spec)), 0)
            session = CloudSession(partition, adapter_sha256, max_len=max_len)
        except BaseException:
            self.store.release(version.number)
            raise
        self._partitions[key] = (partition, users + 1)
        opened = OpenSession(f"{self.replica}/edge-{next(self._ids)}", caller, version, split, session, need)
        self._open[opened.id] = opened
        self.opened += 1
        log.info(
            "edge session %s of %s opened: split %d, adapter %s, %d positions, %d bytes of deep KV", opened.id, caller, split, version.label, max_len, need
        )
        return opened

    def close(self, opened: OpenSession) -> None:
        """Drop the session's deep KV and release its adapter pin (once; later calls do nothing)."""
        with self._lock:
            if self._open.pop(opened.id, None) is None:
                return
            key = (opened.split, opened.version.number)
            partition, users = self._partitions[key]
            if users > 1:
                self._partitions[key] = (partition, users - 1)
            else:
                del self._partitions[key]
        self.store.release(opened.version.number)
        log.info("edge session %s closed after %d requests", opened.id, opened.session.requests)

    def serve(self, messages: Iterator[pb.EdgeMessage], *, caller: str) -> Iterator[pb.CloudMessage]:
        """One EdgeSession call: open on the first message, then states and requests in order; the
        session is closed however the call ends (the edge hung up, a bad state, idle expiry)."""
        first = next(messages, None)
        if first is None or first.WhichOneof("kind") != "open":
            raise ValueError("an edge session starts with an `open` message (model, split, adapter sha256, max_len)")
        o = first.open
        opened = self.open(model=o.model, split=o.split, adapter_sha256=o.adapter_sha256, max_len=o.max_len, caller=caller)
        try:
            yield pb.CloudMessage(
                opened=pb.EdgeOpened(session_id=opened.id, replica=self.replica, adapter_version=opened.version.label, kv_bytes=opened.kv_bytes)
            )
            for message in messages:
                kind = message.WhichOneof("kind")
                if kind == "state":
                    opened.session.receive(message.state)
                elif kind == "request":
                    token = opened.session.request(message.request.state)
                    yield pb.CloudMessage(token=pb.EdgeToken(id=message.request.id, token=token))
                else:
                    raise ValueError(f"an open edge session takes states and requests, not {kind or 'an empty message'}")
        except TimeoutError:
            with self._lock:
                self.expired += 1
            raise
        finally:
            self.close(opened)
