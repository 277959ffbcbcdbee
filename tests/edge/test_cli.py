"""`collm-edge`: built from its flags against the package's replica, serving TGI's POST /generate."""

from __future__ import annotations

import asyncio

from aiohttp.test_utils import TestClient, TestServer

from collm_rpc import tls
from replica_agent.edge.cli import GREEDY_NOTE, ROUTES_HEADER, EdgeServer, build_parser, build_server, main
from replica_agent.edge.exit_head import init_exit_head
from replica_agent.edge.split import PinnedAdapter
from replica_agent.engine.requests import SamplingParams
from replica_agent.federated.export import export_peft, read_peft
from replica_agent.serving.pipeline import ADAPTER_HEADER, ADAPTER_SHA_HEADER

from .conftest import CLUSTER, NS, PROMPTS, SPLIT, whole_model_greedy


def post_all(server: EdgeServer, bodies: list[dict]) -> list[tuple[int, dict, dict]]:
    async def run() -> list[tuple[int, dict, dict]]:
        async with TestClient(TestServer(server.app())) as client:
            out = []
            for body in bodies:
                reply = await client.post("/generate", json=body)
                out.append((reply.status, await reply.json(), dict(reply.headers)))
            return out

    return asyncio.run(run())


def test_collm_edge_serves_generate_with_the_replicas_version_and_says_what_it_ignores(tmp_path, tiny_base, runtime, adapter, agent, address, edge_creds):
    version = agent.store.current
    export_peft(dict(version.tensors), agent.spec, tmp_path / "adapter", base_model="tiny")
    assert PinnedAdapter.of(*read_peft(tmp_path / "adapter")).sha256 == version.sha256  # the file is the version, byte for byte
    init_exit_head(runtime, SPLIT, adapter.sha256).save(tmp_path / "head.safetensors")
    edge_creds.write(tmp_path / "tls")
    flags = ["--split", str(SPLIT), "--adapter", str(tmp_path / "adapter"), "--exit-head", str(tmp_path / "head.safetensors")]
    cloud_flags = ["--cloud", address, "--tls-dir", str(tmp_path / "tls"), "--threshold", "1.01", "--state-dtype", "fp32", "--latency-budget-ms", "10000"]
    server = build_server(build_parser().parse_args(flags + cloud_flags))
    try:
        prompt = tiny_base.tokenizer(PROMPTS[0])["input_ids"]
        expected = whole_model_greedy(runtime, adapter, prompt, 12)[0]
        plain, sampled, empty = post_all(
            server,
            [
                {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 12, "details": True}},
                {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 12, "do_sample": True, "temperature": 0.7}},
                {"inputs": ""},
            ],
        )
        texts = [t["text"] for t in plain[1]["details"]["tokens"]]
        stop = texts[6]  # a stop sequence that the 7th token completes (and no earlier one)
        assert stop and stop not in "".join(texts[:6])
        ((_, stopped, _),) = post_all(server, [{"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 12, "stop": [stop], "details": True}}])
    finally:
        server.cloud.close()
    status, body, headers = plain
    assert status == 200 and [t["id"] for t in body["details"]["tokens"]] == expected  # every token the replica's: the whole model's
    assert headers[ROUTES_HEADER] == "edge=0 cloud=12 standalone=0" and "warnings" not in body
    assert (headers[ADAPTER_HEADER], headers[ADAPTER_SHA_HEADER]) == (version.label, version.sha256)
    assert body["details"]["finish_reason"] == "length" and body["generated_text"] == tiny_base.tokenizer.decode(expected, skip_special_tokens=True)
    assert sampled[0] == 200 and sampled[1]["warnings"] == [GREEDY_NOTE] and sampled[1]["generated_text"] == body["generated_text"]
    assert stopped["details"]["finish_reason"] == "stop_sequence" and stopped["generated_text"] == "".join(texts[:7])  # the engine's stop rule
    assert empty[0] == 422 and empty[1]["error_type"] == "validation"


def test_without_a_cloud_the_edge_answers_alone(tiny_base, halves):
    edge, _ = halves
    server = EdgeServer(edge, tiny_base.tokenizer, eos_token_ids=tiny_base.eos_token_ids, bos_token_id=tiny_base.bos_token_id, threshold=0.5)
    done = server.complete(tiny_base.tokenizer(PROMPTS[1])["input_ids"], SamplingParams(max_new_tokens=16))
    assert set(done.result.routes) <= {"edge", "standalone"} and done.link is None and done.final.adapter_version is None
    assert done.final.generated_tokens == len(done.result.tokens) == 16 and done.final.adapter_sha256 == edge.adapter.sha256


def test_bad_flags_exit_with_what_to_fix(tmp_path, ca, capsys):
    assert main(["--split", "2"]) == 2
    assert "give an exit head" in capsys.readouterr().err
    ca.issue(tls.Identity.replica(NS, CLUSTER, "tiny-1")).write(tmp_path)
    assert main(["--split", "2", "--exit-head", "head.safetensors", "--tls-dir", str(tmp_path)]) == 2
    assert "edge identities only" in capsys.readouterr().err
