"""The OpenAPI documents of the agent and the router stay true to their apps: the same routes with the
same methods, valid OpenAPI 3.2, examples their own parsers accept, answers their response models
describe; both serve them at /openapi.json and /docs without a token. No model is loaded here; the
fuzzing test (test_openapi_fuzz.py) checks a live agent's answers against the document.
"""

from __future__ import annotations

import asyncio
import json
import re
from types import SimpleNamespace

import pytest
import schemathesis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from replica_agent.engine.requests import FinalEvent, FinishReason, TokenEvent, TokenInfo
from replica_agent.router.app import ClientTokens, ReplicaEndpoint, create_router_app
from replica_agent.router.openapi import router_document
from replica_agent.serving import openai_schemas as oai
from replica_agent.serving import schemas as tgi
from replica_agent.serving.http_api import create_app
from replica_agent.serving.openapi import agent_document, render_html


def agent_app() -> web.Application:
    """The agent's routes, on an agent stub: building the app reads no more than this."""
    engine = SimpleNamespace(observers=[])
    return create_app(SimpleNamespace(config=SimpleNamespace(admin_token_file=None, replica_id="stub"), engine=engine))


def router_app(**settings) -> web.Application:
    return create_router_app([ReplicaEndpoint("a", "http://127.0.0.1:9")], health_interval_s=0, **settings)


APPS = {"agent": (agent_app, agent_document), "router": (router_app, router_document)}


def registered(app: web.Application) -> dict[str, set[str]]:
    routes: dict[str, set[str]] = {}
    for route in app.router.routes():
        routes.setdefault(route.resource.canonical, set()).add(route.method.lower())
    return routes


@pytest.mark.parametrize("name", APPS)
def test_every_route_is_documented_with_its_methods_and_nothing_else(name):
    make_app, document = APPS[name]
    routes = registered(make_app())
    for path, methods in routes.items():  # aiohttp answers HEAD on every GET route; the document leaves it implicit
        assert ("head" in methods) == ("get" in methods), path
    assert {path: methods - {"head"} for path, methods in routes.items()} == {path: set(item) for path, item in document()["paths"].items()}


@pytest.mark.parametrize("name", APPS)
def test_the_document_is_valid_openapi_and_every_operation_says_its_errors(name):
    document = APPS[name][1]()
    schemathesis.openapi.from_dict(document).validate()  # the OpenAPI 3.2 meta-schema
    schemas = document["components"]["schemas"]
    for path, item in document["paths"].items():
        for method, op in item.items():
            where = f"{method.upper()} {path}"
            assert "200" in op["responses"], where
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body is not None:
                assert set(op["responses"]) & {"400", "422"}, f"{where} takes a body but documents no validation error"
            if "security" in op:
                assert op["responses"]["401"]["headers"]["WWW-Authenticate"]["required"], where
            for status, response in op["responses"].items():
                if status == "429":
                    assert response["headers"]["Retry-After"]["required"], where
                if status != "200":
                    (error,) = response["content"].values()
                    assert error["schema"]["$ref"].rsplit("/", 1)[1] in ("ErrorResponse", "OpenAIErrorResponse"), where
    for ref in set(re.findall(r'"#/components/schemas/(\w+)"', json.dumps(document))):
        assert ref in schemas, f"{ref} is referenced but not defined"


def test_the_router_documents_the_agents_client_routes_with_the_agents_schemas():
    agent, router = agent_document(), router_document()
    for path in ("/generate", "/v1/chat/completions", "/v1/models"):
        ((method, mine),) = router["paths"][path].items()
        theirs = agent["paths"][path][method]
        assert mine.get("requestBody") == theirs.get("requestBody") and mine["responses"]["200"] == theirs["responses"]["200"]
        assert {"401", "429", "502", "503"} <= set(mine["responses"]) and mine["security"] == [{"clientToken": []}, {}]
    for name in ("GenerateRequest", "ChatCompletionRequest", "StreamResponse", "ModelList"):
        assert router["components"]["schemas"][name] == agent["components"]["schemas"][name]
    assert router["paths"]["/admin/weights"]["put"]["security"] == [{"adminToken": []}]


