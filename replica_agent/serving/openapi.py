"""OpenAPI documents of the agent and the router (GET /openapi.json) and a page showing them (GET /docs).

Built, not written: request schemas are the JSON schemas of the very pydantic models that
parse_generate_request and parse_openai_request validate with, answers are the response models of
schemas.py and openai_schemas.py, and the operations below say which route takes and answers what.
Tests keep the document equal to each app's route table (tests/serving/test_openapi.py) and every
answer of a live agent conformant to it (schemathesis, tests/serving/test_openapi_fuzz.py).

OpenAPI 3.2, for its `itemSchema`: a stream (text/event-stream) is described event by event, each
event's `data` being JSON of one of the stream's event models (or OpenAI's closing `[DONE]`). The
page is plain HTML rendered here from the document: the product runs offline, so no viewer from a
CDN. Every GET route also answers HEAD (aiohttp), which the document leaves implicit.
"""

from __future__ import annotations

import functools
import html
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .. import __version__
from . import openai_schemas as oai
from . import schemas as tgi
from .pipeline import ADAPTER_HEADER, ADAPTER_SHA_HEADER, ADMIT_IN_HEADER

OPENAPI_VERSION = "3.2.0"
REF_TEMPLATE = "#/components/schemas/{model}"
JSON, SSE, TEXT, HTML = "application/json", "text/event-stream", "text/plain", "text/html"
ADMIN, CLIENT = "adminToken", "clientToken"  # security schemes
Dialect = Literal["tgi", "openai"]


@dataclass(frozen=True)
class Events:
    """A text/event-stream body: each event's `data` is JSON of one of `models`; with `done` the
    stream ends with `data: [DONE]`."""

    models: tuple[type[BaseModel], ...]
    done: bool = False


@dataclass(frozen=True)
class Operation:
    """One route and method. `ok` maps each media type of a 200 to its schema: a model, Events, or a
    JSON schema whose values may be models. `errors` maps each other status to when it is sent; the
    body is the dialect's error body."""

    method: Literal["get", "post", "put"]
    path: str
    summary: str
    dialect: Dialect
    body: type[BaseModel] | None = None
    ok: Mapping[str, Any] = field(default_factory=dict)
    ok_headers: Mapping[str, str] = field(default_factory=dict)  # header -> what it says (documented as optional)
    errors: Mapping[int, str] = field(default_factory=dict)
    security: str | None = None  # the bearer scheme that may be checked; 401 is documented with it
    security_optional: bool = False  # the token is checked only where one is configured

    def with_errors(self, errors: Mapping[int, str], **changes: Any) -> Operation:
        return replace(self, errors={**self.errors, **errors}, **changes)


GENERATION_HEADERS = {
    "x-prompt-tokens": "prompt tokens",
    "x-generated-tokens": "generated tokens",
    ADAPTER_HEADER: "the adapter version that served the request, `<cluster version>.<local revision>`",
    ADAPTER_SHA_HEADER: "that version's sha256",
    "x-queue-time": "milliseconds the request waited before admission",
    "x-time-per-token": "mean milliseconds per generated token",
}
TOO_LARGE = "the body is larger than the server reads"
OVERLOADED = (
    "the replica's queue is full, or the request would wait past its TTFT SLO for its first token (SLO-aware admission): "
    "retry after Retry-After seconds, or on another replica"
)
NOT_RUNNING = "the engine is not running (shutting down): retry on another replica"
TGI_GENERATION_ERRORS = {
    413: TOO_LARGE,
    422: "invalid request (error_type validation): `error` says what to change",
    424: "the engine failed the request before it finished (error_type generation)",
    429: OVERLOADED,
    503: NOT_RUNNING,
}
OPENAI_GENERATION_ERRORS = {
    400: "invalid request: `error.param` names the field, `error.message` what to change",
    404: "`model` names no model of this server (GET /v1/models lists them)",
    413: TOO_LARGE,
    429: OVERLOADED,
    500: "the engine failed the request before its first token (code generation_failed)",
    503: NOT_RUNNING,
}
TGI_EVENTS = Events((tgi.StreamResponse, tgi.ErrorResponse))
STATS = {
    "type": "object",
    "description": "AgentStats.as_dict() (collm_control/stats.py), what the operator plans with, plus `slo_attainment` "
    "(share of the last 60 s's requests within the SLO, null when none) and /stats-only extras",
    "required": ["replica_id"],
    "additionalProperties": True,
}
STRING = {"type": "string"}

