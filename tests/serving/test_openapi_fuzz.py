"""Fuzzing a real agent on loopback (the tiny model), and the router in front of it, with schemathesis
over their own OpenAPI documents.

Every operation gets the document's examples, schemathesis' coverage cases (each field at its edges
and with a wrong type, each missing, other methods) and generated requests, valid and invalid. Every
answer must be no 5xx and match the document: its status, content type, headers and body (streams
event by event). The agent serves at most 128 tokens per request, so any generation is quick. The
short run (derandomized: the same cases each time) is part of `make test`; the long one is slow.
"""

from __future__ import annotations

import json
import urllib.request

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from replica_agent.agent import Agent
from replica_agent.config import AgentConfig
from replica_agent.local.cluster import BackgroundRouter
from replica_agent.router.app import ReplicaEndpoint
from replica_agent.router.openapi import router_document
from replica_agent.serving.openapi import agent_document

TOKEN = "fuzzing-admin-token-0123456789"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance, response_schema_conformance]
# The document as the code builds it; the first test checks the agent serves exactly this one.
# (Loaded here rather than from the agent's URL: schemathesis' fixture loader does not run on pytest 9.)
schema = schemathesis.openapi.from_dict(agent_document())
router_schema = schemathesis.openapi.from_dict(router_document())


@pytest.fixture(scope="module")
def agent(json_data, tmp_path_factory):
    token = tmp_path_factory.mktemp("admin") / "token"
    token.write_text(TOKEN)
    # train=False: the trainer only evaluates, so /publish works and the CPU serves the fuzzer.
    config = AgentConfig(
        model="tiny",
        data=str(json_data),
        train=False,
        feedback=True,
        admin_token_file=str(token),
        port=0,
        max_total_tokens=128,
        eval_batches=1,
        revision_every_seconds=0,
    )
    agent = Agent(config)
    agent.start()
    yield agent
    agent.stop()


def test_the_agent_serves_the_fuzzed_document(server):
    with urllib.request.urlopen(server.url + "/openapi.json", timeout=30) as answer:
        assert json.loads(answer.read()) == agent_document()


def call(case, server) -> None:
    case.call_and_validate(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, checks=CHECKS, timeout=60)


@schema.parametrize()
@settings(max_examples=10, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_agent_answers_as_its_document_says(case, server):
    call(case, server)


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_agent_answers_as_its_document_says_long(case, server):
    call(case, server)


@pytest.fixture(scope="module")
def router(server, tmp_path_factory):
    """The router in front of the fuzzed agent, with the same admin token (its health checks off: the agent is up)."""
    router = BackgroundRouter([ReplicaEndpoint("a", server.url)], admin_token=TOKEN, health_interval_s=0)
    yield router
    router.stop()


def test_the_router_serves_the_fuzzed_document(router):
    with urllib.request.urlopen(router.url + "/openapi.json", timeout=30) as answer:
        assert json.loads(answer.read()) == router_document()


@router_schema.parametrize()
@settings(max_examples=5, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_router_answers_as_its_document_says(case, router):
    call(case, router)


@pytest.mark.slow
@router_schema.parametrize()
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_router_answers_as_its_document_says_long(case, router):
    call(case, router)
