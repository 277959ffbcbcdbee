"""The slow timescale's one decision: observed numbers in, what to do out.

Both the operator (collm_operator/control.py, against Kubernetes) and the local mode
(replica_agent/local/controller.py, against processes on one machine) are thin adapters around
`decide()`: each observes (agent stats over gRPC, request arrivals, its rounds), calls it, and acts
(pushes plans and routing weights, re-publishes the cluster's adapter to laggards, starts the round
it names, writes status). Nothing here imports Kubernetes, torch or gRPC.

The only memory is the Planner (load predictor and smoothed capacity profiles), passed in and
kept by the caller.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from collm_control.planning import Decision, Planner
from collm_control.stats import AdapterRef, AgentStats


@dataclass(frozen=True)
class Adapter:
    """A global adapter of the cluster: the cluster version a round published, and its sha256."""

    version: int
    sha256: str
    round: str = ""
    eval_loss: str | None = None

    def as_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version, "sha256": self.sha256, "round": self.round}
        if self.eval_loss is not None:
            out["evalLoss"] = self.eval_loss
        return out


@dataclass(frozen=True)
class ControlSettings:
    policy: str = "coexec"
    federation: bool = True  # rounds are scheduled at all
    round_interval_s: float = 60.0
    min_participants: int = 1
    secure_aggregation: bool = False  # the aggregator must hold no pair seed of its own: it does not train
    local_steps: int = 0  # training steps a participant owes a round (0: the straggler rule is off)
    round_deadline_s: float = 0.0  # how long a round's training may take
    # Ablations (collm bench goodput --ablations): what remains without one timescale.
    slow_timescale: bool = True  # False: equal routing weights, every cap at its maximum, no straggler or trough rule
    fast_timescale: bool = True  # False: the agents train exactly their cap every iteration (no per-iteration mix)


@dataclass(frozen=True)
class Observation:
    now: float
    arrivals: int  # requests that arrived since the last decision
    stats: Mapping[str, AgentStats | None]  # every replica's stats; None when it could not be read
    published: Adapter | None = None  # the newest adapter a round of this cluster published (None: none yet)
    round_participants: tuple[str, ...] = ()  # replicas training in a running round
    round_running: bool = False
    round_publishing: bool = False  # a running round is switching the replicas to its adapter
    last_round_at: float | None = None  # when the last round started (or the cluster was created)
    rounds_started: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON form, for decision logs (COLLM_DECISION_LOG) and the recordings tests replay."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["stats"] = {n: st.as_dict() if st is not None else None for n, st in self.stats.items()}
        out["published"] = asdict(self.published) if self.published is not None else None
        out["round_participants"] = list(self.round_participants)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Observation:
        stats = {n: AgentStats.from_dict(st) if st is not None else None for n, st in d["stats"].items()}
        published = Adapter(**d["published"]) if d.get("published") else None
        return cls(**{**d, "stats": stats, "published": published, "round_participants": tuple(d.get("round_participants") or ())})


@dataclass(frozen=True)
class RoundChoice:
    number: int  # rounds_started + 1
    participants: tuple[str, ...]
    aggregator: str


@dataclass(frozen=True)
class Actions:
    plan: Decision | None  # caps, routing weights, home affinity (None: no replica could be read)
    fixed_training: bool  # the static baseline: a fixed training batch every iteration
    adapter: Adapter | None  # the cluster's current global adapter
    republish: tuple[str, ...]  # replicas resting on an older global adapter: publish `adapter` to them
    republish_source: str | None  # a replica that holds `adapter`
    adapter_lost: bool  # no reachable replica holds the current adapter any more
    round: RoundChoice | None  # the round to start now, if any
    training: tuple[str, ...]  # replicas whose plan lets them train and that have data

    def cap(self, replica: str) -> int:
        return self.plan.cap(replica) if self.plan is not None else 0


def decision_record(planner: Planner, observation: Observation, settings: ControlSettings, source: str) -> dict[str, Any]:
    """One line of a decision log: what `decide()` was given, enough to replay it (tests/control)."""
    return {"source": source, "planning": asdict(planner.settings), "settings": asdict(settings), "observation": observation.as_dict()}


def log_decision(path: str, planner: Planner, observation: Observation, settings: ControlSettings, source: str) -> None:
    """Append the decision's inputs to the JSON-lines file `path` (COLLM_DECISION_LOG; both adapters)."""
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(decision_record(planner, observation, settings, source), sort_keys=True) + "\n")


