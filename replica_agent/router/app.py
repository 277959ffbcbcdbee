"""The router's HTTP front: TGI's and OpenAI's routes proxied to the replica agents, plus admin routes.

    POST /, /generate, /generate_stream, /v1/completions, /v1/chat/completions   proxied (proxy.py)
    GET  /info, /v1/models                  proxied to one replica
    GET  /health                            200 while at least one replica is healthy and routable
    GET  /metrics                           the router's Prometheus metrics
    GET  /openapi.json, /docs               the router's OpenAPI document and a page of it (openapi.py)
    GET  /admin/replicas                    each replica's url, weight, health, outstanding requests
    PUT  /admin/weights                     {"weights": {"<name>": <weight>, ...}, "affinity": true|false}
                                            (the operator's allocation; affinity optional)

Each request goes to a replica chosen by weighted power of two choices (dispatch.py). A request
with the header `x-collm-affinity: <replica>` goes to that home replica while it has room, unless
the allocation turned affinity off (the `static` policy spreads requests evenly). A background
task GETs /health on every replica every `health_interval_s` (0 disables it); a replica that fails
it, or refuses a connection, gets no traffic until it passes again. The router is stateless: the
weights it holds are the last ones pushed, and a restarted router starts from its flags.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from ..serving.openapi import add_routes as add_document_routes
from ..serving.pipeline import admin_refusal, admin_warning, bearer_in, bearer_matches, read_token
from .dispatch import ReplicaLoad, choose, eligible, why_none
from .metrics import RouterMetrics
from .openapi import router_document
from .proxy import PROXIED_ROUTES, error_response, forward

log = logging.getLogger(__name__)

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ROUTER_KEY: web.AppKey[Router] = web.AppKey("collm_router")
ADMIN_TOKEN_KEY: web.AppKey[str | None] = web.AppKey("collm_router_admin_token")
CLIENT_TOKENS_KEY: web.AppKey[ClientTokens | None] = web.AppKey("collm_router_client_tokens")
OPEN_PATHS = ("/health", "/metrics", "/openapi.json", "/docs")  # probes, scrapers and the API's description: no client token
ENV_PREFIX = "COLLM_ROUTER_"
MAX_BACK_OFF_S = 10.0  # the longest a replica's 429 keeps traffic away from it


@dataclass(frozen=True)
class ReplicaEndpoint:
    """One replica agent as the router is told about it."""

    name: str
    url: str  # e.g. http://collm-0.collm:8080
    weight: float = 1.0


@dataclass
class ReplicaState:
    name: str
    url: str
    weight: float
    healthy: bool = True  # until the first health check says otherwise
    outstanding: int = 0
    last_error: str | None = None
    checked_at: float | None = None
    shed_until: float = 0.0  # time.monotonic() until which the replica said it sheds (its 429's x-collm-admit-in-ms)
    down: asyncio.Event = field(default_factory=asyncio.Event)  # set when it turns unhealthy: attempts waiting for its first byte give up

    def set_healthy(self, healthy: bool) -> None:
        if healthy and not self.healthy:
            self.down = asyncio.Event()
        elif not healthy:
            self.down.set()
        self.healthy = healthy

    def shedding(self, now: float) -> bool:
        return now < self.shed_until


class Router:
    def __init__(
        self,
        replicas: Sequence[ReplicaEndpoint],
        *,
        max_outstanding: int = 64,
        health_interval_s: float = 5.0,
        connect_timeout_s: float = 2.0,
        first_byte_timeout_s: float = 300.0,
        stream_idle_timeout_s: float = 30.0,
        max_attempts: int = 3,
        retry_after_s: int = 1,
        rng: random.Random | None = None,
    ) -> None:
        if not replicas:
            raise ValueError("the router needs at least one replica (--replica NAME=URL)")
        if max_outstanding < 1 or max_attempts < 1:
            raise ValueError("max_outstanding and max_attempts must be at least 1")
        self.replicas: dict[str, ReplicaState] = {}
        for r in replicas:
            if r.name in self.replicas:
                raise ValueError(f"replica name {r.name!r} is given twice; names must be unique")
            if urlsplit(r.url).scheme not in ("http", "https") or not urlsplit(r.url).netloc:
                raise ValueError(f"replica {r.name!r} has url {r.url!r}; give an http:// or https:// url like http://10.0.0.5:8080")
            _check_weight(r.name, r.weight)
            self.replicas[r.name] = ReplicaState(r.name, r.url.rstrip("/"), float(r.weight))
        self.max_outstanding, self.max_attempts, self.retry_after_s = max_outstanding, max_attempts, retry_after_s
        self.health_interval_s, self.stream_idle_timeout_s = health_interval_s, stream_idle_timeout_s
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=first_byte_timeout_s)
        self.rng = rng or random.Random()
        self.affinity = True  # honour x-collm-affinity (the allocation may turn it off)
        self.metrics = RouterMetrics(self)
        self.session: aiohttp.ClientSession | None = None

    # -- dispatch -----------------------------------------------------------------------------
    def loads(self) -> list[ReplicaLoad]:
        now = time.monotonic()
        return [ReplicaLoad(s.name, s.weight, s.healthy, s.outstanding, self.max_outstanding, s.shedding(now)) for s in self.replicas.values()]

    def pick(self, exclude: Sequence[str] = (), home: str | None = None) -> ReplicaState | None:
        chosen = choose(self.loads(), self.rng, exclude, home if self.affinity else None)
        return self.replicas[chosen.name] if chosen else None

    def why_none(self, exclude: Sequence[str] = ()) -> str:
        return why_none(self.loads(), exclude)

    def back_off(self, replica: ReplicaState, admit_in_ms: str | None) -> None:
        """A replica answered 429 saying when it expects to admit again: send it nothing until then (at most MAX_BACK_OFF_S)."""
        try:
            wait_s = min(MAX_BACK_OFF_S, max(0.0, float(admit_in_ms or 0) / 1000))
        except ValueError:
            return
        replica.shed_until = max(replica.shed_until, time.monotonic() + wait_s)

    def admit_in_s(self, exclude: Sequence[str] = ()) -> float:
        """Seconds until the first eligible replica stops shedding (0 when none sheds)."""
        now = time.monotonic()
        return min((self.replicas[r.name].shed_until - now for r in eligible(self.loads(), exclude) if r.shedding), default=0.0)

    def suspect(self, replica: ReplicaState, message: str) -> None:
        """A connection failure: no traffic until the next health check passes (kept when checks are off)."""
        replica.last_error = message
        if self.health_interval_s > 0 and replica.healthy:
            log.warning("replica %s: %s; no traffic until its health check passes", replica.name, message)
            replica.set_healthy(False)

    # -- admin --------------------------------------------------------------------------------
    def set_weights(self, body) -> None:
        """Apply {"weights": {name: weight}, "affinity": bool} (names not given keep theirs; affinity is
        optional); ValueError says what is wrong."""
        weights = body.get("weights") if isinstance(body, dict) else None
        if not isinstance(weights, dict) or not weights:
            raise ValueError('send {"weights": {"<replica name>": <non-negative number>, ...}}')
        affinity = body.get("affinity", self.affinity)
        if not isinstance(affinity, bool):
            raise ValueError(f'"affinity" must be true or false, got {affinity!r}')
        unknown = sorted(set(weights) - set(self.replicas))
        if unknown:
            raise ValueError(f"unknown replica name(s) {', '.join(unknown)}; known: {', '.join(self.replicas)}")
        for name, weight in weights.items():
            _check_weight(name, weight)
        for name, weight in weights.items():
            self.replicas[name].weight = float(weight)
        self.affinity = affinity
        log.info("routing weights now %s (affinity %s)", {n: s.weight for n, s in self.replicas.items()}, "on" if affinity else "off")

    def describe(self) -> list[dict]:
        return [
            {
                "name": s.name,
                "url": s.url,
                "weight": s.weight,
                "healthy": s.healthy,
                "outstanding": s.outstanding,
                "max_outstanding": self.max_outstanding,
                "shedding_for_s": round(max(0.0, s.shed_until - time.monotonic()), 3),
                "last_error": s.last_error,
                "checked_at": s.checked_at,
            }
            for s in self.replicas.values()
        ]

    # -- health -------------------------------------------------------------------------------
    async def check_health(self) -> None:
        """GET /health on every replica at once; 200 means healthy."""
        timeout = aiohttp.ClientTimeout(total=max(0.5, min(self.health_interval_s or 2.0, 5.0)))
        await asyncio.gather(*(self._check(s, timeout) for s in self.replicas.values()))

    async def _check(self, state: ReplicaState, timeout: aiohttp.ClientTimeout) -> None:
        try:
            async with self.session.get(state.url + "/health", timeout=timeout) as resp:
                ok, problem = resp.status == 200, f"GET /health answered {resp.status}: {(await resp.text())[:200]}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            ok, problem = False, f"GET /health failed: {type(exc).__name__} {exc}"
        state.checked_at = time.time()
        if ok != state.healthy:
            log.warning("replica %s is now %s%s", state.name, "healthy" if ok else "unhealthy", "" if ok else f" ({problem})")
        state.set_healthy(ok)
        if not ok:
            state.last_error = problem

    async def _health_loop(self) -> None:
        while True:
            try:
                await self.check_health()
            except Exception:  # a bug: keep checking, but say so
                log.exception("health check round failed")
            await asyncio.sleep(self.health_interval_s)

    async def lifespan(self, _app: web.Application):
        """aiohttp cleanup context: the client session and the health checks live as long as the app."""
        # No connection cap here: max_outstanding per replica is the back-pressure.
        self.session = aiohttp.ClientSession(timeout=self.timeout, connector=aiohttp.TCPConnector(limit=0), auto_decompress=True)
        task = asyncio.create_task(self._health_loop()) if self.health_interval_s > 0 else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            await self.session.close()


def _check_weight(name: str, weight) -> None:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"the weight of replica {name!r} must be a finite number >= 0 (0 sends it no traffic); got {weight!r}")


# -- HTTP handlers ------------------------------------------------------------------------------
async def _proxy(request: web.Request) -> web.StreamResponse:
    return await forward(request.app[ROUTER_KEY], request)


async def _health(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    routable = [s.name for s in router.replicas.values() if s.healthy and s.weight > 0]
    if not routable:
        return error_response(request.path, 503, "no replica is healthy and routable; see GET /admin/replicas")
    return web.json_response({"status": "ok", "routable_replicas": routable})


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[ROUTER_KEY].metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})


class ClientTokens:
    """The bearer tokens clients may send: one per file of a directory (a Secret mounted there, one
    key per client), read again at most every `reload_s` so a rotated Secret takes effect without a
    restart. An empty directory refuses every client rather than opening the routes."""

    def __init__(self, directory: str, reload_s: float = 30.0) -> None:
        self.directory, self.reload_s = Path(directory), reload_s
        self._tokens: tuple[str, ...] = ()
        self._read_at = -math.inf
        if not self.directory.is_dir():
            raise ValueError(f"client token directory {directory} does not exist: mount the Secret named in spec.security.clientTokenSecretRef there")
        self.tokens()

    def tokens(self) -> tuple[str, ...]:
        now = time.monotonic()
        if now - self._read_at >= self.reload_s:
            # Secret volumes hold each key as a symlink beside hidden ..data entries: skip dot-files.
            files = sorted(p for p in self.directory.iterdir() if not p.name.startswith(".") and p.is_file())
            self._tokens = tuple(t for t in (p.read_text().strip() for p in files) if t)
            self._read_at = now
        return self._tokens


@web.middleware
async def _errors(request: web.Request, handler):
    """aiohttp's own refusals (unknown route 404, wrong method 405, body too large 413) in the route's dialect, not plain text."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(request.path, exc.status, f"{exc.reason}: {request.method} {request.path}", headers=headers)


