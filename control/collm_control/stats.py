"""What one replica agent reports to the slow timescale, typed.

`AgentStats` is what the operator and the local mode read over gRPC (collm_rpc.stats converts the
proto message `collm.v1.Stats`) and what `decide()` takes. It is plain data, torch-free and
gRPC-free; `as_dict()`/`from_dict()` give the JSON form the agent's /stats endpoint shows and the
recorded stats of tests/control are kept in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class AdapterRef:
    """An adapter version: `version` is its label "<cluster version>.<local revision>"."""

    version: str
    cluster_version: int
    sha256: str
    revision: int = 0
    eval_loss: float | None = None  # held-out loss recorded with it


@dataclass(frozen=True)
class CapacityPoint:
    """At training cap `cap` (tokens per iteration) the replica serves `requests_per_s` within the
    SLO while training `training_tokens_per_s` (measured by its capacity profiler)."""

    cap: int
    requests_per_s: float
    training_tokens_per_s: float


@dataclass(frozen=True)
class AgentStats:
    replica_id: str
    model: str = ""
    adapter: AdapterRef | None = None  # what it serves: the global adapter plus its local revision
    global_adapter: AdapterRef | None = None  # the global adapter it rests on
    live_versions: tuple[str, ...] = ()
    # load
    uptime_s: float = 0.0
    queue_depth: int = 0
    running: int = 0
    iterations: int = 0
    inference_tokens: int = 0
    requests_finished: int = 0
    requests_met_slo: int = 0
    ttft_ms: int = 0  # the SLO it plans for
    tpot_ms: int = 0
    capacity_profile: tuple[CapacityPoint, ...] = ()
    # training
    training_tokens: int = 0
    training_steps: int = 0
    training_share: float = 0.0
    train_cap_tokens: int = 0
    train_loss: float | None = None
    eval_loss: float | None = None  # None: the replica has no private data (no held-out split)
    trainer_error: str = ""
    data_error: str = ""
    state_error: str = ""  # why the state volume took no write ("" when the last writes worked; docs/operator.md)
    data_tokens: int = 0  # training tokens of its private data (0: none)
    unuploaded_steps: int = 0
    revisions_published: int = 0
    revisions_rejected: int = 0
    last_revision_at: float | None = None
    # the adapter's shape
    lora_rank: int = 0
    lora_alpha: int = 0
    lora_target_modules: tuple[str, ...] = ()
    # cloud-edge: edge devices' sessions open on this replica
    edge_sessions: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)  # /stats only: pins, LoRA shape, threads

    @property
    def has_data(self) -> bool:
        return self.eval_loss is not None

    @property
    def can_train(self) -> bool:
        """It has data and its trainer has not failed (a failed trainer still serves; trainer.py)."""
        return self.has_data and not self.trainer_error

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("extra")
        out["live_versions"] = list(self.live_versions)
        out["lora_target_modules"] = list(self.lora_target_modules)
        out["capacity_profile"] = [[p.cap, p.requests_per_s, p.training_tokens_per_s] for p in self.capacity_profile]
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AgentStats:
        """The inverse of as_dict(); keys it does not know go to `extra`."""
        known = {f.name for f in fields(cls)} - {"extra"}
        if "replica_id" not in d:
            raise ValueError(f"agent stats without a replica_id: {sorted(d)}")
        values: dict[str, Any] = {k: v for k, v in d.items() if k in known}
        for key in ("adapter", "global_adapter"):
            ref = values.get(key)
            values[key] = AdapterRef(**{k: v for k, v in ref.items() if k in AdapterRef.__dataclass_fields__}) if ref else None
        values["live_versions"] = tuple(values.get("live_versions") or ())
        values["lora_target_modules"] = tuple(values.get("lora_target_modules") or ())
        values["capacity_profile"] = tuple(CapacityPoint(int(c), float(r), float(t)) for c, r, t in values.get("capacity_profile") or ())
        return cls(**values, extra={k: v for k, v in d.items() if k not in known})
