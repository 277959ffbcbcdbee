"""The slow timescale of one CollmCluster, level-based: every `slowIntervalSeconds` the daemon calls
`ClusterController.step(body)`, a thin adapter around the control core's one decision
(collm_control.decide, which the local mode runs too). It

1. observes the StatefulSet, its pods, the router and the cluster's rounds (from kopf's indexes in
   the operator, from the API in tests and tools: observers.py), and reads every agent's stats
   over gRPC;
2. decides (load prediction, allocation, laggards, the round to start) and pushes the plans
   (ApplyPlan: training cap and SLO) to the agents and the routing weights to the router pods;
3. re-publishes the cluster's current adapter to any agent that serves an older one (a restarted or
   new pod gets it back without anyone acting); the current adapter is the newest one a round of
   this cluster published, or, before any round, the one every agent agrees on;
4. creates the next AdapterRound when `roundIntervalSeconds` passed and none is running, and
   prunes finished scheduled rounds beyond `roundHistoryLimit`;
5. writes allocation, goodput, SLO attainment, ready replicas and the conditions into status.

Nothing is remembered that cannot be rebuilt from the API and the agents, except the planner's
smoothing and the request counters' last readings (a restart costs one interval of goodput figures).
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import grpc

from collm_control import rounds as R
from collm_control.decide import Actions, Adapter, ControlSettings, Observation, decide, log_decision, served_adapter
from collm_control.planning import Planner, PlanningSettings
from collm_control.stats import AgentStats
from collm_operator import api, objects, privacy_budget
from collm_operator.agents import AgentPool, grpc_addresses
from collm_operator.certificates import admin_token, operator_credentials
from collm_operator.conditions import TRUE, Reason, get_condition
from collm_operator.kube import Kube
from collm_operator.observers import ApiObserver, Observer
from collm_operator.reconcile import Health, cluster_conditions
from collm_operator.round_control import finished
from collm_rpc import tls
from collm_rpc.client import plan_message

log = logging.getLogger(__name__)
SECRET_REREAD_S = 60.0  # a Secret changes only when someone (or cert-manager, when renewing) replaces it
T = TypeVar("T")

SLO_WINDOW_S = 60.0
Event = Callable[[str, str, str], None]  # (type, reason, message)


def published_adapter(status: Mapping[str, Any], rounds: list[dict]) -> Adapter | None:
    """The newest adapter this cluster's rounds published: the status' adapter or a succeeded round's result."""
    best = None
    a = status.get("adapter") or {}
    if a.get("sha256"):
        best = Adapter(int(a.get("version") or 0), a["sha256"], a.get("round") or "", a.get("evalLoss"))
    for r in rounds:
        s = r.get("status") or {}
        summary = get_condition(s.get("conditions"), "Succeeded")
        if summary and summary.get("status") == TRUE and s.get("sha256") and int(s.get("version") or 0) > (best.version if best else -1):
            best = Adapter(int(s["version"]), s["sha256"], r["metadata"]["name"], s.get("evalLossAfter"))
    return best


class Reread(Generic[T]):
    """A value read from a Secret, read again at most every SECRET_REREAD_S, and at every call while
    `missing(value)` (a Secret not created yet)."""

    def __init__(self, missing: Callable[[T], bool]) -> None:
        self.missing = missing
        self._read: tuple[float, T] | None = None  # (read at, value)

    def get(self, read: Callable[[], T]) -> T:
        now = time.monotonic()
        if self._read is None or self.missing(self._read[1]) or now - self._read[0] > SECRET_REREAD_S:
            self._read = (now, read())
        return self._read[1]