@web.middleware
async def _auth(request: web.Request, handler):
    if request.path.startswith("/admin/"):
        token = request.app[ADMIN_TOKEN_KEY]
        if token is not None and not bearer_matches(request, token):
            body = {"error": admin_refusal(request.path), "error_type": "unauthorized"}
            return web.json_response(body, status=401, headers={"WWW-Authenticate": "Bearer"})
    elif request.path not in OPEN_PATHS:
        clients = request.app[CLIENT_TOKENS_KEY]
        if clients is not None and not bearer_in(request, clients.tokens()):
            message = "this endpoint needs an API key: send Authorization: Bearer <one of the cluster's client tokens>"
            return error_response(request.path, 401, message, headers={"WWW-Authenticate": "Bearer"})
    return await handler(request)


async def _replicas(request: web.Request) -> web.Response:
    return web.json_response({"replicas": request.app[ROUTER_KEY].describe()})


async def _weights(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    try:
        router.set_weights(await request.json())
    except ValueError as exc:  # json.JSONDecodeError is one too
        return web.json_response({"error": str(exc), "error_type": "validation"}, status=400)
    return web.json_response({"replicas": router.describe()})


def create_router_app(
    replicas: Sequence[ReplicaEndpoint],
    *,
    max_outstanding_per_replica: int = 64,
    admin_token: str | None = None,
    client_tokens: ClientTokens | None = None,
    **settings,
) -> web.Application:
    """The router's application; `admin_token` guards /admin/* (None: open, development only);
    `client_tokens` guard the client routes (None: open); `settings` are Router's keyword arguments
    (timeouts, health interval, rng...)."""
    router = Router(replicas, max_outstanding=max_outstanding_per_replica, **settings)
    app = web.Application(middlewares=[_errors, _auth])
    app[ROUTER_KEY] = router
    app[ADMIN_TOKEN_KEY] = admin_token
    app[CLIENT_TOKENS_KEY] = client_tokens
    if admin_token is None:
        admin_warning("router")
    app.cleanup_ctx.append(router.lifespan)
    app.add_routes(
        [
            *((web.get if method == "get" else web.post)(path, _proxy) for method, path in PROXIED_ROUTES),  # web.get: HEAD too
            web.get("/health", _health),
            web.get("/metrics", _metrics),
            web.get("/admin/replicas", _replicas),
            web.put("/admin/weights", _weights),
        ]
    )
    add_document_routes(app, router_document())
    return app


# -- command line -------------------------------------------------------------------------------
def parse_replica(text: str, index: int) -> ReplicaEndpoint:
    """NAME=URL, or a bare URL (named replica-INDEX)."""
    name, sep, url = text.partition("=")
    if not sep:
        name, url = f"replica-{index}", text
    if not name or not url:
        raise ValueError(f"--replica {text!r}: write NAME=URL, e.g. collm-0=http://collm-0.collm:8080")
    return ReplicaEndpoint(name.strip(), url.strip())


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="collm-router",
        description="CoLLM router: TGI- and OpenAI-compatible HTTP front that dispatches requests to replica agents by routing weight and load. "
        "Every flag also reads a COLLM_ROUTER_* environment variable.",
    )
    p.add_argument(
        "--replica", action="append", default=[], metavar="NAME=URL", help="a replica agent (repeatable; env COLLM_ROUTER_REPLICAS, comma-separated)"
    )
    p.add_argument("--host", default=env(ENV_PREFIX + "HOST", "0.0.0.0"), help="listen address (env COLLM_ROUTER_HOST; default 0.0.0.0)")
    p.add_argument("--port", type=int, default=int(env(ENV_PREFIX + "PORT", "8080")), help="listen port (env COLLM_ROUTER_PORT; default 8080)")
    p.add_argument(
        "--max-outstanding",
        type=int,
        default=int(env(ENV_PREFIX + "MAX_OUTSTANDING", "64")),
        help="requests in flight per replica before the router answers 429 (env COLLM_ROUTER_MAX_OUTSTANDING; default 64)",
    )
    p.add_argument(
        "--health-interval",
        type=float,
        default=float(env(ENV_PREFIX + "HEALTH_INTERVAL", "5")),
        help="seconds between health checks, 0 to disable (env COLLM_ROUTER_HEALTH_INTERVAL; default 5)",
    )
    p.add_argument(
        "--max-attempts",
        type=int,
        default=int(env(ENV_PREFIX + "MAX_ATTEMPTS", "3")),
        help="replicas tried per request before giving up (env COLLM_ROUTER_MAX_ATTEMPTS; default 3)",
    )
    p.add_argument(
        "--stream-idle-timeout",
        type=float,
        default=float(env(ENV_PREFIX + "STREAM_IDLE_TIMEOUT", "30")),
        help="seconds a stream may stay silent before the client gets an error event (env COLLM_ROUTER_STREAM_IDLE_TIMEOUT; default 30)",
    )
    p.add_argument(
        "--admin-token-file",
        default=env(ENV_PREFIX + "ADMIN_TOKEN_FILE"),
        help="file holding the bearer token that /admin/* requires (env COLLM_ROUTER_ADMIN_TOKEN_FILE; unset: no token, development only)",
    )
    p.add_argument(
        "--client-tokens-dir",
        default=env(ENV_PREFIX + "CLIENT_TOKENS_DIR"),
        help="directory of files, each holding one bearer token a client may send (env COLLM_ROUTER_CLIENT_TOKENS_DIR; unset: client routes are open)",
    )
    p.add_argument("--log-level", default=env(ENV_PREFIX + "LOG_LEVEL", "INFO"), help="logging level (env COLLM_ROUTER_LOG_LEVEL)")
    return p


def main(argv: list[str] | None = None) -> int:
    """`collm-router`: serve until SIGTERM/SIGINT, finishing in-flight requests."""
    parser = build_parser()
    args = parser.parse_args(argv)
    specs = args.replica or [s for s in os.environ.get(ENV_PREFIX + "REPLICAS", "").split(",") if s.strip()]
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        replicas = [parse_replica(spec, i) for i, spec in enumerate(specs)]
        app = create_router_app(
            replicas,
            max_outstanding_per_replica=args.max_outstanding,
            health_interval_s=args.health_interval,
            max_attempts=args.max_attempts,
            stream_idle_timeout_s=args.stream_idle_timeout,
            admin_token=read_token(args.admin_token_file),
            client_tokens=ClientTokens(args.client_tokens_dir) if args.client_tokens_dir else None,
        )
    except ValueError as exc:
        parser.error(str(exc))
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=30.0,
        print=lambda *_: log.info("routing on http://%s:%d to %s", args.host, args.port, ", ".join(specs)),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
