"""`collm bench simulate`: the slow timescale on the Azure code trace, every policy, no model.

A pure, fast simulation (numbers only, about a second per policy): it replays the trace's
arrival times against a cluster of replicas, runs the load predictor and `allocate()` every
`slow_interval_s`, and scores each policy by docs/design.md's goodput (F x Q integrated).

Replica model (one fluid FIFO queue per replica). At training cap c a replica serves requests
at C(c) req/s (its CapacityProfile); a request waits for the work queued ahead of it to drain at
the current rate, and meets the SLO when that wait is at most `ttft_slack_s` (the TTFT SLO less
the prefill). Requests are dispatched by smooth weighted round-robin over the allocation's
weights. Under `coexec` the batch mixer (fast timescale) is modelled too: when more than
`pressure_s` of work waits, training drops to 0 (the mixer's Overload) and comes back to the
plan's cap over `mixer_ramp_s` (additive increase). The baselines have no mixer: `static`
trains a fixed batch, `separated` replicas either train or serve, `inferenceOnly` never trains.

Quality: the served adapter's eval loss falls with the training tokens it holds:
loss = floor + (initial - floor) * exp(-tokens / T), Q = 1 / loss, T = the tokens the whole cluster
trains at its highest cap in `loss_time_constant_s`. Federated rounds (every `round_interval_s`)
publish what was trained; with real-time reuse (`revision_interval_s` > 0: the agent's local
revisions, under every co-located policy) what the replicas train since the last round is served
too, every `revision_interval_s`. `separated` has no reuse: its serving replicas train nothing.
Each request that meets the SLO adds the Q of the adapter it was admitted with: goodput = sum F x Q dt.

Calibration (`--calibrate reports/goodput.json`): the serving capacity per replica, the training
rate of a replica that only trains, the training share a co-executing replica keeps, and the loss
curve are taken from a measured `collm bench goodput` run (`calibrate()`), so the simulation can
show what the measured two replicas imply for 8.
"""

from __future__ import annotations

import bisect
import json
import math
from collections import deque
from dataclasses import asdict, dataclass

from collm_control.allocation import DEFAULT_STATIC_CAP, POLICIES, CapacityProfile, ReplicaState, allocate
from collm_control.predictor import EmaPredictor, LoadPredictor, replay
from replica_agent.traces import CODE_TRACE, load_arrivals

# (cap tokens/iteration, share of the inference-alone rate, share of the training-alone rate).
# Anchored on reports/coexec.json at cap 128 (0.90, 0.81 on CPU, CEE 1.71) but with more
# interference at high caps, for a CEE near the CEE measured by `collm bench coexec` (median about 1.45) at the top cap.
PROFILE_SHAPE = ((0, 1.0, 0.0), (64, 0.93, 0.40), (128, 0.85, 0.62), (256, 0.72, 0.80), (512, 0.60, 0.85))
ABLATIONS = {  # name -> (policy, predictor, mixer, real-time reuse, slow-timescale plan)
    "coexec, EMA predictor": ("coexec", "ema", True, True, True),
    "coexec, slow timescale only": ("coexec", "burst", False, True, True),
    "coexec, fast timescale only": ("coexec", "none", True, True, False),
    "coexec, no real-time reuse (rounds only)": ("coexec", "burst", True, False, True),
}
HETERO_SPEEDS = (1.0, 0.5)  # `--cluster hetero`: every other replica a device half as fast


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
    revision_interval_s: float = 0.0  # real-time reuse of local progress (0: rounds only, the earlier model)
    training_share: float | None = None  # the training share at the top cap (calibrate(): measured); None: PROFILE_SHAPE's
    offered_rps: float | None = None  # time-scale the trace to this mean rate (None: its own times)
    trace_requests: int | None = None  # replay only the trace's first N requests (None: all)
    calibrated_from: str = ""
    speeds: tuple[float, ...] = ()  # each replica's speed relative to the profile (cycled; empty: all 1)

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError(f"duration_s must be > 0 or None for the whole trace, got {self.duration_s}")
        if not 0 < self.step_s <= self.slow_interval_s:
            raise ValueError("step_s must be > 0 and at most slow_interval_s")
        if not self.loss_initial > self.loss_floor > 0:
            raise ValueError("loss_initial must exceed loss_floor, which must be > 0")
        if self.revision_interval_s < 0:
            raise ValueError("revision_interval_s must be >= 0")
        if self.training_share is not None and not 0 < self.training_share <= 1:
            raise ValueError("training_share must be in (0, 1]")
        if self.offered_rps is not None and self.offered_rps <= 0:
            raise ValueError("offered_rps must be > 0")
        if self.trace_requests is not None and self.trace_requests < 2:
            raise ValueError("trace_requests must be >= 2")


