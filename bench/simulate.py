"""`collm bench simulate`: the slow timescale on the Azure code trace, every policy, no model.

A pure, fast simulation (numbers only, about a second per policy): it replays the trace's
arrival times against a cluster of replicas, runs the load predictor and `allocate()` every
`slow_interval_s`, and scores each policy by DESIGN.md's goodput (F x Q integrated).

Replica model (one fluid FIFO queue per replica). At training cap c a replica serves requests
at C(c) req/s (its CapacityProfile); a request waits for the work queued ahead of it to drain at
the current rate, and meets the SLO when that wait is at most `ttft_slack_s` (the TTFT SLO less
the prefill). Requests are dispatched by smooth weighted round-robin over the allocation's
weights. Under `coexec` the batch mixer (fast timescale) is modelled too: when more than
`pressure_s` of work waits, training drops to 0 (the mixer's Overload) and comes back to the
plan's cap over `mixer_ramp_s` (additive increase). The baselines have no mixer: `static`
trains a fixed batch, `separated` replicas either train or serve, `inferenceOnly` never trains.

Quality: the served adapter's eval loss falls with the training tokens published by federated
rounds (every `round_interval_s`): loss = floor + (initial - floor) * exp(-tokens / T), Q = 1 / loss,
T = the tokens the whole cluster trains at its highest cap in `loss_time_constant_s`. Each
request that meets the SLO adds the Q of the adapter it was admitted with: goodput = sum F x Q dt.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import asdict, dataclass
from collm_operator.allocation import DEFAULT_STATIC_CAP, POLICIES, CapacityProfile, ReplicaState, allocate
from collm_operator.predictor import EmaPredictor, LoadPredictor, replay
from replica_agent.traces import CODE_TRACE, load_arrivals


# (cap tokens/iteration, share of the inference-alone rate, share of the training-alone rate).
# Anchored on reports/coexec.json at cap 128 (0.90, 0.81 on CPU, CEE 1.71) but with more
# interference at high caps, for a CEE near DESIGN.md's median 1.45 at the top cap.
PROFILE_SHAPE = ((0, 1.0, 0.0), (64, 0.93, 0.40), (128, 0.85, 0.62), (256, 0.72, 0.80), (512, 0.60, 0.85))
ABLATIONS = {  # name -> (policy, predictor, mixer)
    "coexec, EMA predictor": ("coexec", "ema", True),
    "coexec, slow timescale only": ("coexec", "burst", False),
    "coexec, fast timescale only": ("coexec", "none", True),
}


@dataclass(frozen=True)
class SimConfig:
    replicas: int = 4
    duration_s: float | None = None  # replay this much of the trace; None = all of it
    slow_interval_s: float = 10.0
    step_s: float = 0.1  # the mixer's reaction time
    ttft_slack_s: float = 1.0
    peak_utilization: float = 0.6  # the trace's p99 10-s rate over the cluster's inference-only capacity
    inference_alone_rps: float | None = None  # per replica; overrides the sizing by peak_utilization
    headroom: float = 0.9
    static_cap: int = DEFAULT_STATIC_CAP  # the agent's default; also the best fixed cap here (docs/scheduling.md)
    round_interval_s: float = 60.0
    training_alone_tokens_per_s: float = 6300.0  # reports/coexec.json, tiny model on CPU
    loss_initial: float = 2.0
    loss_floor: float = 1.5
    loss_time_constant_s: float = 1200.0
    data_tokens: int = 100_000_000
    pressure_s: float = 0.1
    mixer_ramp_s: float = 0.4

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError(f"duration_s must be > 0 or None for the whole trace, got {self.duration_s}")
        if not 0 < self.step_s <= self.slow_interval_s:
            raise ValueError("step_s must be > 0 and at most slow_interval_s")
        if not self.loss_initial > self.loss_floor > 0:
            raise ValueError("loss_initial must exceed loss_floor, which must be > 0")


def p99_rate(arrivals, window_s: float = 10.0) -> float:
    counts = [0] * (int(arrivals[-1] // window_s) + 1)
    for t in arrivals:
        counts[int(t // window_s)] += 1
    counts.sort()
    return counts[min(len(counts) - 1, int(0.99 * len(counts)))] / window_s


class _Replica:
    """Fluid FIFO queue: cumulative work enqueued and drained, in requests."""

    def __init__(self, profile: CapacityProfile):
        self.profile = profile
        self.enqueued = 0
        self.drained = 0.0
        self.waiting: deque[tuple[float, int, float]] = deque()  # (arrival, work ahead, quality)
        self.rate = profile.capacity_at(profile.max_cap)
        self.clock = 0.0
        self.cap = 0.0
        self.plan_cap = 0

    def advance(self, now: float, outcomes: list) -> None:
        if self.rate > 0 and now > self.clock:
            start_work = self.drained
            end_work = min(float(self.enqueued), start_work + self.rate * (now - self.clock))
            while self.waiting and self.waiting[0][1] <= end_work:
                arrival, ahead, quality = self.waiting.popleft()
                outcomes.append((self.clock + (ahead - start_work) / self.rate - arrival, quality))
            self.drained = end_work
        self.clock = now

    def backlog_s(self) -> float:
        return (self.enqueued - self.drained) / self.rate if self.rate > 0 else math.inf

    def admit(self, arrival: float, quality: float, outcomes: list) -> None:
        if self.drained >= self.enqueued:
            outcomes.append((0.0, quality))
        else:
            self.waiting.append((arrival, self.enqueued, quality))
        self.enqueued += 1


def simulate(arrivals, config: SimConfig, policy: str, *, predictor: str = "burst", mixer: bool | None = None) -> dict:
    """Replay `arrivals` (seconds, sorted) under one policy; returns its figures."""
    c = config
    arrivals = [t for t in arrivals if c.duration_s is None or t < c.duration_s]
    end = c.duration_s if c.duration_s is not None else arrivals[-1]
    mixer = policy == "coexec" if mixer is None else mixer
    inference_alone = c.inference_alone_rps or p99_rate(arrivals) / (c.replicas * c.peak_utilization)
    profile = CapacityProfile(tuple((cap, inference_alone * a, c.training_alone_tokens_per_s * b) for cap, a, b in PROFILE_SHAPE))
    names = [f"replica-{i}" for i in range(c.replicas)]
    replicas = {n: _Replica(profile) for n in names}
    scale_tokens = c.replicas * profile.training_rate_at(profile.max_cap) * c.loss_time_constant_s
    forecaster = {"burst": LoadPredictor(), "ema": EmaPredictor(60.0), "none": None}[predictor]

    published = round_tokens = trained = 0.0
    loss = c.loss_initial
    outcomes: list[tuple[float, float]] = []
    weights: dict[str, float] = {}
    participants: set[str] = set()
    current = {n: 0.0 for n in names}  # smooth weighted round-robin state
    quality_time = cap_time = 0.0
    overloaded_intervals = intervals = 0
    next_arrival = seen_at_tick = 0
    next_tick, next_round = 0.0, c.round_interval_s
    steps = int(math.ceil(end / c.step_s))
    for k in range(steps + 1):
        t = k * c.step_s
        if t >= next_round - 1e-9:
            published += round_tokens
            round_tokens = 0.0
            loss = c.loss_floor + (c.loss_initial - c.loss_floor) * math.exp(-published / scale_tokens)
            next_round += c.round_interval_s
        if t >= next_tick - 1e-9:
            load = 0.0
            if forecaster is not None:
                forecaster.observe(t, next_arrival - seen_at_tick)
                load = forecaster.predict(c.slow_interval_s)
            seen_at_tick = next_arrival
            slope = (c.loss_initial - c.loss_floor) / scale_tokens * math.exp(-published / scale_tokens)
            states = [ReplicaState(n, True, profile, slope, c.data_tokens) for n in names]
            plan = allocate(load, states, policy=policy, headroom=c.headroom, static_cap=c.static_cap)
            weights, participants = plan.weights, set(plan.participants)
            for n in names:
                replicas[n].plan_cap = plan.caps[n]
            overloaded_intervals += plan.overloaded
            intervals += 1
            next_tick += c.slow_interval_s
        if k == steps:
            break
        for n in names:
            r = replicas[n]
            r.advance(t, outcomes)
            if not mixer:
                r.cap = r.plan_cap
            elif r.backlog_s() > c.pressure_s:
                r.cap = 0.0
            else:
                r.cap = min(r.plan_cap, r.cap + r.plan_cap * c.step_s / c.mixer_ramp_s)
            r.rate = profile.capacity_at(r.cap)
            if n in participants:
                tokens = profile.training_rate_at(r.cap) * c.step_s
                round_tokens += tokens
                trained += tokens
            cap_time += r.cap * c.step_s
        quality_time += c.step_s / loss
        stop = bisect.bisect_left(arrivals, t + c.step_s, lo=next_arrival)
        for arrival in arrivals[next_arrival:stop]:
            name = _pick(weights, current)
            replicas[name].advance(arrival, outcomes)
            replicas[name].admit(arrival, 1.0 / loss, outcomes)
        next_arrival = stop

    for r in replicas.values():  # let every queue drain to decide the last requests
        r.advance(end + r.backlog_s() + 1.0, outcomes)
    met = [q for wait, q in outcomes if wait <= c.ttft_slack_s]
    duration = steps * c.step_s
    return {
        "policy": policy,
        "requests": len(arrivals),
        "slo_met": len(met),
        "slo_attainment": len(met) / len(arrivals) if arrivals else 0.0,
        "training_tokens": trained,
        "published_tokens": published,
        "final_loss": loss,
        "mean_quality": quality_time / duration,
        "goodput": sum(met),
        "mean_cap": cap_time / (duration * c.replicas),
        "overloaded_intervals": overloaded_intervals,
        "allocations": intervals,
        "inference_alone_rps_per_replica": inference_alone,
    }


def _pick(weights: dict[str, float], current: dict[str, float]) -> str:
    """Smooth weighted round-robin (nginx): deterministic, and equal weights give plain round-robin."""
    total = 0.0
    best = None
    for name, weight in weights.items():
        if weight <= 0:
            continue
        current[name] += weight
        total += weight
        if best is None or current[name] > current[best]:
            best = name
    current[best] -= total
    return best


def run(*, replicas: int = 4, duration_s: float | None = None, slow_interval_s: float = 10.0, static_cap: int = DEFAULT_STATIC_CAP, trace: str | None = None, ablations: bool = True, json_path: str | None = None) -> dict:
    """Simulate every policy (and the ablations) on the code trace; print a table, write JSON."""
    config = SimConfig(replicas=replicas, duration_s=duration_s, slow_interval_s=slow_interval_s, static_cap=static_cap)
    arrivals = load_arrivals(trace or CODE_TRACE)
    rows = {p: simulate(arrivals, config, p) for p in POLICIES}
    if ablations:
        for name, (policy, predictor, mixer) in ABLATIONS.items():
            rows[name] = {**simulate(arrivals, config, policy, predictor=predictor, mixer=mixer), "policy": name}
    reference = rows["coexec"]["goodput"]
    for row in rows.values():
        row["goodput_ratio"] = row["goodput"] / reference if reference else 0.0
    in_window = [t for t in arrivals if duration_s is None or t < duration_s]
    scores = {
        "burst (LoadPredictor)": replay(LoadPredictor(), in_window, slow_interval_s, headroom=config.headroom).as_dict(),
        "EMA 60 s": replay(EmaPredictor(60.0), in_window, slow_interval_s, headroom=config.headroom).as_dict(),
    }
    result = {
        "benchmark": "simulate",
        "trace": str(trace or CODE_TRACE.name),
        "config": asdict(config),
        "profile_shape": [list(p) for p in PROFILE_SHAPE],
        "policies": {p: rows[p] for p in POLICIES},
        "ablations": {n: rows[n] for n in rows if n not in POLICIES},
        "predictor": scores,
        "coexec_ahead": all(rows["coexec"]["goodput"] > rows[p]["goodput"] for p in POLICIES if p != "coexec"),
    }
    _report(result, json_path)
    return result


def _report(result: dict, json_path: str | None) -> None:
    from replica_agent.report import print_table, write_json  # imports torch: only when printing

    columns = ["policy", "SLO attainment", "training Mtokens", "mean quality", "final loss", "goodput", "vs coexec"]
    rows = [
        [r["policy"], r["slo_attainment"], r["training_tokens"] / 1e6, r["mean_quality"], r["final_loss"], r["goodput"], r["goodput_ratio"]]
        for r in [*result["policies"].values(), *result["ablations"].values()]
    ]
    c = result["config"]
    print_table(f"Goodput on the Azure code trace: {c['replicas']} replicas, slow interval {c['slow_interval_s']:g} s", columns, rows)
    print_table(
        f"Load predictor, one prediction per {c['slow_interval_s']:g} s",
        ["predictor", "burst under-prediction", "requests over prediction", "idle prediction req/s", "reserved / actual"],
        [[n, s["burst_under_prediction_rate"], s["under_predicted_share"], s["long_idle_prediction"], s["reserved_over_actual"]] for n, s in result["predictor"].items()],
    )
    write_json(result, json_path)

