"""One version identity everywhere: `<cluster version>.<local revision>` and the sha256, the same in the
response header, the stream's final event, /stats, /metrics, gRPC GetStats and the CollmCluster status."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest

from collm_control.decide import served_adapter
from collm_rpc.client import AgentClient
from replica_agent.agent import Agent
from replica_agent.config import AgentConfig
from replica_agent.serving.grpc_service import serve_grpc
from replica_agent.serving.pipeline import ADAPTER_HEADER, ADAPTER_SHA_HEADER

from ..helpers import post_json

PROMPT = "def identity("


@pytest.fixture(scope="module")
def agent(json_data, tiny_base):
    agent = Agent(
        AgentConfig(model="tiny", data=str(json_data), port=0, max_total_tokens=256, eval_batches=1, revision_every_seconds=0, train_cap_tokens=0),
        base=tiny_base,
    )
    agent.start()
    yield agent
    agent.stop()


@pytest.fixture(scope="module")
def grpc_address(agent):
    server, _, port = serve_grpc(agent, "127.0.0.1", 0)
    yield f"127.0.0.1:{port}"
    server.stop(grace=0)


def everywhere(server, agent, grpc_address) -> dict[str, tuple[str, str]]:
    status, _, headers = post_json(server.url + "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}})
    assert status == 200
    seen = {"header": (headers[ADAPTER_HEADER], headers[ADAPTER_SHA_HEADER])}
    request = urllib.request.Request(
        server.url + "/generate_stream",
        data=json.dumps({"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        final = [json.loads(line[5:]) for line in reply.read().decode().splitlines() if line.startswith("data:")][-1]
    seen["stream"] = (final["adapter_version"], final["adapter_sha256"])
    with urllib.request.urlopen(server.url + "/stats", timeout=30) as reply:
        adapter = json.loads(reply.read())["adapter"]
    seen["stats"] = (adapter["version"], adapter["sha256"])
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as reply:
        info = re.search(r'collm_adapter_info\{sha256="([0-9a-f]+)",version="([0-9.]+)"\} 1\.0', reply.read().decode())
    seen["metrics"] = (info.group(2), info.group(1))
    with AgentClient(grpc_address) as client:
        stats = client.stats()
    seen["grpc"] = (stats.adapter.version, stats.adapter.sha256)
    status_entry = served_adapter(stats)  # what the operator writes into status.allocation.<replica>
    seen["CollmCluster status"] = (status_entry["adapter"], status_entry["adapterSha256"])
    return seen


def test_the_served_version_is_named_the_same_everywhere(server, agent, grpc_address):
    first = everywhere(server, agent, grpc_address)
    assert set(first.values()) == {("0.0", agent.store.current.sha256)}, first
    revision = agent.publish()  # a local revision on top of global 0
    second = everywhere(server, agent, grpc_address)
    assert set(second.values()) == {("0.1", revision.sha256)}, second
    new_global = agent.adopt_global({k: v + 0.01 for k, v in revision.tensors.items()}, 4)
    third = everywhere(server, agent, grpc_address)
    assert set(third.values()) == {("4.0", new_global.sha256)}, third