def fit_loss_curve(points: list[tuple[float, float]], loss_initial: float) -> tuple[float, float]:
    """(floor, tokens constant) of loss = floor + (initial - floor) * exp(-tokens / T) that fits
    measured (tokens, loss) points best (least squares over a log grid of T and a grid of floors)."""
    if not points:
        raise ValueError("no measured (tokens, loss) point to fit")
    most = max(t for t, _ in points) or 1.0
    best = (math.inf, loss_initial * 0.5, most)
    for i in range(1, 200):
        floor = loss_initial * i / 200
        for k in range(-30, 31):
            scale = most * 10 ** (k / 10)
            error = sum((floor + (loss_initial - floor) * math.exp(-t / scale) - loss) ** 2 for t, loss in points)
            if error < best[0]:
                best = (error, floor, scale)
    return best[1], best[2]


def fit_service_rate(arrivals, *, replicas: int, capacity_rps: float, attainment: float, ttft_slack_s: float) -> float:
    """The per-replica service rate at which `replicas` simulated replicas, offered `arrivals` at
    `capacity_rps` with training off, meet the SLO for `attainment` of the requests (bisection on a
    log scale; attainment grows with the rate)."""

    def attained(rate: float) -> float:
        config = SimConfig(replicas=replicas, inference_alone_rps=rate, offered_rps=capacity_rps, ttft_slack_s=ttft_slack_s, round_interval_s=1e9)
        return simulate(arrivals, config, "inferenceOnly")["slo_attainment"]

    low, high = capacity_rps / replicas / 10, capacity_rps / replicas * 100
    if attained(high) < attainment:
        raise ValueError(f"no service rate up to {high:g} req/s per replica reaches {attainment:.0%} attainment: the measured run cannot be calibrated")
    for _ in range(40):
        mid = math.sqrt(low * high)
        low, high = (mid, high) if attained(mid) < attainment else (low, mid)
    return high


def calibrate(goodput_json: str, *, replicas: int, load: float | None = None, **overrides) -> SimConfig:
    """A SimConfig whose cost and quality models come from a measured `collm bench goodput` run.

    - inference_alone_rps: the rate of the simulation's fluid queue at which it reproduces the
      measured capacity: the measured replicas, offered the measured segment at the capacity,
      meet the SLO at the measured attainment (a replica batches a burst, so its service rate in
      a burst is far above the capacity's mean rate; fit_service_rate());
    - training_alone_tokens_per_s: `separated`'s training replica (it only trains);
    - training_share: coexec's training rate per replica over that (what co-execution keeps);
    - loss_initial, loss_floor, loss_time_constant_s: fitted to coexec's per-window served quality
      against the tokens each replica had trained by then (`windows` in the JSON);
    - offered_rps: `load` (default: the run's first load) x the capacity per replica x `replicas`;
    - trace_requests: the measured segment's requests per replica x `replicas` (the first of the
      trace, as the benchmark replays its first ones), so each replica gets as many requests as it
      did in the measured run, over the same time.
    """
    with open(goodput_json) as f:
        measured = json.load(f)
    entry = measured["loads"][0]
    runs = {r["policy"]: r for r in entry["policies"]}
    for needed in ("coexec", "separated"):
        if needed not in runs:
            raise ValueError(f"{goodput_json} has no {needed} run; calibrating needs coexec and separated")
    n_measured = measured["replicas"]
    per_replica_rps = measured["capacity"]["rate"] / n_measured
    separated, coexec = runs["separated"], runs["coexec"]
    alone = max(separated["training_tokens_per_replica"].values()) / separated["duration_s"]
    share = coexec["training_tokens"] / n_measured / coexec["duration_s"] / alone
    loss_initial = 1 / coexec["mean_quality_initial_adapter"]
    points, tokens = [], 0.0
    for w in coexec["windows"]:
        # tokens per replica trained by the end of the window (older JSON lacks them: a steady rate)
        tokens = (
            tokens + w["training_tokens"] / n_measured if "training_tokens" in w else coexec["training_tokens"] / n_measured * w["t"] / coexec["duration_s"]
        )
        if w.get("mean_quality"):
            points.append((tokens, 1 / w["mean_quality"]))
    floor, scale = fit_loss_curve(points, loss_initial)
    revision = measured.get("replica_settings", {}).get("revision_every_seconds") or 5.0
    segment = measured["capacity"]["segment_requests"]
    service_rps = fit_service_rate(
        load_arrivals(CODE_TRACE)[:segment],
        replicas=n_measured,
        capacity_rps=measured["capacity"]["rate"],
        attainment=measured["capacity"].get("threshold", 0.9),
        ttft_slack_s=measured["slo"]["ttft_ms"] / 1000,
    )
    settings = dict(
        replicas=replicas,
        inference_alone_rps=service_rps,
        training_alone_tokens_per_s=alone,
        training_share=share,
        loss_initial=loss_initial,
        loss_floor=floor,
        loss_time_constant_s=scale / (alone * share),  # T = tokens one replica trains at co-execution's rate in this time
        round_interval_s=measured["controller"]["round_interval_s"],
        slow_interval_s=measured["controller"]["slow_interval_s"],
        revision_interval_s=float(revision),
        ttft_slack_s=measured["slo"]["ttft_ms"] / 1000,
        offered_rps=(load if load is not None else entry["load"]) * per_replica_rps * replicas,
        trace_requests=max(2, round(segment * replicas / n_measured)),
        calibrated_from=goodput_json,
    )
    return SimConfig(**{**settings, **overrides})


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


