"""The agent's gRPC server: translates collm.proto messages to the agent's federated roles.

Thin on purpose: decisions live in federated/participant.py and federated/aggregator.py.

Worker threads are few and a client-streaming upload holds one for as long as its sender takes, so
uploads have bounds of their own: at most `max_uploads` stream at once (more are refused with
RESOURCE_EXHAUSTED at once, leaving the other workers to control calls such as GetStats and
ApplyPlan), and one that has not finished within `upload_time_limit_s` is cut with DEADLINE_EXCEEDED
and its partial data dropped. `maximum_concurrent_rpcs` bounds every call together, queued ones
included. An edge session (EdgeSession) holds a worker for its whole life too, so the pool has one
worker more per edge session the agent admits (`Agent.edge`, edge/cloud_service.py), and an idle
session is cut after the agent's `edge_idle_seconds`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import TypeVar

import grpc

from collm_rpc import tls
from collm_rpc.client import CHANNEL_OPTIONS, chunks
from collm_rpc.proto import collm_pb2 as pb
from collm_rpc.proto import collm_pb2_grpc as pb_grpc
from collm_rpc.stats import ref_to_proto
from collm_rpc.stats import to_proto as stats_to_proto

from ..edge.cloud_service import SessionLimit, SessionRefused
from ..engine.mixer import Plan
from ..federated.aggregator import Aggregator, AggregatorError
from ..federated.participant import Participant, Refused, RoundNotStarted, SecureRound
from ..federated.update import UpdateError, encode

log = logging.getLogger(__name__)

WORKERS = 8
UPLOAD_TIME_LIMIT_S = 120.0  # above the senders' own 30 s deadline (AgentClient), so an honest upload meets that first
T = TypeVar("T")


def _guarded(method):
    """Refuse the call unless tls.authorize lets the caller's verified identity make it."""

    @functools.wraps(method)
    def handler(self, request, context):
        if self.me is not None:
            reason = tls.authorize(method.__name__, tls.peer_identity(context), self.me)
            if reason is not None:
                log.warning("refused %s: %s", method.__name__, reason)
                context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)
        return method(self, request, context)

    return handler


