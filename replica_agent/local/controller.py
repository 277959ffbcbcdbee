"""The local mode's slow timescale: a thin adapter around the control core's one decision
(collm_control.decide), as the operator's control loop is, run against agents over gRPC.

Every `slow_interval_s` the controller observes (each agent's stats over GetStats, the arrivals
counted since the last tick, its rounds), calls `decide()`, and acts: pushes the plans (ApplyPlan;
`static` sends a fixed training batch) and the routing weights (the router's PUT /admin/weights),
re-publishes the cluster's adapter to replicas behind it, and starts the round the decision
names (RoundDriver) on a thread of its own so that planning goes on while the round trains.

Policies: `coexec` (water-filled caps, weights by capacity), `static` (a fixed training batch on
every replica, equal weights), `separated` (the allocation's training half gets weight 0 and
publishes at round end), `inferenceOnly` (cap 0, no rounds).

Arrivals are counted where requests enter the cluster: `arrivals()` returns the cumulative count
(the router's, in local mode).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import grpc

from collm_control import rounds as R
from collm_control.allocation import POLICIES, Allocation
from collm_control.decide import Actions, Adapter, ControlSettings, Observation, decide, log_decision, next_version
from collm_control.planning import Planner, PlanningSettings
from collm_control.stats import AgentStats
from collm_rpc import tls
from collm_rpc.client import AgentClient, read_stats
from collm_rpc.driver import RoundDriver, StrategyConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControllerSettings:
    policy: str = "coexec"
    slow_interval_s: float = 5.0
    round_interval_s: float = 20.0
    local_steps: int = 10
    round_deadline_s: float = 60.0
    eval_tolerance: float = 0.05  # nats a candidate may be worse than the current adapter
    ttft_ms: int = 1000
    tpot_ms: int = 100
    max_cap_tokens: int = 128  # the highest training cap a plan may give (the agents' train_cap_tokens)
    headroom: float = 0.9
    min_participants: int = 1
    participation_fraction: float = 1.0
    strategy: StrategyConfig = StrategyConfig()
    prior_rps: float = 10.0  # capacity guessed for a replica with no measured profile yet
    profile_smoothing: float = 0.3  # EMA weight of a new profile reading (the agents' online profiles are noisy)
    profile_spread: float = 2.0  # a replica's capacity is kept within [1/x, x] of the cluster median
    rpc_timeout_s: float = 10.0
    load_window_s: float = 15.0  # the load fed to allocate() is at most the mean arrival rate over this window
    overload_keeps_caps: bool = True  # an infeasible plan leaves the caps at their maximum for the mixer to cut
    round_min_cap: int = 16  # while a round runs, its participants' caps stay at least this (else it waits out its deadline)
    min_round_deadline_s: float = 10.0  # a deadline shortened to fit the run is never shorter than this
    slow_timescale: bool = True  # ablations (ControlSettings): without the slow timescale's plan ...
    fast_timescale: bool = True  # ... or without the agents' per-iteration batch mix
    home_caps: bool = True  # coexec: each replica's cap from its own users' load

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown scheduling policy {self.policy!r}; use one of {', '.join(POLICIES)}")
        if self.slow_interval_s <= 0 or self.round_interval_s <= 0:
            raise ValueError("slow_interval_s and round_interval_s must be positive numbers of seconds")

    def planning(self) -> PlanningSettings:
        """The slow-timescale settings, as the operator's Planner takes them."""
        names = PlanningSettings.__dataclass_fields__
        return PlanningSettings(**{k: v for k, v in self.__dict__.items() if k in names})

    def control(self) -> ControlSettings:
        """The decision's settings (rounds every round_interval_s, never under inferenceOnly)."""
        return ControlSettings(
            policy=self.policy,
            round_interval_s=self.round_interval_s,
            min_participants=self.min_participants,
            local_steps=self.local_steps,
            round_deadline_s=self.round_deadline_s,
            slow_timescale=self.slow_timescale,
            fast_timescale=self.fast_timescale,
        )


@dataclass
class Tick:
    """One slow-timescale decision, as recorded for reports."""

    at: float
    arrivals: int
    predicted_load: float  # the load allocate() planned for (the forecast, bounded by the observed rate)
    caps: dict[str, int]
    weights: dict[str, float]
    participants: tuple[str, ...]
    aggregator: str | None
    overloaded: bool
    healthy: dict[str, bool]
    forecast: float = 0.0  # the predictor's raw forecast
    capacity: float = 0.0  # the plan's SLO-sustainable req/s at its caps, by the profiles
    profiles: dict[str, list] = field(default_factory=dict)  # the (smoothed) profile each replica was planned with
    republished: list[str] = field(default_factory=list)  # replicas the cluster's adapter was re-published to

    def as_dict(self) -> dict:
        return {**self.__dict__, "participants": list(self.participants)}


