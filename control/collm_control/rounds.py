"""One federated round as a pure state machine: `step(state, event) -> (state, actions)`.

The operator's AdapterRound handler and the local mode drive rounds with this code. The driver owns
the clock and the transport: it feeds in events stamped `at` (seconds on its clock), persists
`state.to_dict()`, then executes the actions over gRPC; after a restart it rebuilds the state with
`RoundState.from_dict` and calls `pending_actions`, which re-issues only the unfinished work of the
stage in progress. Nothing here does I/O, reads a clock, or raises on a surprising event: one out of
place leaves the state as it was and returns a `Refused` (reason + message the driver may send back);
one that repeats what the state records returns nothing; applying an event twice changes nothing.

The stage in progress is the first of Trained, Aggregated, Evaluated, Published not True yet. A
failing stage turns its own condition False with the round's reason (Succeeded too); later ones
stay Unknown.
- Trained: every participant uploaded or was dropped, or the deadline passed with `min_participants`
  uploads (else NotEnoughParticipants, as soon as it is out of reach). Later uploads: RoundClosed.
  Any event whose `at` reaches a deadline fires it; Tick fires it when nothing else happens.
  A secure round (spec.secure) first exchanges keys: each participant's StartRound reply carries
  its ephemeral public key (KeyAdvertised); once every pending participant has one, the map is fixed
  (`key_holders`, persisted before ShareKeys goes out) and handed to them, and they mask with each
  other only. Uploads before that are refused (KeysNotShared). A participant that advertises another
  key once the map is fixed restarted and lost its keys: it is Dropped (KeysLost), its peers reveal
  the seeds they derived with its old key, so a resumed round goes on or fails, and never waits on it.
- Aggregated: the aggregator says which uploads it used. The aggregator is fixed for the round: if it
  fails before any replica acked the new version the round ends Failed AggregatorLost; only it held
  the candidate, so nothing was published and every replica keeps its version. The recovery is a NEW
  round with another aggregator (no re-election within a round). The driver reports its death with
  AggregatorFailed even when it is also a participant. After an ack, acked replicas become sources.
- Evaluated: only accepted participants evaluate (one whose update was rejected may be faulty or
  hostile: no vote on the gate); failures are ignored if one evaluated. The gate compares the
  token-weighted losses: candidate <= current + eval_tolerance (nats), else Rejected EvalGateFailed.
  Aggregation and evaluation have no deadline here: driver call timeouts become *Failed events.
- Published: a failed publish is retried on the next Tick until the publish deadline; an ack counts
  even in the event that reaches it. Replicas not acked by then are `laggards()`: the round still
  Succeeds (PartiallyPublished) and the operator re-publishes to them later (versions are immutable
  and content-addressed, so a late publish is the same switch). Freshness = last ack - aggregation end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from .round_state import (  # re-exported: callers use rounds.<Name>
    STAGES,
    Action,
    Aggregate,
    Aggregated,
    AggregatorFailed,
    Condition,
    ConditionState,
    Delivery,
    Evaluate,
    Evaluated,
    EvaluationFailed,
    Event,
    Finish,
    KeyAdvertised,
    Outcome,
    ParticipantFailed,
    ParticipantRecord,
    Publish,
    PublishAcked,
    PublishFailed,
    PublishRecord,
    Refused,
    Result,
    RoundSpec,
    RoundState,
    ShareKeys,
    Started,
    StartTraining,
    Tick,
    UpdateUploaded,
    valid_number,
)

__all__ = [
    "Action",
    "Aggregate",
    "Aggregated",
    "AggregatorFailed",
    "Condition",
    "ConditionState",
    "Delivery",
    "Evaluate",
    "Evaluated",
    "EvaluationFailed",
    "Event",
    "Finish",
    "KeyAdvertised",
    "Outcome",
    "ParticipantFailed",
    "ParticipantRecord",
    "Publish",
    "PublishAcked",
    "PublishFailed",
    "PublishRecord",
    "Refused",
    "Result",
    "RoundSpec",
    "RoundState",
    "STAGES",
    "ShareKeys",
    "StartTraining",
    "Started",
    "Tick",
    "UpdateUploaded",
    "start",
    "step",
    "pending_actions",
    "laggards",
]


def start(spec: RoundSpec) -> RoundState:
    """A round not started yet: the driver feeds `Started` when it begins."""
    return RoundState(spec=spec, conditions={c: ConditionState() for c in Condition}, participants={p: ParticipantRecord() for p in spec.participants})


def step(state: RoundState, event: Event) -> tuple[RoundState, list[Action]]:
    """Apply one event; pure. Refusals leave the state as it was, but time still moves deadlines."""
    s = replace(state, conditions=dict(state.conditions), participants=dict(state.participants), publishes=dict(state.publishes))
    if isinstance(event, Tick):
        actions: list[Action] = []
    elif s.finished:
        actions = [_refuse(s, event, "RoundFinished", f"round {s.spec.round_id} already ended {s.result.value} ({s.conditions[Condition.SUCCEEDED].reason})")]
    elif s.started_at is None and not isinstance(event, (Started, AggregatorFailed)):
        actions = [_refuse(s, event, "NotStarted", f"round {s.spec.round_id} has not started yet")]
    else:
        actions = _HANDLERS[type(event)](s, event)
    if not s.finished and s.started_at is not None:
        actions += _advance(s, event.at, retry=isinstance(event, Tick))
    return s, actions


def pending_actions(state: RoundState) -> list[Action]:
    """What a restarted driver must (re)do now: only the unfinished work of the stage in progress."""
    if state.finished:
        summary = state.conditions[Condition.SUCCEEDED]
        return [Finish(state.succeeded, summary.reason, summary.message)]
    if state.started_at is None:
        return []
    stage = state.stage
    if stage is Condition.TRAINED:
        waiting = _with(state, Outcome.PENDING)
        if not waiting:
            return []
        # A secure round whose keys went out: StartRound again (a participant that restarted answers
        # with a new key and is dropped), then the same map again (taking it twice changes nothing).
        shared = [ShareKeys(waiting, state.public_keys())] if state.keys_shared_at is not None else []
        return [_start_training(state, waiting), *shared]
    if stage is Condition.AGGREGATED:
        return [Aggregate(state.spec.aggregator, _with(state, Outcome.UPLOADED))]
    if stage is Condition.EVALUATED:
        waiting = tuple(p for p in _with(state, Outcome.ACCEPTED) if _evaluation_pending(state, p))
        return [Evaluate(waiting, state.version_sha256)] if waiting else []
    missing, sources = laggards(state), _sources(state)
    return [Publish(missing, state.version_sha256, sources)] if missing and sources else []


def laggards(state: RoundState) -> tuple[str, ...]:
    """Replicas that have not acked the round's version (empty before publishing starts)."""
    return tuple(r for r, p in state.publishes.items() if p.status is not Delivery.ACKED)


