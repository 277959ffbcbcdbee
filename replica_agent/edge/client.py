"""The edge's side of the EdgeSession RPC: a `collab.CloudLink` over gRPC that never fails a request.

An `EdgeLink` is one sequence's link to a replica. Every boundary state streams up as the edge
makes it; a cloud request waits for its answer at most the latency budget. A late answer, a refused
session or a dropped link make `request` return None, so the edge emits its exit head's token
(standalone) and decoding goes on. The link keeps every state of its sequence (a few hundred bytes
to a few KB each), so the first state or request `retry_s` after a failure opens a new session and
first sends it the states it lacks (all of them, from position 0): the cloud's deep KV is caught
up in one batch at the next request, and its answers are exact again.

A late answer is not a broken link: the session goes on, its answer is dropped when it comes.
A link that stalls without breaking (no TCP reset) costs each cloud-routed token the budget and
nothing else; the link emulator's outages break connections, as a lost route does.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from collm_rpc import tls
from collm_rpc.client import CHANNEL_OPTIONS
from collm_rpc.proto import collm_pb2 as pb
from collm_rpc.proto import collm_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinkSettings:
    latency_budget_s: float = 0.2  # the longest a token waits for the cloud before the edge emits its own
    retry_s: float = 1.0  # after the link failed, requests go standalone this long before a new session is tried

    def __post_init__(self) -> None:
        if not (self.latency_budget_s > 0 and self.retry_s >= 0):
            raise ValueError(f"the latency budget must be > 0 and retry_s >= 0, got {self}")


@dataclass
class LinkStats:
    sessions: int = 0  # sessions opened: 1, plus one per reconnection
    states_sent: int = 0  # boundary states sent, those re-sent to catch a new session up included
    bytes_sent: int = 0  # their payload bytes (collab.state_bytes each)
    answered: int = 0  # requests the cloud answered within the budget
    standalone: int = 0  # requests the edge answered itself: late answer, no link, refused session
    last_error: str | None = None  # why the last session ended early
    adapter_version: str | None = None  # the label of the version the replica pinned for the last session


class CloudClient:
    """A channel to one replica's gRPC port for the edge sessions of one model, split and adapter
    version; `link(max_len)` per sequence. With `credentials` (an edge identity, tls.Identity.edge)
    it speaks mutual TLS; without, plaintext (development only)."""

    def __init__(
        self,
        address: str,
        *,
        model: str,
        split: int,
        adapter_sha256: str,
        credentials: tls.Credentials | None = None,
        settings: LinkSettings = LinkSettings(),
    ) -> None:
        self.address, self.settings = address, settings
        self.model, self.split, self.adapter_sha256 = model, split, adapter_sha256
        # Reconnect attempts no further apart than retry_s: the channel must be ready when the link is back.
        backoff_ms = max(100, int(settings.retry_s * 1000))
        options: list[tuple[str, str | int]] = [
            *CHANNEL_OPTIONS,
            ("grpc.initial_reconnect_backoff_ms", backoff_ms),
            ("grpc.max_reconnect_backoff_ms", backoff_ms),
        ]
        if credentials is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            options.append(("grpc.ssl_target_name_override", tls.TARGET_NAME))
            self._channel = grpc.secure_channel(address, tls.channel_credentials(credentials), options=options)
        self.stub = pb_grpc.AgentStub(self._channel)

    def link(self, max_len: int) -> EdgeLink:
        return EdgeLink(self, max_len)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CloudClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Session:
    """One EdgeSession call: messages go out through a queue, answers come in on a reader thread."""

    def __init__(self, stub: pb_grpc.AgentStub, first: pb.EdgeOpen, catch_up: list[bytes]) -> None:
        self._out: queue.SimpleQueue[pb.EdgeMessage | None] = queue.SimpleQueue()
        self._out.put(pb.EdgeMessage(open=first))
        for payload in catch_up:
            self._out.put(pb.EdgeMessage(state=payload))
        self._cond = threading.Condition()
        self._answers: dict[int, int] = {}
        self.failure: str | None = None
        self.failed_at = 0.0  # time.monotonic() of the failure
        self.opened: pb.EdgeOpened | None = None
        self._call = stub.EdgeSession(self._messages())
        threading.Thread(target=self._read, name="collm-edge-link", daemon=True).start()

    def _messages(self) -> Iterator[pb.EdgeMessage]:
        while (message := self._out.get()) is not None:
            yield message

    def _read(self) -> None:
        try:
            for reply in self._call:
                with self._cond:
                    if reply.WhichOneof("kind") == "token":
                        self._answers[reply.token.id] = reply.token.token
                    else:
                        self.opened = reply.opened
                    self._cond.notify_all()
            reason = "the replica ended the session"
        except grpc.RpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
        with self._cond:
            self.failure, self.failed_at = reason, time.monotonic()
            self._cond.notify_all()

    def send(self, message: pb.EdgeMessage) -> None:
        self._out.put(message)

    def wait(self, request_id: int, deadline: float) -> int | None:
        """The answer to `request_id`, or None once `deadline` (time.monotonic()) passes or the call ends."""
        with self._cond:
            for stale in [i for i in self._answers if i < request_id]:  # answers that came too late
                del self._answers[stale]
            while request_id not in self._answers and self.failure is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return self._answers.pop(request_id, None)

    def close(self) -> None:
        """End the stream: the replica closes the session and releases its pin."""
        self._out.put(None)


class EdgeLink:
    """One sequence's `collab.CloudLink` over the EdgeSession RPC (see the module docstring)."""

    def __init__(self, client: CloudClient, max_len: int) -> None:
        self.client, self.max_len = client, max_len
        self.stats = LinkStats()
        self._states: list[bytes] = []  # every boundary state of the sequence, in position order
        self._session: _Session | None = None
        self._retry_at = 0.0
        self._ids = itertools.count(1)

    def receive(self, payload: bytes) -> None:
        self._states.append(payload)
        session = self._usable()
        if session is not None:
            self._send(session, pb.EdgeMessage(state=payload), payload)

    def request(self, payload: bytes) -> int | None:
        self._states.append(payload)
        session = self._usable()
        if session is None:
            self.stats.standalone += 1
            return None
        request_id = next(self._ids)
        self._send(session, pb.EdgeMessage(request=pb.EdgeRequest(id=request_id, state=payload)), payload)
        token = session.wait(request_id, time.monotonic() + self.client.settings.latency_budget_s)
        if token is None:
            self.stats.standalone += 1
        else:
            self.stats.answered += 1
            self.stats.adapter_version = session.opened.adapter_version if session.opened is not None else None
        return token

    @property
    def connected(self) -> bool:
        """A session is open and has not failed (as far as the edge knows yet)."""
        return self._session is not None and self._session.failure is None

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def __enter__(self) -> EdgeLink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, session: _Session, message: pb.EdgeMessage, payload: bytes) -> None:
        session.send(message)
        self.stats.states_sent += 1
        self.stats.bytes_sent += len(payload)

    def _usable(self) -> _Session | None:
        """The open session; else a new one caught up with every state before the newest (the
        caller sends that one), unless the last session failed less than retry_s ago."""
        session = self._session
        if session is not None and session.failure is not None:
            log.warning("edge session with %s ended: %s; the edge answers alone for %g s", self.client.address, session.failure, self.client.settings.retry_s)
            self.stats.last_error = session.failure
            session.close()
            self._retry_at = session.failed_at + self.client.settings.retry_s
            self._session = session = None
        if session is None and time.monotonic() >= self._retry_at:
            c = self.client
            catch_up = self._states[:-1]
            session = self._session = _Session(
                c.stub, pb.EdgeOpen(model=c.model, split=c.split, adapter_sha256=c.adapter_sha256, max_len=self.max_len), catch_up
            )
            self.stats.sessions += 1
            self.stats.states_sent += len(catch_up)
            self.stats.bytes_sent += sum(map(len, catch_up))
        return session
