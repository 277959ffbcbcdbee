"""A replica's side of federated rounds: train from the round's base, upload, evaluate, publish.

Only the update (shadow minus base) leaves the replica, never its data. Every call is idempotent
for a round id (a retried StartRound does not train twice; a repeated Publish of the adapter that
is already current changes nothing). Publishing fetches the adapter, verifies its sha256 and
shapes, and switches atomically through the adapter store: requests in flight keep their pins.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch

from ..engine.adapter_store import AdapterVersion
from ..engine.lora import check_adapter
from ..engine.adapter_store import adapter_sha256
from .client import AgentClient
from .secure import encode_masked, mask_update, pair_seeds, reveal_seeds
from .update import UpdateError, encode_update, make_update

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecureRound:
    """A secure-aggregation round: who masks with whom, and the participant's own clip norm."""

    participants: tuple[str, ...]
    clip_norm: float | None = None


@dataclass
class ParticipantRound:
    round_id: str
    state: str = "Training"  # Training -> Uploading -> Uploaded | Failed
    message: str = ""
    steps_done: int = 0
    started_at: float = 0.0
    secure: SecureRound | None = None
    seeds: dict | None = None  # pair seeds of a secure round, kept to reveal those of dropped peers


class Participant:
    def __init__(self, agent, aggregator) -> None:
        self.agent = agent
        self.aggregator = aggregator  # this replica's Aggregator: candidates it holds can be served locally
        self._rounds: dict[str, ParticipantRound] = {}
        self._fetched: dict[str, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()
        self.local_address = ""  # set by the gRPC server once it listens, so self-uploads skip the network

    # -- adapters by content hash -------------------------------------------------------------
    def adapter(self, sha256: str) -> dict[str, torch.Tensor] | None:
        """An adapter this replica holds: a retained version, a candidate it aggregated or fetched."""
        version = self.agent.store.find(sha256)
        if version is not None:
            return dict(version.tensors)
        candidate = self.aggregator.candidate(sha256)
        if candidate is not None:
            return candidate
        with self._lock:
            return self._fetched.get(sha256)

    def obtain(self, sha256: str, source: str) -> dict[str, torch.Tensor]:
        tensors = self.adapter(sha256)
        if tensors is not None:
            return tensors
        if not source:
            raise UpdateError(f"adapter {sha256[:12]} is not held here and no source was given")
        with AgentClient(source) as peer:
            tensors = peer.fetch(sha256)
        check_adapter(tensors, self.agent.spec, self.agent.runtime.dims)
        with self._lock:
            self._fetched[sha256] = tensors
        return tensors

    # -- training -----------------------------------------------------------------------------
    def start_round(self, round_id: str, *, local_steps: int, base_sha256: str, base_source: str, aggregator_address: str, only_b: bool = False, secure: SecureRound | None = None) -> ParticipantRound:
        with self._lock:
            existing = self._rounds.get(round_id)
            if existing is not None:
                return existing
            rnd = self._rounds[round_id] = ParticipantRound(round_id, started_at=time.time(), secure=secure)
        trainer = self.agent.trainer
        if trainer is None:
            rnd.state, rnd.message = "Failed", "this replica has no training data (start it with --data)"
            return rnd
        if secure is not None:
            secret_file = self.agent.config.secure_aggregation_secret_file
            if not secret_file:
                rnd.state, rnd.message = "Failed", "secure aggregation needs the round secret: start the agent with --secure-aggregation-secret-file"
                return rnd
            try:
                with open(secret_file, "rb") as f:
                    rnd.seeds = pair_seeds(self.agent.config.replica_id, secure.participants, f.read().strip(), round_id)
            except (OSError, ValueError) as exc:
                rnd.state, rnd.message = "Failed", f"cannot derive the pair seeds: {exc}"
                return rnd
        try:
            base = self.obtain(base_sha256, base_source)
        except Exception as exc:
            rnd.state, rnd.message = "Failed", f"cannot get the round's base adapter: {exc}"
            return rnd
        start_step = trainer.step

        def done(snapshot: dict[str, torch.Tensor]) -> None:
            rnd.steps_done = trainer.step - start_step
            rnd.state = "Uploading"
            threading.Thread(target=self._upload, args=(rnd, snapshot, base, aggregator_address, only_b), daemon=True).start()

        trainer.begin_round(round_id, base, local_steps, done, only_b=only_b)
        if not trainer.is_running:
            trainer.start()
        return rnd

    def _upload(self, rnd: ParticipantRound, shadow, base, aggregator_address: str, only_b: bool) -> None:
        agent = self.agent
        try:
            update = make_update(agent.config.replica_id, rnd.round_id, shadow, base, agent.dataset.train_chunks, only_b=only_b)
            blob, sha, masked = encode_update(update), update.sha256, rnd.secure is not None
            if masked:  # only the masked form leaves this replica
                secured = mask_update(update, rnd.secure.participants, rnd.seeds, clip_norm=rnd.secure.clip_norm)
                blob, sha = encode_masked(secured), adapter_sha256(secured.masked)
            if aggregator_address == self.local_address:
                outcome = self.aggregator.receive(rnd.round_id, update.participant, blob, sha, masked=masked)
                accepted, reason, message = outcome.accepted, outcome.reason, outcome.message
            else:
                with AgentClient(aggregator_address) as peer:
                    reply = peer.upload(rnd.round_id, update.participant, blob, sha, masked=masked)
                accepted, reason, message = reply.accepted, reply.reason, reply.message
            rnd.state = "Uploaded" if accepted else "Failed"
            rnd.message = message if accepted else f"{reason}: {message}"
        except Exception as exc:  # the aggregator is gone or refused: the round goes on without us
            rnd.state, rnd.message = "Failed", f"upload to {aggregator_address} failed: {exc}"
            log.warning("round %s: %s", rnd.round_id, rnd.message)

    def reveal(self, round_id: str, dropped: list[str]) -> dict[tuple[str, str], bytes]:
        """The pair seeds this participant shared with `dropped` peers of a secure round, no others."""
        rnd = self.status(round_id)
        if rnd is None or rnd.seeds is None:
            raise KeyError(f"{self.agent.config.replica_id} holds no pair seeds for round {round_id}")
        return reveal_seeds(self.agent.config.replica_id, dropped, rnd.seeds)

    def status(self, round_id: str) -> ParticipantRound | None:
        with self._lock:
            return self._rounds.get(round_id)

    # -- evaluation and publishing ------------------------------------------------------------
    def evaluate(self, candidate_sha256: str, source: str) -> tuple[float, float, int]:
        """(candidate loss, current loss, eval tokens) on this replica's held-out split."""
        trainer = self.agent.trainer
        if trainer is None:
            raise RuntimeError("this replica has no held-out data to evaluate on (start it with --data)")
        candidate = self.obtain(candidate_sha256, source)
        current = self.agent.store.current
        candidate_loss = trainer.evaluate(candidate)
        current_loss = trainer.evaluate(dict(current.tensors)) if current is not None else candidate_loss
        return candidate_loss, current_loss, trainer.eval_tokens

    def publish(self, sha256: str, source: str, *, round: int, eval_loss: float | None) -> AdapterVersion:
        current = self.agent.store.current
        if current is not None and current.sha256 == sha256:
            return current  # already serving it: a retry changes nothing
        tensors = self.obtain(sha256, source)
        version = self.agent.store.publish(tensors, round=round, step=0, eval_loss=eval_loss)
        with self._lock:
            self._fetched.pop(sha256, None)
        return version

    def rollback(self, sha256: str) -> AdapterVersion:
        version = self.agent.store.find(sha256)
        if version is None:
            raise KeyError(f"adapter {sha256[:12]} is not retained on {self.agent.config.replica_id}; retained versions: {self.agent.store.retained()}")
        return self.agent.store.rollback(version.number)
