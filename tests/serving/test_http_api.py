"""The TGI-compatible HTTP API, driven by TGI's own client against a real agent on the tiny model."""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import aiohttp
import pytest
from text_generation import AsyncClient, Client
from text_generation.errors import GenerationError, OverloadedError, ValidationError

from replica_agent.agent import Agent
from replica_agent.config import AgentConfig
from replica_agent.engine.engine import QueueFull, RequestRejected
from replica_agent.engine.requests import FinalEvent, FinishReason, TokenEvent, TokenInfo
from replica_agent.serving import http_api
from replica_agent.serving.pipeline import ADAPTER_HEADER, ADAPTER_SHA_HEADER, ADMIT_IN_HEADER
from replica_agent.serving.schemas import InvalidRequest, StreamFramer, parse_generate_request, prompt_ids, sampling_params

from ..helpers import eventually, post_json

PROMPT = "The Python language reference describes"


@pytest.fixture(scope="module")
def agent(json_data):
    data = json_data
    # No automatic local revisions: what is served changes only when a test publishes.
    agent = Agent(AgentConfig(model="tiny", data=str(data), port=0, max_total_tokens=512, eval_batches=2, revision_every_seconds=0))
    agent.start()
    yield agent
    agent.stop()


@pytest.fixture
def client(server):
    return Client(server.url, timeout=60)


def post(server, path: str, body, *, raw: bool = False) -> tuple[int, dict, dict]:
    return post_json(server.url + path, body)  # raw bodies are bytes, sent as they are


def get(server, path: str) -> tuple[int, bytes, dict]:
    try:
        with urllib.request.urlopen(server.url + path, timeout=30) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def sse_events(server, body) -> list[dict]:
    """The raw `data:` events of a stream, extra keys included."""
    req = urllib.request.Request(server.url + "/generate_stream", data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        return [json.loads(line[5:]) for line in resp.read().decode().splitlines() if line.startswith("data:")]


# -- generation through TGI's client -------------------------------------------------------------
def test_generate_with_details(client):
    r = client.generate(PROMPT, max_new_tokens=12)
    assert r.details.finish_reason.value == "length"
    assert r.details.generated_tokens == len(r.details.tokens) == 12
    assert r.generated_text == "".join(t.text for t in r.details.tokens)
    assert r.details.prefill == [] and r.details.seed is None
    assert all(t.logprob is not None and t.logprob <= 0 for t in r.details.tokens)


def test_generate_stream_joins_to_final_text(client, server):
    events = list(client.generate_stream(PROMPT, max_new_tokens=16))
    assert len(events) == 16 == events[-1].details.generated_tokens
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    assert "".join(e.token.text for e in events if not e.token.special) == events[-1].generated_text
    assert events[-1].generated_text == client.generate(PROMPT, max_new_tokens=16).generated_text

    raw = sse_events(server, {"inputs": PROMPT, "parameters": {"max_new_tokens": 4, "details": True}})
    final = raw[-1]
    current = server.api.agent.store.current
    assert final["adapter_version"] == final["details"]["adapter_version"] == current.label
    assert final["adapter_sha256"] == final["details"]["adapter_sha256"] == current.sha256
    assert [e["index"] for e in raw] == [0, 1, 2, 3]


def test_concurrent_async_requests(server):
    async def main():
        client = AsyncClient(server.url, timeout=60)
        prompts = [f"{PROMPT} item {i}" for i in range(8)]
        return await asyncio.gather(*(client.generate(p, max_new_tokens=8 + i) for i, p in enumerate(prompts)))

    results = asyncio.run(main())
    assert [r.details.generated_tokens for r in results] == [8 + i for i in range(8)]


def test_async_stream(server):
    async def main():
        client = AsyncClient(server.url, timeout=60)
        return [e async for e in client.generate_stream(PROMPT, max_new_tokens=6)]

    events = asyncio.run(main())
    assert len(events) == 6 and events[-1].generated_text == "".join(e.token.text for e in events)


def test_stop_sequence(client):
    text = client.generate(PROMPT, max_new_tokens=20).generated_text
    stop = text[5:7]
    r = client.generate(PROMPT, max_new_tokens=20, stop_sequences=[stop])
    assert r.details.finish_reason.value == "stop_sequence"
    assert r.generated_text.endswith(stop) and text.startswith(r.generated_text)
    events = list(client.generate_stream(PROMPT, max_new_tokens=20, stop_sequences=[stop]))
    assert events[-1].details.finish_reason.value == "stop_sequence" and events[-1].generated_text == r.generated_text


def test_seeded_sampling_is_reproducible(client):
    kwargs = dict(do_sample=True, temperature=1.3, top_k=100, top_p=0.95, max_new_tokens=16)
    a = client.generate(PROMPT, seed=42, **kwargs)
    b = client.generate(PROMPT, seed=42, **kwargs)
    assert a.generated_text == b.generated_text and a.details.seed == 42
    texts = {client.generate(PROMPT, seed=s, **kwargs).generated_text for s in (1, 2, 3)}
    assert len(texts) > 1


def test_return_full_text_and_prefill(client, agent):
    r = client.generate(PROMPT, max_new_tokens=5, return_full_text=True, decoder_input_details=True)
    assert r.generated_text.startswith(PROMPT) and len(r.generated_text) > len(PROMPT)
    assert len(r.details.prefill) == len(agent.engine.encode(PROMPT))
    assert r.details.prefill[0].logprob is None and all(t.logprob is not None for t in r.details.prefill[1:])


def test_truncate_keeps_the_last_tokens(server, agent):
    status, body, headers = post(server, "/generate", {"inputs": "x" * 2000 + PROMPT, "parameters": {"truncate": 100, "max_new_tokens": 3}})
    assert status == 200 and headers["x-prompt-tokens"] == "101"  # BOS + the last 100 text tokens


def test_compat_route_dispatches_on_stream(server):
    status, body, _ = post(server, "/", {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}})
    assert status == 200 and isinstance(body, list) and "details" not in body[0]
    status, body, _ = post(server, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}})
    assert status == 200 and isinstance(body, dict) and set(body) == {"generated_text"}
    req = urllib.request.Request(server.url + "/", data=json.dumps({"inputs": PROMPT, "stream": True, "parameters": {"max_new_tokens": 3}}).encode())
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.read().decode().count("data:") == 3


