"""The agent's HTTP API: TGI's routes, so that `text_generation.Client` works unchanged, plus control routes.

    POST /generate, /generate_stream, /   generation (TGI; `/` dispatches on "stream" and wraps the
                                          non-streaming answer in a list, as TGI does)
    GET  /info, /health, /metrics, /stats model and adapter, liveness, Prometheus, agent.stats()
    POST /publish                         publish the shadow adapter now
    POST /feedback                        append {"prompt", "completion"} to the local data (opt-in)
    /v1/completions, /v1/chat/completions, /v1/models   OpenAI's API (openai_api.py)
    GET  /openapi.json, /docs             this API's OpenAPI document and a page of it (openapi.py)

Errors have TGI's body `{"error": ..., "error_type": ...}`: validation 422 (413 for a body over
the size limit), overloaded 429, generation 424, engine not running 503. In a stream, a failure
after the first token is a `data:` event with that body, which the TGI client raises.
Every answer to a generation says which adapter version served it, as `<cluster version>.<local
revision>` (e.g. `7.3`) and sha256: the `x-collm-adapter-version` and `x-collm-adapter-sha256`
headers of /generate, and `adapter_version` and `adapter_sha256` in the final stream event (top
level and `details`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from .. import __version__
from ..engine.data import DataError, append_feedback
from ..engine.engine import QueueFull, RequestRejected
from ..engine.model_host import dtype_name
from ..engine.requests import FinalEvent
from . import openai_api, openapi
from .metrics import AgentMetrics
from .pipeline import RETRY_AFTER_S, admin_refusal, admin_warning, bearer_matches, generation_headers, overload_headers, read_json, read_token, stream_events
from .schemas import (
    MAX_STOP_SEQUENCES,
    GenerateRequest,
    InvalidRequest,
    StreamFramer,
    error_body,
    generate_body,
    parse_generate_request,
    prompt_ids,
    sampling_params,
)

log = logging.getLogger(__name__)

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
HEALTH_STALE_S = 5.0  # an engine that has not finished an iteration for this long is unhealthy
SHUTDOWN_TIMEOUT_S = 30.0  # in-flight requests get this long to finish on SIGTERM
ENCODE_IN_THREAD_CHARS = 4096  # tokenize longer prompts off the event loop
API_KEY: web.AppKey[HttpApi] = web.AppKey("collm_api")


class ApiError(Exception):
    """An answer other than 200, with TGI's error body."""

    def __init__(self, status: int, message: str, error_type: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.error_type, self.headers = status, message, error_type, headers


class HttpApi:
    def __init__(self, agent, metrics: AgentMetrics) -> None:
        self.agent, self.metrics = agent, metrics
        self.admin_token = read_token(agent.config.admin_token_file)
        if self.admin_token is None:
            admin_warning(f"agent {agent.config.replica_id}")
        self.engine = agent.engine
        self.draining = False
        self._last_iteration = time.monotonic()
        self.engine.observers.append(self._observe)

    def _check_admin(self, request: web.Request) -> None:
        if self.admin_token is not None and not bearer_matches(request, self.admin_token):
            raise ApiError(401, admin_refusal(request.path), "unauthorized")

    def _observe(self, kind: str, _payload) -> None:
        if kind == "iteration":
            self._last_iteration = time.monotonic()

    # -- generation ---------------------------------------------------------------------------
    async def generate(self, request: web.Request) -> web.StreamResponse:
        return await self._dispatch(request, stream=False)

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        return await self._dispatch(request, stream=True)

    async def compat(self, request: web.Request) -> web.StreamResponse:
        return await self._dispatch(request, stream=None, as_list=True)

    async def _dispatch(self, request: web.Request, *, stream: bool | None, as_list: bool = False) -> web.StreamResponse:
        req = parse_generate_request(await _read_json(request), stream=stream)
        ids = await self._encode(req)
        params = sampling_params(req.params, len(ids), self.engine.settings.max_total_tokens)
        try:
            self.engine.check(ids, params)
        except RequestRejected as exc:
            raise InvalidRequest(str(exc)) from None
        events = self.engine.stream(ids, params, decoder_input_details=req.params.decoder_input_details)
        # aclosing: however the handler ends (client gone, write failed), the engine request is cancelled.
        async with contextlib.aclosing(events):
            try:
                first = await anext(events)
            except QueueFull as exc:
                raise ApiError(429, str(exc), "overloaded", overload_headers(exc.retry_after_s)) from None
            except RequestRejected as exc:  # passed check(), so the engine is not running
                raise ApiError(503, f"{exc}; retry on another replica", "unavailable") from None
            prefix = req.inputs if req.params.return_full_text else ""
            if req.stream:
                framer = StreamFramer(details=req.params.details, prefix=prefix)
                return await _stream(request, events, first, framer)
            final = first
            while not isinstance(final, FinalEvent):
                final = await anext(events)
        if not final.ok:
            raise ApiError(424, final.error or f"the request ended early ({final.finish_reason.value})", "generation")
        body = generate_body(final, details=req.params.details, prefix=prefix)
        return web.json_response([body] if as_list else body, headers=generation_headers(final))

    async def _encode(self, req: GenerateRequest) -> list[int]:
        text = req.inputs
        ids = await asyncio.to_thread(self.engine.encode, text) if len(text) > ENCODE_IN_THREAD_CHARS else self.engine.encode(text)
        return prompt_ids(ids, req.params.truncate, self.engine.bos_token_id)

    # -- information --------------------------------------------------------------------------
    async def info(self, _request: web.Request) -> web.Response:
        agent, s = self.agent, self.engine.settings
        current = agent.store.current
        return web.json_response(
            {
                # TGI's Info keys (required ones always present; optional ones null when unknown)
                "model_id": agent.base.name,
                "model_sha": None,
                "model_dtype": dtype_name(agent.runtime.dtype),
                "model_device_type": agent.runtime.device.type,
                "model_pipeline_tag": "text-generation",
                "max_concurrent_requests": s.max_queue + s.max_batch,
                "max_best_of": 1,
                "max_stop_sequences": MAX_STOP_SEQUENCES,
                "max_input_tokens": s.max_total_tokens - 1,
                "max_input_length": s.max_total_tokens - 1,
                "max_total_tokens": s.max_total_tokens,
                "max_batch_total_tokens": s.max_batch * s.max_total_tokens,
                "max_batch_size": s.max_batch,
                "max_client_batch_size": 1,
                "validation_workers": 1,
                "router": "collm-agent",
                "version": __version__,
                "sha": None,
                "docker_label": None,
                # CoLLM
                "replica_id": agent.config.replica_id,
                "adapter": current.summary() if current else None,
                "training": agent.training,
            }
        )

    async def health(self, _request: web.Request) -> web.Response:
        if self.draining:
            raise ApiError(503, "this replica is shutting down", "unhealthy")
        idle = time.monotonic() - self._last_iteration
        if idle > HEALTH_STALE_S:
            raise ApiError(503, f"the engine has not completed an iteration for {idle:.1f} s", "unhealthy")
        return web.json_response({"status": "ok", "adapter_version": _current_version(self.agent)})

    async def prometheus(self, _request: web.Request) -> web.Response:
        body = await asyncio.to_thread(self.metrics.render)
        return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def stats(self, _request: web.Request) -> web.Response:
        stats = self.agent.stats().as_dict()
        stats["slo_attainment"] = self.metrics.slo_attainment()
        return web.json_response(stats)

    # -- control ------------------------------------------------------------------------------
    async def publish(self, request: web.Request) -> web.Response:
        self._check_admin(request)
        if self.agent.trainer is None:
            raise ApiError(409, "this agent has no training data, so there is no shadow adapter to publish; start it with --data", "conflict")
        version = await asyncio.to_thread(self.agent.publish)
        return web.json_response(version.summary())

    async def feedback(self, request: web.Request) -> web.Response:
        self._check_admin(request)
        config = self.agent.config
        if not config.feedback:
            raise ApiError(404, "feedback is disabled on this agent; start it with --feedback (COLLM_FEEDBACK=true)", "not_found")
        body = await _read_json(request)
        if not isinstance(body, dict):
            raise InvalidRequest('the body must be a JSON object like {"prompt": "...", "completion": "..."}')
        path = feedback_path(config)
        try:
            await asyncio.to_thread(append_feedback, path, body.get("prompt"), body.get("completion"))
        except DataError as exc:
            raise InvalidRequest(str(exc)) from None
        return web.json_response({"appended": True, "path": str(path)})


def feedback_path(config) -> Path:
    """config.feedback_path, else feedback.jsonl in the data folder (or next to the data file)."""
    if config.feedback_path:
        return Path(config.feedback_path)
    data = Path(config.data)
    return (data if data.is_dir() else data.parent) / "feedback.jsonl"


async def _read_json(request: web.Request) -> Any:
    return await read_json(request, example='{"inputs": "...", "parameters": {"max_new_tokens": 20}}', error=_body_error)


def _body_error(status: int, message: str) -> Exception:
    if status == 413:
        return ApiError(413, f"Input validation error: {message}", "validation")
    return InvalidRequest(message)


async def _stream(request: web.Request, events, first, framer: StreamFramer) -> web.StreamResponse:
    def frames(event):
        return framer.final(event) if isinstance(event, FinalEvent) else framer.token(event)

    return await stream_events(request, events, first, frames, lambda f: b"data:" + json.dumps(f).encode() + b"\n\n")


def _current_version(agent) -> str | None:
    current = agent.store.current
    return current.label if current else None


@web.middleware
async def _errors(request: web.Request, handler):
    api: HttpApi = request.app[API_KEY]
    try:
        return await handler(request)
    except InvalidRequest as exc:
        api.metrics.reject("validation")
        return web.json_response(error_body(str(exc), "validation"), status=422)
    except ApiError as exc:
        if exc.error_type in ("validation", "overloaded", "unavailable"):
            api.metrics.reject(exc.error_type)
        headers = exc.headers or ({"Retry-After": str(RETRY_AFTER_S)} if exc.status == 429 else {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)
        return web.json_response(error_body(exc.message, exc.error_type), status=exc.status, headers=headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return web.json_response(error_body(f"{exc.reason}: {request.method} {request.path}", "not_found" if exc.status == 404 else "http"), status=exc.status)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:  # a bug: log it loudly, answer in TGI's shape
        log.exception("unhandled error in %s %s", request.method, request.path)
        return web.json_response(error_body(f"internal error: {exc}", "internal"), status=500)


def create_app(agent) -> web.Application:
    """The aiohttp application of a started (or about to be started) agent."""
    app = web.Application(middlewares=[_errors])
    api = HttpApi(agent, AgentMetrics(agent))
    app[API_KEY] = api
    app.add_routes(
        [
            web.post("/", api.compat),
            web.post("/generate", api.generate),
            web.post("/generate_stream", api.generate_stream),
            web.get("/info", api.info),
            web.get("/health", api.health),
            web.get("/metrics", api.prometheus),
            web.get("/stats", api.stats),
            web.post("/publish", api.publish),
            web.post("/feedback", api.feedback),
        ]
    )
    openai_api.add_routes(app, api)
    openapi.add_routes(app, openapi.agent_document())
    return app


async def serve(agent, host: str | None = None, port: int | None = None) -> web.AppRunner:
    """Serve `agent` (started by the caller) until `runner.cleanup()`; port 0 picks a free port (see runner.addresses)."""
    app = create_app(agent)
    # handler_cancellation: a client that disconnects cancels its handler, and with it its engine request.
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=SHUTDOWN_TIMEOUT_S, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, agent.config.host if host is None else host, agent.config.port if port is None else port)
    await site.start()
    log.info("serving the TGI API on %s", ", ".join(f"http://{a[0]}:{a[1]}" for a in runner.addresses))
    return runner


async def drain(runner: web.AppRunner) -> None:
    """Graceful stop: /health turns 503, the listener closes, in-flight requests get SHUTDOWN_TIMEOUT_S."""
    runner.app[API_KEY].draining = True
    await runner.cleanup()


def run_server(agent) -> None:
    """Start the agent, serve it on config.host:config.port until SIGTERM or SIGINT, then stop both."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await asyncio.to_thread(agent.start)
        runner = await serve(agent)
        try:
            await stop.wait()
            log.info("stopping: finishing in-flight requests (up to %.0f s)", SHUTDOWN_TIMEOUT_S)
        finally:
            await drain(runner)
            await asyncio.to_thread(agent.stop)

    asyncio.run(main())
