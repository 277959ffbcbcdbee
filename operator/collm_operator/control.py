"""The slow timescale of one CollmCluster, level-based: every `slowIntervalSeconds` the daemon calls
`ClusterController.step(body)`, which

1. observes the StatefulSet, its pods and the router, and reads every agent's stats over gRPC;
2. plans (collm_operator.planning: load prediction + allocation) and pushes the plans (ApplyPlan:
   training cap and SLO) to the agents and the routing weights to the router pods;
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
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc

from collm_operator import api, objects
from collm_operator.agents import AgentPool, grpc_addresses
from collm_operator.conditions import TRUE, get_condition
from collm_operator.kube import Kube
from collm_operator.planning import Decision, Planner, PlanningSettings
from collm_operator.reconcile import Health, cluster_conditions, observe_workloads
from collm_operator.round_control import finished
from replica_agent.federated import rounds as R
from replica_agent.proto import collm_pb2 as pb

log = logging.getLogger(__name__)

SLO_WINDOW_S = 60.0
Event = Callable[[str, str, str], None]  # (type, reason, message)


@dataclass(frozen=True)
class Adapter:
    version: int
    sha256: str
    round: str = ""
    eval_loss: str | None = None

    def as_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version, "sha256": self.sha256, "round": self.round}
        if self.eval_loss is not None:
            out["evalLoss"] = self.eval_loss
        return out


def current_adapter(status: Mapping[str, Any], rounds: list[dict], stats: Mapping[str, dict | None]) -> Adapter | None:
    """The newest of: the status' adapter, the succeeded rounds' results; else what every agent serves."""
    best = None
    a = status.get("adapter") or {}
    if a.get("sha256"):
        best = Adapter(int(a.get("version") or 0), a["sha256"], a.get("round") or "", a.get("evalLoss"))
    for r in rounds:
        s = r.get("status") or {}
        summary = get_condition(s.get("conditions"), "Succeeded")
        if summary and summary.get("status") == TRUE and s.get("sha256") and int(s.get("version") or 0) > (best.version if best else -1):
            best = Adapter(int(s["version"]), s["sha256"], r["metadata"]["name"], s.get("evalLossAfter"))
    if best is not None:
        return best
    rests_on = {global_adapter(st).get("sha256") for st in stats.values() if st}
    if len(rests_on) == 1 and None not in rests_on and all(st is not None for st in stats.values()) and stats:
        return Adapter(0, rests_on.pop())
    return None


def global_adapter(stats: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The global adapter an agent rests on (it may serve a local revision on top of it)."""
    return (stats or {}).get("global_adapter") or {}


def served_adapter(stats: Mapping[str, Any]) -> dict[str, str]:
    """The adapter an agent serves, as status shows it: `<cluster version>.<local revision>` and sha256."""
    served = stats.get("adapter") or {}
    return {"adapter": str(served["version"]), "adapterSha256": served.get("sha256", "")} if served.get("version") is not None else {}


def laggards(adapter: Adapter | None, stats: Mapping[str, dict | None]) -> list[str]:
    """Agents resting on a global adapter older than the current one (never a newer one: a round may be
    publishing). A local revision on top of the current global is not lagging: it is that global plus
    what the replica learnt since."""
    if adapter is None:
        return []
    out = []
    for name, st in stats.items():
        rests_on = global_adapter(st)
        if st is not None and rests_on.get("sha256") != adapter.sha256 and int(rests_on.get("cluster_version") or 0) < max(adapter.version, 1):
            out.append(name)
    return sorted(out)


