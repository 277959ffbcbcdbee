"""The router's OpenAPI document (GET /openapi.json, GET /docs): the agent's client routes that it
proxies, with the agent's own schemas plus the answers the router adds (client token, load
shedding, no replica), its /health and /metrics, and the admin routes. serving/openapi.py builds it.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import SkipJsonSchema

from ..serving.openapi import (
    ADMIN,
    AGENT_OPERATIONS,
    CLIENT,
    DOC_OPERATIONS,
    JSON,
    STRING,
    TEXT,
    Operation,
    build_document,
)
from .proxy import PROXIED_ROUTES


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RouterHealth(_Body):
    status: Literal["ok"]
    routable_replicas: list[str]


class ReplicaDescription(_Body):
    """One replica as the router sees it (Router.describe())."""

    name: str
    url: str
    weight: float
    healthy: bool
    outstanding: int
    max_outstanding: int
    last_error: str | None
    checked_at: float | None  # Unix time of the last health check
    shedding_for_s: float  # seconds it still gets no traffic after its 429 for its TTFT SLO (0: none)


class Replicas(_Body):
    replicas: list[ReplicaDescription]


class WeightsRequest(BaseModel):
    """The operator's allocation (Router.set_weights checks it): replicas not named keep their weight;
    a weight is a finite number >= 0 (0 sends no traffic); `affinity` (optional) turns home affinity on or off."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"weights": {"collm-0": 2, "collm-1": 1}, "affinity": True}]})

    weights: dict[str, float]
    affinity: bool | SkipJsonSchema[None] = None


PROXY_ERRORS = {
    429: "every replica is at its limit of outstanding requests or sheds requests that would miss its TTFT SLO (or a replica's own 429): "
    "retry after Retry-After seconds",
    502: "every replica tried failed before answering",
    503: "no replica is healthy and routable",
}
ROUTER_DESCRIPTION = """\
The CoLLM router: the agents' TGI and OpenAI routes, each request sent to a replica chosen by
routing weight and load (retried on another before its first byte), plus admin routes for the
operator. The client routes need a client token only where the cluster sets
spec.security.clientTokenSecretRef; /admin/* need the admin token; /health, /metrics,
/openapi.json and /docs need none. Errors have the route's dialect (TGI's or OpenAI's body)."""


@functools.cache
def router_document() -> dict[str, Any]:
    agent = {(op.method, op.path): op for op in AGENT_OPERATIONS}
    proxied = [agent[route].with_errors(PROXY_ERRORS, security=CLIENT, security_optional=True) for route in PROXIED_ROUTES]
    own = [
        Operation(
            "get",
            "/health",
            "200 while at least one replica is healthy and routable",
            "tgi",
            ok={JSON: RouterHealth},
            errors={503: "no replica is healthy and routable"},
        ),
        Operation("get", "/metrics", "The router's Prometheus metrics", "tgi", ok={TEXT: STRING}),
        Operation("get", "/admin/replicas", "Each replica's url, weight, health and outstanding requests", "tgi", ok={JSON: Replicas}, security=ADMIN),
        Operation(
            "put",
            "/admin/weights",
            "Set routing weights (the operator's allocation)",
            "tgi",
            WeightsRequest,
            {JSON: Replicas},
            errors={400: "the body is not JSON, or names an unknown replica or an invalid weight (error_type validation)"},
            security=ADMIN,
        ),
    ]
    return build_document("CoLLM router", ROUTER_DESCRIPTION, [*proxied, *own, *DOC_OPERATIONS])