def at_rate(arrivals, rate: float | None) -> list[float]:
    """The same bursts and gaps, squeezed or stretched to a mean rate of `rate` req/s (None: unchanged)."""
    span = arrivals[-1] - arrivals[0] if arrivals else 0.0
    if rate is None or span <= 0:
        return list(arrivals)
    return [(t - arrivals[0]) * len(arrivals) / rate / span for t in arrivals]


def simulate(
    arrivals, config: SimConfig, policy: str, *, predictor: str = "burst", mixer: bool | None = None, reuse: bool | None = None, slow: bool = True
) -> dict:
    """Replay `arrivals` (seconds, sorted; at `config.offered_rps` if set) under one policy; returns its figures.
    `slow=False` is the ablation "fast timescale only": equal weights and every cap at its maximum."""
    c = config
    arrivals = at_rate(arrivals[: c.trace_requests], c.offered_rps)
    arrivals = [t for t in arrivals if c.duration_s is None or t < c.duration_s]
    end = c.duration_s if c.duration_s is not None else arrivals[-1]
    mixer = policy == "coexec" if mixer is None else mixer
    inference_alone = c.inference_alone_rps or p99_rate(arrivals) / (c.replicas * c.peak_utilization)
    train_scale = c.training_share / PROFILE_SHAPE[-1][2] if c.training_share is not None else 1.0
    profile = CapacityProfile(tuple((cap, inference_alone * a, c.training_alone_tokens_per_s * b * train_scale) for cap, a, b in PROFILE_SHAPE))
    reuse = (c.revision_interval_s > 0 if reuse is None else reuse) and c.revision_interval_s > 0 and policy not in ("separated", "inferenceOnly")
    names = [f"replica-{i}" for i in range(c.replicas)]
    speeds = {n: (c.speeds[i % len(c.speeds)] if c.speeds else 1.0) for i, n in enumerate(names)}
    replicas = {n: _Replica(scaled(profile, speeds[n])) for n in names}
    scale_tokens = sum(r.profile.training_rate_at(r.profile.max_cap) for r in replicas.values()) * c.loss_time_constant_s
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
    next_revision = c.revision_interval_s if reuse else math.inf
    steps = int(math.ceil(end / c.step_s))
    for k in range(steps + 1):
        t = k * c.step_s
        if t >= next_round - 1e-9:
            published += round_tokens
            round_tokens = 0.0
            if not reuse:
                loss = c.loss_floor + (c.loss_initial - c.loss_floor) * math.exp(-published / scale_tokens)
            next_round += c.round_interval_s
        if t >= next_revision - 1e-9:  # local revisions: everything trained so far is served (rebased, never lost)
            loss = c.loss_floor + (c.loss_initial - c.loss_floor) * math.exp(-trained / scale_tokens)
            next_revision += c.revision_interval_s
        if t >= next_tick - 1e-9:
            load = 0.0
            if forecaster is not None:
                forecaster.observe(t, next_arrival - seen_at_tick)
                load = forecaster.predict(c.slow_interval_s)
            seen_at_tick = next_arrival
            slope = (c.loss_initial - c.loss_floor) / scale_tokens * math.exp(-published / scale_tokens)
            states = [ReplicaState(n, True, replicas[n].profile, slope, c.data_tokens) for n in names]
            plan = allocate(load, states, policy=policy, headroom=c.headroom, static_cap=c.static_cap)
            weights, participants = plan.weights, set(plan.participants)
            for n in names:
                replicas[n].plan_cap = plan.caps[n] if slow else replicas[n].profile.max_cap
            if not slow:
                weights = {n: 1.0 / len(names) for n in names}
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
            r.rate = r.profile.capacity_at(r.cap)
            tokens = r.profile.training_rate_at(r.cap) * c.step_s
            if n in participants:
                round_tokens += tokens
            if n in participants or (reuse and tokens > 0):
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