def test_adapter_version_header(server, agent):
    status, _, headers = post(server, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}})
    assert status == 200 and headers[ADAPTER_HEADER] == agent.store.current.label and headers[ADAPTER_SHA_HEADER] == agent.store.current.sha256


# -- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(prompt=""),
        dict(prompt=PROMPT, max_new_tokens=-1),
        dict(prompt=PROMPT, max_new_tokens=10**9),
        dict(prompt=PROMPT, temperature=0.0),
        dict(prompt="word " * 200, max_new_tokens=20),
        dict(prompt=PROMPT, typical_p=0.5),
    ],
)
def test_client_validation_errors(client, kwargs):
    with pytest.raises(ValidationError):
        client.generate(**kwargs)


@pytest.mark.parametrize(
    "body, words",
    [
        (b'{"inputs": "x", ', "not valid JSON"),
        (b"", "empty"),
        (b"[1, 2]", "JSON object"),
        (b'{"inputs": 5}', "`inputs`"),
        (b'{"inputs": ""}', "cannot be empty"),
        (b'{"parameters": {}}', "`inputs` is required"),
        (b'{"inputs": "x", "parameters": {"max_new_tokens": "20"}}', "parameters.max_new_tokens"),
        (b'{"inputs": "x", "parameters": {"max_new_tokens": 0}}', "strictly positive"),
        (b'{"inputs": "x", "parameters": {"max_new_tokens": 1000000000}}', "must be <= 512"),
        (b'{"inputs": "x", "parameters": {"temperature": 0}}', "`temperature`"),
        (b'{"inputs": "x", "parameters": {"temperature": NaN}}', "NaN"),
        (b'{"inputs": "x", "parameters": {"top_p": 1.5}}', "`top_p`"),
        (b'{"inputs": "x", "parameters": {"top_k": -3}}', "`top_k`"),
        (b'{"inputs": "x", "parameters": {"repetition_penalty": 1e-300}}', "`repetition_penalty` must be between 0.0001 and 10000"),
        (b'{"inputs": "x", "parameters": {"repetition_penalty": 1e300}}', "`repetition_penalty` must be between"),
        (b'{"inputs": "x", "parameters": {"seed": -1}}', "`seed`"),
        (b'{"inputs": "x", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}', "up to 4"),
        (b'{"inputs": "x", "parameters": {"best_of": 2}}', "not supported"),
        (b'{"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "a+"}}}', "not supported"),
        (b'{"inputs": "x", "parameters": {"max_new_token": 3}}', "unknown field `parameters.max_new_token`"),
        (b'{"inputs": "x", "stream": true, "parameters": {"decoder_input_details": true}}', "streaming"),
    ],
)
def test_malformed_requests_get_tgi_validation_errors(server, body, words):
    status, payload, _ = post(server, "/", body, raw=True)
    assert status == 422, payload
    assert payload["error_type"] == "validation" and words in payload["error"]
    assert payload["error"].startswith("Input validation error")