class AgentService(pb_grpc.AgentServicer):
    def __init__(self, agent, me: tls.Identity | None = None, *, max_uploads: int = WORKERS // 2, upload_time_limit_s: float = UPLOAD_TIME_LIMIT_S) -> None:
        """`me`: this replica's identity when it serves with mutual TLS (None: plaintext, no checks)."""
        self.agent, self.me = agent, me
        self.aggregator = Aggregator(agent.store, max_upload_bytes=upload_limit(agent.spec, agent.runtime.dims))
        self.participant = Participant(agent, self.aggregator)
        self.max_uploads, self.upload_time_limit_s = max_uploads, upload_time_limit_s
        self.uploads_streaming = 0
        self._uploads_lock = threading.Lock()

    @_guarded
    def GetStats(self, request, context):
        return stats_to_proto(self.agent.stats())

    @_guarded
    def ApplyPlan(self, request, context):
        try:
            self.agent.apply_plan(Plan(request.train_cap_tokens, request.ttft_ms, request.tpot_ms, adaptive=not request.fixed_training))
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.Ack(ok=True)

    @_guarded
    def StartRound(self, request, context):
        if request.local_steps < 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "local_steps must be >= 1")
        rnd = self.participant.start_round(
            request.round_id,
            local_steps=request.local_steps,
            base_sha256=request.base_sha256,
            base_source=request.base_source,
            aggregator_address=request.aggregator_address,
            deadline_unix=request.deadline_unix,
            only_b=request.only_b,
            secure=SecureRound(tuple(request.participants), request.clip_norm or None, dict(request.peer_addresses)) if request.secure else None,
        )
        return pb.RoundStatus(round_id=rnd.round_id, state=rnd.state, message=rnd.message, steps_done=rnd.steps_done, public_key=rnd.public_key)

    @_guarded
    def GetRoundStatus(self, request, context):
        status = pb.RoundStatus(round_id=request.round_id, state="Unknown")
        mine = self.participant.status(request.round_id)
        if mine is not None:
            status.state, status.message, status.steps_done, status.public_key = mine.state, mine.message, mine.steps_done, mine.public_key
        hosted = self.aggregator.round(request.round_id)
        if hosted is not None:
            for name, upload in sorted(hosted.uploads.items()):
                status.uploads.add(participant=name, num_samples=upload.num_samples, sha256=upload.sha256, bytes=upload.bytes, received_unix=upload.received_at)
            if mine is None:
                status.state = "Aggregated" if hosted.result is not None else ("Closed" if hosted.closed else "Collecting")
        return status

    @_guarded
    def UploadUpdate(self, request_iterator, context):
        with self._uploads_lock:
            full = self.uploads_streaming >= self.max_uploads
            self.uploads_streaming += not full
        if full:
            message = f"{self.max_uploads} uploads are streaming to {self.agent.config.replica_id} already; send again later"
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        try:
            return self._receive_upload(request_iterator, context)
        finally:
            with self._uploads_lock:
                self.uploads_streaming -= 1

    def _receive_upload(self, request_iterator, context):
        header, parts, size, limit = None, [], 0, self.aggregator.max_upload_bytes
        try:
            for chunk in within(request_iterator, time.monotonic() + self.upload_time_limit_s):
                header = header or chunk
                size += len(chunk.data)
                if limit is not None and (size > limit or header.total_bytes > limit):
                    # Stop reading: a junk stream is dropped as it arrives, not held in memory.
                    message = f"the upload passes {limit} bytes, more than an update of this cluster's LoRA shape can take"
                    return pb.UploadReply(accepted=False, reason="TooLarge", message=message)
                parts.append(chunk.data)
        except TimeoutError:
            parts.clear()
            message = f"the upload did not finish within {self.upload_time_limit_s:g} s; the {size} bytes received are dropped"
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, message)
        if header is None:
            return pb.UploadReply(accepted=False, reason="Corrupt", message="empty upload")
        caller = tls.peer_identity(context) if self.me is not None else None
        if caller is not None and caller.name != header.participant:
            reason = f"{caller} may upload its own update only, not {header.participant!r}'s"
            context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)
        blob = b"".join(parts)
        if header.total_bytes and len(blob) != header.total_bytes:
            return pb.UploadReply(accepted=False, reason="Corrupt", message=f"received {len(blob)} of {header.total_bytes} bytes")
        outcome = self.aggregator.receive(header.round_id, header.participant, blob, header.sha256, masked=header.masked)
        return pb.UploadReply(accepted=outcome.accepted, reason=outcome.reason, message=outcome.message)

    @_guarded
    def Aggregate(self, request, context):
        try:
            rnd = self.aggregator.aggregate(
                request.round_id,
                list(request.participants),
                strategy=request.strategy or "fedavg",
                base_sha256=request.base_sha256,
                clip_norm=request.clip_norm or None,
                noise_multiplier=request.noise_multiplier or None,
                outlier_factor=request.outlier_factor or None,
                invited=list(request.invited) if request.secure else None,
                revealed={(share.a, share.b): share.seed for share in request.revealed},
            )
        except (AggregatorError, ValueError) as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        if rnd.failure is not None:  # every update rejected: no candidate, the reasons say why
            reply = pb.AggregateReply(bytes_in=self.aggregator.bytes_in(request.round_id))
            for rejection in rnd.failure.rejected:
                reply.rejected.add(participant=rejection.participant, reason=rejection.reason, detail=rejection.detail)
            return reply
        result = rnd.result
        reply = pb.AggregateReply(
            candidate_sha256=rnd.candidate_sha256,
            accepted=list(result.accepted),
            clipped=list(result.clipped),
            bytes_in=self.aggregator.bytes_in(request.round_id),
            record_json=json.dumps(result.record(), default=str),
        )
        for rejection in result.rejected:
            reply.rejected.add(participant=rejection.participant, reason=rejection.reason, detail=rejection.detail)
        return reply

    @_guarded
    def Evaluate(self, request, context):
        try:
            candidate, current, tokens = self.participant.evaluate(request.candidate_sha256, request.source)
        except (UpdateError, RuntimeError, ValueError) as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except grpc.RpcError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot fetch the candidate from {request.source}: {exc.details()}")
        return pb.EvaluateReply(candidate_loss=candidate, current_loss=current, tokens=tokens)

    @_guarded
    def FetchAdapter(self, request, context):
        tensors = self.participant.adapter(request.sha256)
        if tensors is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"adapter {request.sha256[:12]} is not held by {self.agent.config.replica_id}")
        blob = encode(tensors, {"sha256": request.sha256})
        for part in chunks(blob):
            yield pb.AdapterChunk(sha256=request.sha256, total_bytes=len(blob), data=part)

    @_guarded
    def Publish(self, request, context):
        try:
            version = self.participant.publish(
                request.sha256,
                request.source,
                cluster_version=request.cluster_version,
                round_id=request.round_id,
                included=tuple(request.included),
                eval_loss=request.eval_loss if request.has_eval_loss else None,
            )
        except (UpdateError, ValueError) as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except grpc.RpcError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot fetch the adapter from {request.source}: {exc.details()}")
        return pb.PublishReply(adapter=ref_to_proto(version.ref()), switched_unix=time.time())

    @_guarded
    def RevealSeeds(self, request, context):
        try:
            shares = self.participant.reveal(request.round_id, list(request.dropped))
        except (KeyError, ValueError) as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        reply = pb.RevealReply()
        for (a, b), seed in shares.items():
            reply.shares.add(a=a, b=b, seed=seed)
        return reply

    @_guarded
    def AnnounceUpload(self, request, context):
        caller = tls.peer_identity(context) if self.me is not None else None
        if caller is not None and request.participant and request.participant != caller.name:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{caller} may announce its own upload only, not {request.participant!r}'s")
        announcer = caller.name if caller is not None else request.participant  # the request's word on plaintext (development) only
        if not announcer:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the announcement names no participant")
        try:
            self.participant.take_announcement(request.round_id, announcer, withdraw=request.withdraw)
        except RoundNotStarted as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        except Refused as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return pb.AnnounceReply(replica=self.agent.config.replica_id)

    @_guarded
    def SharePublicKeys(self, request, context):
        try:
            rnd = self.participant.take_public_keys(request.round_id, dict(request.public_keys))
        except RoundNotStarted as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        except Refused as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return pb.RoundStatus(round_id=rnd.round_id, state=rnd.state, message=rnd.message, steps_done=rnd.steps_done, public_key=rnd.public_key)

    @_guarded
    def EdgeSession(self, request_iterator, context):
        edge = self.agent.edge
        caller = tls.peer_identity(context) if self.me is not None else None
        try:
            yield from edge.serve(within(request_iterator, idle_s=edge.limits.idle_s), caller=str(caller or context.peer()))
        except TimeoutError:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no message for {edge.limits.idle_s:g} s: the edge session is closed; open a new one")
        except SessionLimit as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except SessionRefused as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except ValueError as exc:  # a bad split, max_len or state (collab.StateRejected)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    @_guarded
    def Rollback(self, request, context):
        try:
            version = self.participant.rollback(request.sha256)
        except KeyError as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        return pb.PublishReply(adapter=ref_to_proto(version.ref()), switched_unix=time.time())


