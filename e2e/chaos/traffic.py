"""Streaming traffic through the router, and how each request ended as its client saw it.

`classify` is pure: it reads what one client received (HTTP status, body, the stream's events, why
reading stopped) and names the outcome:
- completed: a final event (`generated_text`) whose `details.generated_tokens` matches the token
  events received, with a known finish reason and the adapter that served it;
- error_event: the stream carried an explicit error event (`{"error": ...}`), e.g. the router's
  "the output is incomplete" after a replica failed mid-stream;
- refused: no stream, an HTTP error answer with an error message (429, 502, 503);
- lost: anything else: a stream that ended without a final or error event, no event for `idle_s` or
  no end within `deadline_s` (a hang), a final event that claims more or fewer tokens than were
  streamed (silent truncation), an answer without an error message, no answer at all.

`Traffic` runs `concurrency` clients in a loop on an event loop of its own (a thread), each sending
one `/generate_stream` request at a time, and keeps every request's record. The first client asks
for `long_tokens` tokens (about a second of streaming on the tiny model), the others for
`max_new_tokens`: a fault can then hit a stream in its middle, not only between short ones.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

COMPLETED, ERROR_EVENT, REFUSED, LOST = "completed", "error_event", "refused", "lost"
OUTCOMES = (COMPLETED, ERROR_EVENT, REFUSED, LOST)
FINISH_REASONS = {"length", "eos_token", "stop_sequence"}
REPLICA_HEADER = "x-collm-replica"
PROMPTS = (
    "The Python language reference describes",
    "def parse_arguments(argv):",
    "A context manager is",
    "Exceptions are raised when",
    "import json\n\ndef load(path):",
    "The with statement",
)


@dataclass
class RequestRecord:
    started: float  # unix seconds
    ended: float = 0.0
    outcome: str = ""
    detail: str = ""
    replica: str = ""  # the router's x-collm-replica: who served (or failed) the stream
    status: int | None = None
    tokens: int = 0  # token events received before the end (or before the error event)
    adapter_version: str = ""  # "<cluster version>.<local revision>" of the final event
    adapter_sha256: str = ""


def classify(status: int | None, body: bytes, events: list[dict], end: str) -> tuple[str, str, int]:
    """(outcome, detail, tokens before the end) of one request; see the module docstring.
    `end` says why reading stopped: "eof", or the timeout or connection error."""
    if status is None:
        return LOST, f"no answer from the router ({end})", 0
    if status != 200:
        try:
            message = json.loads(body).get("error")
        except (ValueError, AttributeError):
            message = None
        if isinstance(message, dict):  # OpenAI's shape
            message = message.get("message")
        if message:
            return REFUSED, f"HTTP {status}: {str(message)[:160]}", 0
        return LOST, f"HTTP {status} without an error message: {body[:80]!r}", 0
    tokens = 0
    for event in events:
        if "error" in event:
            return ERROR_EVENT, str(event["error"])[:240], tokens
        if "token" in event:
            tokens += 1
        if event.get("generated_text") is not None:
            details = event.get("details") or {}
            claimed, reason = details.get("generated_tokens"), details.get("finish_reason")
            if claimed != tokens:
                return LOST, f"the final event claims {claimed} tokens, {tokens} were streamed", tokens
            if reason not in FINISH_REASONS:
                return LOST, f"the final event has finish reason {reason!r}", tokens
            if not event.get("adapter_version") or not event.get("adapter_sha256"):
                return LOST, "the final event names no adapter version", tokens
            return COMPLETED, "", tokens
        if "token" not in event:
            return LOST, f"an event that is no token, final or error: {str(event)[:80]}", tokens
    return LOST, f"the stream ended without a final or error event after {tokens} tokens ({end})", tokens


def final_adapter(events: list[dict]) -> tuple[str, str]:
    for event in events:
        if event.get("generated_text") is not None:
            return str(event.get("adapter_version") or ""), str(event.get("adapter_sha256") or "")
    return "", ""


@dataclass
class InFlight:
    started: float
    max_new_tokens: int
    replica: str = ""
    tokens: int = 0


@dataclass
class Traffic:
    """`base_url()` gives the router's address (http://ip:port), asked again after a connection error."""

    base_url: Callable[[], str]
    concurrency: int = 3
    max_new_tokens: int = 24
    long_tokens: int = 200
    idle_s: float = 90.0
    deadline_s: float = 150.0
    think_s: float = 0.2
    records: list[RequestRecord] = field(default_factory=list)
    in_flight: dict[int, InFlight] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._ids = 0

    def start(self) -> Traffic:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="chaos-traffic", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sending; requests in flight finish (or reach their deadline) first."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.deadline_s + 30)

    def snapshot(self) -> list[RequestRecord]:
        with self._lock:
            return list(self.records)

    def open_streams(self) -> list[InFlight]:
        with self._lock:
            return [InFlight(f.started, f.max_new_tokens, f.replica, f.tokens) for f in self.in_flight.values()]

    async def _main(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            await asyncio.gather(*(self._client(session, i) for i in range(self.concurrency)))

    async def _client(self, session: aiohttp.ClientSession, index: int) -> None:
        n, tokens = index, self.long_tokens if index == 0 else self.max_new_tokens
        while not self._stop.is_set():
            record = await self._one(session, PROMPTS[n % len(PROMPTS)], tokens)
            with self._lock:
                self.records.append(record)
            n += self.concurrency
            await asyncio.sleep(self.think_s)

    async def _one(self, session: aiohttp.ClientSession, prompt: str, max_new_tokens: int) -> RequestRecord:
        with self._lock:
            self._ids += 1
            key = self._ids
            flight = self.in_flight[key] = InFlight(time.time(), max_new_tokens)
        record = RequestRecord(started=flight.started)
        status: int | None = None
        body, events, end = b"", [], "eof"
        payload = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "details": True}}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=self.idle_s)
        try:
            async with asyncio.timeout(self.deadline_s):
                async with session.post(self.base_url() + "/generate_stream", json=payload, timeout=timeout) as resp:
                    status, flight.replica = resp.status, resp.headers.get(REPLICA_HEADER, "")
                    if status != 200 or resp.content_type != "text/event-stream":
                        body = await resp.read()
                    else:
                        async for line in resp.content:
                            event = _parse(line)
                            if event is None:
                                continue
                            events.append(event)
                            flight.tokens += "token" in event
                            if "error" in event or event.get("generated_text") is not None:
                                break
        except TimeoutError as exc:  # aiohttp's read timeout is one too
            end = f"no end within {self.deadline_s:g} s" if not isinstance(exc, aiohttp.ServerTimeoutError) else f"no event for {self.idle_s:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            end = f"connection: {type(exc).__name__}: {exc}"
        finally:
            with self._lock:
                self.in_flight.pop(key, None)
        record.ended, record.status, record.replica = time.time(), status, flight.replica
        record.outcome, record.detail, record.tokens = classify(status, body, events, end)
        record.adapter_version, record.adapter_sha256 = final_adapter(events)
        return record


def _parse(line: bytes) -> dict | None:
    line = line.strip()
    if not line.startswith(b"data:"):
        return None
    try:
        event = json.loads(line[5:])
    except ValueError:
        return {"unparseable": line[:80].decode(errors="replace")}
    return event if isinstance(event, dict) else {"unparseable": str(event)[:80]}