AGENT_OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "post",
        "/",
        "TGI's compatibility route: /generate (answered as a list of one) or /generate_stream, as the body's `stream` says",
        "tgi",
        tgi.GenerateRequest,
        {JSON: {"type": "array", "items": tgi.GenerateResponse, "minItems": 1, "maxItems": 1}, SSE: TGI_EVENTS},
        GENERATION_HEADERS,
        TGI_GENERATION_ERRORS,
    ),
    Operation("post", "/generate", "Generate text (TGI)", "tgi", tgi.GenerateRequest, {JSON: tgi.GenerateResponse}, GENERATION_HEADERS, TGI_GENERATION_ERRORS),
    Operation(
        "post",
        "/generate_stream",
        "Generate text as a stream of token events (TGI); a failure after the first token is an error event",
        "tgi",
        tgi.GenerateRequest,
        {SSE: TGI_EVENTS},
        errors=TGI_GENERATION_ERRORS,
    ),
    Operation("get", "/info", "The model, the serving limits and the adapter served now (TGI's Info)", "tgi", ok={JSON: tgi.Info}),
    Operation(
        "get",
        "/health",
        "Liveness: 200 while the engine iterates",
        "tgi",
        ok={JSON: tgi.Health},
        errors={503: "shutting down, or the engine has not finished an iteration for 5 s"},
    ),
    Operation("get", "/metrics", "Prometheus metrics", "tgi", ok={TEXT: STRING}),
    Operation("get", "/stats", "What the operator's slow timescale reads", "tgi", ok={JSON: STATS}),
    Operation(
        "post",
        "/publish",
        "Publish the shadow adapter now as a local revision (no eval gate: an admin's explicit act)",
        "tgi",
        ok={JSON: tgi.AdapterSummary},
        errors={409: "this agent has no training data, so no shadow adapter"},
        security=ADMIN,
    ),
    Operation(
        "post",
        "/feedback",
        "Append a served interaction to the local training data (opt-in: --feedback)",
        "tgi",
        tgi.FeedbackRequest,
        {JSON: tgi.FeedbackResponse},
        errors={404: "feedback is disabled on this agent", 413: TOO_LARGE, 422: "`prompt` or `completion` is missing or empty"},
        security=ADMIN,
    ),
    Operation(
        "post",
        "/v1/completions",
        "Complete a prompt (OpenAI); `stream` answers with chunks",
        "openai",
        oai.CompletionRequest,
        {JSON: oai.Completion, SSE: Events((oai.CompletionChunk, oai.OpenAIErrorResponse), done=True)},
        GENERATION_HEADERS,
        OPENAI_GENERATION_ERRORS,
    ),
    Operation(
        "post",
        "/v1/chat/completions",
        "Answer a conversation, rendered with the model's chat template (OpenAI); `stream` answers with chunks",
        "openai",
        oai.ChatCompletionRequest,
        {JSON: oai.ChatCompletion, SSE: Events((oai.ChatCompletionChunk, oai.OpenAIErrorResponse), done=True)},
        GENERATION_HEADERS,
        OPENAI_GENERATION_ERRORS,
    ),
    Operation("get", "/v1/models", "The base model and every live adapter version as `<base>@<version>` (OpenAI)", "openai", ok={JSON: oai.ModelList}),
)
DOC_OPERATIONS: tuple[Operation, ...] = (
    Operation("get", "/openapi.json", "This document (OpenAPI 3.2)", "tgi", ok={JSON: {"type": "object"}}),
    Operation("get", "/docs", "This document as a page", "tgi", ok={HTML: STRING}),
)
AGENT_DESCRIPTION = """\
A CoLLM replica agent: TGI's routes (so `text_generation.Client` works unchanged) and OpenAI's
(so the `openai` client does), plus control routes. Errors have the route's dialect: TGI's
`{"error", "error_type"}` or OpenAI's `{"error": {"message", "type", "param", "code"}}`. Every
answer to a generation says which adapter version served it. /publish and /feedback need the
cluster's admin token where the agent was given one (--admin-token-file). Request schemas are the
server's own validators: a request they allow may still be refused (422 or 400) with a message that
says why."""
SECURITY_SCHEMES = {
    ADMIN: {"type": "http", "scheme": "bearer", "description": "the cluster's admin token (a Secret the operator mounts)"},
    CLIENT: {"type": "http", "scheme": "bearer", "description": "one of the cluster's client tokens (spec.security.clientTokenSecretRef)"},
}


