"""The router in front of real agent processes on loopback (and small fake replicas for failure modes)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import aiohttp
import openai
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from text_generation import Client
from text_generation.errors import IncompleteGenerationError, OverloadedError

from replica_agent.router.app import ROUTER_KEY, ClientTokens, ReplicaEndpoint, create_router_app, main, parse_replica
from replica_agent.router.proxy import AFFINITY_HEADER, REPLICA_HEADER
from replica_agent.serving.pipeline import ADMIT_IN_HEADER

from ..helpers import eventually

PROMPT = "The Python language reference describes"
AGENT = "from replica_agent.cli import agent_main; import sys; sys.exit(agent_main())"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body=None, timeout: float = 60, headers: dict | None = None) -> tuple[int, bytes, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


@pytest.fixture(scope="module")
def agents(tmp_path_factory):
    """Three agent processes: a and b serve most tests, c is killed mid-stream."""
    cwd = tmp_path_factory.mktemp("agents")
    procs, urls = {}, {}
    try:
        for name in ("a", "b", "c"):
            port = free_port()
            args = ["--port", str(port), "--max-total-tokens", "256", "--engine-threads", "1", "--replica-id", name, "--log-level", "WARNING"]
            procs[name] = subprocess.Popen([sys.executable, "-c", AGENT, *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            urls[name] = f"http://127.0.0.1:{port}"

        def healthy(name: str) -> bool:
            assert procs[name].poll() is None, f"agent {name} exited with {procs[name].returncode}"
            with contextlib.suppress(OSError):
                return http("GET", urls[name] + "/health", timeout=2)[0] == 200
            return False

        assert eventually(lambda: all(healthy(n) for n in procs), timeout=180, interval=0.2), "the agents did not start"
        yield {"urls": urls, "procs": procs}
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


class Loop:
    """aiohttp applications (the router, fake replicas) served on one event loop in a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runners: list[web.AppRunner] = []

    def serve(self, app: web.Application) -> str:
        async def start() -> str:
            runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.runners.append(runner)
            return f"http://127.0.0.1:{runner.addresses[0][1]}"

        return asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)

    def close(self) -> None:
        for runner in reversed(self.runners):
            asyncio.run_coroutine_threadsafe(runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def loop():
    loop = Loop()
    yield loop
    loop.close()


def start_router(loop: Loop, replicas: dict[str, str], **settings):
    settings.setdefault("rng", random.Random(0))
    app = create_router_app([ReplicaEndpoint(n, u) for n, u in replicas.items()], **settings)
    return loop.serve(app), app[ROUTER_KEY]


def metric(url: str, name: str, **labels) -> float:
    text = http("GET", url + "/metrics")[1].decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there: connections are refused


# -- clients through the router -------------------------------------------------------------------
def test_tgi_client_through_the_router(agents, loop):
    urls = agents["urls"]
    url, _ = start_router(loop, {"a": urls["a"], "b": urls["b"]}, health_interval_s=0.5)
    direct = Client(urls["a"], timeout=30).generate(PROMPT, max_new_tokens=12).generated_text
    client = Client(url, timeout=30)
    r = client.generate(PROMPT, max_new_tokens=12)
    assert r.generated_text == direct and r.details.generated_tokens == 12  # a and b serve the same model and adapter
    events = list(client.generate_stream(PROMPT, max_new_tokens=12))
    assert len(events) == 12 and events[-1].generated_text == direct
    status, body, headers = http("POST", url + "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}})
    assert status == 200 and headers[REPLICA_HEADER] in ("a", "b") and headers["x-collm-adapter-version"] == "0.0"
    status, body, _ = http("POST", url + "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": -1}})
    assert status == 422 and json.loads(body)["error_type"] == "validation"  # the replica's answer, passed through
    status, body, _ = http("GET", url + "/info")
    assert status == 200 and json.loads(body)["model_id"] == "tiny"
    status, body, _ = http("GET", url + "/health")
    assert status == 200 and sorted(json.loads(body)["routable_replicas"]) == ["a", "b"]
    assert metric(url, "collm_router_requests_total", outcome="client_error") == 1