def _with(s: RoundState, outcome: Outcome) -> tuple[str, ...]:
    return tuple(p for p in s.spec.participants if s.participants[p].outcome is outcome)


def _evaluation_pending(s: RoundState, participant: str) -> bool:
    record = s.participants[participant]
    return not record.eval_tokens and not record.eval_error


def _sources(s: RoundState) -> tuple[str, ...]:
    acked = tuple(r for r, p in s.publishes.items() if p.status is Delivery.ACKED)
    return acked if s.aggregator_lost else (s.spec.aggregator,)


def _start_training(s: RoundState, participants: tuple[str, ...]) -> StartTraining:
    return StartTraining(participants, s.base_version, s.base_sha256, s.spec.local_steps, s.deadline_at, s.spec.aggregator)


def _refuse(s: RoundState, event: Event, reason: str, message: str) -> Refused:
    sender = getattr(event, "participant", None) or getattr(event, "replica", None)
    if sender is None:
        sender = s.spec.aggregator if isinstance(event, (Aggregated, AggregatorFailed)) else ""
    return Refused(sender, reason, message)


def _set(s: RoundState, condition: Condition, status: str, reason: str, message: str, at: float) -> None:
    s.conditions[condition] = ConditionState(status, reason, message, at)


def _finish(s: RoundState, at: float, result: Result, reason: str, message: str) -> list[Action]:
    if result is Result.SUCCEEDED:
        _set(s, Condition.PUBLISHED, "True", reason, message, at)
        s.published_at = at
    else:
        _set(s, s.stage or Condition.TRAINED, "False", reason, message, at)
    _set(s, Condition.SUCCEEDED, "True" if result is Result.SUCCEEDED else "False", reason, message, at)
    s.result, s.finished_at = result, at
    return [Finish(result is Result.SUCCEEDED, reason, message)]


