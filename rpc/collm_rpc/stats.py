"""collm.v1.Stats <-> collm_control.stats.AgentStats: the typed contract on both sides of GetStats.

proto3 scalars have no "unset": an optional number travels with a has_<name> flag, an absent
adapter as an empty AdapterRef (no sha256), an absent time as 0."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

from collm_control.stats import AdapterRef, AgentStats, CapacityPoint

from .proto import collm_pb2 as pb


def ref_to_proto(ref: AdapterRef | None) -> pb.AdapterRef:
    if ref is None:
        return pb.AdapterRef()
    return pb.AdapterRef(
        version=ref.version,
        cluster_version=ref.cluster_version,
        sha256=ref.sha256,
        revision=ref.revision,
        eval_loss=ref.eval_loss or 0.0,
        has_eval_loss=ref.eval_loss is not None,
    )


def ref_from_proto(ref: pb.AdapterRef) -> AdapterRef | None:
    if not ref.sha256:
        return None
    return AdapterRef(ref.version, ref.cluster_version, ref.sha256, ref.revision, ref.eval_loss if ref.has_eval_loss else None)


# AgentStats fields that do not travel as a plain scalar or repeated field of the same name.
REFS = ("adapter", "global_adapter")  # an AdapterRef message, empty for None
OPTIONAL = ("train_loss", "eval_loss")  # the value and has_<name>
TIMES = {"last_revision_at": "last_revision_unix"}  # seconds since the epoch, 0 for None


def to_proto(s: AgentStats) -> pb.Stats:
    m = pb.Stats()
    for f in fields(AgentStats):
        name, value = f.name, getattr(s, f.name)
        if name == "extra":  # /stats only
            continue
        if name in REFS:
            getattr(m, name).CopyFrom(ref_to_proto(value))
        elif name == "capacity_profile":
            m.capacity_profile.extend(pb.CapacityPoint(**asdict(point)) for point in value)
        elif name in OPTIONAL:
            setattr(m, name, value or 0.0)
            setattr(m, f"has_{name}", value is not None)
        elif name in TIMES:
            setattr(m, TIMES[name], value or 0.0)
        elif isinstance(value, tuple):
            getattr(m, name).extend(value)
        else:
            setattr(m, name, value)
    return m


def from_proto(m: pb.Stats) -> AgentStats:
    values: dict[str, Any] = {}
    for f in fields(AgentStats):
        name = f.name
        if name == "extra":
            continue
        if name in REFS:
            values[name] = ref_from_proto(getattr(m, name))
        elif name == "capacity_profile":
            values[name] = tuple(CapacityPoint(p.cap, p.requests_per_s, p.training_tokens_per_s) for p in m.capacity_profile)
        elif name in OPTIONAL:
            values[name] = getattr(m, name) if getattr(m, f"has_{name}") else None
        elif name in TIMES:
            values[name] = getattr(m, TIMES[name]) or None
        elif f.default == ():
            values[name] = tuple(getattr(m, name))
        else:
            values[name] = getattr(m, name)
    return AgentStats(**values)
