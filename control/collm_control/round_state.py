"""The vocabulary of a federated round (rounds.py holds the state machine that uses it).

The spec, the events the driver feeds in (stamped `at` by its clock), the actions it must carry
out, the per-participant and per-replica records, and `RoundState` with its JSON form (camelCase
keys, what lands in an AdapterRound's status and what a restarted driver resumes from).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from enum import Enum


class Condition(str, Enum):
    TRAINED = "Trained"
    AGGREGATED = "Aggregated"
    EVALUATED = "Evaluated"
    PUBLISHED = "Published"
    SUCCEEDED = "Succeeded"


STAGES = (Condition.TRAINED, Condition.AGGREGATED, Condition.EVALUATED, Condition.PUBLISHED)


class Outcome(str, Enum):
    """A participant's fate in the round."""

    PENDING = "Pending"  # invited, no update yet
    UPLOADED = "Uploaded"  # update in before the deadline, not aggregated yet
    LATE = "Late"  # no update before the deadline
    DROPPED = "Dropped"  # reported dead before uploading
    ACCEPTED = "Accepted"  # the strategy used its update
    REJECTED = "Rejected"  # the strategy refused its update (reason says why)


class Result(str, Enum):
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    REJECTED = "Rejected"  # Rejected: the eval gate said no


class Delivery(str, Enum):
    IN_FLIGHT = "InFlight"
    FAILED = "Failed"
    ACKED = "Acked"  # Failed: retried on the next Tick


def valid_number(value, minimum: float, strict: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return value > minimum if strict else value >= minimum


@dataclass(frozen=True)
class RoundSpec:
    round_id: str
    replicas: tuple[str, ...]  # every replica the result is published to
    participants: tuple[str, ...]  # the replicas invited to train
    aggregator: str
    local_steps: int
    deadline_s: float  # for uploads, from Started
    min_participants: int
    eval_tolerance: float = 0.0  # nats the candidate may be worse than the current adapter
    publish_deadline_s: float = 60.0  # for publish retries, from the gate passing
    secure: bool = False  # secure aggregation: participants exchange public keys (KeyAdvertised, ShareKeys) before masking

    def __post_init__(self):
        object.__setattr__(self, "replicas", tuple(self.replicas))
        object.__setattr__(self, "participants", tuple(self.participants))
        problems = []
        for name in ("replicas", "participants"):
            names = getattr(self, name)
            if not names or len(set(names)) != len(names):
                problems.append(f"{name} must name at least one replica, each once (got {list(names)})")
        strangers = [p for p in self.participants if p not in self.replicas]
        if strangers:
            problems.append(f"participants {strangers} are not replicas; add them to replicas or remove them")
        if self.aggregator not in self.replicas:
            problems.append(f"aggregator {self.aggregator!r} must be one of the replicas {list(self.replicas)}")
        if not (isinstance(self.local_steps, int) and valid_number(self.local_steps, 0, strict=True)):
            problems.append(f"local_steps must be a positive integer (got {self.local_steps!r})")
        if not (isinstance(self.min_participants, int) and 1 <= self.min_participants <= len(self.participants)):
            problems.append(f"min_participants must be between 1 and the {len(self.participants)} participants (got {self.min_participants!r})")
        for name in ("deadline_s", "publish_deadline_s"):
            if not valid_number(getattr(self, name), 0, strict=True):
                problems.append(f"{name} must be a positive number of seconds (got {getattr(self, name)!r})")
        if not valid_number(self.eval_tolerance, 0, strict=False):
            problems.append(f"eval_tolerance must be a non-negative number of nats (got {self.eval_tolerance!r})")
        if not isinstance(self.secure, bool):
            problems.append(f"secure must be true or false (got {self.secure!r})")
        if problems:
            raise ValueError(f"invalid spec for round {self.round_id!r}: " + "; ".join(problems))


# Events: what happened, stamped `at` by the driver's clock.
@dataclass(frozen=True)
class Started:
    at: float
    base_version: str
    base_sha256: str


@dataclass(frozen=True)
class UpdateUploaded:
    at: float
    participant: str
    num_samples: int
    sha256: str
    bytes: int


@dataclass(frozen=True)
class KeyAdvertised:
    """A participant's ephemeral public key for a secure round (its StartRound reply), hex."""

    at: float
    participant: str
    public_key: str


@dataclass(frozen=True)
class ParticipantFailed:
    at: float
    participant: str
    reason: str


@dataclass(frozen=True)
class Tick:
    at: float


@dataclass(frozen=True)
class Aggregated:
    at: float
    version_sha256: str
    accepted: tuple[str, ...]
    rejected: tuple[tuple[str, str], ...]  # (participant, reason)
    bytes_in: int


@dataclass(frozen=True)
class AggregatorFailed:
    at: float
    reason: str


@dataclass(frozen=True)
class Evaluated:
    at: float
    participant: str
    candidate_loss: float
    current_loss: float
    tokens: int


@dataclass(frozen=True)
class EvaluationFailed:
    at: float
    participant: str
    reason: str


@dataclass(frozen=True)
class PublishAcked:
    at: float
    replica: str
    version: str  # the sha256 the replica now serves


@dataclass(frozen=True)
class PublishFailed:
    at: float
    replica: str
    reason: str


Event = (
    Started
    | UpdateUploaded
    | KeyAdvertised
    | ParticipantFailed
    | Tick
    | Aggregated
    | AggregatorFailed
    | Evaluated
    | EvaluationFailed
    | PublishAcked
    | PublishFailed
)


# Actions: what the driver must do.
@dataclass(frozen=True)
class StartTraining:
    participants: tuple[str, ...]
    base_version: str
    base_sha256: str
    local_steps: int
    deadline_at: float
    aggregator: str  # where to upload


@dataclass(frozen=True)
class ShareKeys:
    """Hand every key holder's public key to `participants` (a secure round: they mask with these only)."""

    participants: tuple[str, ...]
    public_keys: tuple[tuple[str, str], ...]  # (participant, hex public key) of every key holder


@dataclass(frozen=True)
class Aggregate:
    aggregator: str
    participants: tuple[str, ...]  # the uploads to combine


@dataclass(frozen=True)
class Evaluate:
    participants: tuple[str, ...]
    version_sha256: str  # the candidate, held by the aggregator


@dataclass(frozen=True)
class Publish:
    replicas: tuple[str, ...]
    version_sha256: str
    sources: tuple[str, ...]  # sources hold it


@dataclass(frozen=True)
class Finish:
    succeeded: bool
    reason: str
    message: str


@dataclass(frozen=True)
class Refused:
    to: str  # who sent the refused event: a participant, a replica, the aggregator; "" = the driver
    reason: str
    message: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


Action = StartTraining | ShareKeys | Aggregate | Evaluate | Publish | Finish | Refused


@dataclass(frozen=True)
class ConditionState:
    status: str = "Unknown"
    reason: str = "Pending"
    message: str = ""
    at: float | None = None


@dataclass(frozen=True)
class ParticipantRecord:
    outcome: Outcome = Outcome.PENDING
    reason: str = ""
    num_samples: int = 0
    sha256: str = ""
    bytes: int = 0
    uploaded_at: float | None = None
    candidate_loss: float | None = None
    current_loss: float | None = None
    eval_tokens: int = 0  # > 0 once evaluated
    eval_error: str = ""  # set when its evaluation failed
    public_key: str = ""  # secure rounds: the ephemeral public key it advertised (hex)

    def __post_init__(self):
        object.__setattr__(self, "outcome", Outcome(self.outcome))


@dataclass(frozen=True)
class PublishRecord:
    status: Delivery = Delivery.IN_FLIGHT
    attempts: int = 1
    reason: str = ""
    acked_at: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "status", Delivery(self.status))