class ClusterController:
    """`observer`: where a step reads the workloads and rounds (default: the API through `kube`;
    the operator passes one that reads kopf's indexes). `kube` writes: status, rounds, Secrets read."""

    def __init__(
        self,
        kube: Kube,
        *,
        observer: Observer | None = None,
        event: Event | None = None,
        pool: AgentPool | None = None,
        clock: Callable[[], float] = time.time,
        decision_log: str | None = None,
    ) -> None:
        self.kube, self.clock = kube, clock
        self.observer = observer or ApiObserver(kube)
        self.decision_log = decision_log  # a file each step appends what decide() was given to (JSON lines)
        self.event = event or (lambda *_: None)
        self.pool = pool or AgentPool()
        self.planner: Planner | None = None
        self._planning: PlanningSettings | None = None
        self._counters: dict[str, tuple[int, int]] = {}  # agent -> (finished, met SLO) at the last reading
        self._window: deque[tuple[float, int, int]] = deque()  # (time, finished, met) per step
        self._over_budget = False  # the privacy budget stopped rounds (warned once per change)
        self._token: Reread[str | None] = Reread(lambda token: token is None)  # the cluster's admin token
        # A cert-manager certificate (`own` until issued); one object from read to read also keeps the pool's channels.
        self._credentials: Reread[tls.Credentials | None] = Reread(lambda creds: creds is self.pool.credentials)

    def close(self) -> None:
        self.pool.close()

    # -- the step -----------------------------------------------------------------------------
    def step(self, body: Mapping[str, Any]) -> float:
        """One slow-timescale pass; returns the seconds until the next one."""
        try:
            cluster = api.parse_cluster(body)
        except api.SpecError:
            return 10.0  # the reconcile handler reports it; nothing runs on an invalid spec
        status = dict(body.get("status") or {})
        now = self.clock()
        self.pool.active = self._operator_credentials(cluster)
        workloads = self.observer.workloads(cluster)
        names = objects.replica_names(cluster)
        addresses = grpc_addresses(cluster, workloads.pods, [n for n in names if n in workloads.pods])
        stats = self.pool.stats(addresses)
        self.pool.forget(stats)
        arrivals, finished_n, met_n = self._count_requests(now, stats)
        rounds = self.observer.rounds(cluster)
        running = [r for r in rounds if not finished(r.get("status"))]
        in_round = tuple(p for r in running for p in (((r.get("status") or {}).get("state") or {}).get("spec") or {}).get("participants") or ())

        f = cluster.spec.federation
        since = status.get("lastRoundTime") or body["metadata"].get("creationTimestamp")
        observation = Observation(
            now=now,
            arrivals=arrivals,
            stats=stats,
            published=published_adapter(status, rounds),
            round_participants=in_round,
            round_running=bool(running),
            round_publishing=any(_stage(r) is R.Condition.PUBLISHED for r in running),
            last_round_at=_parse_time(since) if since else None,
            rounds_started=int(status.get("roundsCreated") or 0),
        )
        over_budget = privacy_budget.refusal(cluster, status)
        if over_budget is not None and not self._over_budget:
            self.event("Warning", Reason.PRIVACY_BUDGET_SPENT, over_budget)
        self._over_budget = over_budget is not None
        settings = ControlSettings(
            policy=cluster.spec.scheduling.policy,
            federation=f.enabled and over_budget is None,
            round_interval_s=float(f.round_interval_seconds),
            min_participants=f.min_participants,
            secure_aggregation=f.secure_aggregation,
            local_steps=f.local_steps,
            round_deadline_s=float(f.deadline_seconds),
        )
        planner = self._planner(cluster, now)
        if self.decision_log:
            log_decision(self.decision_log, planner, observation, settings, f"operator:{cluster.namespace}/{cluster.name}")
        actions = decide(planner, observation, settings)
        reachable = {n: st for n, st in stats.items() if st is not None}
        if actions.plan is not None:
            self._push_plans(cluster, actions, addresses, reachable)
            self._push_weights(cluster, actions, workloads.router_ips)
        adapter = actions.adapter
        if actions.republish and adapter is not None and actions.republish_source is not None:
            self._republish(adapter, actions.republish, actions.republish_source, addresses)

        patch: dict[str, Any] = {}
        if f.noise_multiplier and "privacy" not in status:  # epsilon 0 and the rounds the budget allows, before any round
            patch["privacy"] = privacy_budget.figures(cluster, privacy_budget.ledger(status))
        if actions.round is not None:
            patch.update(self._create_round(cluster, actions, now))
        self._prune(cluster, rounds)

        slo_attainment = met_n / finished_n if finished_n else None
        health = Health(
            reachable=frozenset(reachable),
            laggards=actions.republish,
            slo_attainment=slo_attainment,
            slo_requests=finished_n,
            adapter_lost=f"no serving replica holds adapter version {adapter.version} ({adapter.sha256[:12]}) any more; the next round publishes a new one"
            if adapter is not None and actions.adapter_lost
            else "",
            training=actions.training,
            with_data=sum(1 for st in reachable.values() if st.has_data),
            state_errors=tuple(f"{n}: {st.state_error}" for n, st in sorted(reachable.items()) if st.state_error),
        )
        judgement = cluster_conditions(status.get("conditions"), cluster, workloads, health, datetime.fromtimestamp(now, UTC))
        patch.update(
            {
                "observedGeneration": cluster.generation,
                "conditions": judgement.conditions,
                "readyReplicas": judgement.ready_replicas,
                "sloAttainment": f"{slo_attainment:.3f}" if slo_attainment is not None else None,
                "goodput": self._goodput(finished_n, met_n, reachable),
            }
        )
        if adapter is not None:
            patch["adapter"] = adapter.as_status()
        if cluster.spec.cloud_edge.enabled:
            patch["edgeSessions"] = sum(st.edge_sessions for st in reachable.values())
        if actions.plan is not None:
            a = actions.plan.allocation
            allocation = {n: {"trainCapTokens": actions.cap(n), "weight": f"{a.weights.get(n, 0.0):.3f}", **served_adapter(reachable[n])} for n in reachable}
            gone = {n: None for n in status.get("allocation") or {} if n not in allocation}  # scaled away or unreachable
            patch["allocation"] = {**allocation, **gone} if status.get("allocation") != allocation else allocation
        self._announce(status, patch)
        # Only what changed: a key written meanwhile by a round (status.adapter) is not overwritten
        # with the value this step read before it.
        changed = {k: v for k, v in patch.items() if status.get(k) != v}
        if changed:
            self.kube.patch_status(api.API_VERSION, api.CLUSTER_KIND, cluster.namespace, cluster.name, changed)
        return float(cluster.spec.scheduling.slow_interval_seconds)

    # -- pieces ---------------------------------------------------------------------------------
    def _planner(self, cluster: api.Cluster, now: float) -> Planner:
        spec = cluster.spec
        settings = PlanningSettings(
            policy=spec.scheduling.policy,
            slow_interval_s=float(spec.scheduling.slow_interval_seconds),
            max_cap_tokens=spec.training.train_cap_tokens,
            min_participants=spec.federation.min_participants,
            participation_fraction=spec.federation.participation_percent / 100,
        )
        if self.planner is None or settings != self._planning:
            self.planner, self._planning = Planner(settings, now=now), settings
        return self.planner

    def _count_requests(self, now: float, stats: Mapping[str, AgentStats | None]) -> tuple[int, int, int]:
        """Arrivals since the last step, and finished / SLO-met requests over the SLO window."""
        new_finished = new_met = 0
        for name, st in stats.items():
            if st is None:
                continue
            f, m = st.requests_finished, st.requests_met_slo
            old_f, old_m = self._counters.get(name, (f, m))
            if f < old_f:  # the agent restarted: its counters began again
                old_f, old_m = 0, 0
            new_finished, new_met = new_finished + f - old_f, new_met + m - old_m
            self._counters[name] = (f, m)
        self._window.append((now, new_finished, new_met))
        while self._window and now - self._window[0][0] > SLO_WINDOW_S:
            self._window.popleft()
        return new_finished, sum(w[1] for w in self._window), sum(w[2] for w in self._window)

    def _goodput(self, finished_n: int, met_n: int, reachable: Mapping[str, AgentStats]) -> str | None:
        """F x Q over the window: SLO-met requests per second x 1 / mean held-out loss (None without a loss)."""
        losses = [st.eval_loss for st in reachable.values() if st.eval_loss]
        if not losses or len(self._window) < 2:
            return None
        seconds = max(1e-9, self._window[-1][0] - self._window[0][0])
        return f"{met_n / seconds / (sum(losses) / len(losses)):.3g}"

    def _push_plans(self, cluster: api.Cluster, actions: Actions, addresses: Mapping[str, str], reachable: Mapping[str, AgentStats]) -> None:
        s = cluster.spec
        plans = {
            name: plan_message(actions.cap(name), s.serving.ttft_milliseconds, s.serving.tpot_milliseconds, fixed_training=actions.fixed_training)
            for name in reachable
        }
        for name, code in self.pool.apply_plans(plans, addresses, reachable).items():
            log.info("ApplyPlan to %s failed: %s", name, code)

    def _admin_token(self, cluster: api.Cluster) -> str | None:
        return self._token.get(lambda: admin_token(self.kube, cluster))

    def _operator_credentials(self, cluster: api.Cluster) -> tls.Credentials | None:
        """What the pool presents to this cluster's agents; only a cert-manager certificate is read (from its Secret)."""
        if cluster.spec.security.mutual_tls and cluster.spec.security.cert_manager_issuer is not None:
            return self._credentials.get(lambda: operator_credentials(self.kube, cluster, self.pool.credentials))
        return operator_credentials(self.kube, cluster, self.pool.credentials)

    def _push_weights(self, cluster: api.Cluster, actions: Actions, router_ips: tuple[str, ...]) -> None:
        assert actions.plan is not None
        body = json.dumps({"weights": dict(actions.plan.allocation.weights), "affinity": actions.plan.affinity}).encode()
        headers = {"Content-Type": "application/json"}
        token = self._admin_token(cluster)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        for ip in router_ips:
            request = urllib.request.Request(f"http://{ip}:{objects.ROUTER_PORT}/admin/weights", data=body, method="PUT", headers=headers)
            try:
                urllib.request.urlopen(request, timeout=3).close()
            except (urllib.error.URLError, OSError) as exc:
                log.info("routing weights not pushed to the router at %s: %s", ip, exc)

    def _republish(self, adapter: Adapter, behind: tuple[str, ...], source: str, addresses: Mapping[str, str]) -> None:
        loss = float(adapter.eval_loss) if adapter.eval_loss else None
        for name in behind:
            try:
                self.pool.client(name, addresses[name]).republish(adapter.sha256, source=addresses[source], cluster_version=adapter.version, eval_loss=loss)
                self.event("Normal", "AdapterRestored", f"{name} serves adapter version {adapter.version} ({adapter.sha256[:12]}) again")
            except grpc.RpcError as exc:
                log.info("re-publishing %s to %s failed: %s", adapter.sha256[:12], name, exc.code().name)

    def _create_round(self, cluster: api.Cluster, actions: Actions, now: float) -> dict[str, Any]:
        """The AdapterRound the decision chose; the status keys that remember it."""
        choice = actions.round
        assert choice is not None
        obj = objects.build_round(cluster, choice.number, list(choice.participants), choice.aggregator)
        created = self.kube.create(obj)
        name = obj["metadata"]["name"]
        if created is not None:
            self.event("Normal", "RoundCreated", f"{name}: {len(choice.participants)} participants")
        return {"roundsCreated": choice.number, "lastRound": name, "lastRoundTime": _format_time(now)}

    def _prune(self, cluster: api.Cluster, rounds: list[dict]) -> None:
        """Delete finished scheduled rounds beyond roundHistoryLimit (oldest first); hand-made ones stay."""
        scheduled = [r for r in rounds if (r["metadata"].get("labels") or {}).get(objects.SCHEDULED_LABEL) == "true" and finished(r.get("status"))]
        scheduled.sort(key=lambda r: (r["metadata"].get("creationTimestamp") or "", r["metadata"]["name"]))
        excess = len(scheduled) - cluster.spec.federation.round_history_limit
        for r in scheduled[: max(0, excess)]:
            self.kube.delete(api.API_VERSION, api.ROUND_KIND, cluster.namespace, r["metadata"]["name"])

    def _announce(self, status: Mapping[str, Any], patch: Mapping[str, Any]) -> None:
        """An Event when the Ready condition changes."""
        old = get_condition(status.get("conditions"), "Ready") or {}
        new = get_condition(patch.get("conditions"), "Ready") or {}
        if new and (old.get("status"), old.get("reason")) != (new.get("status"), new.get("reason")):
            kind = "Normal" if new["status"] == TRUE else "Warning"
            self.event(kind, new.get("reason") or "Ready", new.get("message") or f"Ready is {new['status']}")


def _stage(round_obj: Mapping[str, Any]) -> R.Condition | None:
    """The stage a running round works on, from the state it persisted (None before it started)."""
    saved = (round_obj.get("status") or {}).get("state")
    return R.RoundState.from_dict(saved).stage if saved else None


def _parse_time(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def _format_time(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