@functools.cache
def agent_document() -> dict[str, Any]:
    return build_document("CoLLM replica agent", AGENT_DESCRIPTION, AGENT_OPERATIONS + DOC_OPERATIONS)


def build_document(title: str, description: str, operations: Sequence[Operation]) -> dict[str, Any]:
    """The OpenAPI document of `operations`; every model they name becomes a component schema."""
    models: dict[type[BaseModel], None] = {}  # in order of first use
    _walk([_raw_operation(op) for op in operations], lambda m: models.setdefault(m))
    refs, defs = models_json_schema([(m, "validation") for m in models], ref_template=REF_TEMPLATE)
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method] = _walk(_raw_operation(op), lambda m: refs[m, "validation"])
    schemes = {name: SECURITY_SCHEMES[name] for name in sorted({op.security for op in operations if op.security})}
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": __version__, "description": description},
        "paths": paths,
        "components": {"schemas": defs.get("$defs", {}), "securitySchemes": schemes},
    }


def _raw_operation(op: Operation) -> dict[str, Any]:
    """The operation object with models still in place of their $refs."""
    out: dict[str, Any] = {"operationId": _operation_id(op), "summary": op.summary}
    if op.body is not None:
        out["requestBody"] = {"required": True, "content": {JSON: {"schema": op.body}}}
    ok: dict[str, Any] = {"description": "OK", "content": {media: _media(schema) for media, schema in op.ok.items()}}
    if op.ok_headers:
        ok["headers"] = {name: {"description": text, "schema": STRING} for name, text in op.ok_headers.items()}
    responses: dict[str, Any] = {"200": ok}
    errors = dict(op.errors)
    if op.security:
        errors.setdefault(401, "no or a wrong bearer token")
        out["security"] = [{op.security: []}, {}] if op.security_optional else [{op.security: []}]
    for status in sorted(errors):
        responses[str(status)] = _error(op.dialect, status, errors[status])
    out["responses"] = responses
    return out


def _operation_id(op: Operation) -> str:
    words = re.sub(r"[^A-Za-z0-9]+", " ", op.path).split() or ["root"]
    return op.method + "".join(w[:1].upper() + w[1:] for w in words)


def _media(schema: Any) -> dict[str, Any]:
    if not isinstance(schema, Events):
        return {"schema": schema}
    data: dict[str, Any] = {"type": "string", "contentMediaType": JSON, "contentSchema": {"anyOf": list(schema.models)}}
    if schema.done:
        data = {"anyOf": [{"const": "[DONE]"}, data]}
    return {"itemSchema": {"type": "object", "required": ["data"], "properties": {"data": data}}}


def _error(dialect: Dialect, status: int, description: str) -> dict[str, Any]:
    body = tgi.ErrorResponse if dialect == "tgi" else oai.OpenAIErrorResponse
    out: dict[str, Any] = {"description": description, "content": {JSON: {"schema": body}}}
    if status == 429:
        out["headers"] = {
            "Retry-After": {"description": "seconds to wait before a retry", "required": True, "schema": {"type": "integer"}},
            ADMIT_IN_HEADER: {"description": "ms until a request like this one would be admitted (a router waits that long)", "schema": {"type": "integer"}},
        }
    elif status == 401:
        out["headers"] = {"WWW-Authenticate": {"required": True, "schema": {"const": "Bearer"}}}
    return out


