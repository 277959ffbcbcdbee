"""The OpenAI-compatible routes, driven by the official `openai` client against a real agent on the tiny model."""

from __future__ import annotations

import openai
import pytest

from replica_agent.agent import Agent
from replica_agent.config import AgentConfig
from replica_agent.engine.requests import FinalEvent, FinishReason, TokenEvent, TokenInfo
from replica_agent.serving.openai_schemas import OpenAIError, ResponseBuilder, cut_at_stop, parse_openai_request, sampling_params
from replica_agent.serving.pipeline import ADAPTER_HEADER

from ..helpers import post_json

PROMPT = "The Python language reference describes"
MESSAGES = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is a list?"}]


@pytest.fixture(scope="module")
def agent(json_data):
    data = json_data
    # Data without training: the adapter can be published on demand, and no trainer competes for the CPU.
    agent = Agent(AgentConfig(model="tiny", data=str(data), train=False, port=0, max_total_tokens=256, eval_batches=1))
    agent.start()
    yield agent
    agent.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def post(server, path: str, body) -> tuple[int, dict, dict]:
    return post_json(server.url + path, body)


def tgi_text(server, inputs: str, max_new_tokens: int) -> str:
    return post(server, "/generate", {"inputs": inputs, "parameters": {"max_new_tokens": max_new_tokens}})[1]["generated_text"]


def fingerprint(agent) -> str:
    return f"collm-adapter-{agent.store.current.label}"


# -- completions ----------------------------------------------------------------------------------
def test_completion_is_the_greedy_tgi_text(client, server, agent):
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    (choice,) = r.choices
    assert choice.text == tgi_text(server, PROMPT, 12) and choice.finish_reason == "length"
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == "tiny"
    assert r.system_fingerprint == fingerprint(agent)
    n_prompt = len(agent.engine.encode(PROMPT))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 12, n_prompt + 12)
    assert client.completions.create(model="tiny", prompt=[PROMPT], max_tokens=12, temperature=0).choices[0].text == choice.text
    assert client.completions.create(model="tiny", prompt=PROMPT, temperature=0).usage.completion_tokens == 16  # OpenAI's default
    # A vanishing temperature is greedy too; 1e-300 overflowed float32 in the sampler and was a 500.
    assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1e-300).choices[0].text == choice.text


def test_completion_stream(client, agent):
    text = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0).choices[0].text
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}))
    *tokens, usage = chunks
    assert "".join(c.choices[0].text for c in tokens) == text
    assert [c.choices[0].finish_reason for c in tokens] == [None] * (len(tokens) - 1) + ["length"]
    assert tokens[-1].system_fingerprint == fingerprint(agent) and len({c.id for c in chunks}) == 1
    assert usage.choices == [] and usage.usage.completion_tokens == 10


def test_stop_sequence_is_left_out(client):
    text = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0).choices[0].text
    stop = text[6:8]
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0, stop=stop)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == text[: text.find(stop)]
    streamed = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop, "\x00"], stream=True))
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text and streamed[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client):
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=16, temperature=1.3, top_p=0.95)
    a = client.completions.create(seed=42, **kwargs).choices[0].text
    assert client.completions.create(seed=42, **kwargs).choices[0].text == a
    assert len({client.completions.create(seed=s, **kwargs).choices[0].text for s in (1, 2, 3)}) > 1


# -- chat -----------------------------------------------------------------------------------------
def test_chat_uses_the_chat_template(client, server, agent):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "length" and r.object == "chat.completion"
    rendered = agent.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("assistant: ")  # the tiny model's plain-text template
    assert choice.message.content == tgi_text(server, rendered, 12)  # BOS added as for a plain prompt
    assert r.usage.prompt_tokens == len(agent.engine.encode(rendered)) and r.system_fingerprint == fingerprint(agent)
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "a list?"}]}]
    assert client.chat.completions.create(model="tiny", messages=parts, max_tokens=3, temperature=0).usage.prompt_tokens == len(
        agent.engine.encode(agent.tokenizer.apply_chat_template([{"role": "user", "content": "What is a list?"}], add_generation_prompt=True, tokenize=False))
    )