def scaled(profile: CapacityProfile, speed: float) -> CapacityProfile:
    """The same device `speed` times as fast: it serves and trains `speed` times as much at every cap."""
    return CapacityProfile(tuple((cap, rps * speed, tps * speed) for cap, rps, tps in profile.points))


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


def run(
    *,
    replicas: int = 4,
    duration_s: float | None = None,
    slow_interval_s: float = 10.0,
    static_cap: int = DEFAULT_STATIC_CAP,
    trace: str | None = None,
    ablations: bool = True,
    calibrate_from: str | None = None,
    load: float | None = None,
    json_path: str | None = None,
    cluster: str = "identical",
) -> dict:
    """Simulate every policy (and the ablations) on the code trace; print a table, write JSON.
    `cluster="hetero"`: every other replica a device half as fast (HETERO_SPEEDS).
    With `calibrate_from` (a `collm bench goodput` JSON) the cost and quality models are the measured
    ones (calibrate()) and the trace is offered at `load` of the cluster's calibrated capacity."""
    if cluster not in ("identical", "hetero"):
        raise ValueError(f"unknown cluster {cluster!r}; use identical or hetero")
    speeds = HETERO_SPEEDS if cluster == "hetero" else ()
    if calibrate_from:
        config = calibrate(calibrate_from, replicas=replicas, load=load, duration_s=duration_s, speeds=speeds)
    else:
        config = SimConfig(replicas=replicas, duration_s=duration_s, slow_interval_s=slow_interval_s, static_cap=static_cap, speeds=speeds)
    arrivals = load_arrivals(trace or CODE_TRACE)
    rows = {p: simulate(arrivals, config, p) for p in POLICIES}
    if ablations:
        for name, (policy, predictor, mixer, reuse, slow) in ABLATIONS.items():
            if not reuse and not config.revision_interval_s:
                continue  # the configuration has no real-time reuse to take away
            rows[name] = {**simulate(arrivals, config, policy, predictor=predictor, mixer=mixer, reuse=reuse, slow=slow), "policy": name}
    reference = rows["coexec"]["goodput"]
    for row in rows.values():
        row["goodput_ratio"] = row["goodput"] / reference if reference else 0.0
    in_window = [t for t in at_rate(arrivals[: config.trace_requests], config.offered_rps) if duration_s is None or t < duration_s]
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
    source = f", calibrated from {c['calibrated_from']}" if c["calibrated_from"] else ""
    speeds = f", replica speeds {'/'.join(f'{x:g}' for x in c['speeds'])} (cycled)" if c["speeds"] else ""
    print_table(f"Goodput on the Azure code trace: {c['replicas']} replicas{speeds}, slow interval {c['slow_interval_s']:g} s{source}", columns, rows)
    print_table(
        f"Load predictor, one prediction per {c['slow_interval_s']:g} s",
        ["predictor", "burst under-prediction", "requests over prediction", "idle prediction req/s", "reserved / actual"],
        [
            [n, s["burst_under_prediction_rate"], s["under_predicted_share"], s["long_idle_prediction"], s["reserved_over_actual"]]
            for n, s in result["predictor"].items()
        ],
    )
    write_json(result, json_path)