def _on_started(s: RoundState, e: Started) -> list[Action]:
    if s.started_at is not None:
        if (e.base_version, e.base_sha256) == (s.base_version, s.base_sha256):
            return []
        return [_refuse(s, e, "AlreadyStarted", f"round {s.spec.round_id} started at {s.started_at:g} from version {s.base_version}")]
    s.started_at, s.deadline_at = e.at, e.at + s.spec.deadline_s
    s.base_version, s.base_sha256 = e.base_version, e.base_sha256
    return [_start_training(s, s.spec.participants)]


def _on_uploaded(s: RoundState, e: UpdateUploaded) -> list[Action]:
    record = s.participants.get(e.participant)
    if record is None:
        return [_refuse(s, e, "NotAParticipant", f"{e.participant!r} is not a participant of round {s.spec.round_id}; wait for a round that invites it")]
    if record.uploaded_at is not None and record.sha256 == e.sha256:
        return []  # a retried upload that already arrived
    if record.outcome is Outcome.LATE or (record.outcome is Outcome.PENDING and e.at >= s.deadline_at):
        return [
            _refuse(
                s, e, "RoundClosed", f"the round's deadline passed at {s.deadline_at:g} (update sent at {e.at:g}); the update was not used, join the next round"
            )
        ]
    if record.outcome is Outcome.DROPPED:
        return [_refuse(s, e, "ParticipantDropped", f"{e.participant} was dropped from round {s.spec.round_id} ({record.reason}); join the next round")]
    if record.outcome is not Outcome.PENDING:
        return [_refuse(s, e, "Duplicate", f"{e.participant} already uploaded update {record.sha256[:12]} in round {s.spec.round_id}; one update per round")]
    if s.spec.secure and s.keys_shared_at is None:
        return [_refuse(s, e, "KeysNotShared", f"round {s.spec.round_id} is secure and its public keys were not shared yet: no update can be masked")]
    if not e.sha256 or not (isinstance(e.num_samples, int) and e.num_samples >= 1) or not valid_number(e.bytes, 0, False):
        return [_refuse(s, e, "Corrupt", f"an update needs a sha256, num_samples >= 1 and bytes >= 0 (got {e.sha256!r}, {e.num_samples!r}, {e.bytes!r})")]
    s.participants[e.participant] = replace(record, outcome=Outcome.UPLOADED, num_samples=e.num_samples, sha256=e.sha256, bytes=e.bytes, uploaded_at=e.at)
    s.bytes_uploaded += e.bytes
    return []


def _on_key_advertised(s: RoundState, e: KeyAdvertised) -> list[Action]:
    record = s.participants.get(e.participant)
    if record is None:
        return [_refuse(s, e, "NotAParticipant", f"{e.participant!r} is not a participant of round {s.spec.round_id}")]
    if not s.spec.secure:
        return [_refuse(s, e, "NotSecure", f"round {s.spec.round_id} is not a secure round: it exchanges no keys")]
    if not (isinstance(e.public_key, str) and e.public_key):
        return [_refuse(s, e, "Corrupt", f"a public key must be a non-empty string (got {e.public_key!r})")]
    if record.public_key == e.public_key or record.outcome is not Outcome.PENDING:
        return []  # a retried StartRound; or one past caring (uploaded, dropped, late)
    if s.keys_shared_at is None:  # nobody holds its earlier key: the new one replaces it
        s.participants[e.participant] = replace(record, public_key=e.public_key)
        return []
    s.participants[e.participant] = replace(
        record,
        outcome=Outcome.DROPPED,
        reason=f"KeysLost: {e.participant} answered with another public key than the one shared in this round (it restarted); "
        "its peers reveal the seeds they share with it",
    )
    return []


