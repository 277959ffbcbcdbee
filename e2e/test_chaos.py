"""The chaos runner (e2e/chaos): its pure parts and the pods' fault hook here, fast; whole runs on the
dev cluster marked slow (minutes on 2 cores: three agents, the operator and traffic)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from .chaos.scenarios import arm, fill
from .chaos.traffic import COMPLETED, ERROR_EVENT, LOST, REFUSED, RequestRecord, classify
from .chaos.verdict import Served, disagreements, half_applied, passed, request_figures

HOOK = Path(__file__).parent / "devcluster" / "fault_hook.py"


def token(i: int, text: str = "a") -> dict:
    return {"index": i, "token": {"id": i, "text": text, "logprob": -1.0}, "generated_text": None, "details": None}


def final(n: int, *, claimed: int | None = None, reason: str = "length") -> dict:
    event = token(n)
    event.update(generated_text="a" * n, details={"finish_reason": reason, "generated_tokens": n if claimed is None else claimed})
    event.update(adapter_version="3.1", adapter_sha256="f" * 64)
    return event


def test_each_way_a_request_can_end_is_named():
    assert classify(200, b"", [token(1), token(2), final(3)], "eof")[:2] == (COMPLETED, "")
    outcome, detail, tokens = classify(200, b"", [token(1), {"error": "replica tiny-1 failed mid-stream; the output is incomplete"}], "eof")
    assert (outcome, tokens) == (ERROR_EVENT, 1) and "incomplete" in detail
    assert classify(429, b'{"error": "every replica is at its limit", "error_type": "overloaded"}', [], "eof")[0] == REFUSED
    assert classify(503, b'{"error": {"message": "no replica"}}', [], "eof")[0] == REFUSED  # OpenAI's shape
    # Lost: what a client cannot tell from a proper answer or a proper error.
    assert classify(502, b"Bad Gateway", [], "eof")[0] == LOST
    assert classify(None, b"", [], "connection: ClientConnectorError")[0] == LOST
    assert classify(200, b"", [token(1), token(2)], "eof")[:2][0] == LOST  # no final event
    assert "no event for 90 s" in classify(200, b"", [token(1)], "no event for 90 s")[1]  # a hang
    assert "claims 5 tokens" in classify(200, b"", [token(1), final(2, claimed=5)], "eof")[1]  # silent truncation
    assert classify(200, b"", [final(1, reason="cancelled")], "eof")[0] == LOST
    assert classify(200, b"", [{"unparseable": "data:{"}], "eof")[0] == LOST


def test_request_figures_split_error_events_at_the_first_token():
    records = [
        RequestRecord(0.0, 1.0, COMPLETED),
        RequestRecord(0.0, 3.0, COMPLETED),
        RequestRecord(0.0, 1.0, ERROR_EVENT, "incomplete", tokens=4, status=200),
        RequestRecord(0.0, 1.0, ERROR_EVENT, "failed", tokens=0, status=200),
        RequestRecord(0.0, 1.0, LOST, "ended", replica="tiny-0"),
    ]
    f = request_figures(records)
    assert (f["sent"], f["completed"], f["error_event"], f["lost"]) == (5, 2, 2, 1)
    assert (f["error_events_after_first_token"], f["error_events_before_first_token"], f["error_events_after_first_token_saying_incomplete"]) == (1, 1, 1)
    assert f["latency_p50_s"] == 2.0 and f["latency_max_s"] == 3.0 and f["lost_details"] == ["tiny-0: ended"]
    assert passed(True, 0, 0) and not passed(True, 1, 0) and not passed(True, 0, 1) and not passed(False, 0, 0)


def served(replica: str, version: int, revision: int, sha: str, source: str = "stats") -> Served:
    return Served(0.0, replica, version, revision, sha, source)


def test_half_applied_versions_are_found_by_each_rule():
    published = {0: {"a" * 64}, 1: {"b" * 64}}
    good = [served("r0", 1, 0, "b" * 64, "global"), served("r0", 1, 2, "c" * 64), served("r0", 1, 2, "c" * 64, "response"), served("r1", 0, 3, "d" * 64)]
    assert half_applied(good, published) == []
    # 1. a cluster version no round published (a failed round's candidate)
    assert "no round published cluster version 2" in half_applied([served("r0", 2, 0, "e" * 64, "global")], published)[0]
    # 2. the global with another sha256 than the published one, and a version published twice
    assert "published as bbbbbbbbbbbb" in half_applied([served("r1", 1, 0, "e" * 64)], published)[0]
    assert "published with 2 different sha256" in half_applied([], {1: {"b" * 64, "e" * 64}})[0]
    # 3. one label, two sha256 on one replica (another replica's 1.2 is its own)
    found = half_applied([served("r0", 1, 2, "c" * 64), served("r0", 1, 2, "e" * 64, "response"), served("r1", 1, 2, "f" * 64)], published)
    assert len(found) == 1 and "r0 served 1.2 with 2 different sha256" in found[0]
    # 4. disagreement after recovery
    assert disagreements({"r0": (1, "b" * 64), "r1": (1, "b" * 64)}, (1, "b" * 64)) == []
    assert disagreements({"r0": (0, "a" * 64), "r1": None}, (1, "b" * 64)) == [
        "r0 rests on 0 (aaaaaaaaaaaa), the cluster on 1 (bbbbbbbbbbbb)",
        "r1 did not answer after recovery",
    ]


@pytest.fixture
def hook(tmp_path, monkeypatch):
    """The fault hook, loaded as a module of its own (its import finder is not installed) and armed from tmp_path."""
    monkeypatch.delenv("COLLM_DEVCLUSTER_FAULTS", raising=False)
    spec = importlib.util.spec_from_file_location("chaos_fault_hook_under_test", HOOK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module._DIR = str(tmp_path)
    monkeypatch.setenv("HOSTNAME", "tiny-0")
    return module


class _Stub:
    def __init__(self) -> None:
        self.sent: list = []

    def UploadUpdate(self, messages, timeout=None):  # noqa: N802  the gRPC stub's name
        self.sent = list(messages)
        return "reply"


def _upload(hook, round_id: str, blob: bytes, sha: str) -> list:
    from collm_rpc.client import AgentClient

    client = AgentClient.__new__(AgentClient)
    client.stub, client.timeout = _Stub(), 5.0
    assert hook._wrap_upload(AgentClient.upload)(client, round_id, "tiny-0", blob, sha) == "reply"
    return client.stub.sent


def _update_blob(round_id: str) -> tuple[bytes, str]:
    from replica_agent.federated.update import encode_update, make_update

    base = {"layers.0.q_proj.lora_A.weight": torch.zeros(4, 8), "layers.0.q_proj.lora_B.weight": torch.zeros(8, 4)}
    shadow = {k: v + 0.5 for k, v in base.items()}
    update = make_update("tiny-0", round_id, shadow, base, 16)
    return encode_update(update), update.sha256


def test_a_corrupt_upload_chunk_is_refused_by_the_aggregator(hook, tmp_path):
    from replica_agent.federated.aggregator import Aggregator

    blob, sha = _update_blob("chaos-corrupt-1-abcd")
    arm(tmp_path, "tiny-0", "corrupt-upload", round="chaos-corrupt-1")
    assert len(b"".join(m.data for m in _upload(hook, "other-round", blob, sha))) == len(blob)  # not this round: untouched
    sent = _upload(hook, "chaos-corrupt-1-abcd", blob, sha)
    received = b"".join(m.data for m in sent)
    assert len(received) == len(blob) and received != blob and sent[0].sha256 == sha and sent[0].total_bytes == len(blob)
    fired = json.loads((tmp_path / "tiny-0" / "corrupt-upload.fired").read_text())
    assert fired["round_id"] == "chaos-corrupt-1-abcd" and received[fired["byte"]] != blob[fired["byte"]]
    outcome = Aggregator(store=None).receive("chaos-corrupt-1-abcd", "tiny-0", received, sha)
    assert not outcome.accepted and outcome.reason == "Corrupt" and "sha256 mismatch" in outcome.message
    assert b"".join(m.data for m in _upload(hook, "chaos-corrupt-1-abcd", blob, sha)) == blob  # it fired once


def test_a_stalled_upload_sends_half_then_the_rest(hook, tmp_path):
    blob, sha = _update_blob("chaos-aggregator-2-abcd")
    arm(tmp_path, "tiny-0", "stall-upload", round="chaos-aggregator-2", seconds=0)
    sent = _upload(hook, "chaos-aggregator-2-abcd", blob, sha)
    assert len(sent) == 2 and len(sent[0].data) == len(blob) // 2 and b"".join(m.data for m in sent) == blob
    assert sent[0].round_id == "chaos-aggregator-2-abcd" and not sent[1].round_id
    assert (tmp_path / "tiny-0" / "stall-upload.streaming").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a size-limited tmpfs needs root")
def test_fill_writes_until_the_volume_is_full(tmp_path):
    import subprocess

    volume = tmp_path / "volume"
    volume.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "chaos-test", str(volume)], capture_output=True).returncode != 0:
        pytest.skip("mount -t tmpfs is not allowed here")
    try:
        assert fill(volume / "filler") >= 1 << 20
        with pytest.raises(OSError, match="No space left"):
            (volume / "more").write_bytes(b"x" * 8192)
    finally:
        subprocess.run(["umount", str(volume)], capture_output=True)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_chaos_one_scenario(tmp_path, tiny_model_dir):
    from .chaos.runner import Settings, run

    out = run(Settings(scenarios=["corrupt-upload-chunk"], workdir=str(tmp_path / "chaos")), str(tmp_path / "chaos.json"))
    (result,) = out["scenarios"]
    assert result["injected"] and result["as_expected"], result
    assert result["requests"]["lost"] == 0 and result["half_applied"] == 0 and out["passed"], result


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_chaos_every_scenario(tmp_path, tiny_model_dir):
    from .chaos.runner import Settings, run

    out = run(Settings(workdir=str(tmp_path / "chaos")), str(tmp_path / "chaos.json"))
    assert [r["scenario"] for r in out["scenarios"]] == Settings().scenarios
    for result in out["scenarios"]:
        assert result["requests"]["lost"] == 0 and result["half_applied"] == 0, result
    assert out["passed"], [(r["scenario"], r["note"]) for r in out["scenarios"] if not r["passed"]]