def test_chat_stream(client):
    content = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0).choices[0].message.content
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == content
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].system_fingerprint.startswith("collm-adapter-")


def test_chat_without_max_tokens_fills_the_context(client, agent):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], temperature=0)
    assert r.usage.total_tokens == 256 or r.choices[0].finish_reason == "stop"


# -- models and adapter versions ------------------------------------------------------------------
def test_models_and_adapter_versions(client, agent):
    before = agent.store.current.label
    assert [m.id for m in client.models.list()] == ["tiny", f"tiny@{before}"]
    new = agent.publish().label
    assert f"tiny@{new}" in [m.id for m in client.models.list()]
    raw = client.completions.with_raw_response.create(model=f"tiny@{before}", prompt=PROMPT, max_tokens=2)
    assert raw.headers[ADAPTER_HEADER] == new and raw.parse().system_fingerprint == f"collm-adapter-{new}"
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert err.value.status_code == 404 and err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tiny@latest", prompt=PROMPT)


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(n=2), "n"),
        (dict(logprobs=1), "logprobs"),
        (dict(echo=True), "echo"),
        (dict(best_of=3), "best_of"),
        (dict(max_tokens=10**6), "max_tokens"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=2.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(seed=-1), "seed"),
        (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
        (dict(prompt=["a", "b"]), "prompt"),
        (dict(prompt="word " * 300), "prompt"),
    ],
)
def test_completion_errors(client, kwargs, param):
    kwargs = {"model": "tiny", "prompt": PROMPT, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**kwargs)
    assert err.value.status_code == 400 and err.value.body["param"] == param and err.value.body["type"] == "invalid_request_error"


def test_chat_errors(client):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, tools=tools)
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="tiny", messages=[{"role": "tool", "content": "1", "tool_call_id": "x"}])
    with pytest.raises(openai.BadRequestError, match="context length") as err:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=1000)
    assert err.value.body["code"] == "context_length_exceeded"


@pytest.mark.parametrize(
    "path, body, words",
    [
        ("/v1/completions", b"", "empty"),
        ("/v1/completions", b'{"model": "tiny", ', "not valid JSON"),
        ("/v1/completions", b"[1]", "JSON object"),
        ("/v1/completions", b'{"model": "tiny"}', "`prompt` is required"),
        ("/v1/completions", b'{"model": "tiny", "prompt": "x", "max_tokens": "5"}', "`max_tokens`"),
        ("/v1/completions", b'{"model": "tiny", "prompt": "x", "frequency_penalty": 0.5}', "frequency_penalty"),
        ("/v1/completions", b'{"model": "tiny", "prompt": "x", "max_token": 5}', "Unrecognized request argument supplied: max_token"),
        ("/v1/completions", b'{"model": "tiny", "prompt": "x", "stream_options": {"include_usage": true}}', "stream=true"),
        ("/v1/chat/completions", b'{"model": "tiny", "messages": []}', "at least one message"),
        ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', "only text"),
        ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user"}]}', "must be a string"),
        (
            "/v1/chat/completions",
            b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}',
            "response_format",
        ),
    ],
)
def test_malformed_requests_get_openai_errors(server, path, body, words):
    status, payload, _ = post(server, path, body)
    assert status == 400, payload
    assert set(payload["error"]) == {"message", "type", "param", "code"} and words in payload["error"]["message"]