def test_extreme_but_valid_parameters_are_served_not_failed(server):
    """Found probing the OpenAPI document's bounds: top_k 10**400 was a 500 (float() overflowed) and a
    temperature of 1e-300 a 424 (logits / temperature overflowed float32): now a huge top_k is all the
    vocabulary and a vanishing temperature decodes greedily."""
    greedy = post(server, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 6, "details": True}})[1]
    for parameters in ({"temperature": 1e-300}, {"temperature": 1e-300, "do_sample": True, "top_k": 5}, {"top_k": 10**400, "truncate": 10**400}):
        status, body, _ = post(server, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 6, "details": True, **parameters}})
        assert status == 200, body
        assert all(math.isfinite(t["logprob"]) for t in body["details"]["tokens"])
        if "temperature" in parameters:
            assert body["generated_text"] == greedy["generated_text"] and body["details"]["seed"] is None


def test_unknown_null_fields_are_ignored(server):
    status, body, _ = post(server, "/generate", {"inputs": PROMPT, "model": None, "parameters": {"max_new_tokens": 1, "adapter_id": None, "new_thing": None}})
    assert status == 200 and body["generated_text"]


def test_overload_and_engine_failures_map_to_tgi_errors(client, server, agent, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(agent.engine.settings, "max_queue", 0)
        with pytest.raises(OverloadedError, match="queue is full"):
            client.generate(PROMPT, max_new_tokens=2)
        status, _, headers = post(server, "/generate", {"inputs": PROMPT})
        assert status == 429 and headers["Retry-After"] == "1"  # TGI's dialect says when to retry, as OpenAI's does

    def late(*_args, **_kwargs):
        raise QueueFull("past its TTFT SLO", retry_after_s=2.5)

    with monkeypatch.context() as m:  # SLO-aware shedding: the precise wait for the router, whole seconds for clients
        m.setattr(agent.engine, "submit", late)
        for path, body in (("/generate", {"inputs": PROMPT}), ("/v1/completions", {"model": "tiny", "prompt": PROMPT})):
            status, _, headers = post(server, path, body)
            assert status == 429 and headers["Retry-After"] == "3" and headers[ADMIT_IN_HEADER] == "2500", (path, headers)

    async def failing(ids, params, **_):
        yield FinalEvent(FinishReason.ERROR, "", 0, None, None, len(ids), error="engine error: boom")

    with monkeypatch.context() as m:
        m.setattr(agent.engine, "stream", failing)
        status, body, _ = post(server, "/generate", {"inputs": PROMPT})
        assert (status, body) == (424, {"error": "engine error: boom", "error_type": "generation"})
        with pytest.raises(GenerationError, match="boom"):
            list(client.generate_stream(PROMPT))

    async def stopped(ids, params, **_):
        raise RequestRejected("the engine is not running")
        yield

    with monkeypatch.context() as m:
        m.setattr(agent.engine, "stream", stopped)
        status, body, _ = post(server, "/generate", {"inputs": PROMPT})
        assert status == 503 and "not running" in body["error"]
    metrics = get(server, "/metrics")[1].decode()
    assert 'collm_requests_total{outcome="overloaded"} 4.0' in metrics  # two queue-full, two predicted late


# -- information and control ---------------------------------------------------------------------
def test_info_health_stats(server, agent):
    status, body, _ = get(server, "/info")
    info = json.loads(body)
    assert status == 200 and info["model_id"] and info["max_total_tokens"] == 512 and info["max_input_tokens"] == 511
    assert info["adapter"]["version"] == agent.store.current.label and info["model_device_type"] == "cpu"
    status, body, _ = get(server, "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body, _ = get(server, "/stats")
    assert status == 200 and json.loads(body)["replica_id"] == "agent-0"
    status, body, _ = get(server, "/nope")
    assert status == 404 and json.loads(body)["error_type"] == "not_found"


def test_metrics_exposition(server, client):
    client.generate(PROMPT, max_new_tokens=2)
    status, body, headers = get(server, "/metrics")
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    for name in ("collm_requests_total", "collm_time_to_first_token_seconds", "collm_adapter_version", "collm_training_share"):
        assert name in text
    assert 'collm_requests_total{outcome="validation"}' in text


def test_publish_serves_the_next_local_revision(server, agent):
    before = agent.store.current
    status, body, _ = post(server, "/publish", {})
    assert status == 200 and body["version"] == f"{before.cluster_version}.{before.revision + 1}" == agent.store.current.label and len(body["sha256"]) == 64
    status, _, headers = post(server, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 1}})
    assert headers[ADAPTER_HEADER] == body["version"] and headers[ADAPTER_SHA_HEADER] == body["sha256"]


