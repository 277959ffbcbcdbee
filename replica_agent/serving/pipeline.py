"""What the agent's two HTTP dialects share: reading a JSON body, the generation headers, and
writing a stream of events as server-sent events.

TGI (http_api.py) and OpenAI (openai_api.py) differ in their request schemas, their frames and
their error bodies; each passes its own frames and its own error type here, so neither imports the
other. The wire formats themselves (schemas.py, openai_schemas.py) are shared with the router.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from ..engine.requests import FinalEvent, TokenEvent

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # the least a 429 tells the client to wait, in both dialects
ADMIT_IN_HEADER = "x-collm-admit-in-ms"  # on a 429: when the replica expects to admit a request like it (the router backs off that long)

ADAPTER_HEADER = "x-collm-adapter-version"  # "<cluster version>.<local revision>", e.g. 7.3
ADAPTER_SHA_HEADER = "x-collm-adapter-sha256"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

BodyError = Callable[[int, str], Exception]  # (HTTP status, message) -> the dialect's exception


async def read_json(request: web.Request, *, example: str, error: BodyError) -> Any:
    """The request's JSON body; `error(status, message)` for a body that is too large, empty or not JSON."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:  # aiohttp's exception does not keep the limit: the request does
        raise error(413, f"the body is larger than {request.client_max_size} bytes") from None
    if not raw.strip():
        raise error(400, f"the body is empty; send JSON like {example}")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise error(400, f"the body is not valid JSON ({exc}); send JSON like {example}") from None
    except RecursionError:
        raise error(400, f"the body nests JSON deeper than this server reads; send JSON like {example}") from None
    try:  # JSON may escape a lone UTF-16 surrogate ("\ud800"), which no tokenizer can encode
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise error(400, "the body has a lone surrogate escape (such as \\ud800) in a string: send valid Unicode text") from None
    return body


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def overload_headers(retry_after_s: float) -> dict[str, str]:
    """A 429's headers: Retry-After in whole seconds (at least RETRY_AFTER_S) and the precise wait in ms."""
    return {"Retry-After": str(max(RETRY_AFTER_S, math.ceil(retry_after_s))), ADMIT_IN_HEADER: str(max(0, round(retry_after_s * 1000)))}


def generation_headers(final: FinalEvent) -> dict[str, str]:
    """The headers of a finished generation: token counts, timings, and the adapter that served it."""
    headers = {"x-prompt-tokens": str(final.prompt_tokens), "x-generated-tokens": str(final.generated_tokens)}
    if final.adapter_version is not None:
        headers[ADAPTER_HEADER] = final.adapter_version
        headers[ADAPTER_SHA_HEADER] = final.adapter_sha256 or ""
    if final.queue_s is not None:
        headers["x-queue-time"] = str(int(final.queue_s * 1000))
    if final.tpot_s is not None:
        headers["x-time-per-token"] = str(int(final.tpot_s * 1000))
    return headers


async def stream_events(
    request: web.Request,
    events: AsyncIterator[TokenEvent | FinalEvent],
    first: TokenEvent | FinalEvent,
    frames: Callable[[TokenEvent | FinalEvent], Sequence[Any]],
    encode: Callable[[Any], bytes],
    *,
    opening: Sequence[Any] = (),
    closing: bytes = b"",
) -> web.StreamResponse:
    """Write `opening`, then each event's frames, then `closing`, as server-sent events until the
    final event. A client that goes away ends the stream quietly (the caller cancels the request)."""
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    pending, event = list(opening), first
    try:
        while True:
            pending += frames(event)
            if pending:
                await response.write(b"".join(encode(f) for f in pending))
                pending = []
            if isinstance(event, FinalEvent):
                break
            event = await anext(events)
        if closing:
            await response.write(closing)
        await response.write_eof()
    except ConnectionResetError:
        log.debug("client of %s disconnected mid-stream", request.path)
    return response


# -- admin routes ----------------------------------------------------------------------------------
# Routes that change what a replica serves or where the router sends requests (/publish, /feedback,
# the router's /admin/*) take a bearer token read from a file (a Secret mounted by the operator).


def read_token(path: str | None) -> str | None:
    """The token in `path` (surrounding whitespace dropped); None when no path is given."""
    if not path:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read the admin token file {path}: {exc.strerror}") from None
    if len(token) < 16:
        raise ValueError(f"the admin token in {path} is {len(token)} characters long; use at least 16 random ones")
    return token


def bearer_matches(request: web.Request, token: str) -> bool:
    """True when the request carries `Authorization: Bearer <token>` (compared in constant time)."""
    return bearer_in(request, (token,))


def bearer_in(request: web.Request, tokens: Iterable[str]) -> bool:
    """True when the request's bearer token is one of `tokens` (each compared in constant time, all of them)."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    sent = given.strip().encode()
    return any([hmac.compare_digest(sent, t.encode()) for t in tokens])  # a list: no early exit


def admin_refusal(path: str) -> str:
    """What a request to an admin route without the token is told (agent and router alike)."""
    return f"{path} is an admin route: send Authorization: Bearer <the cluster's admin token>"


def admin_warning(what: str) -> None:
    log.warning("%s: admin routes need no token (no admin token file given); anyone who reaches the port may use them. Development only.", what)
