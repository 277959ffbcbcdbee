"""Replaying a slice of an Azure LLM trace against the router over HTTP, measured at the client.

The slice keeps the trace's arrival pattern (bursts and gaps) and its request sizes: the first
`rate x duration` requests from `offset`, their timestamps stretched or squeezed to span
`duration` seconds (so the mean rate is `rate`), prompt and output lengths scaled down as in
`replica_agent.traces.trace_shapes`. Each request streams from the router's /generate_stream;
TTFT and mean TPOT are measured here, at the client, and the final event names the replica
(header `x-collm-replica`) and the adapter version that served it.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from ..traces import CODE_TRACE, CONV_TRACE, RequestShape, load_arrivals, trace_shapes

TRACES = {"conv": CONV_TRACE, "code": CODE_TRACE}


@dataclass(frozen=True)
class Arrival:
    at_s: float  # seconds from the start of the replay
    shape: RequestShape


def trace_slice(trace: str, *, rate: float, duration_s: float, offset: int = 0, max_output: int = 32) -> list[Arrival]:
    """`rate x duration_s` consecutive requests of the trace from `offset`, rescaled to span `duration_s`."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError("rate and duration_s must be positive")
    path = Path(TRACES.get(trace, trace))
    count = max(1, round(rate * duration_s))
    if path.exists():
        times = load_arrivals(str(path))[offset : offset + count]
        shapes = trace_shapes(path, max_output=max_output, limit=offset + count)[offset:]
    else:  # no trace beside the checkout: Poisson arrivals and a fixed size mix
        rng = random.Random(offset)
        t, times = 0.0, []
        for _ in range(count):
            times.append(t)
            t += rng.expovariate(rate)
        shapes = trace_shapes(None)
    span = (times[-1] - times[0]) if len(times) > 1 else 0.0
    # Stretch so that the last arrival lands one mean gap before the end.
    scale = (duration_s * (1 - 1 / count)) / span if span > 0 else 0.0
    return [Arrival((t - times[0]) * scale, shapes[i % len(shapes)]) for i, t in enumerate(times)]


def prompt_texts(count: int = 64, seed: int = 0) -> list[str]:
    """Python source text that no replica trains on (`collections`), cut at random places."""
    import collections

    source = Path(collections.__file__).read_text()
    rng = random.Random(seed)
    return [source[i:] for i in (rng.randrange(0, len(source) - 4096) for _ in range(count))]


@dataclass
class RequestRecord:
    sent_s: float  # seconds from the start of the replay
    ttft_ms: float
    tpot_ms: float
    tokens: int
    ok: bool
    met: bool
    replica: str = ""
    adapter_version: int = 0
    error: str = ""


@dataclass
class TrafficReplay:
    """Sends the arrivals through `url` (the router) on a thread of its own; `records` fill as answers end."""

    url: str
    arrivals: list[Arrival]
    ttft_ms: float
    tpot_ms: float
    records: list[RequestRecord] = field(default_factory=list)
    sent: int = 0
    started_at: float = 0.0

    def __post_init__(self) -> None:
        self.prompts = prompt_texts()
        self.done = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._replay()), name="collm-traffic", daemon=True)

    def start(self) -> "TrafficReplay":
        self.started_at = time.time()
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    async def _replay(self) -> None:
        try:
            timeout = aiohttp.ClientTimeout(total=300)
            async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
                start = time.perf_counter()
                tasks = []
                for i, arrival in enumerate(self.arrivals):
                    delay = start + arrival.at_s - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    prompt = self.prompts[i % len(self.prompts)][: arrival.shape.prompt_tokens]
                    tasks.append(asyncio.create_task(self._one(session, prompt, arrival.shape.output_tokens, time.perf_counter() - start)))
                    self.sent += 1
                await asyncio.gather(*tasks)
        finally:
            self.done.set()

    async def _one(self, session: aiohttp.ClientSession, prompt: str, max_new_tokens: int, sent_s: float) -> None:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens}}
        started = time.perf_counter()
        first = None
        tokens, replica, version, error = 0, "", 0, ""
        try:
            async with session.post(self.url + "/generate_stream", json=body) as resp:
                replica = resp.headers.get("x-collm-replica", "")
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
                            version = int(event.get("adapter_version") or 0)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        end = time.perf_counter()
        ok = not error and tokens > 0
        ttft = ((first or end) - started) * 1000
        tpot = (end - first) * 1000 / (tokens - 1) if ok and tokens > 1 else 0.0
        met = ok and ttft <= self.ttft_ms and tpot <= self.tpot_ms
        self.records.append(RequestRecord(sent_s, ttft, tpot, tokens, ok, met, replica, version, error))
