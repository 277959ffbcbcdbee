"""Runs one federated round: the pure state machine (rounds.py) on one side, agents over gRPC on the other.

The operator's AdapterRound handler and the local mode both use this driver. It owns the clock
(unix seconds, the same clock the agents' deadlines use) and the transport: it feeds events into
`rounds.step`, persists the state through `persist` before it acts, executes the actions, and
polls the aggregator and the participants for progress. A driver started with a persisted state
resumes with `rounds.pending_actions`, so no finished stage runs again (and every agent call is
idempotent for the round id anyway).

In a secure round the driver relays the participants' ephemeral public keys: it feeds each
StartRound reply's key to the state machine (KeyAdvertised) and hands the map it fixes to every key
holder (SharePublicKeys, an operator-only call over mutual TLS, so no replica can swap a key). It
sees public keys only; the only seeds it handles are those survivors reveal for dropped peers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import grpc

from collm_control import rounds as R

from . import tls
from .client import AgentClient
from .proto import collm_pb2 as pb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StrategyConfig:
    name: str = "fedavg"  # fedavg | ffa | median | trimmed_mean
    clip_norm: float | None = None
    noise_multiplier: float | None = None
    outlier_factor: float | None = None
    secure: bool = False  # pairwise-masked uploads; the aggregator must not be a participant

    @property
    def only_b(self) -> bool:
        return self.name == "ffa"


class RoundDriver:
    def __init__(
        self,
        spec: R.RoundSpec,
        addresses: Mapping[str, str],
        *,
        strategy: StrategyConfig = StrategyConfig(),
        round_number: int = 0,
        state: R.RoundState | None = None,
        persist: Callable[[dict], None] | None = None,
        clock: Callable[[], float] = time.time,
        poll_s: float = 0.2,
        rpc_timeout_s: float = 30.0,
        credentials: tls.Credentials | None = None,
    ) -> None:
        """`credentials`: the operator's certificate, for agents that serve with mutual TLS."""
        missing = [r for r in spec.replicas if r not in addresses]
        if missing:
            raise ValueError(f"no gRPC address for replicas {missing}")
        if strategy.secure and spec.aggregator in spec.participants:
            raise ValueError(
                f"secure aggregation needs an aggregator that is not a participant (it would hold pair seeds of its own); {spec.aggregator} is both"
            )
        if strategy.secure and strategy.name != "fedavg":
            raise ValueError("secure aggregation sums masked updates: only the fedavg strategy applies")
        if strategy.secure and strategy.noise_multiplier:
            raise ValueError("secure aggregation with DP noise is not supported: the aggregator sees only the masked sum (distributed DP is not built)")
        # The strategy says whether the round is secure; the state machine needs it to exchange keys.
        spec = replace(spec, secure=strategy.secure)
        self.spec, self.addresses, self.strategy = spec, dict(addresses), strategy
        self.credentials = credentials
        self.round_number = round_number
        self.state = replace(state, spec=replace(state.spec, secure=strategy.secure)) if state is not None else R.start(spec)
        self.persist = persist or (lambda _: None)
        self.clock, self.poll_s, self.rpc_timeout_s = clock, poll_s, rpc_timeout_s
        self.refusals: list[R.Refused] = []
        self.aggregate_record: str = ""
        self._clients: dict[str, AgentClient] = {}
        self._seen_uploads: set[str] = set()

    def client(self, replica: str) -> AgentClient:
        if replica not in self._clients:
            self._clients[replica] = AgentClient(self.addresses[replica], timeout=self.rpc_timeout_s, credentials=self.credentials)
        return self._clients[replica]

    def close(self) -> None:
        for c in self._clients.values():
            c.close()

    # -- main loop ----------------------------------------------------------------------------
    def run(self, timeout_s: float | None = None, *, stop: Callable[[], bool] | None = None) -> R.RoundState:
        """Drive the round to its end; with `stop`, return the unfinished state once it says so
        (the state is persisted: a new driver resumes from it)."""
        limit = None if timeout_s is None else self.clock() + timeout_s
        try:
            if self.state.started_at is None:
                try:
                    # The round starts from the global adapter the aggregator rests on, not from a local
                    # revision it may serve: every participant's update is relative to that global.
                    base = self.client(self.spec.aggregator).stats().global_adapter
                    actions = self._feed(R.Started(self.clock(), str(base.cluster_version) if base else "0", base.sha256 if base else ""))
                except grpc.RpcError as exc:  # ends the round AggregatorLost: nothing started, nothing to undo
                    actions = self._feed(R.AggregatorFailed(self.clock(), f"aggregator {self.spec.aggregator} unreachable at the start: {exc.code().name}"))
            else:
                actions = R.pending_actions(self.state)
            while True:
                while actions:
                    actions = [a for act in actions for a in self._execute(act)]
                if self.state.finished or (stop is not None and stop()):
                    return self.state
                if limit is not None and self.clock() > limit:
                    raise TimeoutError(f"round {self.spec.round_id} did not finish within {timeout_s} s (stage {self.state.stage})")
                time.sleep(self.poll_s)
                actions = self._poll()
        finally:
            self.close()

    def _feed(self, event) -> list:
        self.state, actions = R.step(self.state, event)
        self.persist(self.state.to_dict())
        for action in actions:
            if isinstance(action, R.Refused):
                self.refusals.append(action)
                log.info("round %s refused an event from %s: %s", self.spec.round_id, action.to or "the driver", action)
        return [a for a in actions if not isinstance(a, R.Refused)]

    def _poll(self) -> list:
        """Progress of the training stage (uploads, dead participants), then a Tick for deadlines."""
        actions = []
        if self.state.stage is R.Condition.TRAINED:
            actions += self._poll_uploads()
            for participant, record in self.state.participants.items():
                if record.outcome is R.Outcome.PENDING:
                    actions += self._poll_participant(participant)
        return actions + self._feed(R.Tick(self.clock()))

    def _poll_uploads(self) -> list:
        try:
            status = self.client(self.spec.aggregator).round_status(self.spec.round_id)
        except grpc.RpcError as exc:
            return self._feed(R.AggregatorFailed(self.clock(), f"aggregator unreachable: {exc.code().name}"))
        actions = []
        for upload in status.uploads:
            if upload.participant not in self._seen_uploads:
                self._seen_uploads.add(upload.participant)
                actions += self._feed(R.UpdateUploaded(self.clock(), upload.participant, upload.num_samples, upload.sha256, upload.bytes))
        return actions

    def _poll_participant(self, participant: str) -> list:
        try:
            status = self.client(participant).round_status(self.spec.round_id)
        except grpc.RpcError as exc:
            return self._feed(R.ParticipantFailed(self.clock(), participant, f"unreachable: {exc.code().name}"))
        if status.state == "Failed":
            return self._feed(R.ParticipantFailed(self.clock(), participant, status.message))
        return []

    # -- actions ------------------------------------------------------------------------------
    def _execute(self, action) -> list:
        if isinstance(action, R.StartTraining):
            return self._start_training(action)
        if isinstance(action, R.ShareKeys):
            return self._share_keys(action)
        if isinstance(action, R.Aggregate):
            return self._aggregate(action)
        if isinstance(action, R.Evaluate):
            return self._evaluate(action)
        if isinstance(action, R.Publish):
            return self._publish(action)
        if isinstance(action, R.Finish):
            log.info("round %s finished: %s (%s) %s", self.spec.round_id, "succeeded" if action.succeeded else "failed", action.reason, action.message)
        return []

    def _start_training(self, action: R.StartTraining) -> list:
        aggregator = self.addresses[action.aggregator]
        request: dict[str, Any] = dict(
            round_id=self.spec.round_id,
            local_steps=action.local_steps,
            deadline_unix=action.deadline_at,
            base_sha256=action.base_sha256,
            base_source=aggregator,
            aggregator_address=aggregator,
            only_b=self.strategy.only_b,
        )
        if self.strategy.secure:
            request.update(
                secure=True,
                participants=list(self.spec.participants),
                clip_norm=self.strategy.clip_norm or 0.0,
                peer_addresses={p: self.addresses[p] for p in self.spec.participants},  # each announces its upload to the others
            )
        actions = []
        for participant in action.participants:
            try:
                status = self.client(participant).start_round(pb.StartRoundRequest(**request))
            except grpc.RpcError as exc:
                actions += self._feed(R.ParticipantFailed(self.clock(), participant, f"cannot start training: {exc.code().name}"))
                continue
            if status.state == "Failed":
                actions += self._feed(R.ParticipantFailed(self.clock(), participant, status.message))
            elif self.strategy.secure and not status.public_key:
                actions += self._feed(R.ParticipantFailed(self.clock(), participant, "NoPublicKey: it gave no public key for the secure round"))
            elif self.strategy.secure:
                actions += self._feed(R.KeyAdvertised(self.clock(), participant, status.public_key.hex()))
        return actions

    def _share_keys(self, action: R.ShareKeys) -> list:
        """Every key holder's public key to those still waiting; one that refuses or is unreachable drops out."""
        keys = {p: bytes.fromhex(key) for p, key in action.public_keys}
        waiting = [p for p in action.participants if self.state.participants[p].outcome is R.Outcome.PENDING]

        def one(participant: str) -> R.ParticipantFailed | None:
            try:
                self.client(participant).share_public_keys(self.spec.round_id, keys)
                return None
            except grpc.RpcError as exc:
                return R.ParticipantFailed(self.clock(), participant, f"did not take the round's public keys: {exc.code().name}: {exc.details()}")

        with ThreadPoolExecutor(max_workers=max(1, len(waiting))) as pool:
            events = [e for e in pool.map(one, waiting) if e is not None]
        return [a for event in events for a in self._feed(event)]

    def _aggregate(self, action: R.Aggregate) -> list:
        s = self.strategy
        request = pb.AggregateRequest(
            round_id=self.spec.round_id,
            participants=list(action.participants),
            strategy=s.name,
            clip_norm=s.clip_norm or 0.0,
            noise_multiplier=s.noise_multiplier or 0.0,
            outlier_factor=s.outlier_factor or 0.0,
            base_sha256=self.state.base_sha256,
        )
        if s.secure:
            request.secure = True
            holders = self.state.key_holders  # who masked with whom: the participants the keys went to
            request.invited.extend(holders)
            dropped = [p for p in holders if p not in action.participants]
            if dropped:  # survivors reveal the seeds they shared with the dropped, so their masks can be removed
                for survivor in action.participants:
                    try:
                        request.revealed.extend(self.client(survivor).reveal_seeds(self.spec.round_id, dropped).shares)
                    except grpc.RpcError as exc:
                        # FAILED_PRECONDITION when a "dropped" participant had announced its upload: the
                        # aggregator may hold its update, and the seeds would unmask it alone.
                        reason = f"{survivor} did not reveal its seeds for dropped {dropped}: {exc.code().name}: {exc.details()}"
                        return self._feed(R.AggregatorFailed(self.clock(), reason))
        try:
            reply = self.client(action.aggregator).aggregate(request)
        except grpc.RpcError as exc:
            return self._feed(R.AggregatorFailed(self.clock(), f"aggregation failed: {exc.code().name}: {exc.details()}"))
        self.aggregate_record = reply.record_json
        rejected = tuple((r.participant, f"{r.reason}: {r.detail}") for r in reply.rejected)
        # With every update rejected there is no candidate; the state machine ends NoUpdateAccepted.
        return self._feed(R.Aggregated(self.clock(), reply.candidate_sha256 or "no-candidate", tuple(reply.accepted), rejected, reply.bytes_in))

    def _evaluate(self, action: R.Evaluate) -> list:
        source = self.addresses[self.spec.aggregator]

        def one(participant):
            try:
                reply = self.client(participant).evaluate(self.spec.round_id, action.version_sha256, source)
                return R.Evaluated(self.clock(), participant, reply.candidate_loss, reply.current_loss, reply.tokens)
            except grpc.RpcError as exc:
                return R.EvaluationFailed(self.clock(), participant, f"{exc.code().name}: {exc.details()}")

        with ThreadPoolExecutor(max_workers=max(1, len(action.participants))) as pool:
            events = list(pool.map(one, action.participants))
        return [a for event in events for a in self._feed(event)]

    def _publish(self, action: R.Publish) -> list:
        loss = self.state.eval_loss_after
        # Whose uploads the new global holds: their shadows rebase from the snapshot they uploaded.
        included = [p for p, record in self.state.participants.items() if record.outcome is R.Outcome.ACCEPTED]

        def one(replica):
            for source in action.sources:
                request = pb.PublishRequest(
                    round_id=self.spec.round_id,
                    sha256=action.version_sha256,
                    source=self.addresses[source],
                    cluster_version=self.round_number,
                    eval_loss=loss or 0.0,
                    has_eval_loss=loss is not None,
                    included=included,
                )
                try:
                    reply = self.client(replica).publish(request)
                    return R.PublishAcked(self.clock(), replica, reply.adapter.sha256)
                except grpc.RpcError as exc:
                    reason = f"{exc.code().name}: {exc.details()}"
            return R.PublishFailed(self.clock(), replica, reason)

        with ThreadPoolExecutor(max_workers=max(1, len(action.replicas))) as pool:
            events = list(pool.map(one, action.replicas))
        return [a for event in events for a in self._feed(event)]