def test_openai_client_through_the_router(agents, loop):
    url, _ = start_router(loop, {"a": agents["urls"]["a"], "b": agents["urls"]["b"]})
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
    text = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0).choices[0].text
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text and chunks[-1].choices[0].finish_reason == "length"
    messages = [{"role": "user", "content": "What is a tuple?"}]
    reply = client.chat.completions.create(model="tiny@0.0", messages=messages, max_tokens=6, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content
    assert reply.usage.completion_tokens == 6 and reply.system_fingerprint == "collm-adapter-0.0"
    assert [m.id for m in client.models.list()] == ["tiny", "tiny@0.0"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt=PROMPT)


# -- dispatch -------------------------------------------------------------------------------------
def test_dispatch_follows_the_weights(agents, loop):
    url, router = start_router(loop, {"a": agents["urls"]["a"], "b": agents["urls"]["b"]})
    status, body, _ = http("PUT", url + "/admin/weights", {"weights": {"a": 3, "b": 1}})
    assert status == 200 and {r["name"]: r["weight"] for r in json.loads(body)["replicas"]} == {"a": 3.0, "b": 1.0}
    for _ in range(80):
        assert http("POST", url + "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 1}})[0] == 200
    served = {n: metric(url, "collm_router_requests_total", replica=n, outcome="ok") for n in ("a", "b")}
    assert served["a"] + served["b"] == 80 and 48 <= served["a"] <= 72, served  # 75% +- 3 standard deviations

    http("PUT", url + "/admin/weights", {"weights": {"a": 0}})  # drain a
    for _ in range(5):
        assert http("POST", url + "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 1}})[2][REPLICA_HEADER] == "b"


def test_requests_go_to_their_home_replica_unless_affinity_is_off(agents, loop):
    url, router = start_router(loop, {"a": agents["urls"]["a"], "b": agents["urls"]["b"]})
    home = {AFFINITY_HEADER: "a"}
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 1}}
    assert {http("POST", url + "/generate", body, headers=home)[2][REPLICA_HEADER] for _ in range(10)} == {"a"}
    http("PUT", url + "/admin/weights", {"weights": {"a": 1, "b": 1}, "affinity": False})
    assert {http("POST", url + "/generate", body, headers=home)[2][REPLICA_HEADER] for _ in range(30)} == {"a", "b"}
    status, payload, _ = http("PUT", url + "/admin/weights", {"weights": {"a": 1}, "affinity": "yes"})
    assert status == 400 and "affinity" in json.loads(payload)["error"] and router.affinity is False


@pytest.mark.parametrize(
    "body, words",
    [
        ({"weights": {"a": -1}}, ">= 0"),
        ({"weights": {"a": "3"}}, "finite number"),
        ({"weights": {"a": True}}, "finite number"),
        ({"weights": {"zz": 1}}, "unknown replica name(s) zz"),
        ({"weights": {}}, '{"weights"'),
        ([1], '{"weights"'),
    ],
)
def test_weights_are_validated(loop, body, words):
    url, router = start_router(loop, {"a": closed_port_url(), "b": closed_port_url()}, health_interval_s=0)
    status, payload, _ = http("PUT", url + "/admin/weights", body)
    assert status == 400 and words in json.loads(payload)["error"]
    assert [r["weight"] for r in json.loads(http("GET", url + "/admin/replicas")[1])["replicas"]] == [1.0, 1.0]


# -- failures -------------------------------------------------------------------------------------
def test_retry_before_the_first_token(agents, loop):
    async def unavailable(_request):
        return web.json_response({"error": "the engine is not running", "error_type": "unavailable"}, status=503)

    fake = web.Application()
    fake.router.add_post("/{tail:.*}", unavailable)
    replicas = {"dead": closed_port_url(), "failing": loop.serve(fake), "a": agents["urls"]["a"]}
    url, router = start_router(loop, replicas, health_interval_s=0)
    http("PUT", url + "/admin/weights", {"weights": {"dead": 10, "failing": 10, "a": 1}})
    client = Client(url, timeout=30)
    for _ in range(6):
        assert client.generate(PROMPT, max_new_tokens=3).details.generated_tokens == 3
        assert len(list(client.generate_stream(PROMPT, max_new_tokens=3))) == 3
    ai = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
    assert ai.completions.create(model="tiny", prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2
    assert metric(url, "collm_router_requests_total", replica="a", outcome="ok") == 13
    retries = {n: metric(url, "collm_router_retries_total", replica=n) for n in ("dead", "failing")}
    assert retries["dead"] >= 1 and retries["failing"] >= 1 and sum(retries.values()) == metric(url, "collm_router_requests_total", outcome="upstream_error")
    assert router.replicas["dead"].healthy and "cannot connect" in router.replicas["dead"].last_error  # no health checks: only retried

    router.replicas["a"].weight = 0  # nothing can serve: the last replica's own error comes back
    status, body, _ = http("POST", url + "/generate", {"inputs": PROMPT})
    assert status == 503 and json.loads(body)["error_type"] == "unavailable"


def test_health_checks_take_replicas_out_of_rotation(agents, loop):
    url, router = start_router(loop, {"dead": closed_port_url(), "a": agents["urls"]["a"]}, health_interval_s=0.2)
    assert eventually(lambda: not router.replicas["dead"].healthy, 5.0)
    replicas = {r["name"]: r for r in json.loads(http("GET", url + "/admin/replicas")[1])["replicas"]}
    assert replicas["a"]["healthy"] and not replicas["dead"]["healthy"] and "GET /health failed" in replicas["dead"]["last_error"]
    for _ in range(5):
        assert http("POST", url + "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 1}})[0] == 200
    assert metric(url, "collm_router_retries_total") == 0 and metric(url, "collm_router_replica_healthy", replica="dead") == 0

    url, router = start_router(loop, {"dead": closed_port_url()}, health_interval_s=0.2)
    assert eventually(lambda: not router.replicas["dead"].healthy, 5.0)
    status, body, headers = http("POST", url + "/generate", {"inputs": PROMPT})
    assert status == 503 and "no replica is healthy" in json.loads(body)["error"] and headers["Retry-After"] == "1"
    assert http("GET", url + "/health")[0] == 503


def test_load_shedding_answers_429_with_retry_after(agents, loop):
    url, router = start_router(loop, {"a": agents["urls"]["a"], "b": agents["urls"]["b"]}, max_outstanding_per_replica=1, health_interval_s=0)

    async def burst():
        async with aiohttp.ClientSession() as session:

            async def one(i: int):
                path, body = (
                    ("/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 150}})
                    if i < 6
                    else ("/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 150})
                )
                async with session.post(url + path, json=body) as resp:
                    return resp.status, await resp.json(), resp.headers.get("Retry-After")

            return await asyncio.gather(*(one(i) for i in range(7)))

    results = asyncio.run(burst())
    assert sorted(status for status, _, _ in results) == [200, 200, 429, 429, 429, 429, 429]
    shed = [(body, retry_after) for status, body, retry_after in results if status == 429]
    assert all(retry_after == "1" for _, retry_after in shed)
    tgi_bodies = [body for body, _ in shed if "error_type" in body]
    assert all(b["error_type"] == "overloaded" for b in tgi_bodies) and len(tgi_bodies) >= 4
    assert all(body["error"]["code"] == "rate_limit_exceeded" for body, _ in shed if "error_type" not in body)
    assert metric(url, "collm_router_shed_requests_total") == 5
    with pytest.raises(OverloadedError):  # TGI's client raises its own overload error
        router.replicas["a"].outstanding = router.replicas["b"].outstanding = 1
        try:
            Client(url, timeout=30).generate(PROMPT, max_new_tokens=1)
        finally:
            router.replicas["a"].outstanding = router.replicas["b"].outstanding = 0


def test_a_replica_shedding_for_its_ttft_gets_no_traffic_until_it_said(loop):
    hits = {"late": 0, "ok": 0}

    async def late(request: web.Request) -> web.Response:
        hits["late"] += 1
        body = {"error": "this replica would answer the first token in about 2600 ms, past its TTFT SLO", "error_type": "overloaded"}
        return web.json_response(body, status=429, headers={"Retry-After": "2", ADMIT_IN_HEADER: "1500"})

    async def ok(request: web.Request) -> web.Response:
        hits["ok"] += 1
        return web.json_response({"generated_text": "x"})

    urls = {}
    for name, handler in (("late", late), ("ok", ok)):
        app = web.Application()
        app.router.add_post("/generate", handler)
        urls[name] = loop.serve(app)
    url, router = start_router(loop, urls, health_interval_s=0, max_attempts=2)
    for _ in range(20):  # the first attempt on "late" is retried on "ok"; then "late" is left alone
        assert http("POST", url + "/generate", {"inputs": PROMPT})[0] == 200
    assert hits == {"late": 1, "ok": 20}
    assert 1.0 < json.loads(http("GET", url + "/admin/replicas")[1])["replicas"][0]["shedding_for_s"] <= 1.5

    url, router = start_router(loop, {"late": urls["late"]}, health_interval_s=0)
    status, body, headers = http("POST", url + "/generate", {"inputs": PROMPT})
    assert status == 429 and headers["Retry-After"] == "2" and hits["late"] == 2  # the replica's own answer, passed on
    started = time.monotonic()
    status, body, headers = http("POST", url + "/generate", {"inputs": PROMPT})
    assert status == 429 and hits["late"] == 2 and time.monotonic() - started < 0.5  # answered by the router, at once
    assert "would miss its TTFT SLO" in json.loads(body)["error"] and headers["Retry-After"] == "2" and 1000 < int(headers[ADMIT_IN_HEADER]) <= 1500
    assert metric(url, "collm_router_shed_requests_total") == 2
    router.replicas["late"].shed_until = 0.0  # its wait is over: it is tried again
    assert http("POST", url + "/generate", {"inputs": PROMPT})[0] == 429 and hits["late"] == 3


@pytest.mark.timeout(60)
def test_replica_killed_mid_stream_gives_a_clear_error(agents, loop):
    url, router = start_router(loop, {"c": agents["urls"]["c"]}, health_interval_s=0)
    events = Client(url, timeout=30).generate_stream(PROMPT, max_new_tokens=200)
    received = [next(events) for _ in range(3)]
    started = time.monotonic()
    agents["procs"]["c"].send_signal(signal.SIGKILL)
    with pytest.raises(IncompleteGenerationError, match="replica c"):
        for event in events:
            received.append(event)
    assert time.monotonic() - started < 10 and 3 <= len(received) < 200
    assert eventually(lambda: metric(url, "collm_router_requests_total", replica="c", outcome="stream_broken") == 1, 5.0)
    assert router.replicas["c"].outstanding == 0


def test_stalled_stream_times_out_with_an_openai_error(loop):
    async def stall(request):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 0,
            "model": "tiny",
            "choices": [{"index": 0, "text": "hi", "logprobs": None, "finish_reason": None}],
        }
        await response.write(b"data: " + json.dumps(chunk).encode() + b'\n\ndata: {"half": ')  # then half an event, then silence
        await asyncio.sleep(30)
        return response

    fake = web.Application()
    fake.router.add_post("/v1/completions", stall)
    url, router = start_router(loop, {"stuck": loop.serve(fake)}, health_interval_s=0, stream_idle_timeout_s=0.5)
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
    started = time.monotonic()
    received = []
    with pytest.raises(openai.APIError, match="sent nothing for 0.5 s"):
        for chunk in client.completions.create(model="tiny", prompt="x", stream=True):
            received.append(chunk.choices[0].text)
    assert received == ["hi"] and time.monotonic() - started < 5


# -- metrics and command line ---------------------------------------------------------------------
def test_metrics_exposition(agents, loop):
    url, _ = start_router(loop, {"a": agents["urls"]["a"]}, health_interval_s=0)
    http("POST", url + "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 1}})
    status, body, headers = http("GET", url + "/metrics")
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    for name in (
        "collm_router_requests_total",
        "collm_router_retries_total",
        "collm_router_shed_requests_total",
        "collm_router_upstream_seconds_bucket",
        "collm_router_upstream_first_byte_seconds_bucket",
    ):
        assert name in text
    assert 'collm_router_outstanding_requests{replica="a"} 0.0' in text and 'collm_router_replica_weight{replica="a"} 1.0' in text


def test_command_line_rejects_bad_replicas(capsys):
    assert parse_replica("x=http://h:1", 0) == ReplicaEndpoint("x", "http://h:1")
    assert parse_replica("http://h:1", 2).name == "replica-2"
    for argv, words in (
        ([], "at least one replica"),
        (["--replica", "a=ftp://h"], "http:// or https://"),
        (["--replica", "a=http://h:1", "--replica", "a=http://h:2"], "given twice"),
    ):
        with pytest.raises(SystemExit):
            main(argv)
        assert words in capsys.readouterr().err


def test_collm_router_serves(agents, tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from replica_agent.router.app import main; import sys; sys.exit(main())",
            "--replica",
            f"a={agents['urls']['a']}",
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
        ],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert eventually(lambda: _up(f"http://127.0.0.1:{port}/health"), 30, 0.1), "the router did not start"
        assert Client(f"http://127.0.0.1:{port}", timeout=30).generate(PROMPT, max_new_tokens=2).details.generated_tokens == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _up(url: str) -> bool:
    with contextlib.suppress(OSError):
        return http("GET", url, timeout=2)[0] == 200
    return False


def test_admin_routes_need_the_admin_token(agents, loop):
    """PUT /admin/weights on the client port once let anyone set every weight to 0 (all requests 503)."""
    token = "s3cret-admin-token-0123456789"
    url, router = start_router(loop, {"a": agents["urls"]["a"]}, admin_token=token)
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": token}):
        status, body, answer = http("PUT", url + "/admin/weights", {"weights": {"a": 0}}, headers=headers)
        assert status == 401 and answer["WWW-Authenticate"] == "Bearer" and b"admin route" in body
        assert http("GET", url + "/admin/replicas", headers=headers)[0] == 401
    assert router.replicas["a"].weight == 1.0  # nothing changed
    status, _, _ = http("PUT", url + "/admin/weights", {"weights": {"a": 2}}, headers={"Authorization": f"Bearer {token}"})
    assert status == 200 and router.replicas["a"].weight == 2.0
    assert http("POST", url + "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 1}})[0] == 200  # clients need no token


def test_client_routes_take_the_clusters_api_keys(agents, loop, tmp_path):
    """spec.security.clientTokenSecretRef: OpenAI and TGI clients send a key from the mounted Secret; others get 401."""
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "team-a").write_text("key-a-0123456789abcdef\n")
    (keys / "..data").mkdir()  # a Secret volume's bookkeeping entry, not a token
    url, _ = start_router(loop, {"a": agents["urls"]["a"]}, client_tokens=ClientTokens(str(keys), reload_s=0.0))

    ai = openai.OpenAI(base_url=url + "/v1", api_key="key-a-0123456789abcdef", max_retries=0, timeout=30)
    assert ai.completions.create(model="tiny", prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError) as refused:
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0, timeout=30).completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
    assert refused.value.code == "invalid_api_key" and "API key" in refused.value.message

    tgi = Client(url, headers={"Authorization": "Bearer key-a-0123456789abcdef"}, timeout=30)
    assert tgi.generate(PROMPT, max_new_tokens=2).details.generated_tokens == 2
    status, body, answer = http("POST", url + "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 1}})
    assert status == 401 and answer["WWW-Authenticate"] == "Bearer" and json.loads(body)["error_type"] == "unauthorized"
    assert http("GET", url + "/health")[0] == 200 and http("GET", url + "/metrics")[0] == 200  # probes and scrapers need none

    (keys / "team-a").unlink()  # a rotated Secret: the old key stops working without a restart
    (keys / "team-b").write_text("key-b-0123456789abcdef")
    with pytest.raises(openai.AuthenticationError):
        ai.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
    assert openai.OpenAI(base_url=url + "/v1", api_key="key-b-0123456789abcdef", max_retries=0, timeout=30).models.list().data


def test_a_missing_client_token_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="clientTokenSecretRef"):
        ClientTokens(str(tmp_path / "absent"))


def test_a_request_waiting_on_a_replica_that_freezes_is_retried_when_its_health_check_fails(loop):
    """A frozen replica accepts connections and answers nothing: the attempt gives up when its health check fails, not after the first-byte timeout."""
    frozen = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await frozen.wait()  # never set: nothing is answered, the health check included
        return web.json_response({})

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"generated_text": "x"} if request.method == "POST" else {"status": "ok"})

    urls = {}
    for name, handler in (("frozen", hang), ("ok", ok)):
        app = web.Application()
        app.router.add_post("/generate", handler)
        app.router.add_get("/health", handler)
        urls[name] = loop.serve(app)
    url, router = start_router(loop, urls, health_interval_s=0.3, max_attempts=2)
    http("PUT", url + "/admin/weights", {"weights": {"frozen": 1000, "ok": 1}})
    started = time.monotonic()
    status, body, headers = http("POST", url + "/generate", {"inputs": PROMPT})
    assert status == 200 and headers[REPLICA_HEADER] == "ok" and time.monotonic() - started < 5, (status, body)
    assert metric(url, "collm_router_retries_total", replica="frozen") == 1 and not router.replicas["frozen"].healthy