def _on_participant_failed(s: RoundState, e: ParticipantFailed) -> list[Action]:
    record = s.participants.get(e.participant)
    if record is None:
        return [_refuse(s, e, "NotAParticipant", f"{e.participant!r} is not a participant of this round")]
    reason = e.reason or "failed"
    if s.stage is Condition.TRAINED and record.outcome is Outcome.PENDING:
        s.participants[e.participant] = replace(record, outcome=Outcome.DROPPED, reason=reason)
    elif s.stage is Condition.EVALUATED and record.outcome is Outcome.ACCEPTED and _evaluation_pending(s, e.participant):
        s.participants[e.participant] = replace(record, eval_error=reason)
    return []  # an update already uploaded is kept


def _on_aggregated(s: RoundState, e: Aggregated) -> list[Action]:
    if s.stage is not Condition.AGGREGATED:
        if s.aggregated_at is not None and e.version_sha256 == s.version_sha256:
            return []
        return [_refuse(s, e, "NotAggregating", f"round {s.spec.round_id} is at {s.stage.value}, not aggregating")]
    if s.trained_at is not None and e.at <= s.trained_at:
        # Not an answer to this round's Aggregate, which went out at trained_at: a reply comes later.
        # (Accepting it would also let the same event be refused once and taken when repeated.)
        return [_refuse(s, e, "NotAggregating", f"an aggregate at {e.at:g} predates the request at {s.trained_at:g}")]
    uploaded = _with(s, Outcome.UPLOADED)
    rejected = dict(e.rejected)
    named = list(e.accepted) + list(rejected)
    strangers = [p for p in named if p not in uploaded]
    if not e.version_sha256 or strangers or len(named) != len(set(named)) or len(rejected) != len(e.rejected):
        return [
            _refuse(
                s, e, "InvalidAggregate", f"an aggregate needs a version sha256 and names each upload of {list(uploaded)} at most once (unknown: {strangers})"
            )
        ]
    for p in uploaded:
        if p in e.accepted:
            s.participants[p] = replace(s.participants[p], outcome=Outcome.ACCEPTED)
        else:
            why = rejected.get(p, "NotAggregated: the aggregator did not use this update")
            s.participants[p] = replace(s.participants[p], outcome=Outcome.REJECTED, reason=why)
    accepted = _with(s, Outcome.ACCEPTED)
    s.version_sha256, s.aggregated_at, s.bytes_aggregated = e.version_sha256, e.at, e.bytes_in
    if not accepted:
        return _finish(s, e.at, Result.FAILED, "NoUpdateAccepted", f"the aggregator rejected all {len(uploaded)} updates: {rejected}")
    _set(
        s,
        Condition.AGGREGATED,
        "True",
        "Aggregated",
        f"{len(accepted)} of {len(uploaded)} updates combined into {e.version_sha256[:12]}" + (f"; rejected {sorted(rejected)}" if rejected else ""),
        e.at,
    )
    return [Evaluate(accepted, e.version_sha256)]


def _on_aggregator_failed(s: RoundState, e: AggregatorFailed) -> list[Action]:
    if s.stage is Condition.PUBLISHED:
        if not s.aggregator_lost:  # the replicas that acked become the sources (see _advance)
            s.aggregator_lost = True
            agg = s.spec.aggregator
            if s.publishes[agg].status is not Delivery.ACKED:
                s.publishes[agg] = replace(s.publishes[agg], status=Delivery.FAILED, reason=f"AggregatorLost: {e.reason}")
        return []
    return _finish(
        s,
        e.at,
        Result.FAILED,
        "AggregatorLost",
        f"aggregator {s.spec.aggregator} failed before the round was {s.stage.value} "
        f"({e.reason}); nothing was published and every replica keeps its current version; "
        f"start a new round with another aggregator",
    )


