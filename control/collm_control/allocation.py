"""Slow-timescale allocation: training caps, routing weights and round participants per replica.

Pure code (stdlib only): plain functions of numbers, used by the operator, the local mode and the
simulation (bench/simulate.py). docs/scheduling.md gives the formulation and why it is right.

Problem (policy `coexec`). Each healthy replica i gets a training cap c_i (tokens per inference
iteration, handed to its batch mixer) and a routing weight w_i. Its measured CapacityProfile
gives C_i(c), the request rate it sustains within the SLO, and R_i(c), its training tokens/s.
With predicted load L and headroom h:

    maximise   sum_i v_i * R_i(c_i)          (training value; v_i = loss slope of participants)
    subject to w_i * L <= h * C_i(c_i)       (no replica is routed more than it serves in SLO)
               sum_i w_i = 1,  c_i within the profile's caps

Goodput is F x Q: serving the predicted load within the SLO comes first (F), then the caps buy
as much quality (Q) as the spare capacity allows. The weights are feasible exactly when
sum_i h * C_i(c_i) >= L, and w_i proportional to C_i(c_i) is then feasible and balances
utilisation, so the problem reduces to a resource allocation over the caps: start from every
cap at its maximum and, while capacity is short, lower the cap where a unit of capacity costs
the least training value. Each profile is replaced by the upper concave hull of its
(capacity, value) points, so marginal costs rise along each replica; a heap merges the replicas'
segments cheapest first (a fractional knapsack: optimal on the hull, the last segment cut at an
integer cap). O(P log N) for N replicas of P profile points; ties break by replica name.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

POLICIES = ("coexec", "static", "separated", "inferenceOnly")
DEFAULT_STATIC_CAP = 128  # the agent's default train_cap_tokens
_TOLERANCE = 1e-9


@dataclass(frozen=True)
class CapacityProfile:
    """Measured by an agent: (training cap tokens/iteration, SLO-sustainable req/s, training tokens/s).

    Caps strictly increase; capacity must not rise and training must not fall with the cap (use
    `from_measurements` for noisy points). Values between points are interpolated linearly and
    caps outside the range are clamped to it.
    """

    points: tuple[tuple[int, float, float], ...]
    _caps: list[int] = field(init=False, repr=False, compare=False, default_factory=list)

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("a CapacityProfile needs at least one (cap, capacity, training rate) point")
        previous = None
        for point in self.points:
            cap, capacity, training = point
            if not isinstance(cap, int) or isinstance(cap, bool) or cap < 0:
                raise ValueError(f"profile caps must be integers >= 0, got {cap!r}")
            for value in (capacity, training):
                if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                    raise ValueError(f"profile rates must be finite numbers >= 0, got {point!r}")
            if previous is not None:
                if cap <= previous[0]:
                    raise ValueError(f"profile caps must strictly increase: {previous[0]} then {cap}")
                if capacity > previous[1] or training < previous[2]:
                    raise ValueError(
                        f"profile point {point!r} after {previous!r}: capacity must not rise and training must "
                        "not fall as the cap grows; build noisy measurements with CapacityProfile.from_measurements"
                    )
            previous = point
        object.__setattr__(self, "_caps", [p[0] for p in self.points])

    @classmethod
    def from_measurements(cls, points) -> CapacityProfile:
        """Sort, average repeated caps and make the curves monotone (measurement noise must not
        make a higher cap look like more capacity)."""
        by_cap: dict[int, list[tuple[float, float]]] = {}
        for cap, capacity, training in points:
            by_cap.setdefault(int(cap), []).append((float(capacity), float(training)))
        clean, lowest_capacity, highest_training = [], math.inf, 0.0
        for cap in sorted(by_cap):
            values = by_cap[cap]
            lowest_capacity = min(lowest_capacity, sum(v[0] for v in values) / len(values))
            highest_training = max(highest_training, sum(v[1] for v in values) / len(values))
            clean.append((cap, max(0.0, lowest_capacity), highest_training))
        return cls(tuple(clean))

    @property
    def min_cap(self) -> int:
        return self.points[0][0]

    @property
    def max_cap(self) -> int:
        return self.points[-1][0]

    def capacity_at(self, cap: float) -> float:
        return self._interpolate(cap, 1)

    def training_rate_at(self, cap: float) -> float:
        return self._interpolate(cap, 2)

    def clamp(self, cap: int) -> int:
        return min(self.max_cap, max(self.min_cap, cap))

    def _interpolate(self, cap: float, column: int) -> float:
        points = self.points
        if cap <= points[0][0]:
            return float(points[0][column])
        if cap >= points[-1][0]:
            return float(points[-1][column])
        i = bisect.bisect_right(self._caps, cap)
        (c0, *v0), (c1, *v1) = points[i - 1], points[i]
        a, b = v0[column - 1], v1[column - 1]
        return a + (b - a) * (cap - c0) / (c1 - c0)


@dataclass(frozen=True)
class ReplicaState:
    """What the operator knows about one replica at allocation time (from Agent.stats())."""

    name: str
    healthy: bool
    profile: CapacityProfile
    loss_slope_per_token: float = 0.0  # eval-loss decrease per training token, estimated by the agent
    data_tokens: int = 0  # local training tokens the replica holds

    def __post_init__(self) -> None:
        slope = self.loss_slope_per_token
        if not (isinstance(slope, (int, float)) and math.isfinite(slope) and slope >= 0):
            raise ValueError(f"replica {self.name}: loss_slope_per_token must be a finite number >= 0, got {slope!r}")
        if not isinstance(self.data_tokens, int) or self.data_tokens < 0:
            raise ValueError(f"replica {self.name}: data_tokens must be an integer >= 0, got {self.data_tokens!r}")

    @property
    def expected_gain(self) -> float:
        """First-order loss decrease a pass over the replica's data would buy: ranks round participants."""
        return self.loss_slope_per_token * self.data_tokens


