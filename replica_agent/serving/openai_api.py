"""OpenAI-compatible routes of the agent, so that the official `openai` client works unchanged.

    POST /v1/completions        prompt: a string (or a list of one string)
    POST /v1/chat/completions   messages, rendered with the model's chat template
    GET  /v1/models             the base model ("tiny") and the live adapter versions ("tiny@7.3")

A request's `model` may name the base model or any `<base>@<version>`; either way it is served by the
adapter version current at admission (pinning a version per request is not offered), and the answer
says which one: `system_fingerprint` "collm-adapter-<version>" (the final chunk of a stream) and the
`x-collm-adapter-version` header of non-streaming answers. Other model ids get 404.

OpenAI's semantics where they differ from TGI's: `temperature` defaults to 1 (sampling; 0 is
greedy), a matched stop sequence is left out of the text, `finish_reason` is "stop" or "length".
Parameters this server cannot honour (n > 1, logprobs, echo, best_of, penalties, logit_bias, tools,
response formats other than text) are accepted only at their "off" values; unknown non-null
fields are rejected. Errors have OpenAI's body `{"error": {"message", "type", "param", "code"}}`.
The wire format (parsing, bodies, chunks, errors) is in openai_schemas.py, shared with the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiohttp import web

from ..engine.requests import FinalEvent
from .openai_schemas import (
    ENCODE_IN_THREAD_CHARS,
    OpenAIError,
    OpenAIRequest,
    ResponseBuilder,
    error_body,
    models_body,
    parse_openai_request,
    resolve_model,
    sampling_params,
    sse,
)
from .pipeline import RETRY_AFTER_S, generation_headers, overload_headers, read_json, stream_events

log = logging.getLogger(__name__)


# -- aiohttp handlers --------------------------------------------------------------------------
@web.middleware
async def _openai_errors(request: web.Request, handler):
    if not request.path.startswith("/v1/"):
        return await handler(request)
    try:
        return await handler(request)
    except OpenAIError as exc:
        return web.json_response(exc.body(), status=exc.status, headers=exc.headers or ({"Retry-After": str(RETRY_AFTER_S)} if exc.status == 429 else None))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return web.json_response(error_body(f"{exc.reason}: {request.method} {request.path}"), status=exc.status)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:  # a bug: log it loudly, answer in OpenAI's shape
        log.exception("unhandled error in %s %s", request.method, request.path)
        return web.json_response(error_body(f"internal error: {exc}", type="server_error"), status=500)


class OpenAIRoutes:
    def __init__(self, api) -> None:
        self.api, self.engine, self.agent = api, api.engine, api.agent

    async def models(self, _request: web.Request) -> web.Response:
        store = self.agent.store
        versions = [(v.label, v.created_at) for n in sorted(store.live_versions()) if (v := _version(store, n))]
        return web.json_response(models_body(self.agent.base.name, versions, int(self.agent.started_at)))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        from ..engine.engine import QueueFull, RequestRejected  # torch lives there; the wire format above stays torch-free

        try:
            req = parse_openai_request(await _read_json(request), chat=chat)
            resolve_model(req.model, self.agent.base.name)
            ids = await self._encode(req)
            params = sampling_params(req, len(ids), self.engine.settings.max_total_tokens)
        except OpenAIError as exc:
            self.api.metrics.reject("validation" if exc.status == 400 else "not_found")
            raise
        builder = ResponseBuilder(req, self.agent.base.name)
        events = self.engine.stream(ids, params)
        async with contextlib.aclosing(events):
            try:
                first = await anext(events)
            except QueueFull as exc:
                self.api.metrics.reject("overloaded")
                raise OpenAIError(429, str(exc), type="rate_limit_error", code="rate_limit_exceeded", headers=overload_headers(exc.retry_after_s)) from None
            except RequestRejected as exc:  # the engine is not running
                self.api.metrics.reject("unavailable")
                raise OpenAIError(503, f"{exc}; retry on another replica", type="server_error", code="unavailable") from None
            # A request that fails before its first token gets a 5xx, not a stream: a router can still retry it.
            if req.stream and (not isinstance(first, FinalEvent) or first.ok):
                return await _stream(request, events, first, builder)
            final = first
            while not isinstance(final, FinalEvent):
                final = await anext(events)
        if not final.ok:
            raise OpenAIError(500, final.error or f"the request ended early ({final.finish_reason.value})", type="server_error", code="generation_failed")
        return web.json_response(builder.body(final), headers=generation_headers(final))

    async def _encode(self, req: OpenAIRequest) -> list[int]:
        size = sum(len(m["content"]) for m in req.messages) if req.chat else len(req.prompt)
        encode = (lambda: self._chat_ids(req.messages)) if req.chat else (lambda: self.engine.encode(req.prompt))
        return await asyncio.to_thread(encode) if size > ENCODE_IN_THREAD_CHARS else encode()

    def _chat_ids(self, messages: tuple[dict, ...]) -> list[int]:
        tokenizer = self.engine.tokenizer
        try:
            text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # no template, or the template rejects these messages (e.g. role order)
            raise OpenAIError(
                400, f"the model's chat template cannot render these messages ({exc}); use /v1/completions with a plain prompt", param="messages"
            ) from None
        ids = tokenizer.encode(text, add_special_tokens=False)
        # Add BOS when the model expects one (engine.encode adds it) and the template did not write it.
        bos = self.engine.bos_token_id
        if bos is not None and self.engine.encode("x")[:1] == [bos] and ids[:1] != [bos]:
            ids = [bos, *ids]
        return ids


def _version(store, number: int):
    with contextlib.suppress(KeyError):  # pruned since live_versions() was read
        return store.get(number)
    return None


async def _read_json(request: web.Request) -> Any:
    return await read_json(request, example='{"model": "...", "prompt": "..."}', error=lambda status, message: OpenAIError(status, message))


async def _stream(request: web.Request, events, first, builder: ResponseBuilder) -> web.StreamResponse:
    def frames(event):
        return builder.final(event) if isinstance(event, FinalEvent) else builder.token(event)

    return await stream_events(request, events, first, frames, sse, opening=builder.start(), closing=sse("[DONE]"))


def add_routes(app: web.Application, api) -> None:
    """Register the /v1 routes on the agent's application (`api` is its HttpApi)."""
    routes = OpenAIRoutes(api)
    app.middlewares.append(_openai_errors)
    app.add_routes(
        [
            web.post("/v1/completions", routes.completions),
            web.post("/v1/chat/completions", routes.chat_completions),
            web.get("/v1/models", routes.models),
        ]
    )