def _walk(value: Any, model: Callable[[type[BaseModel]], Any]) -> Any:
    """`value` with every pydantic model class replaced by model(cls)."""
    if isinstance(value, type) and issubclass(value, BaseModel):
        return model(value)
    if isinstance(value, Mapping):
        return {k: _walk(v, model) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_walk(v, model) for v in value]
    return value


# -- serving ---------------------------------------------------------------------------------------
def add_routes(app: web.Application, document: Mapping[str, Any]) -> None:
    """Serve `document` at GET /openapi.json and its page at GET /docs (both rendered once, here)."""
    body, page = json.dumps(document).encode(), render_html(document).encode()

    async def openapi_json(_request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=JSON)

    async def docs(_request: web.Request) -> web.Response:
        return web.Response(body=page, content_type=HTML, charset="utf-8")

    app.add_routes([web.get("/openapi.json", openapi_json), web.get("/docs", docs)])


_STYLE = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;line-height:1.4}
code,pre{font-family:ui-monospace,monospace}pre{background:#f5f5f5;padding:.6rem;overflow-x:auto;font-size:.85rem}
.m{display:inline-block;min-width:3.5rem;font-weight:bold}section{border-top:1px solid #ddd;margin-top:1.5rem}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:.2rem .5rem;text-align:left;vertical-align:top}"""


def render_html(document: Mapping[str, Any]) -> str:
    """A self-contained page: every operation with its body, responses and headers, then every schema."""
    e = html.escape
    info = document["info"]
    ops = [(path, method, op) for path, item in document["paths"].items() for method, op in item.items()]
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(info['title'])}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{e(info['title'])} <small>{e(info['version'])}</small></h1><p>{e(info['description'])}</p>",
        "<p><a href='openapi.json'>openapi.json</a> (OpenAPI " + e(document["openapi"]) + ")</p><ul>",
        *(
            f"<li><a href='#{op['operationId']}'><span class='m'>{method.upper()}</span> <code>{e(path)}</code></a> {e(op['summary'])}</li>"
            for path, method, op in ops
        ),
        "</ul>",
    ]
    for path, method, op in ops:
        out.append(f"<section id='{op['operationId']}'><h2><span class='m'>{method.upper()}</span> <code>{e(path)}</code></h2><p>{e(op['summary'])}</p>")
        if "security" in op:
            schemes = [name for requirement in op["security"] for name in requirement]
            optional = " (only where the server was given tokens)" if {} in op["security"] else ""
            out.append(f"<p>Authorization: Bearer ({e(', '.join(schemes))}){optional}</p>")
        if "requestBody" in op:
            out.append(f"<p>Body ({JSON}):</p>{_pre(op['requestBody']['content'][JSON]['schema'])}")
        out.append("<table><tr><th>status</th><th>when</th><th>body</th><th>headers</th></tr>")
        for status, response in op["responses"].items():
            bodies = "".join(f"<div>{e(media)}: {_pre(content)}</div>" for media, content in response.get("content", {}).items())
            headers = ", ".join(f"<code>{e(name)}</code>" for name in response.get("headers", {}))
            out.append(f"<tr><td>{status}</td><td>{e(response['description'])}</td><td>{bodies}</td><td>{headers}</td></tr>")
        out.append("</table></section>")
    out.append("<section><h2>Schemas</h2>")
    for name, schema in document["components"]["schemas"].items():
        out.append(f"<h3 id='schema-{e(name)}'>{e(name)}</h3>{_pre(schema)}")
    out.append("</section></body></html>")
    return "\n".join(out)


def _pre(value: Any) -> str:
    """JSON in a <pre>, with each $ref a link to its schema."""
    text = html.escape(json.dumps(value, indent=2))
    return "<pre>" + re.sub(r"&quot;#/components/schemas/(\w+)&quot;", r"<a href='#schema-\1'>&quot;#/components/schemas/\1&quot;</a>", text) + "</pre>"
