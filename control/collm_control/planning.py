"""One slow-timescale decision from the agents' stats: the operator's timer and the local mode share it.

`Planner.plan()` takes the arrivals counted since the last decision and every agent's stats
(collm_control.stats.AgentStats, None for an agent that did not answer) and returns the `Allocation` to push:
training caps (ApplyPlan), routing weights (the router) and the next round's participants. It
keeps what must persist between decisions (the load predictor, the smoothed capacity profiles,
the recent arrival rates) and does no I/O.

Where the numbers come from: the capacity profile and the held-out eval loss from each agent's
stats; a replica that has not measured a profile yet gets `prior_profile` (a guess that only sets
caps to their maximum until real points arrive).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from collm_control.allocation import POLICIES, Allocation, CapacityProfile, ReplicaState, allocate
from collm_control.predictor import LoadPredictor
from collm_control.stats import AgentStats


@dataclass(frozen=True)
class PlanningSettings:
    policy: str = "coexec"
    slow_interval_s: float = 5.0
    max_cap_tokens: int = 128  # the highest training cap a plan may give (the agents' train_cap_tokens)
    headroom: float = 0.9
    min_participants: int = 1
    participation_fraction: float = 1.0
    prior_rps: float = 10.0  # capacity guessed for a replica with no measured profile yet
    profile_smoothing: float = 0.3  # EMA weight of a new profile reading (the agents' online profiles are noisy)
    profile_spread: float = 2.0  # a replica's capacity is kept within [1/x, x] of the cluster median
    load_window_s: float = 15.0  # the load fed to allocate() is at most the mean arrival rate over this window
    overload_keeps_caps: bool = True  # an infeasible plan leaves the caps at their maximum for the mixer to cut
    round_min_cap: int = 16  # while a round runs, its participants' caps stay at least this (else it waits out its deadline)
    home_caps: bool = True  # coexec: each replica's cap from the load of its own users (allocation._home_fill)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown scheduling policy {self.policy!r}; use one of {', '.join(POLICIES)}")
        if self.slow_interval_s <= 0:
            raise ValueError("slow_interval_s must be a positive number of seconds")

    def prior_profile(self) -> CapacityProfile:
        return CapacityProfile(((0, self.prior_rps, 0.0), (self.max_cap_tokens, self.prior_rps, 1.0)))


@dataclass(frozen=True)
class Decision:
    allocation: Allocation
    states: tuple[ReplicaState, ...]
    predicted_load: float  # the load allocate() planned for (the forecast, bounded by the observed rate)
    forecast: float  # the predictor's raw forecast

    def cap(self, replica: str) -> int:
        """The training cap to send `replica` (inferenceOnly never trains)."""
        return 0 if self.allocation.policy == "inferenceOnly" else self.allocation.caps.get(replica, 0)

    @property
    def affinity(self) -> bool:
        """Whether the router sends a request to its home replica while it has room: every policy but
        `static`, whose baseline spreads requests evenly (DESIGN: round-robin dispatch)."""
        return self.allocation.policy != "static"


@dataclass(frozen=True)
class Rate:
    """A counter an agent reports (requests finished, training steps) and its smoothed rate per second."""

    at: float
    count: int
    rate: float | None = None  # None before two readings

    @staticmethod
    def next(old: Rate | None, now: float, count: int, smoothing: float) -> Rate:
        if old is None or count < old.count or now <= old.at:  # a first reading, or the agent restarted
            return Rate(now, count)
        rate = (count - old.count) / (now - old.at)
        return Rate(now, count, rate if old.rate is None else old.rate + smoothing * (rate - old.rate))


class Planner:
    def __init__(self, settings: PlanningSettings, *, now: float) -> None:
        self.settings = settings
        self.predictor = LoadPredictor(start_s=now)
        self._smoothed: dict[str, dict[int, tuple[float, float]]] = {}
        self._recent: list[tuple[float, int]] = []  # (seconds, arrivals) per decision
        self._last_at = now
        self._served: dict[str, Rate] = {}  # replica -> requests finished, and their smoothed rate
        self._steps: dict[str, Rate] = {}  # replica -> training steps, and their smoothed rate

    def plan(self, now: float, arrivals: int, stats: Mapping[str, AgentStats | None], *, round_participants: tuple[str, ...] = ()) -> Decision:
        """Allocate for the next interval; `round_participants` are training in a running round."""
        s = self.settings
        self.predictor.observe(max(now, self.predictor.time_s), arrivals)
        states = self.replica_states(stats)
        self._observe_rates(now, stats)
        forecast = self.predictor.predict(s.slow_interval_s)
        predicted = self._planned_load(now, arrivals, forecast)
        allocation = allocate(
            predicted,
            states,
            policy=s.policy,
            headroom=s.headroom,
            min_participants=s.min_participants,
            participation_fraction=s.participation_fraction,
            static_cap=s.max_cap_tokens,
            home_shares=self.home_shares() if s.home_caps else None,
        )
        if s.policy == "coexec" and allocation.overloaded and s.overload_keeps_caps:
            allocation = keep_caps(allocation, states, s.max_cap_tokens)
        if s.policy == "coexec" and round_participants and s.round_min_cap > 0:
            floor = {n: max(c, min(s.round_min_cap, s.max_cap_tokens)) for n, c in allocation.caps.items() if n in round_participants}
            if any(floor[n] != allocation.caps[n] for n in floor):
                allocation = replace(allocation, caps={**allocation.caps, **floor})
        return Decision(allocation, tuple(states), predicted, forecast)

    def replica_states(self, stats: Mapping[str, AgentStats | None]) -> list[ReplicaState]:
        profiles = {}
        for name, st in stats.items():
            points = [(p.cap, p.requests_per_s, p.training_tokens_per_s) for p in st.capacity_profile] if st is not None else []
            if st is not None and points:
                profiles[name] = self._smooth(name, profile_over_range(points, self.settings.max_cap_tokens))
        profiles = within_spread(profiles, self.settings.profile_spread)
        states = []
        for name, st in stats.items():
            profile = profiles.get(name) or self.settings.prior_profile()
            if st is None:
                states.append(ReplicaState(name, False, profile))
                continue
            # Only an agent with data has a held-out split; one whose trainer failed still serves
            # (trainer.py) but has nothing to train with. Agents do not report a loss slope yet:
            # every replica with data is worth the same per token, so participants are ranked by
            # the size of their data (expected gain = slope x data tokens) and the caps by capacity.
            trains = st.can_train
            states.append(ReplicaState(name, True, profile, 1e-6 if trains else 0.0, max(1, st.data_tokens) if trains else 0))
        return states

    def forget(self, replica: str) -> None:
        """Drop what was learnt of a replica (it was scaled away or replaced by a new pod)."""
        self._smoothed.pop(replica, None)
        self._served.pop(replica, None)
        self._steps.pop(replica, None)

    def home_shares(self) -> dict[str, float]:
        """Each replica's share of the requests served lately (smoothed): with home affinity, where its
        users are. Empty before any replica has been read twice."""
        rates = {n: r.rate or 0.0 for n, r in self._served.items()}
        total = sum(rates.values())
        return {n: v / total for n, v in rates.items()} if total > 0 else {}

    def training_steps_per_s(self, replica: str) -> float | None:
        """The replica's recent training speed (smoothed steps/s); None before two readings."""
        entry = self._steps.get(replica)
        return entry.rate if entry else None

    def _observe_rates(self, now: float, stats: Mapping[str, AgentStats | None]) -> None:
        for name, st in stats.items():
            if st is not None:
                for memory, count in ((self._served, st.requests_finished), (self._steps, st.training_steps)):
                    memory[name] = Rate.next(memory.get(name), now, count, self.settings.profile_smoothing)

    def _smooth(self, name: str, profile: CapacityProfile) -> CapacityProfile:
        """EMA of each profile point over decisions: one noisy reading must not swing the routing weights."""
        a, previous = self.settings.profile_smoothing, self._smoothed.get(name, {})
        points = {}
        for cap, capacity, training in profile.points:
            old = previous.get(cap)
            points[cap] = (capacity, training) if old is None else (old[0] + a * (capacity - old[0]), old[1] + a * (training - old[1]))
        self._smoothed[name] = points
        return CapacityProfile.from_measurements([(cap, c, t) for cap, (c, t) in points.items()])

    def _planned_load(self, now: float, arrivals: int, forecast: float) -> float:
        """The forecast, bounded by the mean arrival rate seen over the last `load_window_s`.

        The burst predictor jumps to the highest 5-s rate it saw (34 req/s on a 26 req/s trace)
        and allocate() divides by the headroom on top; planning for that with profiles that
        read low cut every cap to 0. The SLO margin is the headroom's job, a sudden rise the
        mixer's (it reacts within iterations), so the plan takes the rate actually arriving.
        Before a window's worth of decisions the forecast stands alone.
        """
        dt = max(0.0, now - self._last_at)
        self._last_at = now
        if dt > 0:
            self._recent.append((dt, arrivals))
        window, seconds, count = self.settings.load_window_s, 0.0, 0
        kept = []
        for span, n in reversed(self._recent):
            if seconds >= window:
                break
            kept.append((span, n))
            seconds, count = seconds + span, count + n
        self._recent = kept[::-1]
        if seconds < min(window, 2 * self.settings.slow_interval_s) - 1e-6:
            return forecast
        return min(forecast, count / seconds)