def decide(planner: Planner, observation: Observation, settings: ControlSettings) -> Actions:
    """Plan the next interval, find the replicas behind the current adapter, and pick the round to start."""
    o = observation
    reachable = {n: st for n, st in o.stats.items() if st is not None}
    plan = planner.plan(o.now, o.arrivals, reachable, round_participants=o.round_participants) if reachable else None
    if plan is not None and not settings.slow_timescale:
        plan = without_slow_timescale(plan, planner.settings.max_cap_tokens)
    adapter = current_adapter(o.published, o.stats)
    holders = sorted(n for n, st in reachable.items() if adapter is not None and st.global_adapter is not None and st.global_adapter.sha256 == adapter.sha256)
    lost = adapter is not None and adapter.version > 0 and bool(reachable) and not holders
    # While a round publishes, the replicas switch to its version one by one: re-publishing the
    # previous version then would roll one back, so it waits for the round to end.
    behind = () if lost or o.round_publishing or not holders else tuple(laggards(adapter, o.stats))
    with_data = {n for n, st in reachable.items() if st.has_data}
    training = tuple(sorted(n for n in with_data if plan is not None and plan.cap(n) > 0))
    return Actions(
        plan=plan,
        fixed_training=settings.policy == "static" or not settings.fast_timescale,
        adapter=adapter,
        republish=behind,
        republish_source=holders[0] if behind else None,
        adapter_lost=lost,
        round=choose_round(plan, o, settings, with_data, planner),
        training=training,
    )


def choose_round(plan: Decision | None, o: Observation, settings: ControlSettings, with_data: set[str], planner: Planner) -> RoundChoice | None:
    """The round to start now: when the interval has passed and none runs, the allocation's
    participants that may train and have data (at least min_participants), its aggregator if among
    them; with secure aggregation the aggregator is a replica outside the participants.

    With the slow timescale on, two more rules (docs/scheduling.md): a replica whose measured
    training speed cannot give `local_steps` steps within the round's deadline is left out (a
    straggler holds the round until its deadline and then counts for nothing), and a due round
    waits, at most one more interval, while the plan says the cluster is overloaded (a round
    trough: aggregation and the switch cost the serving replicas least when load is low)."""
    if not settings.federation or settings.policy == "inferenceOnly" or plan is None or o.round_running:
        return None
    if o.last_round_at is not None and o.now - o.last_round_at < settings.round_interval_s:
        return None
    a = plan.allocation
    slow = settings.slow_timescale
    if slow and a.overloaded and o.last_round_at is not None and o.now - o.last_round_at < 2 * settings.round_interval_s:
        return None
    trainers = [p for p in a.participants if plan.cap(p) > 0 and p in with_data]
    if slow:
        trainers = [p for p in trainers if not straggler(planner.training_steps_per_s(p), settings)]
    if len(trainers) < max(1, settings.min_participants):
        return None
    serving = sorted(n for n, st in o.stats.items() if st is not None)
    hint = a.aggregator if a.aggregator in trainers and not settings.secure_aggregation else None
    try:
        participants, aggregator = assign_roles(
            serving, trainers, aggregator=hint, secure=settings.secure_aggregation, min_participants=settings.min_participants
        )
    except ValueError:
        return None  # no replica is left to aggregate outside the participants; the allocation and TrainingActive say why
    return RoundChoice(o.rounds_started + 1, participants, aggregator)


def straggler(steps_per_s: float | None, settings: ControlSettings) -> bool:
    """Would a replica training at `steps_per_s` miss the round's deadline? Unknown speed: no."""
    if settings.local_steps <= 0 or settings.round_deadline_s <= 0 or steps_per_s is None:
        return False
    return steps_per_s * settings.round_deadline_s < settings.local_steps


