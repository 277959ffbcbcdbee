"""Every status condition of the two resources, in one place (as KServe's *_lifecycle.go does).

Conditions are a list keyed by `type` (`x-kubernetes-list-type: map`), each with status
True|False|Unknown, a short CamelCase reason, a message for people, the generation it was
computed for, and lastTransitionTime (changed only when the status changes). The helpers are pure:
they take `now` and return new lists, so tests and the operator share them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

TRUE, FALSE, UNKNOWN = "True", "False", "Unknown"
_STATUSES = (TRUE, FALSE, UNKNOWN)
_REASON = re.compile(r"^[A-Z][A-Za-z0-9]*$")


@dataclass(frozen=True)
class ConditionType:
    type: str
    set_by: str
    counts_toward_ready: bool
    meaning: str


CLUSTER_CONDITIONS = (
    ConditionType("Ready", "cluster controller (summary of the others)", False, "the spec is valid, every replica serves and the router dispatches"),
    ConditionType(
        "Progressing", "cluster controller", True, "True while child objects roll out or replicas start; False once settled (Ready needs not Progressing)"
    ),
    ConditionType("Degraded", "cluster controller, allocation loop", True, "True when replicas are missing or the SLO is missed; Ready needs it False"),
    ConditionType(
        "TrainingActive",
        "allocation loop, round controller",
        False,
        "True while replicas fine-tune (informational: inferenceOnly clusters are Ready without it)",
    ),
)
ROUND_CONDITIONS = (
    ConditionType("Trained", "round controller", True, "enough participants finished their local steps"),
    ConditionType("Aggregated", "round controller", True, "the aggregator combined the updates into a candidate adapter"),
    ConditionType("Evaluated", "round controller", True, "the candidate passed the eval gate"),
    ConditionType("Published", "round controller", True, "every replica serves the new version"),
    ConditionType("Succeeded", "round controller (summary of the others)", False, "the round published a new adapter"),
)
CATALOG = {"CollmCluster": CLUSTER_CONDITIONS, "AdapterRound": ROUND_CONDITIONS}
SUMMARY = {"CollmCluster": "Ready", "AdapterRound": "Succeeded"}
# Conditions whose healthy value is False ("abnormal-true" conditions).
NEGATIVE_POLARITY = frozenset({"Progressing", "Degraded"})


class Reason:
    """Reasons used across the operator (short CamelCase, stable: alerts match on them)."""

    INVALID_SPEC = "InvalidSpec"
    AVAILABLE = "Available"
    ROLLING_OUT = "RollingOut"
    PUBLISHING_ADAPTER = "PublishingAdapter"
    ROUTER_UNAVAILABLE = "RouterUnavailable"
    ADAPTER_LOST = "AdapterLost"
    STATE_NOT_SAVED = "StateNotSaved"
    REPLICAS_UNAVAILABLE = "ReplicasUnavailable"
    SLO_MISSED = "SloMissed"
    AS_EXPECTED = "AsExpected"
    TRAINING = "Training"
    TRAINING_DISABLED = "TrainingDisabled"
    NO_DATA = "NoTrainingData"
    WAITING = "Waiting"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    TOO_FEW_PARTICIPANTS = "TooFewParticipants"
    EVAL_GATE_REJECTED = "EvalGateRejected"
    AGGREGATION_FAILED = "AggregationFailed"
    PUBLISHED = "Published"
    CLUSTER_NOT_FOUND = "ClusterNotFound"
    PRIVACY_BUDGET_SPENT = "PrivacyBudgetSpent"


def _format_time(now: datetime) -> str:
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def get_condition(conditions: Sequence[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    for condition in conditions or ():
        if condition.get("type") == type_:
            return condition
    return None


def set_condition(
    conditions: Sequence[dict[str, Any]] | None,
    type_: str,
    status: str,
    reason: str,
    message: str,
    observed_generation: int,
    now: datetime,
) -> list[dict[str, Any]]:
    """A new list with `type_` set; lastTransitionTime moves only when the status changes."""
    if status not in _STATUSES:
        raise ValueError(f"condition status must be one of {_STATUSES}, got {status!r}")
    if not _REASON.match(reason):
        raise ValueError(f"condition reasons are CamelCase words, got {reason!r}")
    previous = get_condition(conditions, type_)
    transition = _format_time(now)
    if previous is not None and previous.get("status") == status and previous.get("lastTransitionTime"):
        transition = previous["lastTransitionTime"]
    updated = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": observed_generation,
        "lastTransitionTime": transition,
    }
    result = [dict(c) for c in conditions or () if c.get("type") != type_]
    result.append(updated)
    order = {c.type: i for cat in CATALOG.values() for i, c in enumerate(cat)}
    result.sort(key=lambda c: order.get(c["type"], len(order)))
    return result


def is_healthy(condition: dict[str, Any] | None) -> bool:
    if condition is None:
        return False
    wanted = FALSE if condition["type"] in NEGATIVE_POLARITY else TRUE
    return condition.get("status") == wanted


def summarize_ready(
    conditions: Sequence[dict[str, Any]] | None,
    kind: str,
    observed_generation: int,
    now: datetime,
) -> list[dict[str, Any]]:
    """Set the summary condition (Ready / Succeeded) from the conditions that count toward it.

    Healthy when every counted condition is healthy for this generation. Otherwise False when one
    is unhealthy (its reason and message are carried up; InvalidSpec wins), Unknown when one is
    missing or stale.
    """
    summary = SUMMARY[kind]
    counted = [c.type for c in CATALOG[kind] if c.counts_toward_ready]
    current = get_condition(conditions, summary)
    if current is not None and current.get("reason") == Reason.INVALID_SPEC and current.get("observedGeneration") == observed_generation:
        return [dict(c) for c in conditions or ()]  # the spec error stays until the spec changes
    missing: list[str] = []
    for type_ in counted:
        condition = get_condition(conditions, type_)
        if condition is None or condition.get("observedGeneration") != observed_generation or condition.get("status") == UNKNOWN:
            missing.append(type_)
            continue
        if not is_healthy(condition):
            return set_condition(
                conditions, summary, FALSE, condition.get("reason") or "NotReady", f"{type_}: {condition.get('message', '')}", observed_generation, now
            )
    if missing:
        return set_condition(conditions, summary, UNKNOWN, Reason.WAITING, "waiting for " + ", ".join(missing), observed_generation, now)
    ok_reason = Reason.AVAILABLE if kind == "CollmCluster" else Reason.PUBLISHED
    return set_condition(conditions, summary, TRUE, ok_reason, "", observed_generation, now)


def invalid_spec(conditions: Sequence[dict[str, Any]] | None, kind: str, message: str, observed_generation: int, now: datetime) -> list[dict[str, Any]]:
    """The summary condition False with reason InvalidSpec and the SpecError's message."""
    return set_condition(conditions, SUMMARY[kind], FALSE, Reason.INVALID_SPEC, message, observed_generation, now)