@dataclass(frozen=True)
class Allocation:
    caps: dict[str, int]
    weights: dict[str, float]  # sum 1 over the replicas that serve; 0 for unhealthy or train-only ones
    predicted_load: float
    participants: tuple[str, ...]
    aggregator: str | None
    objective: float  # training value: sum of loss slope x training tokens/s over participants
    policy: str
    overloaded: bool = False  # some replica is routed more than headroom x its capacity
    capacity: float = 0.0  # SLO-sustainable req/s of the serving replicas at their caps


def allocate(
    predicted_load: float,
    replicas: Sequence[ReplicaState],
    *,
    policy: str = "coexec",
    headroom: float = 0.9,
    min_participants: int = 1,
    participation_fraction: float = 1.0,
    static_cap: int = DEFAULT_STATIC_CAP,
    home_shares: Mapping[str, float] | None = None,
) -> Allocation:
    """Plan the next slow interval for `replicas` under `policy` (see the module docstring).

    `home_shares` (coexec): each replica's share of the load that arrives at it (its home users,
    measured). When every replica can carry its own share, each keeps the highest cap that does,
    so a replica whose users are idle trains at its full cap while a busy one yields; otherwise
    the cluster-wide fill below decides (load has to move between replicas anyway)."""
    _validate(predicted_load, replicas, policy, headroom, min_participants, participation_fraction, static_cap)
    healthy = sorted((r for r in replicas if r.healthy), key=lambda r: r.name)
    caps = {r.name: r.profile.min_cap for r in replicas}  # unhealthy replicas: no training, no traffic
    ranked = sorted((r for r in healthy if r.data_tokens > 0), key=lambda r: (-r.expected_gain, r.name))

    if policy == "separated":
        trainers = ranked[: len(healthy) // 2] if len(healthy) > 1 else []
        participants = [r.name for r in trainers]
        trainer_names = set(participants)
        serving = [r for r in healthy if r.name not in trainer_names]
        for r in trainers:
            caps[r.name] = r.profile.max_cap
        proportional = True
    else:
        serving = healthy
        participants = [] if policy == "inferenceOnly" else _choose(ranked, min_participants, participation_fraction)
        proportional = policy != "static"
        if policy == "static":
            for r in healthy:
                caps[r.name] = r.profile.clamp(static_cap)
        elif policy == "coexec":
            values = {name: 1.0 for name in participants}
            at_home = _home_fill(predicted_load / headroom, healthy, home_shares) if home_shares else None
            caps.update(at_home if at_home is not None else _water_fill(predicted_load / headroom, healthy, values))

    capacities = {r.name: r.profile.capacity_at(caps[r.name]) for r in serving}
    weights = {r.name: 0.0 for r in replicas}
    weights.update(_weights(serving, capacities, proportional))
    overloaded = (predicted_load > 0 and not capacities) or any(
        weights[name] * predicted_load > headroom * capacity * (1 + _TOLERANCE) + _TOLERANCE for name, capacity in capacities.items()
    )
    by_name = {r.name: r for r in healthy}
    objective = sum((by_name[n].loss_slope_per_token * by_name[n].profile.training_rate_at(caps[n]) for n in participants), 0.0)
    aggregator = None
    if participants:

        def spare(name: str) -> float:
            return headroom * by_name[name].profile.capacity_at(caps[name]) - weights[name] * predicted_load

        aggregator = min(participants, key=lambda n: (-spare(n), n))
    return Allocation(
        caps=caps,
        weights=weights,
        predicted_load=float(predicted_load),
        participants=tuple(sorted(participants)),
        aggregator=aggregator,
        objective=objective,
        policy=policy,
        overloaded=overloaded,
        capacity=sum(capacities.values(), 0.0),
    )


def _choose(ranked: list[ReplicaState], min_participants: int, fraction: float) -> list[str]:
    """The replicas with the highest expected gain: a fraction of them, at least min_participants."""
    count = max(min_participants, math.ceil(fraction * len(ranked) - _TOLERANCE))
    return [r.name for r in ranked[: min(count, len(ranked))]]


def _weights(serving: list[ReplicaState], capacities: dict[str, float], proportional: bool) -> dict[str, float]:
    """Proportional to capacity (equal utilisation), or equal (round-robin, the static baseline)."""
    total = sum(capacities.values())
    if not serving:
        return {}
    if not proportional or total <= 0:
        return {r.name: 1.0 / len(serving) for r in serving}
    return {r.name: capacities[r.name] / total for r in serving}


def _home_fill(needed: float, replicas: list[ReplicaState], shares: Mapping[str, float]) -> dict[str, int] | None:
    """Each replica's highest cap that still serves its share of `needed` (None: some replica cannot
    carry its share even at its lowest cap, or no share is known)."""
    total = sum(max(0.0, shares.get(r.name, 0.0)) for r in replicas)
    if total <= 0:
        return None
    caps = {}
    for r in replicas:
        need = needed * max(0.0, shares.get(r.name, 0.0)) / total
        if r.profile.capacity_at(r.profile.min_cap) < need:
            return None
        caps[r.name] = _highest_cap_with(r.profile, need, r.profile.min_cap, r.profile.max_cap)
    return caps


def _water_fill(needed: float, replicas: list[ReplicaState], values: dict[str, float]) -> dict[str, int]:
    """Caps that give `needed` req/s of capacity at the least loss of training value.

    values[name] multiplies the replica's loss slope (participants 1, others 0: training that
    joins no round is the first to give way).
    """
    caps = {r.name: r.profile.max_cap for r in replicas}
    deficit = needed - sum(r.profile.capacity_at(r.profile.max_cap) for r in replicas)
    if deficit <= 0:
        return caps
    if needed > sum(r.profile.capacity_at(r.profile.min_cap) for r in replicas) * (1 + _TOLERANCE):
        return {r.name: r.profile.min_cap for r in replicas}  # overloaded: all capacity to serving
    chains = {}
    heap = []
    for r in replicas:
        value = r.loss_slope_per_token * values.get(r.name, 0.0)
        chain = _hull(r.profile, value)
        if len(chain) > 1:
            chains[r.name] = (r, chain)
            heap.append((_cost(chain, 0), r.name, 0))
    heapq.heapify(heap)
    while deficit > 0 and heap:
        _, name, j = heapq.heappop(heap)
        replica, chain = chains[name]
        (cap_hi, cap_hi_capacity, _), (cap_lo, cap_lo_capacity, _) = chain[j], chain[j + 1]
        gain = cap_lo_capacity - cap_hi_capacity
        if gain >= deficit:
            caps[name] = _highest_cap_with(replica.profile, cap_hi_capacity + deficit, cap_lo, cap_hi)
            break
        caps[name] = cap_lo
        deficit -= gain
        if j + 2 < len(chain):
            heapq.heappush(heap, (_cost(chain, j + 1), name, j + 1))
    return caps


def _hull(profile: CapacityProfile, value_per_token: float) -> list[tuple[int, float, float]]:
    """(cap, capacity, value) from the highest cap down, on the upper concave hull of value
    against capacity: each further step down buys capacity at a higher price than the last."""
    hull: list[tuple[int, float, float]] = []
    for cap, capacity, training in reversed(profile.points):
        point = (cap, float(capacity), value_per_token * training)
        if hull and point[1] <= hull[-1][1]:
            continue  # lowering the cap here gains no capacity
        while len(hull) >= 2 and _turns_up(hull[-2], hull[-1], point):
            hull.pop()
        hull.append(point)
    return hull


def _turns_up(o, a, b) -> bool:
    """True when a lies on or under the line from o to b (so a is not a hull vertex)."""
    return (a[1] - o[1]) * (b[2] - o[2]) - (a[2] - o[2]) * (b[1] - o[1]) >= 0


def _cost(chain, j: int) -> float:
    """Training value lost per unit of capacity gained on segment j of a hull chain."""
    (_, c0, v0), (_, c1, v1) = chain[j], chain[j + 1]
    return (v0 - v1) / (c1 - c0)


def _highest_cap_with(profile: CapacityProfile, capacity: float, lo: int, hi: int) -> int:
    """The largest integer cap in [lo, hi] whose capacity reaches `capacity` (capacity falls with the cap)."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if profile.capacity_at(mid) >= capacity:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _validate(predicted_load, replicas, policy, headroom, min_participants, participation_fraction, static_cap) -> None:
    if policy not in POLICIES:
        raise ValueError(f"unknown scheduling policy {policy!r}; use one of {', '.join(POLICIES)}")
    if not (isinstance(predicted_load, (int, float)) and math.isfinite(predicted_load) and predicted_load >= 0):
        raise ValueError(f"predicted_load must be a finite number of requests/s >= 0, got {predicted_load!r}")
    if not (isinstance(headroom, (int, float)) and 0 < headroom <= 1):
        raise ValueError(f"headroom must be in (0, 1], the share of capacity to load; got {headroom!r}")
    if not isinstance(min_participants, int) or min_participants < 0:
        raise ValueError(f"min_participants must be an integer >= 0, got {min_participants!r}")
    if not (isinstance(participation_fraction, (int, float)) and 0 <= participation_fraction <= 1):
        raise ValueError(f"participation_fraction must be in [0, 1], got {participation_fraction!r}")
    if not isinstance(static_cap, int) or static_cap < 0:
        raise ValueError(f"static_cap must be an integer >= 0 (training tokens per iteration), got {static_cap!r}")
    names = [r.name for r in replicas]
    if len(set(names)) != len(names):
        raise ValueError("replica names must be unique; the allocation is keyed by name")