def without_slow_timescale(plan: Decision, max_cap: int) -> Decision:
    """The ablation "fast timescale only": what the replicas do with no slow-timescale plan, equal
    routing weights over the serving replicas and every cap at the maximum (each agent's batch mixer
    alone keeps the SLO)."""
    a = plan.allocation
    serving = [n for n, w in a.weights.items() if w > 0]
    weights = {n: (1.0 / len(serving) if n in serving else 0.0) for n in a.weights}
    return replace(plan, allocation=replace(a, caps={n: max_cap for n in a.caps}, weights=weights))


class NoTrainers(ValueError):
    """Nobody can train in the round."""


def assign_roles(
    serving: list[str], trainers: list[str], *, aggregator: str | None = None, secure: bool = False, fixed: bool = False, min_participants: int = 1
) -> tuple[tuple[str, ...], str]:
    """(participants, aggregator) of a round, for scheduled and hand-made rounds alike.

    `trainers`: who would train (a round's own list when `fixed`, else the candidates, which may
    give one up to aggregate). Without secure aggregation the aggregator is the one named or the
    first participant. With it, the aggregator must hold no pair seed of its own (it would unmask
    with them), so it does not train: a named one is left out of the candidates, else a serving
    replica outside them aggregates, else (not `fixed`, more than `min_participants` candidates) the
    last candidate does.
    ValueError says what is wrong; NoTrainers when nobody can train."""
    participants = [p for p in trainers if not (secure and not fixed and p == aggregator)]
    if aggregator is None:
        if secure:
            others = [r for r in serving if r not in participants]
            if not others and not fixed and len(participants) > max(1, min_participants):
                others = [participants.pop()]  # the last one aggregates instead of training
            aggregator = others[0] if others else None
            if aggregator is None and participants:
                raise ValueError(
                    f"secure aggregation needs an aggregator that is not a participant, and every serving replica "
                    f"({', '.join(serving)}) is one: list fewer spec.participants or add replicas"
                )
        else:
            aggregator = participants[0] if participants else None
    if secure and aggregator in participants:
        raise ValueError(f"secure aggregation needs an aggregator that is not a participant; {aggregator} is both")
    if aggregator is None or not participants:
        raise NoTrainers("nobody can train")
    return tuple(participants), aggregator


def current_adapter(published: Adapter | None, stats: Mapping[str, AgentStats | None]) -> Adapter | None:
    """The newest adapter a round published; before any, the global adapter every replica agrees on."""
    if published is not None:
        return published
    rests_on = {st.global_adapter.sha256 if st.global_adapter else None for st in stats.values() if st}
    if stats and len(rests_on) == 1 and None not in rests_on and all(st is not None for st in stats.values()):
        return Adapter(0, str(rests_on.pop()))
    return None


def next_version(stats: Mapping[str, AgentStats | None], claimed: Iterable[int] = ()) -> int:
    """The cluster version a new round publishes as: 1 + the highest version anyone knows, the
    `claimed` ones (the cluster's adapter, every round that ever started: a failed one claimed its
    number too) and every global adapter an agent rests on. Versions only grow, so an agent never
    mistakes a new adapter for one it already holds."""
    known = [*claimed, *(st.global_adapter.cluster_version for st in stats.values() if st is not None and st.global_adapter is not None)]
    return max(known, default=0) + 1


def served_adapter(stats: AgentStats) -> dict[str, str]:
    """The adapter an agent serves, as status shows it: `<cluster version>.<local revision>` and sha256."""
    served = stats.adapter
    return {"adapter": served.version, "adapterSha256": served.sha256} if served is not None else {}


def laggards(adapter: Adapter | None, stats: Mapping[str, AgentStats | None]) -> list[str]:
    """Agents resting on a global adapter older than the current one (never a newer one: a round may be
    publishing). A local revision on top of the current global is not lagging: it is that global plus
    what the replica learnt since."""
    if adapter is None:
        return []
    out = []
    for name, st in stats.items():
        if st is None:
            continue
        rests_on: AdapterRef | None = st.global_adapter
        if (rests_on is None or rests_on.sha256 != adapter.sha256) and (rests_on.cluster_version if rests_on else 0) < max(adapter.version, 1):
            out.append(name)
    return sorted(out)