def keep_caps(allocation: Allocation, states: list[ReplicaState], max_cap: int) -> Allocation:
    """An infeasible coexec plan, with every healthy replica's cap at its maximum.

    allocate() reports overload when even the lowest caps' capacity falls short of the load, and
    then sets every cap to its lowest: training stops cluster-wide, for as long as the profiles
    keep reading low. Cutting caps cannot make an infeasible plan feasible, while the batch mixer
    already drops training within an iteration whenever the SLO is pressed ("fast timescale
    only" scored best in the simulation, docs/scheduling.md). So the caps go back to the maximum
    and the mixer decides; the routing weights stay as planned.
    """
    caps = dict(allocation.caps)
    for r in states:
        if r.healthy:
            caps[r.name] = max(caps.get(r.name, 0), max_cap)
    return replace(allocation, caps=caps)


def profile_over_range(points, max_cap: int) -> CapacityProfile:
    """The agent's measured points as a profile over the plan's cap range.

    The agent measures at fractions of the cap it runs at; while the cap is 0 (inferenceOnly,
    a serving-only replica) all its points sit at cap 0 and the top of the range is a guess: the
    same capacity, training unknown (0 would make training worthless, so 1 token/s).
    """
    profile = CapacityProfile.from_measurements(points)
    if profile.max_cap < max_cap:
        last = profile.points[-1]
        profile = CapacityProfile(profile.points + ((max_cap, last[1], max(last[2], 1.0)),))
    return profile


def within_spread(profiles: dict[str, CapacityProfile], spread: float) -> dict[str, CapacityProfile]:
    """Scale any profile whose top-cap capacity is off the cluster median by more than `spread`x.

    The agents' online profiles start from few iterations: identical replicas were seen 10x
    apart in their first seconds, which would send nearly all traffic to one of them. A real
    difference larger than the spread (a slower GPU) still shows, only bounded.
    """
    if len(profiles) < 2:
        return profiles
    tops = sorted(p.capacity_at(p.max_cap) for p in profiles.values())
    median = tops[len(tops) // 2]
    out = {}
    for name, p in profiles.items():
        top = p.capacity_at(p.max_cap)
        target = min(max(top, median / spread), median * spread)
        factor = target / top if top > 0 else 1.0
        out[name] = p if factor == 1.0 else CapacityProfile(tuple((cap, c * factor, t) for cap, c, t in p.points))
    return out