def _on_evaluated(s: RoundState, e: Evaluated | EvaluationFailed) -> list[Action]:
    record = s.participants.get(e.participant)
    if s.stage is not Condition.EVALUATED:
        return [_refuse(s, e, "NotEvaluating", f"round {s.spec.round_id} is not evaluating")]
    if record is None or record.outcome is not Outcome.ACCEPTED:
        return [_refuse(s, e, "NotAnEvaluator", f"{e.participant!r} does not evaluate this round's candidate")]
    if not _evaluation_pending(s, e.participant):
        return []  # the first report wins
    if isinstance(e, EvaluationFailed):
        s.participants[e.participant] = replace(record, eval_error=e.reason or "failed")
    elif valid_number(e.candidate_loss, 0, False) and valid_number(e.current_loss, 0, False) and isinstance(e.tokens, int) and e.tokens >= 1:
        s.participants[e.participant] = replace(record, candidate_loss=e.candidate_loss, current_loss=e.current_loss, eval_tokens=e.tokens)
    else:
        s.participants[e.participant] = replace(
            record, eval_error=(f"InvalidEvaluation: losses must be finite and >= 0, tokens >= 1 (got {e.candidate_loss!r}, {e.current_loss!r}, {e.tokens!r})")
        )
    return []


def _on_publish(s: RoundState, e: PublishAcked | PublishFailed) -> list[Action]:
    if s.stage is not Condition.PUBLISHED:
        return [_refuse(s, e, "NotPublishing", f"round {s.spec.round_id} is not publishing")]
    record = s.publishes.get(e.replica)
    if record is None:
        return [_refuse(s, e, "NotAReplica", f"{e.replica!r} is not a replica of this round")]
    if record.status is Delivery.ACKED:
        return []
    if isinstance(e, PublishFailed):
        s.publishes[e.replica] = replace(record, status=Delivery.FAILED, reason=e.reason)
    elif e.version != s.version_sha256:
        return [_refuse(s, e, "WrongVersion", f"{e.replica} acked {e.version[:12]} but round {s.spec.round_id} publishes {s.version_sha256[:12]}")]
    else:
        s.publishes[e.replica] = replace(record, status=Delivery.ACKED, reason="", acked_at=e.at)
    return []


_HANDLERS: dict[type, Callable[[RoundState, Any], list[Action]]] = {
    Started: _on_started,
    UpdateUploaded: _on_uploaded,
    KeyAdvertised: _on_key_advertised,
    ParticipantFailed: _on_participant_failed,
    Aggregated: _on_aggregated,
    AggregatorFailed: _on_aggregator_failed,
    Evaluated: _on_evaluated,
    EvaluationFailed: _on_evaluated,
    PublishAcked: _on_publish,
    PublishFailed: _on_publish,
}


def _advance(s: RoundState, at: float, retry: bool) -> list[Action]:
    """Close the stage in progress if its facts (or the clock) allow it."""
    return {Condition.TRAINED: _settle_training, Condition.EVALUATED: _settle_evaluation, Condition.PUBLISHED: _settle_publishing}.get(s.stage, lambda *_: [])(
        s, at, retry
    )


def _settle_training(s: RoundState, at: float, retry: bool) -> list[Action]:
    if at >= s.deadline_at:
        for p in _with(s, Outcome.PENDING):
            s.participants[p] = replace(s.participants[p], outcome=Outcome.LATE, reason=f"RoundClosed: no update before the deadline at {s.deadline_at:g}")
    uploaded, pending = _with(s, Outcome.UPLOADED), _with(s, Outcome.PENDING)
    others = "".join(f"; {o.value.lower()}: {list(_with(s, o))}" for o in (Outcome.LATE, Outcome.DROPPED) if _with(s, o))
    summary = f"{len(uploaded)} of {len(s.spec.participants)} participants uploaded an update{others}"
    if len(uploaded) + len(pending) < s.spec.min_participants:
        return _finish(s, at, Result.FAILED, "NotEnoughParticipants", f"{summary}; round {s.spec.round_id} needs {s.spec.min_participants}")
    if s.spec.secure and s.keys_shared_at is None:
        return _share_keys(s, at, pending)
    if pending:
        return []
    s.trained_at = at
    _set(s, Condition.TRAINED, "True", "Collected", summary, at)
    return [Aggregate(s.spec.aggregator, uploaded)]