def upload_limit(spec, dims) -> int:
    """Twice the bytes of a masked update (8 bytes per element) of this LoRA shape, plus 1 MiB of headers."""
    elements = sum(spec.rank * sum(dims.module_shape(m)) for m in spec.target_modules) * dims.layers
    return 2 * 8 * elements + (1 << 20)


def within(items: Iterator[T], deadline: float = math.inf, *, idle_s: float = math.inf) -> Iterator[T]:
    """`items`, read on a helper thread so that a stalled sender cannot hold the caller past
    `deadline` (time.monotonic()) nor wait more than `idle_s` for one item: TimeoutError then. A gRPC
    request iterator blocks without a limit, and a sender may set no deadline of its own; once the
    RPC ends the helper's read ends too."""
    box: queue.SimpleQueue = queue.SimpleQueue()
    done = object()

    def pump() -> None:
        try:
            for item in items:
                box.put(item)
            box.put(done)
        except BaseException as exc:  # grpc.RpcError when the call is cancelled: re-raised to the reader
            box.put(exc)

    threading.Thread(target=pump, name="collm-grpc-upload", daemon=True).start()
    while True:
        wait = min(deadline - time.monotonic(), idle_s)
        try:
            item = box.get(timeout=max(0.0, wait) if math.isfinite(wait) else None)
        except queue.Empty:
            raise TimeoutError from None
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def serve_grpc(
    agent,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    workers: int = WORKERS,
    max_uploads: int | None = None,
    upload_time_limit_s: float = UPLOAD_TIME_LIMIT_S,
    max_concurrent_rpcs: int | None = None,
    credentials: tls.Credentials | None = None,
) -> tuple[grpc.Server, AgentService, int]:
    """Start the gRPC server, with mutual TLS when `credentials` are given; returns (server, service, bound port).
    `max_uploads` (default: half the workers) must leave a worker for control calls; `max_concurrent_rpcs`
    (default: 4 x workers, queued calls included) is the bound past which any call is refused at once."""
    max_uploads = workers // 2 if max_uploads is None else max_uploads
    if not 1 <= max_uploads < workers:
        raise ValueError(f"max_uploads must be >= 1 and below workers ({workers}) so control calls keep a thread; got {max_uploads}")
    edge_sessions = agent.edge.limits.max_sessions
    executor = futures.ThreadPoolExecutor(max_workers=workers + edge_sessions, thread_name_prefix="collm-grpc")
    server = grpc.server(executor, options=CHANNEL_OPTIONS, maximum_concurrent_rpcs=max_concurrent_rpcs or 4 * workers + edge_sessions)
    identity = credentials.identity if credentials is not None else None
    service = AgentService(agent, identity, max_uploads=max_uploads, upload_time_limit_s=upload_time_limit_s)
    pb_grpc.add_AgentServicer_to_server(service, server)
    if credentials is None:
        log.warning("gRPC WITHOUT TLS on %s:%d: anyone who reaches it controls this replica (development only)", host, port)
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        bound = server.add_secure_port(f"{host}:{port}", tls.server_credentials(credentials))
    if bound == 0:
        raise OSError(f"cannot listen for gRPC on {host}:{port}")
    server.start()
    service.participant.local_address = f"{host}:{bound}"
    service.participant.credentials = credentials
    log.info("gRPC on %s:%d", host, bound)
    return server, service, bound