class ClusterController:
    def __init__(self, kube: Kube, *, event: Event | None = None, pool: AgentPool | None = None, clock: Callable[[], float] = time.time) -> None:
        self.kube, self.clock = kube, clock
        self.event = event or (lambda *_: None)
        self.pool = pool or AgentPool()
        self.planner: Planner | None = None
        self._planning: PlanningSettings | None = None
        self._counters: dict[str, tuple[int, int]] = {}  # agent -> (finished, met SLO) at the last reading
        self._window: deque[tuple[float, int, int]] = deque()  # (time, finished, met) per step

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
        workloads = observe_workloads(self.kube, cluster)
        names = objects.replica_names(cluster)
        addresses = grpc_addresses(cluster, workloads.pods, [n for n in names if n in workloads.pods])
        stats = self.pool.stats(addresses)
        self.pool.forget(stats)
        arrivals, finished_n, met_n = self._count_requests(now, stats)
        rounds = self.kube.list(api.API_VERSION, api.ROUND_KIND, cluster.namespace, f"{objects.CLUSTER_LABEL}={cluster.name}")
        running = [r for r in rounds if not finished(r.get("status"))]
        in_round = tuple(p for r in running for p in (((r.get("status") or {}).get("state") or {}).get("spec") or {}).get("participants") or ())

        planner = self._planner(cluster, now)
        reachable = {n: st for n, st in stats.items() if st is not None}
        decision = planner.plan(now, arrivals, reachable, round_participants=in_round) if reachable else None
        if decision is not None:
            self._push_plans(cluster, decision, addresses, reachable)
            self._push_weights(cluster, decision)

        adapter = current_adapter(status, rounds, stats)
        holders = [n for n, st in stats.items() if st and global_adapter(st).get("sha256") == (adapter.sha256 if adapter else None)]
        lost = adapter is not None and adapter.version > 0 and bool(reachable) and not holders
        # While a round publishes, the agents switch to its version one by one: a re-publish of the
        # previous version racing that would roll one back, so it waits for the round to end.
        publishing = any(_stage(r) is R.Condition.PUBLISHED for r in running)
        behind = [] if lost or publishing else laggards(adapter, stats)
        if behind:
            self._republish(adapter, behind, holders, addresses)

        patch: dict[str, Any] = {}
        created = self._schedule_round(cluster, body, status, running, decision, reachable, now)
        if created is not None:
            patch.update(created)
        self._prune(cluster, rounds)

        slo_attainment = met_n / finished_n if finished_n else None
        health = Health(
            reachable=frozenset(reachable),
            laggards=tuple(behind),
            slo_attainment=slo_attainment,
            slo_requests=finished_n,
            adapter_lost=f"no serving replica holds adapter version {adapter.version} ({adapter.sha256[:12]}) any more; the next round publishes a new one"
            if lost
            else "",
            training=tuple(sorted(n for n in reachable if decision and decision.cap(n) > 0 and reachable[n].get("eval_loss") is not None)),
            with_data=sum(1 for st in reachable.values() if st.get("eval_loss") is not None),
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
        if decision is not None:
            a = decision.allocation
            allocation = {n: {"trainCapTokens": decision.cap(n), "weight": f"{a.weights.get(n, 0.0):.3f}", **served_adapter(reachable[n])} for n in reachable}
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

    def _count_requests(self, now: float, stats: Mapping[str, dict | None]) -> tuple[int, int, int]:
        """Arrivals since the last step, and finished / SLO-met requests over the SLO window."""
        new_finished = new_met = 0
        for name, st in stats.items():
            if st is None:
                continue
            f, m = int(st.get("requests_finished") or 0), int(st.get("requests_met_slo") or 0)
            old_f, old_m = self._counters.get(name, (f, m))
            if f < old_f:  # the agent restarted: its counters began again
                old_f, old_m = 0, 0
            new_finished, new_met = new_finished + f - old_f, new_met + m - old_m
            self._counters[name] = (f, m)
        self._window.append((now, new_finished, new_met))
        while self._window and now - self._window[0][0] > SLO_WINDOW_S:
            self._window.popleft()
        return new_finished, sum(w[1] for w in self._window), sum(w[2] for w in self._window)

    def _goodput(self, finished_n: int, met_n: int, reachable: Mapping[str, dict]) -> str | None:
        """F x Q over the window: SLO-met requests per second x 1 / mean held-out loss (None without a loss)."""
        losses = [st["eval_loss"] for st in reachable.values() if st.get("eval_loss")]
        if not losses or len(self._window) < 2:
            return None
        seconds = max(1e-9, self._window[-1][0] - self._window[0][0])
        return f"{met_n / seconds / (sum(losses) / len(losses)):.3g}"

    def _push_plans(self, cluster: api.Cluster, decision: Decision, addresses: Mapping[str, str], reachable: Mapping[str, dict]) -> None:
        s = cluster.spec
        for name in reachable:
            try:
                self.pool.client(name, addresses[name]).apply_plan(
                    decision.cap(name), s.serving.ttft_milliseconds, s.serving.tpot_milliseconds, fixed_training=s.scheduling.policy == "static"
                )
            except grpc.RpcError as exc:
                log.info("ApplyPlan to %s failed: %s", name, exc.code().name)

    def _push_weights(self, cluster: api.Cluster, decision: Decision) -> None:
        selector = ",".join(f"{k}={v}" for k, v in objects.selector(cluster, objects.ROUTER).items())
        body = json.dumps({"weights": dict(decision.allocation.weights), "affinity": decision.affinity}).encode()
        for pod in self.kube.list("v1", "Pod", cluster.namespace, selector):
            ip = (pod.get("status") or {}).get("podIP")
            if not ip:
                continue
            request = urllib.request.Request(
                f"http://{ip}:{objects.ROUTER_PORT}/admin/weights", data=body, method="PUT", headers={"Content-Type": "application/json"}
            )
            try:
                urllib.request.urlopen(request, timeout=3).close()
            except (urllib.error.URLError, OSError) as exc:
                log.info("routing weights not pushed to %s: %s", pod["metadata"]["name"], exc)

    def _republish(self, adapter: Adapter, behind: list[str], sources: list[str], addresses: Mapping[str, str]) -> None:
        loss = float(adapter.eval_loss) if adapter.eval_loss else None
        for name in behind:
            request = pb.PublishRequest(
                round_id=f"republish-{adapter.sha256[:12]}",
                sha256=adapter.sha256,
                source=addresses[sources[0]],
                cluster_version=adapter.version,
                eval_loss=loss or 0.0,
                has_eval_loss=loss is not None,
            )
            try:
                self.pool.client(name, addresses[name]).publish(request)
                self.event("Normal", "AdapterRestored", f"{name} serves adapter version {adapter.version} ({adapter.sha256[:12]}) again")
            except grpc.RpcError as exc:
                log.info("re-publishing %s to %s failed: %s", adapter.sha256[:12], name, exc.code().name)

    def _schedule_round(
        self,
        cluster: api.Cluster,
        body: Mapping[str, Any],
        status: Mapping[str, Any],
        running: list[dict],
        decision: Decision | None,
        reachable: Mapping[str, dict],
        now: float,
    ) -> dict[str, Any] | None:
        f = cluster.spec.federation
        if not f.enabled or cluster.spec.scheduling.policy == "inferenceOnly" or decision is None or running:
            return None
        since = status.get("lastRoundTime") or body["metadata"].get("creationTimestamp")
        if since and now - _parse_time(since) < f.round_interval_seconds:
            return None
        a = decision.allocation
        participants = [p for p in a.participants if decision.cap(p) > 0 and reachable.get(p, {}).get("eval_loss") is not None]
        if len(participants) < f.min_participants:
            return None
        aggregator = a.aggregator if a.aggregator in participants else participants[0]
        if f.secure_aggregation:  # the aggregator must not hold the round secret: it does not train
            outside = [n for n in sorted(reachable) if n not in participants]
            if not outside and len(participants) > f.min_participants:
                outside = [participants.pop()]
            if not outside:
                return None  # TrainingActive and the allocation say why; a round could only fail
            aggregator = outside[0]
        number = int(status.get("roundsCreated") or 0) + 1
        obj = objects.build_round(cluster, number, participants, aggregator)
        created = self.kube.create(obj)
        name = obj["metadata"]["name"]
        if created is not None:
            self.event("Normal", "RoundCreated", f"{name}: {len(participants)} participants")
        return {"roundsCreated": number, "lastRound": name, "lastRoundTime": _format_time(now)}

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
