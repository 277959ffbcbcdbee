"""The agent's gRPC server under slow uploads: control calls keep a thread, and uploads have bounds.

Once, a few client-streaming uploads that trickled or stalled held every worker thread: GetStats and
ApplyPlan starved, and a stalled stream was held for as long as its sender liked.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest

from collm_rpc.client import AgentClient
from collm_rpc.proto import collm_pb2 as pb
from replica_agent.agent import Agent
from replica_agent.config import AgentConfig
from replica_agent.serving.grpc_service import serve_grpc

from ..helpers import eventually

WORKERS, UPLOADS = 3, 2


@pytest.fixture(scope="module")
def agent(tiny_base):
    agent = Agent(AgentConfig(model="tiny", replica_id="tiny-0", max_total_tokens=256, train_cap_tokens=0), base=tiny_base)
    agent.start()
    yield agent
    agent.stop()


@contextmanager
def serving(agent, upload_time_limit_s: float):
    server, service, port = serve_grpc(agent, "127.0.0.1", 0, workers=WORKERS, max_uploads=UPLOADS, upload_time_limit_s=upload_time_limit_s)
    try:
        yield f"127.0.0.1:{port}", service
    finally:
        server.stop(grace=0)


def stalled(release: threading.Event, round_id: str) -> Iterator[pb.UpdateChunk]:
    """An upload that sends 4 of its 8 bytes, then nothing until `release` is set."""
    yield pb.UpdateChunk(round_id=round_id, participant="p", sha256="0" * 64, total_bytes=8, data=b"1234")
    release.wait(timeout=30)
    yield pb.UpdateChunk(data=b"5678")


def test_slow_uploads_leave_a_thread_to_control_calls_and_one_too_many_is_refused_at_once(agent):
    release = threading.Event()
    with serving(agent, upload_time_limit_s=30) as (address, service), AgentClient(address, timeout=5) as client:
        try:
            # One more slow upload than allowed, as many as the server has threads: without the bound they hold them all.
            calls = [client.stub.UploadUpdate.future(stalled(release, f"slow-{i}"), timeout=20) for i in range(WORKERS)]
            assert eventually(lambda: service.uploads_streaming == UPLOADS and any(c.done() for c in calls), timeout=3)
            refused = [c for c in calls if c.done()]
            assert len(refused) == 1 and refused[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"{UPLOADS} uploads are streaming" in refused[0].details()
            start = time.monotonic()
            assert client.stats().replica_id == "tiny-0" and client.apply_plan(0, 1000, 100).ok
            assert time.monotonic() - start < 2
        finally:
            release.set()
        for call in calls:
            if call is not refused[0]:
                assert call.result(timeout=5).reason == "Corrupt"  # released: heard out and judged on content
        assert service.uploads_streaming == 0


def test_a_stalled_upload_is_cut_at_the_time_limit_and_its_bytes_dropped(agent):
    release = threading.Event()
    with serving(agent, upload_time_limit_s=0.5) as (address, service), AgentClient(address, timeout=5) as client:
        try:
            start = time.monotonic()
            call = client.stub.UploadUpdate.future(stalled(release, "stalled"), timeout=10)  # the sender's own deadline is later
            with pytest.raises(grpc.RpcError):
                call.result(timeout=5)
            elapsed = time.monotonic() - start
        finally:
            release.set()
        assert call.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "within 0.5 s; the 4 bytes received are dropped" in call.details()
        assert 0.5 <= elapsed < 3
        assert service.aggregator.round("stalled") is None  # nothing of it reached the aggregator
        assert service.uploads_streaming == 0
        assert client.upload("after", "p", b"x", "0" * 64).reason == "Corrupt"  # its slot is free again
        assert eventually(lambda: not any(t.name == "collm-grpc-upload" for t in threading.enumerate()), timeout=3)  # its reader ended


def test_uploads_must_leave_a_worker_to_control_calls(agent):
    with pytest.raises(ValueError, match="below workers"):
        serve_grpc(agent, workers=2, max_uploads=2)