@dataclass
class RoundState:
    """A value: `step` returns a new one and never mutates its argument."""

    spec: RoundSpec
    conditions: dict[Condition, ConditionState]
    participants: dict[str, ParticipantRecord]
    publishes: dict[str, PublishRecord] = field(default_factory=dict)  # per replica, once the gate passed
    base_version: str = ""
    base_sha256: str = ""
    version_sha256: str = ""
    # Secure rounds: who got whose public keys (they mask with each other: the aggregator's `invited`).
    key_holders: tuple[str, ...] = ()
    keys_shared_at: float | None = None
    # Timings, on the driver's clock.
    started_at: float | None = None
    deadline_at: float | None = None
    trained_at: float | None = None
    aggregated_at: float | None = None
    evaluated_at: float | None = None
    publish_deadline_at: float | None = None
    published_at: float | None = None
    finished_at: float | None = None
    # Token-weighted federated eval losses of the current adapter (before) and the candidate (after).
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    eval_tokens: int = 0
    bytes_uploaded: int = 0  # sum of the updates received before the deadline
    bytes_aggregated: int = 0  # what the aggregator reports it received
    freshness_s: float | None = None  # last publish ack - end of aggregation
    aggregator_lost: bool = False
    result: Result | None = None

    def __post_init__(self):
        self.conditions = {Condition(k): v for k, v in self.conditions.items()}
        self.result = Result(self.result) if self.result else None
        self.key_holders = tuple(self.key_holders)

    @property
    def finished(self) -> bool:
        return self.result is not None

    @property
    def succeeded(self) -> bool:
        return self.result is Result.SUCCEEDED

    @property
    def stage(self) -> Condition | None:
        """The condition the round is working towards; None once finished."""
        if self.finished:
            return None
        return next((c for c in STAGES if self.conditions[c].status != "True"), None)

    def public_keys(self) -> tuple[tuple[str, str], ...]:
        """(participant, hex public key) of every key holder: the map a secure round's participants mask with."""
        return tuple((p, self.participants[p].public_key) for p in self.key_holders)

    def to_dict(self) -> dict:
        """JSON-ready, camelCase keys (it lands in the AdapterRound's status)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "spec":
                value = _record_to_dict(value)
            elif isinstance(value, dict):
                value = {_plain(k): _record_to_dict(v) for k, v in value.items()}
            out[_camel(f.name)] = _plain(value)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> RoundState:
        records = {"conditions": ConditionState, "participants": ParticipantRecord, "publishes": PublishRecord}
        kwargs = {}
        for f in fields(cls):
            if _camel(f.name) in data:
                value = data[_camel(f.name)]
                if f.name == "spec":
                    value = _record_from_dict(RoundSpec, value)
                elif f.name in records:
                    value = {k: _record_from_dict(records[f.name], v) for k, v in value.items()}
                kwargs[f.name] = value
        return cls(**kwargs)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word.title() for word in rest)


def _plain(value):
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _record_to_dict(record) -> dict:
    return {_camel(f.name): _plain(getattr(record, f.name)) for f in fields(record)}


def _record_from_dict(cls, data: dict):
    return cls(**{f.name: data[_camel(f.name)] for f in fields(cls) if _camel(f.name) in data})
