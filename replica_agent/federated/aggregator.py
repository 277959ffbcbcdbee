"""The aggregator's side of a round: take uploads until the round closes, then combine them.

Any replica can be a round's aggregator; the operator picks one per round. Uploads are verified
(sha256 of the tensors, the round's base) before they count; after `aggregate` the round is closed
and late uploads are refused with a reason the participant can act on. Every call is idempotent
for a round id: aggregating twice returns the first result.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import cast

import torch

from ..engine.adapter_store import AdapterStore, adapter_sha256
from .aggregation import AggregateResult, AggregationError, build_strategy
from .secure import MaskedUpdate, SecureAggregator, decode_masked
from .update import AdapterUpdate, UpdateError, apply_delta, decode_update

log = logging.getLogger(__name__)


@dataclass
class Upload:
    update: AdapterUpdate | MaskedUpdate | None  # masked in secure rounds: never seen in the clear here; None once aggregated
    sha256: str
    bytes: int
    received_at: float
    num_samples: int


@dataclass
class AggregatorRound:
    round_id: str
    uploads: dict[str, Upload] = field(default_factory=dict)
    closed: bool = False
    closed_at: float | None = None
    candidate_sha256: str | None = None
    result: AggregateResult | None = None
    failure: AggregationError | None = None  # every update was rejected (failure.rejected says why)


@dataclass(frozen=True)
class UploadOutcome:
    accepted: bool
    reason: str = ""
    message: str = ""


class AggregatorError(RuntimeError):
    """A round cannot be aggregated as asked; the message says why."""


ROUNDS_KEPT = 8  # rounds an aggregator or a participant remembers; older ones (and their candidates) are dropped


def drop_oldest(entries: dict, keep: int) -> list:
    """Remove the oldest entries (insertion order) beyond `keep`; returns the removed values."""
    return [entries.pop(next(iter(entries))) for _ in range(len(entries) - keep)]


class Aggregator:
    def __init__(self, store: AdapterStore, *, max_upload_bytes: int | None = None) -> None:
        """`max_upload_bytes`: the largest upload accepted (an update of this replica's LoRA shape
        fits with room to spare); the gRPC handler stops reading a stream that passes it."""
        self.store = store
        self.max_upload_bytes = max_upload_bytes
        self._rounds: dict[str, AggregatorRound] = {}
        self._candidates: dict[str, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def _round_locked(self, round_id: str) -> AggregatorRound:
        """The round's state, made on first sight; the oldest rounds beyond ROUNDS_KEPT are forgotten
        with their candidates, so junk round ids cannot grow memory without bound."""
        rnd = self._rounds.get(round_id)
        if rnd is None:
            rnd = self._rounds[round_id] = AggregatorRound(round_id)
            for oldest in drop_oldest(self._rounds, ROUNDS_KEPT):
                if oldest.candidate_sha256 is not None:
                    self._candidates.pop(oldest.candidate_sha256, None)
        return rnd

    def round(self, round_id: str) -> AggregatorRound | None:
        with self._lock:
            return self._rounds.get(round_id)

    def candidate(self, sha256: str) -> dict[str, torch.Tensor] | None:
        with self._lock:
            return self._candidates.get(sha256)

    def receive(self, round_id: str, participant: str, blob: bytes, sha256: str, *, masked: bool = False) -> UploadOutcome:
        with self._lock:
            rnd = self._round_locked(round_id)
            if rnd.closed:
                return UploadOutcome(False, "RoundClosed", f"round {round_id} closed to uploads at {rnd.closed_at:.3f} (unix); this update came too late")
            previous = rnd.uploads.get(participant)
        if previous is not None:
            if previous.sha256 == sha256:
                return UploadOutcome(True, "Duplicate", "this update was already received")
            return UploadOutcome(False, "Duplicate", f"{participant} already uploaded a different update for round {round_id}")
        try:
            update = _decode_masked(blob, sha256) if masked else decode_update(blob, expected_sha256=sha256)
        except UpdateError as exc:
            return UploadOutcome(False, "Corrupt", str(exc))
        if update.participant != participant or update.round_id != round_id:
            return UploadOutcome(False, "Corrupt", f"the update names participant {update.participant!r} of round {update.round_id!r}")
        with self._lock:
            if rnd.closed:
                return UploadOutcome(False, "RoundClosed", f"round {round_id} closed while this update was in transit")
            rnd.uploads[participant] = Upload(update, sha256, len(blob), time.time(), update.num_samples)
        log.info("round %s: update from %s (%d bytes, %d samples)", round_id, participant, len(blob), update.num_samples)
        return UploadOutcome(True)

    def aggregate(
        self,
        round_id: str,
        participants: list[str],
        *,
        strategy: str,
        base_sha256: str,
        clip_norm: float | None = None,
        noise_multiplier: float | None = None,
        outlier_factor: float | None = None,
        invited: list[str] | None = None,
        revealed: dict | None = None,
    ) -> AggregatorRound:
        """Close the round and combine the named participants' uploads into a candidate adapter.

        With `invited` (a secure round) the uploads are masked: only their sum is unmasked, with the
        `revealed` pair seeds of participants that dropped out (see secure.py).
        """
        if invited is not None and noise_multiplier:
            # The unmasked sum gets no noise here: promising DP for it would be false (distributed DP is not built).
            raise AggregatorError(f"round {round_id}: secure aggregation with a noise multiplier is not supported; use one of the two")
        with self._lock:
            rnd = self._round_locked(round_id)
            if rnd.result is not None or rnd.failure is not None:
                return rnd
            rnd.closed, rnd.closed_at = True, time.time()
            updates = [u for p in participants if p in rnd.uploads and (u := rnd.uploads[p].update) is not None]
        if not updates:
            raise AggregatorError(f"round {round_id}: none of {participants} uploaded an update")
        base = self.store.find(base_sha256)
        if base is None:
            raise AggregatorError(f"round {round_id}: the base adapter {base_sha256[:12]} is not retained on the aggregator")
        try:
            if invited is not None:
                result = _unmask(round_id, invited, updates, revealed or {})
            else:
                plain = cast(list[AdapterUpdate], updates)  # not a secure round: every upload is a plain update
                result = build_strategy(strategy, clip_norm=clip_norm, noise_multiplier=noise_multiplier, outlier_factor=outlier_factor).aggregate(
                    plain, base_sha256=base_sha256
                )
        except AggregationError as exc:
            with self._lock:
                rnd.failure = exc
                _release_uploads(rnd)
            return rnd
        candidate = apply_delta(dict(base.tensors), result.delta)
        sha = adapter_sha256(candidate)
        with self._lock:
            rnd.result, rnd.candidate_sha256 = result, sha
            self._candidates[sha] = candidate
            _release_uploads(rnd)
        return rnd

    def bytes_in(self, round_id: str) -> int:
        rnd = self.round(round_id)
        return sum(u.bytes for u in rnd.uploads.values()) if rnd else 0


def _release_uploads(rnd: AggregatorRound) -> None:
    """Once a round has its result (or failed), its uploads' tensors are needed no more: keep what its
    status reports. The aggregator remembers ROUNDS_KEPT rounds; holding every upload of each made an
    aggregator's memory climb round after round (a soak run, docs/reliability.md)."""
    rnd.uploads = {p: replace(u, update=None) for p, u in rnd.uploads.items()}


def _decode_masked(blob: bytes, sha256: str) -> MaskedUpdate:
    masked = decode_masked(blob)
    actual = adapter_sha256(masked.masked)
    if actual != sha256:
        raise UpdateError(f"masked update sha256 mismatch: got {actual}, the sender announced {sha256}")
    return masked


def _unmask(round_id: str, invited: list[str], updates: list, revealed: dict) -> AggregateResult:
    if any(not isinstance(u, MaskedUpdate) for u in updates):
        raise AggregationError(f"round {round_id}: a secure round takes masked updates only")
    secure = SecureAggregator(round_id, invited)
    for masked in updates:
        try:
            secure.add(masked)
        except UpdateError as exc:
            raise AggregationError(f"round {round_id}: {exc}") from exc
    delta = secure.unmask(revealed)
    total = sum(u.num_samples for u in updates)
    weights = {u.participant: u.num_samples / total for u in updates}
    return AggregateResult(
        delta=delta, accepted=secure.survivors, rejected=(), clipped=(), weights=weights, clip_norm=None, noise_multiplier=None, noise_std=None
    )