def test_request_schemas_are_the_parsers_models_and_their_examples_parse():
    schemas = agent_document()["components"]["schemas"]
    assert schemas["GenerateRequest"]["required"] == ["inputs"]
    # What the parsers enforce beyond the types, from their own tables: unknown keys only when null,
    # unsupported parameters only "off".
    assert schemas["GenerateParameters"]["additionalProperties"] == {"type": "null"}
    assert schemas["GenerateParameters"]["properties"]["best_of"]["allOf"][1] == {"enum": [None, 1]}
    assert schemas["ChatCompletionRequest"]["properties"]["tools"]["allOf"][1] == {"enum": [None, []]}
    for example in schemas["GenerateRequest"]["examples"]:
        tgi.parse_generate_request(example)
    for name, chat in (("CompletionRequest", False), ("ChatCompletionRequest", True)):
        for example in schemas[name]["examples"]:
            oai.parse_openai_request(example, chat=chat)


def token(i: int, text: str, reason: FinishReason | None = None) -> TokenEvent:
    return TokenEvent(TokenInfo(i, text, -0.5), i, reason)


FINAL = FinalEvent(FinishReason.LENGTH, "ab", 2, 7, "3.1", 4, prefill=(TokenInfo(1, "<s>", None),), tokens=(TokenInfo(5, "a", -0.1), TokenInfo(6, "b", -0.2)))


def test_response_models_describe_what_the_builders_send():
    """The same check as the fuzzer's conformance check, on every builder, without a server."""
    for details in (False, True):
        tgi.GenerateResponse.model_validate(tgi.generate_body(FINAL, details=details))
        framer = tgi.StreamFramer(details=details)
        for frame in [*framer.token(token(0, "a")), *framer.token(token(1, "b", FinishReason.LENGTH)), *framer.final(FINAL)]:
            tgi.StreamResponse.model_validate(frame)
    tgi.ErrorResponse.model_validate(tgi.error_body("boom", "generation"))
    for chat, body, chunk in ((False, oai.Completion, oai.CompletionChunk), (True, oai.ChatCompletion, oai.ChatCompletionChunk)):
        raw = {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
        builder = oai.ResponseBuilder(oai.parse_openai_request({**raw, "stream": True, "stream_options": {"include_usage": True}}, chat=chat), "tiny")
        body.model_validate(builder.body(FINAL))
        for frame in [*builder.start(), *builder.token(token(0, "a")), *builder.token(token(1, "b")), *builder.final(FINAL)]:
            chunk.model_validate(frame)
    oai.ModelList.model_validate(oai.models_body("tiny", [("3.1", 1.0)], 0))
    oai.OpenAIErrorResponse.model_validate(oai.OpenAIError(404, "no such model", param="model").body())


def test_the_docs_page_shows_every_operation_and_schema_and_loads_nothing():
    for document in (agent_document(), router_document()):
        page = render_html(document)
        for path, item in document["paths"].items():
            for method in item:
                assert f"<span class='m'>{method.upper()}</span> <code>{path}</code>" in page
        for name in document["components"]["schemas"]:
            assert f"id='schema-{name}'" in page
        assert not re.search(r"(src|href)=['\"]?(https?:)?//", page), "the page must work offline"


def test_both_serve_their_document_and_page_without_a_token(tmp_path):
    (tmp_path / "client").write_text("client-token-0123456789")
    router = router_app(client_tokens=ClientTokens(str(tmp_path)))

    async def get(app: web.Application, *paths: str) -> list[tuple[int, str, str]]:
        async with TestClient(TestServer(app)) as client:
            return [(r.status, r.content_type, await r.text()) for r in [await client.get(path) for path in paths]]

    for app, document, more in ((agent_app(), agent_document(), ()), (router, router_document(), ("/info",))):
        (json_status, json_type, served), (page_status, page_type, page), *rest = asyncio.run(get(app, "/openapi.json", "/docs", *more))
        assert (json_status, json_type, json.loads(served)) == (200, "application/json", document)
        assert (page_status, page_type) == (200, "text/html") and "<h1>" in page
    assert rest[0][0] == 401  # the router's client routes still need a token
