"""A gRPC client of one agent, used by the operator, the round driver and agents calling each other.

Adapter bytes travel in chunks; `fetch_bytes` reassembles them (update.fetch_adapter decodes and
verifies them). This module needs no torch: the operator imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor

import grpc

from collm_control.stats import AgentStats

from . import tls
from .proto import collm_pb2 as pb
from .proto import collm_pb2_grpc as pb_grpc
from .stats import from_proto

MAX_MESSAGE = 64 * 1024 * 1024
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]


def plan_message(train_cap_tokens: int, ttft_ms: int, tpot_ms: int, *, fixed_training: bool = False) -> pb.Plan:
    """The ApplyPlan request: a replica's training cap and the SLO it serves under."""
    return pb.Plan(train_cap_tokens=train_cap_tokens, ttft_ms=ttft_ms, tpot_ms=tpot_ms, fixed_training=fixed_training)


class AgentClient:
    def __init__(self, address: str, *, timeout: float = 30.0, credentials: tls.Credentials | None = None) -> None:
        """`credentials`: the certificate to present (mutual TLS); None: plaintext, for development only."""
        self.address = address
        self.timeout = timeout
        self.credentials = credentials
        if credentials is None:
            self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            options = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", tls.TARGET_NAME)]
            self._channel = grpc.secure_channel(address, tls.channel_credentials(credentials), options=options)
        self.stub = pb_grpc.AgentStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- control ------------------------------------------------------------------------------
    def stats(self) -> AgentStats:
        return from_proto(self.stub.GetStats(pb.StatsRequest(), timeout=self.timeout))

    def apply_plan(self, train_cap_tokens: int, ttft_ms: int, tpot_ms: int, *, fixed_training: bool = False) -> pb.Ack:
        return self.stub.ApplyPlan(plan_message(train_cap_tokens, ttft_ms, tpot_ms, fixed_training=fixed_training), timeout=self.timeout)

    # -- rounds -------------------------------------------------------------------------------
    def start_round(self, request: pb.StartRoundRequest) -> pb.RoundStatus:
        return self.stub.StartRound(request, timeout=self.timeout)

    def round_status(self, round_id: str) -> pb.RoundStatus:
        return self.stub.GetRoundStatus(pb.RoundStatusRequest(round_id=round_id), timeout=self.timeout)

    def upload(self, round_id: str, participant: str, blob: bytes, sha256: str, *, masked: bool = False) -> pb.UploadReply:
        def messages() -> Iterator[pb.UpdateChunk]:
            first = True
            for part in chunks(blob):
                if first:
                    yield pb.UpdateChunk(round_id=round_id, participant=participant, sha256=sha256, total_bytes=len(blob), data=part, masked=masked)
                    first = False
                else:
                    yield pb.UpdateChunk(data=part)

        return self.stub.UploadUpdate(messages(), timeout=self.timeout)

    def aggregate(self, request: pb.AggregateRequest) -> pb.AggregateReply:
        return self.stub.Aggregate(request, timeout=self.timeout)

    def evaluate(self, round_id: str, candidate_sha256: str, source: str) -> pb.EvaluateReply:
        return self.stub.Evaluate(pb.EvaluateRequest(round_id=round_id, candidate_sha256=candidate_sha256, source=source), timeout=max(self.timeout, 120))

    def reveal_seeds(self, round_id: str, dropped: list[str]) -> pb.RevealReply:
        return self.stub.RevealSeeds(pb.RevealRequest(round_id=round_id, dropped=dropped), timeout=self.timeout)

    def announce_upload(self, round_id: str, participant: str, *, withdraw: bool = False) -> pb.AnnounceReply:
        return self.stub.AnnounceUpload(pb.AnnounceRequest(round_id=round_id, participant=participant, withdraw=withdraw), timeout=self.timeout)

    def share_public_keys(self, round_id: str, public_keys: Mapping[str, bytes]) -> pb.RoundStatus:
        return self.stub.SharePublicKeys(pb.PublicKeysRequest(round_id=round_id, public_keys=public_keys), timeout=self.timeout)

    def publish(self, request: pb.PublishRequest) -> pb.PublishReply:
        return self.stub.Publish(request, timeout=self.timeout)

    def republish(self, sha256: str, *, source: str, cluster_version: int, eval_loss: float | None) -> pb.PublishReply:
        """Give this agent the cluster's global adapter back (fetched from `source`): for a replica
        that restarted or that a round could not reach. The operator and the local mode both use it."""
        request = pb.PublishRequest(
            round_id=f"republish-{sha256[:12]}",
            sha256=sha256,
            source=source,
            cluster_version=cluster_version,
            eval_loss=eval_loss or 0.0,
            has_eval_loss=eval_loss is not None,
        )
        return self.publish(request)

    def rollback(self, sha256: str) -> pb.PublishReply:
        return self.stub.Rollback(pb.RollbackRequest(sha256=sha256), timeout=self.timeout)

    # -- adapters -----------------------------------------------------------------------------
    def fetch_bytes(self, sha256: str) -> bytes:
        parts = [chunk.data for chunk in self.stub.FetchAdapter(pb.FetchRequest(sha256=sha256), timeout=self.timeout)]
        return b"".join(parts)


def chunks(blob: bytes, size: int = 1 << 20) -> Iterator[bytes]:
    """The blob in pieces of at most `size` bytes (for a gRPC stream); b"".join() restores it."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    view = memoryview(blob)
    for start in range(0, len(blob), size):
        yield bytes(view[start : start + size])


def read_stats(clients: Mapping[str, AgentClient], on_error: Callable[[str], None] | None = None) -> dict[str, AgentStats | None]:
    """Every agent's stats in parallel; None for one that did not answer, whose
    failure goes to `on_error` (the operator, the local controller and the local reports read them so)."""

    def one(item: tuple[str, AgentClient]) -> tuple[str, AgentStats | None]:
        name, client = item
        try:
            return name, client.stats()
        except grpc.RpcError as exc:
            if on_error is not None:
                on_error(f"{name}: GetStats from {client.address} failed: {exc.code().name}")
            return name, None

    if not clients:
        return {}
    with ThreadPoolExecutor(max_workers=min(16, len(clients))) as pool:
        return dict(pool.map(one, clients.items()))