def test_overload_unknown_route_and_engine_failure(client, server, agent, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(agent.engine.settings, "max_queue", 0)
        with pytest.raises(openai.RateLimitError, match="queue is full"):
            client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
        status, body, headers = post(server, "/v1/chat/completions", {"model": "tiny", "messages": MESSAGES})
        assert status == 429 and headers["Retry-After"] == "1" and body["error"]["code"] == "rate_limit_exceeded"
    status, body, _ = post(server, "/v1/embeddings", {"model": "tiny", "input": "x"})
    assert status == 404 and "error" in body and "message" in body["error"]

    async def fails_after_a_token(ids, params, **_):
        yield TokenEvent(TokenInfo(5, "a", -0.1), 0)
        yield FinalEvent(FinishReason.ERROR, "", 0, None, None, len(ids), error="engine error: boom")

    with monkeypatch.context() as m:
        m.setattr(agent.engine, "stream", fails_after_a_token)
        with pytest.raises(openai.APIError, match="boom"):
            list(client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True))
        with pytest.raises(openai.InternalServerError, match="boom"):
            client.completions.create(model="tiny", prompt=PROMPT)

    async def fails_at_once(ids, params, **_):
        yield FinalEvent(FinishReason.ERROR, "", 0, None, None, len(ids), error="prefill failed: boom")

    with monkeypatch.context() as m:
        m.setattr(agent.engine, "stream", fails_at_once)
        with pytest.raises(openai.InternalServerError, match="prefill failed"):  # a 500 before the stream starts
            list(client.completions.create(model="tiny", prompt=PROMPT, stream=True))


# -- pure parts -----------------------------------------------------------------------------------
def request(**body):
    return parse_openai_request({"model": "tiny", "prompt": "p", **body}, chat=False)


def test_sampling_follows_openai_semantics():
    assert sampling_params(request(), 10, 256).do_sample and sampling_params(request(), 10, 256).max_new_tokens == 16
    greedy = sampling_params(request(temperature=0, top_p=0.5), 10, 256)
    assert not greedy.do_sample and greedy.top_p is None and greedy.temperature is None
    assert sampling_params(request(temperature=1e-300, top_p=0.5), 10, 256) == greedy  # 1 / 1e-300 overflowed float32: a 500
    hot = sampling_params(request(temperature=0.7, top_p=0.9, seed=3, stop="x"), 10, 256)
    assert (hot.temperature, hot.top_p, hot.seed, hot.stop) == (0.7, 0.9, 3, ("x",))
    assert sampling_params(request(), 250, 256).max_new_tokens == 6  # the default shrinks to the room left
    chat = parse_openai_request({"messages": [{"role": "user", "content": "hi"}]}, chat=True)
    assert sampling_params(chat, 56, 256).max_new_tokens == 200
    with pytest.raises(OpenAIError, match="maximum context length"):
        sampling_params(request(max_tokens=247), 10, 256)


def tok(i: int, text: str) -> TokenEvent:
    return TokenEvent(TokenInfo(i, text, -0.1), i)


def test_stream_never_shows_a_stop_sequence():
    builder = ResponseBuilder(request(stop=["END", "zz"]), "tiny")
    texts = [c["choices"][0]["text"] for t in ("ab", "E", "N", "D!") for c in builder.token(tok(0, t))]
    assert texts == ["ab"]  # "E", "EN" may start END; "END!" completes it
    (last,) = builder.final(FinalEvent(FinishReason.STOP_SEQUENCE, "abEND!", 4, None, "3.1", 2))
    assert last["choices"][0] == {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"} and last["system_fingerprint"] == "collm-adapter-3.1"

    builder = ResponseBuilder(request(stop=["END"]), "tiny")
    texts = [c["choices"][0]["text"] for t in ("a", "EN", "x", "E") for c in builder.token(tok(0, t))]
    assert texts == ["a", "ENx"]  # a false alarm is released with the next token
    (last,) = builder.final(FinalEvent(FinishReason.LENGTH, "aENxE~", 4, None, 3, 2))  # "~": a tail released at the end
    assert last["choices"][0]["text"] == "E~" and last["choices"][0]["finish_reason"] == "length"
    assert cut_at_stop("abENDcdzz", ("zz", "END")) == "ab" and cut_at_stop("abc", ()) == "abc"