def _share_keys(s: RoundState, at: float, pending: tuple[str, ...]) -> list[Action]:
    """Fix the key map once every pending participant advertised a key (no upload can precede it)."""
    if any(not s.participants[p].public_key for p in pending):
        return []
    if len(pending) < 2:
        message = f"secure aggregation needs >= 2 participants holding keys to mask with each other; only {list(pending)}"
        return _finish(s, at, Result.FAILED, "NotEnoughParticipants", message)
    s.key_holders, s.keys_shared_at = pending, at
    return [ShareKeys(pending, s.public_keys())]


def _settle_evaluation(s: RoundState, at: float, retry: bool) -> list[Action]:
    evaluators = _with(s, Outcome.ACCEPTED)
    if any(_evaluation_pending(s, p) for p in evaluators):
        return []
    done = [s.participants[p] for p in evaluators if s.participants[p].eval_tokens]
    failed = {p: s.participants[p].eval_error for p in evaluators if s.participants[p].eval_error}
    s.evaluated_at = at
    if not done:
        return _finish(s, at, Result.FAILED, "NoEvaluation", f"no participant could evaluate the candidate: {failed}")
    s.eval_tokens = sum(r.eval_tokens for r in done)
    s.eval_loss_after = sum(r.candidate_loss * r.eval_tokens for r in done) / s.eval_tokens
    s.eval_loss_before = sum(r.current_loss * r.eval_tokens for r in done) / s.eval_tokens
    message = (
        f"candidate loss {s.eval_loss_after:.4f} vs current loss {s.eval_loss_before:.4f} "
        f"(tolerance {s.spec.eval_tolerance:g} nats) over {s.eval_tokens} tokens from {len(done)} "
        f"participants" + (f"; not evaluated: {failed}" if failed else "")
    )
    if s.eval_loss_after > s.eval_loss_before + s.spec.eval_tolerance:
        return _finish(s, at, Result.REJECTED, "EvalGateFailed", message + "; the current adapter stays")
    _set(s, Condition.EVALUATED, "True", "GatePassed", message, at)
    s.publish_deadline_at = at + s.spec.publish_deadline_s
    s.publishes = {r: PublishRecord() for r in s.spec.replicas}
    return [Publish(s.spec.replicas, s.version_sha256, _sources(s))]


def _settle_publishing(s: RoundState, at: float, retry: bool) -> list[Action]:
    acked = [r for r, p in s.publishes.items() if p.status is Delivery.ACKED]
    missing, sources = laggards(s), _sources(s)
    in_flight = [r for r in missing if s.publishes[r].status is Delivery.IN_FLIGHT]
    if acked and (not missing or at >= s.publish_deadline_at):
        s.freshness_s = max(s.publishes[r].acked_at for r in acked) - s.aggregated_at
        if not missing:
            return _finish(s, at, Result.SUCCEEDED, "Published", f"all {len(acked)} replicas serve {s.version_sha256[:12]}")
        return _finish(
            s,
            at,
            Result.SUCCEEDED,
            "PartiallyPublished",
            f"{len(acked)} of {len(s.publishes)} replicas serve {s.version_sha256[:12]}; laggards {list(missing)} will be re-published by the operator",
        )
    if at >= s.publish_deadline_at or not (sources or in_flight):
        reason = "AggregatorLost" if s.aggregator_lost else "NotPublished"
        errors = {r: s.publishes[r].reason or "no answer" for r in missing}
        return _finish(s, at, Result.FAILED, reason, f"no replica acked {s.version_sha256[:12]}: {errors}")
    failed = tuple(r for r in missing if s.publishes[r].status is Delivery.FAILED)
    if not (retry and failed and sources):
        return []
    for r in failed:
        s.publishes[r] = replace(s.publishes[r], status=Delivery.IN_FLIGHT, attempts=s.publishes[r].attempts + 1)
    return [Publish(failed, s.version_sha256, sources)]