@dataclass
class RoundRecord:
    number: int  # the cluster version it publishes as (collm_control.decide.next_version)
    round_id: str
    participants: tuple[str, ...]
    aggregator: str
    started_at: float
    state: dict | None = None  # RoundState.to_dict() once finished
    error: str | None = None

    @property
    def finished_at(self) -> float | None:
        return (self.state or {}).get("finishedAt")

    def summary(self) -> dict:
        s = self.state or {}
        return {
            "number": self.number,
            "round_id": self.round_id,
            "participants": list(self.participants),
            "aggregator": self.aggregator,
            "started_at": self.started_at,
            "finished_at": s.get("finishedAt"),
            "result": s.get("result") or ("Error" if self.error else "Running"),
            "eval_loss_before": s.get("evalLossBefore"),
            "eval_loss_after": s.get("evalLossAfter"),
            "freshness_s": s.get("freshnessS"),
            "version_sha256": s.get("versionSha256", ""),
            "error": self.error,
        }


@dataclass
class ControllerHistory:
    ticks: list[Tick] = field(default_factory=list)
    rounds: list[RoundRecord] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Controller:
    def __init__(
        self,
        addresses: Mapping[str, str],
        *,
        set_weights: Callable[[dict[str, float], bool], None],  # (routing weights, home affinity)
        arrivals: Callable[[], int],
        settings: ControllerSettings = ControllerSettings(),
        clock: Callable[[], float] = time.time,
        credentials: tls.Credentials | None = None,
    ) -> None:
        """`credentials`: the operator's certificate, for agents that serve with mutual TLS."""
        if not addresses:
            raise ValueError("the controller needs at least one agent (name -> gRPC host:port)")
        self.addresses, self.settings = dict(addresses), settings
        self.set_weights, self.arrivals, self.clock = set_weights, arrivals, clock
        self.credentials = credentials
        self.clients = {name: AgentClient(address, timeout=settings.rpc_timeout_s, credentials=credentials) for name, address in self.addresses.items()}
        self.planner = Planner(settings.planning(), now=clock())
        self.history = ControllerHistory()
        self.allocation: Allocation | None = None
        self.stats: dict[str, AgentStats | None] = {}
        self._arrivals_seen = arrivals()
        self.run_until: float | None = None  # when the traffic ends, if known (plan_run): rounds should finish before it
        self.run_s: float = 0.0
        self._last_round_at = clock()
        self.published: Adapter | None = None  # the newest adapter a round of this controller published
        self.actions: Actions | None = None  # the last decision
        self._driver: RoundDriver | None = None
        self._round_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.decision_log = os.environ.get("COLLM_DECISION_LOG") or None  # as the operator's: decide()'s inputs, JSON lines

    # -- one slow-timescale step --------------------------------------------------------------
    def read_stats(self) -> dict[str, AgentStats | None]:
        return read_stats(self.clients, self.history.errors.append)

    def tick(self) -> Tick:
        """Observe, decide, act (everything but starting the round: step() does that)."""
        now = self.clock()
        total = self.arrivals()
        arrivals, self._arrivals_seen = max(0, total - self._arrivals_seen), total
        self.stats = {k: v for k, v in self.read_stats().items()}
        s = self.settings
        running = self.round_running
        driver = self._driver
        observation = Observation(
            now=now,
            arrivals=arrivals,
            stats=self.stats,
            published=self.published,
            round_participants=self.history.rounds[-1].participants if running and self.history.rounds else (),
            round_running=running,
            round_publishing=running and driver is not None and driver.state.stage is R.Condition.PUBLISHED,
            last_round_at=self._last_round_at,
            rounds_started=len(self.history.rounds),
        )
        if self.decision_log:
            log_decision(self.decision_log, self.planner, observation, s.control(), f"local:{s.policy}")
        actions = self.actions = decide(self.planner, observation, s.control())
        decision = actions.plan
        if decision is None:  # no agent could be read: nothing to plan with
            raise RuntimeError("no agent answered GetStats")
        allocation = self.allocation = decision.allocation
        for name, client in self.clients.items():
            try:
                client.apply_plan(actions.cap(name), s.ttft_ms, s.tpot_ms, fixed_training=actions.fixed_training)
            except grpc.RpcError as exc:
                self.history.errors.append(f"{name}: ApplyPlan failed: {exc.code().name}")
        try:
            self.set_weights(dict(allocation.weights), decision.affinity)
        except Exception as exc:  # a router restart must not stop planning; the next tick retries
            self.history.errors.append(f"routing weights not applied: {exc}")
        self._republish(actions)
        states = decision.states
        tick = Tick(
            now,
            arrivals,
            decision.predicted_load,
            dict(allocation.caps),
            dict(allocation.weights),
            allocation.participants,
            allocation.aggregator,
            allocation.overloaded,
            {r.name: r.healthy for r in states},
            decision.forecast,
            allocation.capacity,
            {r.name: [list(p) for p in r.profile.points] for r in states},
            list(actions.republish),
        )
        self.history.ticks.append(tick)
        return tick

    def _republish(self, actions: Actions) -> None:
        """Replicas behind the cluster's adapter (a restarted one, one a round could not reach) get it back."""
        adapter, source = actions.adapter, actions.republish_source
        if adapter is None or source is None:
            return
        loss = float(adapter.eval_loss) if adapter.eval_loss else None
        for name in actions.republish:
            try:
                self.clients[name].republish(adapter.sha256, source=self.addresses[source], cluster_version=adapter.version, eval_loss=loss)
            except grpc.RpcError as exc:
                self.history.errors.append(f"{name}: re-publishing {adapter.sha256[:12]} failed: {exc.code().name}")

    def plan_run(self, started_at: float, duration_s: float) -> None:
        """The traffic runs from `started_at` for `duration_s`: round deadlines are fitted into it."""
        self.run_until, self.run_s = started_at + duration_s, max(0.0, duration_s)

    # -- rounds -------------------------------------------------------------------------------
    @property
    def round_running(self) -> bool:
        return self._round_thread is not None and self._round_thread.is_alive()

    def start_round(self, choice) -> RoundRecord | None:
        """Start the round the decision chose (None when the run is about to end)."""
        s = self.settings
        replicas = tuple(sorted(n for n, healthy in self.history.ticks[-1].healthy.items() if healthy))
        deadline = s.round_deadline_s
        if self.run_until is not None:
            # A round that runs into the end of the traffic publishes an adapter nobody is served
            # with: give it a third of the remaining run (at least min_round_deadline_s), and
            # start none in the run's last quarter.
            remaining = self.run_until - self.clock()
            if remaining < self.run_s / 4:
                return None
            deadline = min(deadline, max(s.min_round_deadline_s, remaining / 3))
        # The version it publishes as, numbered as the operator numbers it (every round claims one).
        number = next_version(self.stats, [self.published.version if self.published else 0, *(r.number for r in self.history.rounds)])
        spec = R.RoundSpec(
            round_id=f"local-{int(self.clock())}-{number}",
            replicas=replicas,
            participants=choice.participants,
            aggregator=choice.aggregator,
            local_steps=s.local_steps,
            deadline_s=deadline,
            min_participants=max(1, min(s.min_participants, len(choice.participants))),
            eval_tolerance=s.eval_tolerance,
        )
        record = RoundRecord(number, spec.round_id, spec.participants, spec.aggregator, self.clock())
        self.history.rounds.append(record)
        driver = self._driver = RoundDriver(
            spec, self.addresses, strategy=s.strategy, round_number=number, rpc_timeout_s=max(30.0, s.rpc_timeout_s), credentials=self.credentials
        )

        def run() -> None:
            try:
                state = driver.run(timeout_s=deadline + 120)
                record.state = state.to_dict()
                if state.result is R.Result.SUCCEEDED and state.version_sha256:
                    after = state.eval_loss_after
                    self.published = Adapter(number, state.version_sha256, spec.round_id, f"{after:.4f}" if after is not None else None)
            except Exception as exc:  # reported in the history; the next round starts afresh
                record.error = f"{type(exc).__name__}: {exc}"
                log.warning("round %s: %s", spec.round_id, record.error)

        self._round_thread = threading.Thread(target=run, name=f"collm-round-{number}", daemon=True)
        self._round_thread.start()
        self._last_round_at = self.clock()
        return record

    # -- loop ---------------------------------------------------------------------------------
    def step(self) -> None:
        self.tick()
        if self.actions is not None and self.actions.round is not None:
            self.start_round(self.actions.round)

    def start(self) -> Controller:
        self.tick()  # plans and weights before traffic starts
        self._thread = threading.Thread(target=self._run, name="collm-controller", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.settings.slow_interval_s):
            try:
                self.step()
            except Exception as exc:  # keep planning; the history says what went wrong
                self.history.errors.append(f"slow-timescale step failed: {type(exc).__name__}: {exc}")
                log.exception("slow-timescale step failed")

    def stop(self, *, wait_round_s: float = 120.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        if self._round_thread is not None:
            self._round_thread.join(wait_round_s)
        for client in self.clients.values():
            client.close()
