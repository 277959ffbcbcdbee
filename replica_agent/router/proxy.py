"""Forwarding one client request to the replicas: retries before the first byte, streams relayed event by event.

An attempt that fails before anything reached the client (connection refused or timed out, a 5xx
or 429 answer, a stream that ends before its first event, a replica whose health check fails
while the attempt waits for its first byte: frozen, or cut off after it accepted the connection)
is retried on another replica, up to `max_attempts`. Once the first event of a stream went out, the request belongs to that replica:
if it dies or stalls, the client gets one error event in the route's dialect (TGI:
`{"error", "error_type": "incomplete_generation"}`, which `text_generation` raises; OpenAI:
`{"error": {...}}` then `[DONE]`, which the `openai` client raises) and the stream ends. Events are
relayed whole, so a replica that dies mid-event never leaves half an event at the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable
from typing import Literal, TypeVar

import aiohttp
from aiohttp import web

from ..serving import openai_schemas, schemas
from ..serving.pipeline import ADMIT_IN_HEADER, overload_headers
from .metrics import CLIENT_ERROR, CLIENT_GONE, OK, STREAM_BROKEN, UPSTREAM_ERROR

log = logging.getLogger(__name__)
T = TypeVar("T")

# The agent's client routes that the router forwards, as (method, path).
PROXIED_ROUTES: tuple[tuple[Literal["get", "post"], str], ...] = (
    *(("post", path) for path in ("/", "/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions")),
    ("get", "/info"),
    ("get", "/v1/models"),
)
REPLICA_HEADER = "x-collm-replica"  # which replica served the answer
AFFINITY_HEADER = "x-collm-affinity"  # the request's home replica (dispatch.py)
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "content-encoding",
}
_UPSTREAM_ERRORS = (aiohttp.ClientError, TimeoutError, OSError)
_TGI_ERROR_TYPES = {401: "unauthorized", 413: "validation", 429: "overloaded", 502: "upstream", 503: "unavailable"}
_OPENAI_ERROR_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded", 502: "upstream_failed", 503: "unavailable"}


class UpstreamFailed(Exception):
    """An attempt failed before anything was sent to the client; `status`/`body` keep a replica's own answer."""

    def __init__(self, message: str, *, status: int | None = None, body: bytes = b"", headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.body, self.headers = status, body, headers or {}


def dialect(path: str) -> str:
    return "openai" if path.startswith("/v1/") else "tgi"


def error_response(path: str, status: int, message: str, *, headers: dict | None = None) -> web.Response:
    """The router's own errors, in the dialect of the route the client called."""
    if dialect(path) == "openai":
        kind = "rate_limit_error" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"
        body = openai_schemas.error_body(message, type=kind, code=_OPENAI_ERROR_CODES.get(status))
    else:
        body = schemas.error_body(message, _TGI_ERROR_TYPES.get(status, "router"))
    return web.json_response(body, status=status, headers=headers)


def stream_error_event(path: str, message: str) -> bytes:
    if dialect(path) == "openai":
        return openai_schemas.sse(openai_schemas.error_body(message, type="server_error", code="replica_failed")) + openai_schemas.sse("[DONE]")
    return b"data:" + json.dumps(schemas.error_body(message, "incomplete_generation")).encode() + b"\n\n"


class EventReader:
    """Whole server-sent events from an upstream body; remembers whether the stream ended properly."""

    def __init__(self, content: aiohttp.StreamReader, path: str) -> None:
        self.content, self.openai = content, dialect(path) == "openai"
        self._buffer = b""
        self._last = b""

    async def read(self) -> bytes:
        """One or more complete events; b"" at the end of the body."""
        while True:
            chunk = await self.content.readany()
            if not chunk:
                tail, self._buffer = self._buffer, b""
                if tail.strip():
                    self._last = tail
                return tail
            self._buffer += chunk
            cut = self._buffer.rfind(b"\n\n")
            if cut >= 0:
                out, self._buffer = self._buffer[: cut + 2], self._buffer[cut + 2 :]
                self._last = out
                return out

    @property
    def complete(self) -> bool:
        """Whether the last event was a final one: `[DONE]` (OpenAI), or one with `generated_text` or `error` (TGI)."""
        events = [e for e in self._last.split(b"\n\n") if e.strip()]
        if not events:
            return False
        data = events[-1].strip().removeprefix(b"data:").strip()
        if self.openai:
            return data == b"[DONE]"
        try:
            event = json.loads(data)
        except ValueError:
            return False
        return isinstance(event, dict) and (event.get("generated_text") is not None or "error" in event)


async def forward(router, request: web.Request) -> web.StreamResponse:
    """Serve `request` from the first replica that answers; see the module docstring."""
    path = request.path
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return error_response(path, 413, f"the body is larger than {request.client_max_size} bytes")
    tried: list[str] = []
    failure: UpstreamFailed | None = None
    home = request.headers.get(AFFINITY_HEADER)
    while len(tried) < router.max_attempts:
        replica = router.pick(exclude=tried, home=home)
        if replica is None:
            break
        if tried:
            router.metrics.retries.labels(tried[-1]).inc()
        tried.append(replica.name)
        try:
            return await _attempt(router, replica, request, body)
        except UpstreamFailed as exc:
            failure = exc
            log.warning("%s %s: %s", request.method, path, exc)
    if failure is not None and failure.status is not None:  # every attempt got an error answer: pass the last one on
        if failure.status == 429:
            router.metrics.shed.inc()
        else:
            router.metrics.unserved.labels("upstream_error").inc()
        return web.Response(status=failure.status, body=failure.body, headers=failure.headers)
    if router.why_none(exclude=tried) == "saturated" and len(tried) < router.max_attempts:
        router.metrics.shed.inc()
        wait_s = router.admit_in_s(exclude=tried)
        headers = overload_headers(max(wait_s, router.retry_after_s))
        why = "would miss its TTFT SLO or is" if wait_s > 0 else "is"
        message = f"every replica {why} at its limit of {router.max_outstanding} outstanding requests; retry after {headers['Retry-After']} s"
        return error_response(path, 429, message, headers=headers)
    if failure is not None:
        router.metrics.unserved.labels("upstream_error").inc()
        return error_response(path, 502, f"no replica could serve the request ({len(tried)} tried); last error: {failure}")
    router.metrics.unserved.labels("no_replica").inc()
    return error_response(
        path, 503, "no replica is healthy and routable (see GET /admin/replicas); retry later", headers={"Retry-After": str(router.retry_after_s)}
    )


async def _attempt(router, replica, request: web.Request, body: bytes) -> web.StreamResponse:
    metrics, name = router.metrics, replica.name
    replica.outstanding += 1
    started = time.monotonic()
    outcome = UPSTREAM_ERROR
    try:
        try:
            upstream = await _unless_down(
                replica, router.session.request(request.method, replica.url + request.path_qs, data=body or None, headers=_request_headers(request))
            )
        except _UPSTREAM_ERRORS as exc:
            router.suspect(replica, f"cannot connect: {_describe(exc)}")
            raise UpstreamFailed(f"cannot reach replica {name}: {_describe(exc)}") from None
        async with upstream:
            headers = _response_headers(upstream, name)
            if upstream.status == 429:
                router.back_off(replica, upstream.headers.get(ADMIT_IN_HEADER))
            if upstream.status >= 500 or upstream.status == 429:
                try:
                    data = await upstream.read()
                except _UPSTREAM_ERRORS:
                    data = b""
                raise UpstreamFailed(
                    f"replica {name} answered {upstream.status}: {data[:200].decode(errors='replace')}", status=upstream.status, body=data, headers=headers
                )
            streaming = upstream.content_type == "text/event-stream"
            reader = EventReader(upstream.content, request.path) if streaming else None
            try:
                first = await _unless_down(replica, reader.read() if reader else upstream.read())
            except _UPSTREAM_ERRORS as exc:
                raise UpstreamFailed(f"replica {name} failed before its first byte: {_describe(exc)}") from None
            metrics.first_byte.labels(name).observe(time.monotonic() - started)
            if reader is None:
                outcome = OK if upstream.status < 400 else CLIENT_ERROR
                return web.Response(status=upstream.status, body=first, headers=headers)
            if not first:
                raise UpstreamFailed(f"replica {name} ended the stream before its first event")
            outcome = CLIENT_GONE
            response = web.StreamResponse(status=upstream.status, headers=headers)
            try:
                await response.prepare(request)
                await response.write(first)
                outcome = await _relay(router, reader, response, name, request.path)
            except ConnectionResetError:  # leaving closes the upstream connection, which cancels the replica's work
                log.debug("client of %s went away mid-stream", request.path)
            return response
    except asyncio.CancelledError:  # the client went away (handler cancellation)
        outcome = CLIENT_GONE
        raise
    finally:
        replica.outstanding -= 1
        metrics.requests.labels(name, outcome).inc()
        metrics.latency.labels(name).observe(time.monotonic() - started)


async def _unless_down(replica, awaitable: Awaitable[T]) -> T:
    """`awaitable`'s result, or UpstreamFailed as soon as the replica fails a health check meanwhile
    (a frozen replica accepts connections and answers nothing; the first-byte timeout is long)."""
    if replica.down.is_set():
        raise UpstreamFailed(f"replica {replica.name} is failing its health check")
    work = asyncio.ensure_future(awaitable)
    down = asyncio.ensure_future(replica.down.wait())
    try:
        done, _ = await asyncio.wait({work, down}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the client went away
        work.cancel()
        raise
    finally:
        down.cancel()
    if work in done:
        return work.result()
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError, *_UPSTREAM_ERRORS):
        late = await work  # it may have completed while being cancelled
        if isinstance(late, aiohttp.ClientResponse):
            late.release()
    raise UpstreamFailed(f"replica {replica.name} failed its health check before its first byte ({replica.last_error})")


async def _relay(router, reader: EventReader, response: web.StreamResponse, name: str, path: str) -> str:
    """Pass the rest of a stream on; a replica that fails or stalls ends it with an error event."""
    idle = router.stream_idle_timeout_s
    while True:
        try:
            events = await asyncio.wait_for(reader.read(), idle)
        except TimeoutError:
            problem = f"replica {name} sent nothing for {idle:g} s"
        except _UPSTREAM_ERRORS as exc:
            problem = f"replica {name} failed mid-stream ({_describe(exc)})"
        else:
            if events:
                await response.write(events)
                continue
            if reader.complete:
                await response.write_eof()
                return OK
            problem = f"replica {name} ended the stream before its final event"
        log.warning("%s: %s", path, problem)
        await response.write(stream_error_event(path, f"{problem}; the output is incomplete, retry the request"))
        await response.write_eof()
        return STREAM_BROKEN


def _request_headers(request: web.Request) -> dict[str, str]:
    return {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}


def _response_headers(upstream: aiohttp.ClientResponse, name: str) -> dict[str, str]:
    headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP | {"date", "server"}}
    headers[REPLICA_HEADER] = name
    return headers


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
