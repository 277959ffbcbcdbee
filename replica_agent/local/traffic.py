"""Replaying a slice of an Azure LLM trace against the router over HTTP, measured at the client.

The slice keeps the trace's arrival pattern (bursts and gaps) and its request sizes: the first
`rate x duration` requests from `offset`, their timestamps stretched or squeezed to span
`duration` seconds (so the mean rate is `rate`), prompt and output lengths scaled down as in
`replica_agent.traces.trace_shapes`. The text of each request comes from workload.py (a held-out
window of one replica's domain). Each request streams from the router's /generate_stream with its
home replica in `x-collm-affinity`; TTFT and mean TPOT are measured here, at the client, and the
final event names the replica (header `x-collm-replica`) and the adapter version and sha256 that
served it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from ..router.proxy import AFFINITY_HEADER
from ..traces import CODE_TRACE, CONV_TRACE, RequestShape, load_arrivals, trace_path, trace_shapes

if TYPE_CHECKING:
    from .workload import Workload

TRACES = {"conv": CONV_TRACE, "code": CODE_TRACE}


@dataclass(frozen=True)
class Arrival:
    at_s: float  # seconds from the start of the replay
    shape: RequestShape


def trace_segment(trace: str, *, count: int, offset: int = 0, max_output: int = 32) -> list[Arrival]:
    """`count` consecutive requests of the trace from `offset`, at the trace's own times (from 0)."""
    if count < 1:
        raise ValueError("count must be >= 1")
    path = trace_file(trace)
    times = load_arrivals(str(path))[offset : offset + count]
    shapes = trace_shapes(path, max_output=max_output, limit=offset + count)[offset:]
    return [Arrival(t - times[0], shapes[i]) for i, t in enumerate(times)]


def at_rate(arrivals: list[Arrival], rate: float) -> list[Arrival]:
    """The same requests, time stretched or squeezed to a mean rate of `rate` req/s: bursts and gaps
    keep their shape (the last arrival lands one mean gap before `len / rate` seconds)."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    count = len(arrivals)
    span = arrivals[-1].at_s - arrivals[0].at_s if count > 1 else 0.0
    scale = (count / rate * (1 - 1 / count)) / span if span > 0 else 0.0
    return [Arrival((a.at_s - arrivals[0].at_s) * scale, a.shape) for a in arrivals]


def trace_slice(trace: str, *, rate: float, duration_s: float, offset: int = 0, max_output: int = 32) -> list[Arrival]:
    """`rate x duration_s` consecutive requests of the trace from `offset`, rescaled to span `duration_s`."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError("rate and duration_s must be positive")
    return at_rate(trace_segment(trace, count=max(1, round(rate * duration_s)), offset=offset, max_output=max_output), rate)


def trace_file(trace: str) -> Path:
    """The file a trace name ("code", "conv") or path reads; a clear error when it is missing."""
    return trace_path(TRACES.get(trace, trace))


@dataclass
class RequestRecord:
    index: int  # the request's position in the workload
    sent_s: float  # seconds from the start of the replay
    ttft_ms: float
    tpot_ms: float
    tokens: int
    ok: bool
    met: bool
    replica: str = ""
    adapter_version: str = ""  # "<cluster version>.<local revision>"
    adapter_sha256: str = ""
    error: str = ""
    status: int = 0  # the HTTP status (0: no answer: connection failed or the request timed out)


@dataclass
class TrafficReplay:
    """Sends the workload through `url` (the router) on a thread of its own; `records` fill as answers end."""

    url: str
    workload: Workload
    ttft_ms: float
    tpot_ms: float
    records: list[RequestRecord] = field(default_factory=list)
    sent: int = 0
    started_at: float = 0.0
    timeout_s: float = 300.0  # a request without its final event by then ends as an error (a hang)

    def __post_init__(self) -> None:
        self.done = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._replay()), name="collm-traffic", daemon=True)

    @property
    def arrivals(self) -> list[Arrival]:
        return self.workload.arrivals

    def start(self) -> TrafficReplay:
        self.started_at = time.time()
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    async def _replay(self) -> None:
        try:
            timeout = aiohttp.ClientTimeout(total=self.timeout_s)
            async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
                start = time.perf_counter()
                tasks = []
                for i, (arrival, request) in enumerate(zip(self.workload.arrivals, self.workload.requests)):
                    delay = start + arrival.at_s - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.create_task(self._one(session, i, request, time.perf_counter() - start)))
                    self.sent += 1
                await asyncio.gather(*tasks)
        finally:
            self.done.set()

    async def _one(self, session: aiohttp.ClientSession, index: int, request, sent_s: float) -> None:
        body = {"inputs": request.prompt, "parameters": {"max_new_tokens": request.max_new_tokens}}
        started = time.perf_counter()
        first = None
        tokens, replica, version, sha, error, status, final = 0, "", "", "", "", 0, False
        try:
            async with session.post(self.url + "/generate_stream", json=body, headers={AFFINITY_HEADER: request.domain}) as resp:
                replica, status = resp.headers.get("x-collm-replica", ""), resp.status
                if resp.status != 200:
                    error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                else:
                    async for line in resp.content:
                        if not line.startswith(b"data:"):
                            continue
                        event = json.loads(line[5:])
                        if "error" in event:
                            error = str(event["error"])
                            break
                        if event.get("token") is not None:
                            tokens += 1
                            first = first or time.perf_counter()
                        if event.get("generated_text") is not None or event.get("details") is not None:
                            final = True
                            version, sha = str(event.get("adapter_version") or ""), str(event.get("adapter_sha256") or "")
                    if not error and not final:
                        error = "the stream ended without its final event"
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        end = time.perf_counter()
        ok = not error and tokens > 0
        ttft = ((first or end) - started) * 1000
        tpot = (end - first) * 1000 / (tokens - 1) if ok and tokens > 1 else 0.0
        met = ok and ttft <= self.ttft_ms and tpot <= self.tpot_ms
        self.records.append(RequestRecord(index, sent_s, ttft, tpot, tokens, ok, met, replica, version, sha, error, status))