def test_publish_without_trainer_is_a_conflict(server, agent, monkeypatch):
    monkeypatch.setattr(agent, "trainer", None)
    status, body, _ = post(server, "/publish", {})
    assert status == 409 and "--data" in body["error"]


def test_feedback(server, agent, monkeypatch):
    status, body, _ = post(server, "/feedback", {"prompt": "p", "completion": "c"})
    assert status == 404 and "--feedback" in body["error"]
    monkeypatch.setattr(agent.config, "feedback", True)
    status, body, _ = post(server, "/feedback", {"prompt": "2 + 2 =", "completion": " 4"})
    assert status == 200
    path = agent.config.data + "/feedback.jsonl"
    assert body["path"] == path
    with open(path) as f:
        assert [json.loads(line) for line in f] == [{"prompt": "2 + 2 =", "completion": " 4"}]
    status, body, _ = post(server, "/feedback", {"prompt": "", "completion": "x"})
    assert status == 422 and body["error_type"] == "validation"


def test_draining_or_stuck_replica_is_unhealthy(server, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(server.api, "draining", True)
        status, body, _ = get(server, "/health")
        assert status == 503 and "shutting down" in json.loads(body)["error"]
    with monkeypatch.context() as m:
        m.setattr(http_api, "HEALTH_STALE_S", -1.0)
        status, body, _ = get(server, "/health")
        assert status == 503 and "has not completed an iteration" in json.loads(body)["error"]


SERVER_SCRIPT = """
import logging
from replica_agent.agent import Agent
from replica_agent.config import AgentConfig
from replica_agent.serving.http_api import run_server
logging.basicConfig(level=logging.INFO)
run_server(Agent(AgentConfig(model="tiny", port=0, max_total_tokens=256)))
"""


def test_sigterm_finishes_in_flight_streams_then_exits(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT], stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        url = None
        for line in proc.stderr:
            if "serving the TGI API on " in line:
                url = line.strip().rsplit(" ", 1)[-1]
                break
        assert url, "the server did not start"
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
        events = Client(url, timeout=30).generate_stream(PROMPT, max_new_tokens=60)
        first = next(events)
        proc.send_signal(signal.SIGTERM)
        rest = list(events)
        assert first.token and len(rest) == 59 and rest[-1].details.generated_tokens == 60
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- robustness ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/generate_stream", "/generate"])
def test_disconnect_mid_request_frees_the_pin(server, agent, path):
    cancelled = server.api.metrics.requests.labels("cancelled")
    before = cancelled._value.get()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", path, body=json.dumps({"inputs": PROMPT, "parameters": {"max_new_tokens": 400}}))
    if path == "/generate_stream":
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data:")
        resp.close()
    assert eventually(lambda: agent.store.pins() != {}, 5.0)  # the request holds its version
    conn.close()
    assert eventually(lambda: agent.store.pins() == {}, 5.0), agent.store.pins()
    assert eventually(lambda: cancelled._value.get() == before + 1, 2.0)  # cancelled, not run to the end


def test_malformed_burst_does_not_disturb_valid_streams(server):
    bad_bodies = [b"{", b'{"inputs": 5}', b'{"inputs": "x", "parameters": {"max_new_tokens": -1}}', b"\xff\xfe", b'{"inputs": "' + b"y" * 3000 + b'"}', b"null"]

    async def bad(session: aiohttp.ClientSession, i: int) -> int:
        path = ("/", "/generate", "/generate_stream")[i % 3]
        async with session.post(server.url + path, data=bad_bodies[i % len(bad_bodies)]) as resp:
            assert (await resp.json())["error_type"] == "validation"
            return resp.status

    async def good(client: AsyncClient, i: int) -> tuple[int, str, str]:
        events = [e async for e in client.generate_stream(f"{PROMPT} {i}", max_new_tokens=10 + i)]
        return len(events), "".join(e.token.text for e in events), events[-1].generated_text

    async def main():
        client = AsyncClient(server.url, timeout=60)
        async with aiohttp.ClientSession() as session:
            goods = [asyncio.ensure_future(good(client, i)) for i in range(6)]
            statuses = []
            for i in range(36):
                statuses.append(await bad(session, i))
                await asyncio.sleep(0.005)
            return await asyncio.gather(*goods), statuses

    goods, statuses = asyncio.run(main())
    assert set(statuses) == {422}
    for i, (n, joined, final) in enumerate(goods):
        assert n == 10 + i and joined == final


# -- pure conversions ----------------------------------------------------------------------------
def tok(i: int, text: str, special: bool = False, finish: FinishReason | None = None) -> TokenEvent:
    return TokenEvent(TokenInfo(100 + i, text, -0.5, special), i, finish)


def final(text: str, n: int, reason=FinishReason.LENGTH) -> FinalEvent:
    return FinalEvent(reason, text, n, None, "7.3", 3, adapter_sha256="ab" * 32)


def test_framer_holds_back_only_the_token_the_engine_marks_last():
    framer = StreamFramer(details=True)
    assert [f["token"]["text"] for f in framer.token(tok(0, "a"))] == ["a"]
    assert [f["token"]["text"] for f in framer.token(tok(1, "", special=True))] == [""]  # special, but not the end: out at once
    assert framer.token(tok(2, "c", finish=FinishReason.LENGTH)) == []  # the last one: held for the final frame
    (last,) = framer.final(final("acd", 3))  # "d": a tail the detokenizer released at the end
    assert last["token"]["text"] == "cd" and last["generated_text"] == "acd" and last["index"] == 2
    assert last["details"] == {
        "finish_reason": "length",
        "generated_tokens": 3,
        "seed": None,
        "input_length": 3,
        "adapter_version": "7.3",
        "adapter_sha256": "ab" * 32,
    }
    assert last["adapter_version"] == "7.3" and last["adapter_sha256"] == "ab" * 32


def test_framer_stays_well_formed_when_no_token_was_marked_last():
    framer = StreamFramer(details=False, prefix="P:")
    assert len(framer.token(tok(0, "x"))) == 1
    assert len(framer.token(tok(1, "y"))) == 1
    out = framer.final(final("xy", 2, FinishReason.STOP_SEQUENCE))
    assert out[-1]["generated_text"] == "P:xy" and out[-1]["details"] is None and out[-1]["token"]["text"] == ""


def test_framer_reports_errors_and_drops_cancelled():
    framer = StreamFramer(details=True)
    framer.token(tok(0, "a"))
    err = FinalEvent(FinishReason.ERROR, "", 0, None, None, 3, error="boom")
    assert framer.final(err) == [{"error": "boom", "error_type": "generation"}]
    assert StreamFramer(details=True).final(FinalEvent(FinishReason.CANCELLED, "", 0, None, None, 3)) == []


def test_request_parsing_helpers():
    req = parse_generate_request({"inputs": "hi", "stream": True, "parameters": {"top_p": 1.0, "stop": ["\n"]}}, stream=False)
    assert req.stream is False and req.params.top_p == 1.0
    assert sampling_params(req.params, prompt_tokens=500, max_total_tokens=512).max_new_tokens == 12
    assert sampling_params(req.params, prompt_tokens=5, max_total_tokens=512).max_new_tokens == 20
    assert prompt_ids([1, 5, 6, 7], 2, bos_token_id=1) == [1, 6, 7]
    assert prompt_ids([5, 6, 7], 2, bos_token_id=None) == [6, 7]
    with pytest.raises(InvalidRequest, match="`watermark`"):
        parse_generate_request({"inputs": "hi", "parameters": {"watermark": True}})
    assert parse_generate_request({"inputs": "hi", "parameters": {"top_k": 10**400, "truncate": 10**400}}).params.top_k == 10**400
    cold = sampling_params(parse_generate_request({"inputs": "hi", "parameters": {"do_sample": True, "temperature": 1e-6, "top_p": 0.5}}).params, 5, 512)
    assert (cold.sampling, cold.temperature, cold.top_p) == (False, None, None)
    warm = sampling_params(parse_generate_request({"inputs": "hi", "parameters": {"temperature": 1e-5, "top_k": 3}}).params, 5, 512)
    assert (warm.sampling, warm.temperature, warm.top_k) == (True, 1e-5, 3)


@pytest.mark.parametrize("path, key", [("/generate", "error"), ("/v1/completions", "error")])
def test_a_body_over_the_size_limit_gets_413_naming_the_limit(server, path, key):
    """aiohttp's 413 exception keeps no limit; the answer names the request's own (1 MiB by default)."""
    status, payload, _ = post(server, path, b'{"inputs": "' + b"x" * (1100 << 10) + b'"}', raw=True)
    assert status == 413, payload
    text = payload[key] if isinstance(payload[key], str) else payload[key]["message"]
    assert "larger than 1048576 bytes" in text


@pytest.mark.parametrize("path", ["/generate", "/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(
    "raw, words",
    [
        (b"[" * 100_000 + b"]" * 100_000, "nests JSON deeper"),  # once a RecursionError: 500
        (b'{"inputs": "\\ud800", "prompt": "\\ud800", "text": "\\ud800"}', "lone surrogate"),  # once a tokenizer error: 500
    ],
)
def test_malformed_json_is_a_client_error_never_a_500(server, path, raw, words):
    status, payload, _ = post(server, path, raw, raw=True)
    assert 400 <= status < 500, (status, payload)
    assert words in json.dumps(payload)


def test_admin_routes_need_the_admin_token_when_one_is_configured(server, agent, tmp_path, monkeypatch):
    """POST /publish and /feedback once needed nothing."""
    from replica_agent.serving.pipeline import read_token

    path = tmp_path / "token"
    path.write_text("admin-token-0123456789abcdef\n")
    monkeypatch.setattr(server.api, "admin_token", read_token(str(path)))
    before = agent.store.current.label
    for headers in ({}, {"Authorization": "Bearer nope"}):
        status, body, answer = post_json(server.url + "/publish", {}, headers)
        assert status == 401 and answer["WWW-Authenticate"] == "Bearer" and "admin route" in body["error"]
    assert agent.store.current.label == before
    status, _, _ = post_json(server.url + "/publish", {}, {"Authorization": "Bearer admin-token-0123456789abcdef"})
    assert status == 200
    with pytest.raises(ValueError, match="at least 16"):
        path.write_text("short")
        read_token(str(path))
