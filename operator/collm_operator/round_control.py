"""AdapterRound: the federated round state machine (collm_control.rounds), driven over gRPC,
with its state persisted in the round's status so that a restarted operator resumes it.

`drive()` is the kopf daemon's body. On first run it fixes the round's roles (participants,
aggregator, publish targets, version) and writes them into `status.state` before any agent is
called; after a restart it reads them back and `RoundDriver` re-issues only the unfinished work of
the stage in progress (agents treat every call idempotently per round id). `round_status()` renders
the state as the status users read: the stage conditions, per-participant outcomes, version,
sha256, eval losses, bytes and timings. Pure except `drive()`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn

from collm_control import rounds as R
from collm_control.decide import NoTrainers, assign_roles, next_version
from collm_operator import api, certificates, objects, privacy_budget
from collm_operator.agents import AgentPool, grpc_addresses
from collm_operator.conditions import FALSE, TRUE, Reason, get_condition, set_condition
from collm_operator.kube import Kube
from collm_operator.reconcile import observe_workloads
from collm_rpc.driver import RoundDriver, StrategyConfig

log = logging.getLogger(__name__)

PUBLISH_DEADLINE_S = 60.0
Event = Callable[[str, str, str], None]  # (type Normal|Warning, reason, message)


def finished(status: Mapping[str, Any] | None) -> bool:
    """A round is over once its summary condition Succeeded is True or False."""
    summary = get_condition((status or {}).get("conditions"), "Succeeded")
    return summary is not None and summary.get("status") in (TRUE, FALSE)


def round_id(name: str, uid: str) -> str:
    """Unique across re-creations of a round with the same name (agents key their state by it)."""
    return f"{name}-{uid[:8]}" if uid else name


@dataclass(frozen=True)
class Roles:
    participants: tuple[str, ...]
    aggregator: str
    replicas: tuple[str, ...]


def choose_roles(cluster: api.Cluster, spec: api.RoundSpec, serving: list[str], with_data: list[str]) -> Roles:
    """Participants, aggregator and publish targets of a new round; ValueError says what is missing.

    `serving`: replicas that answer now; `with_data`: those of them with training data. A round's
    own list wins; else every serving replica with data. Secure aggregation needs an aggregator
    that is not a participant (it must not hold the round secret).
    """
    aggregator = spec.aggregator
    if aggregator is not None and aggregator not in serving:
        raise ValueError(f"spec.aggregator {aggregator!r} does not serve now (serving: {serving or 'none'})")
    if spec.participants is not None:
        absent = [p for p in spec.participants if p not in serving]
        if absent:
            raise ValueError(f"spec.participants {absent} do not serve now (serving: {serving or 'none'}): list serving replicas of {cluster.name}")
    trainers = list(spec.participants) if spec.participants is not None else [p for p in serving if p in with_data]
    try:
        participants, aggregator = assign_roles(
            serving, trainers, aggregator=aggregator, secure=cluster.spec.federation.secure_aggregation, fixed=spec.participants is not None
        )
    except NoTrainers:
        raise ValueError(
            f"no replica of {cluster.name} can train now: {len(serving)} serve, {len(with_data)} have data under {cluster.spec.training.data_path}"
        ) from None
    return Roles(participants, aggregator, tuple(serving))


def strategy(cluster: api.Cluster) -> StrategyConfig:
    f = cluster.spec.federation
    return StrategyConfig(
        name=f.strategy,
        clip_norm=float(f.clip_norm) if f.clip_norm else None,
        noise_multiplier=float(f.noise_multiplier) if f.noise_multiplier else None,
        secure=f.secure_aggregation,
    )


# --- status ---------------------------------------------------------------------------------------


def _iso(at: float | None, fallback: datetime) -> datetime:
    return datetime.fromtimestamp(at, UTC) if at is not None else fallback


def _num(value: float | None, digits: int = 4) -> str | None:
    return None if value is None else f"{value:.{digits}f}"


def round_status(state: R.RoundState, *, generation: int, version: int, now: datetime) -> dict[str, Any]:
    """The AdapterRound status for a state (pure): conditions, participants, result and figures."""
    conditions: list[dict[str, Any]] = []
    since = _iso(state.started_at, now)  # a stage still Unknown has been so since the round started
    for condition in R.Condition:
        c = state.conditions[condition]
        reason = c.reason if c.reason else "Pending"
        conditions = set_condition(conditions, condition.value, c.status, reason, c.message, generation, _iso(c.at, since))
    participants = []
    for name, p in state.participants.items():
        entry: dict[str, Any] = {"name": name, "outcome": p.outcome.value, "reason": p.reason, "bytes": p.bytes}
        if p.sha256:
            entry["sha256"] = p.sha256
        if p.eval_tokens:
            entry["candidateLoss"], entry["currentLoss"] = _num(p.candidate_loss), _num(p.current_loss)
        participants.append(entry)
    s = state
    timings = {}
    for key, start, end in (
        ("train", s.started_at, s.trained_at),
        ("aggregate", s.trained_at, s.aggregated_at),
        ("evaluate", s.aggregated_at, s.evaluated_at),
        ("publish", s.evaluated_at, s.published_at),
        ("total", s.started_at, s.finished_at),
    ):
        if start is not None and end is not None:
            timings[key] = f"{max(0.0, end - start):.3f}"
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": conditions,
        "participants": participants,
        "aggregator": s.spec.aggregator,
        "version": version,
        "bytesTransferred": s.bytes_uploaded,
        "timings": timings,
        "state": s.to_dict(),
    }
    if s.version_sha256 and s.version_sha256 != "no-candidate":
        status["sha256"] = s.version_sha256
    for key, value in (("evalLossBefore", s.eval_loss_before), ("evalLossAfter", s.eval_loss_after), ("freshnessSeconds", s.freshness_s)):
        if value is not None:
            status[key] = _num(value, 3 if key == "freshnessSeconds" else 4)
    return status


def failed_status(previous: Mapping[str, Any] | None, generation: int, reason: str, message: str, now: datetime) -> dict[str, Any]:
    """A round that cannot run at all: Succeeded=False with a reason and what to fix."""
    conditions = set_condition((previous or {}).get("conditions"), "Succeeded", FALSE, reason, message, generation, now)
    return {"observedGeneration": generation, "conditions": conditions}


# --- the daemon -----------------------------------------------------------------------------------


def _ahead(me: Mapping[str, Any], other: Mapping[str, Any]) -> bool:
    """Whether `other`, a round of the same cluster, goes before `me`: it runs already (it has a
    saved state) or it was created earlier. One round of a cluster runs at a time."""
    status = other.get("status") or {}
    if finished(status) or other["metadata"]["name"] == me["metadata"]["name"]:
        return False
    if status.get("state"):
        return True
    key = lambda o: (o["metadata"].get("creationTimestamp") or "", o["metadata"]["name"])  # noqa: E731
    return key(other) < key(me)


class _NotStarted(Exception):
    """The round failed before it started; its status and an Event say why."""


def drive(
    kube: Kube,
    body: Mapping[str, Any],
    *,
    stop: Callable[[], bool],
    event: Event,
    pool: AgentPool | None = None,
    clock: Callable[[], float] = time.time,
    ended: Callable[[str], None] = lambda result: None,
    wait_s: float = 2.0,
) -> R.RoundState | None:
    """Run (or resume) one AdapterRound until it ends or `stop()`; None when it could not start.
    `ended(result)` is told how every round that ends here ends (Succeeded, Failed, Rejected).
    The agents are reached with `pool`'s credentials (the operator's certificate)."""
    try:
        return _drive(kube, body, stop=stop, event=event, pool=pool or AgentPool(), clock=clock, ended=ended, wait_s=wait_s)
    except _NotStarted:
        return None


def _drive(
    kube: Kube,
    body: Mapping[str, Any],
    *,
    stop: Callable[[], bool],
    event: Event,
    pool: AgentPool,
    clock: Callable[[], float],
    ended: Callable[[str], None],
    wait_s: float,
) -> R.RoundState | None:
    meta, status = body["metadata"], dict(body.get("status") or {})
    name, ns, gen = meta["name"], meta.get("namespace", "default"), int(meta.get("generation") or 1)
    now = lambda: datetime.now(UTC)  # noqa: E731

    def fail(reason: str, message: str) -> NoReturn:
        kube.patch_status(api.API_VERSION, api.ROUND_KIND, ns, name, failed_status(status, gen, reason, message, now()))
        event("Warning", reason, message)
        ended(R.Result.FAILED.value)
        raise _NotStarted(message)

    try:
        rnd = api.parse_round(body)
    except api.SpecError as exc:
        fail(Reason.INVALID_SPEC, exc.message)
    cluster_obj = kube.get(api.API_VERSION, api.CLUSTER_KIND, ns, rnd.spec.cluster_name)
    if cluster_obj is None:
        fail(Reason.CLUSTER_NOT_FOUND, f"CollmCluster {rnd.spec.cluster_name!r} does not exist in {ns}: fix spec.clusterRef.name")
    try:
        cluster = api.parse_cluster(cluster_obj)
    except api.SpecError as exc:
        fail(Reason.INVALID_SPEC, f"CollmCluster {rnd.spec.cluster_name} has an invalid spec: {exc.message}")
    if (meta.get("labels") or {}).get(objects.CLUSTER_LABEL) != cluster.name:
        # Hand-made rounds get the label too: the cluster's control loop lists its rounds by it.
        kube.patch(api.API_VERSION, api.ROUND_KIND, ns, name, {"metadata": {"labels": {objects.CLUSTER_LABEL: cluster.name}}})
    if not cluster.spec.federation.enabled or cluster.spec.scheduling.policy == "inferenceOnly":
        fail(Reason.TRAINING_DISABLED, f"CollmCluster {cluster.name} does not train (federation disabled or policy inferenceOnly)")

    pool.active = certificates.operator_credentials(kube, cluster, pool.credentials)
    saved = status.get("state")
    while not saved:
        rounds = kube.list(api.API_VERSION, api.ROUND_KIND, ns, f"{objects.CLUSTER_LABEL}={cluster.name}")
        before = sorted(r["metadata"]["name"] for r in rounds if _ahead(body, r))
        if not before:
            break
        message = f"waiting for round {', '.join(before)} of {cluster.name} to finish (one round at a time)"
        if (get_condition(status.get("conditions"), "Trained") or {}).get("message") != message:
            status["conditions"] = set_condition(status.get("conditions"), "Trained", "Unknown", "Waiting", message, gen, now())
            kube.patch_status(api.API_VERSION, api.ROUND_KIND, ns, name, {"observedGeneration": gen, "conditions": status["conditions"]})
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if stop():
                return None
            time.sleep(0.1)
    if not saved:  # the ledger as of now (an earlier round may have been charged while this one waited)
        latest = kube.get(api.API_VERSION, api.CLUSTER_KIND, ns, cluster.name) or cluster_obj
        over_budget = privacy_budget.refusal(cluster, latest.get("status"))
        if over_budget is not None:
            fail(Reason.PRIVACY_BUDGET_SPENT, over_budget)
    workloads = observe_workloads(kube, cluster)
    if saved:
        state = R.RoundState.from_dict(saved)
        version = int(status.get("version") or 0)
        log.info("round %s resumes at stage %s", name, state.stage.value if state.stage else "finished")
    else:
        serving = sorted(n for n, p in workloads.pods.items() if p.ready)
        stats = pool.stats(grpc_addresses(cluster, workloads.pods, serving))
        serving = [n for n in serving if stats.get(n) is not None]
        with_data = [n for n in serving if stats[n].has_data]
        resolved = rnd.spec.resolved(cluster.spec.federation)
        try:
            roles = choose_roles(cluster, resolved, serving, with_data)
            spec = R.RoundSpec(
                round_id=round_id(name, meta.get("uid", "")),
                replicas=roles.replicas,
                participants=roles.participants,
                aggregator=roles.aggregator,
                local_steps=resolved.local_steps,
                deadline_s=float(resolved.deadline_seconds),
                min_participants=resolved.min_participants,
                eval_tolerance=cluster.spec.federation.eval_gate_tolerance_milli_nats / 1000,
                publish_deadline_s=PUBLISH_DEADLINE_S,
            )
        except ValueError as exc:
            fail(Reason.TOO_FEW_PARTICIPANTS, str(exc))
        spent = privacy_budget.charge(cluster, latest.get("status"))
        if spent is not None:  # charged before any update is computed: a failed round spent it too
            kube.patch_status(api.API_VERSION, api.CLUSTER_KIND, ns, cluster.name, {"privacy": spent})
        state = R.start(spec)
        claimed = [int(((cluster_obj.get("status") or {}).get("adapter") or {}).get("version") or 0)]
        version = next_version(stats, claimed + [int((r.get("status") or {}).get("version") or 0) for r in rounds])
        event("Normal", "RoundStarted", f"participants {', '.join(spec.participants)}, aggregator {spec.aggregator}, {spec.local_steps} local steps")

    written: list[dict] = []

    def persist(state_dict: dict) -> None:
        if written and written[-1] == state_dict:
            return
        new = round_status(R.RoundState.from_dict(state_dict), generation=gen, version=version, now=now())
        kube.patch_status(api.API_VERSION, api.ROUND_KIND, ns, name, new)
        written.append(state_dict)
        del written[:-1]

    persist(state.to_dict())
    addresses = grpc_addresses(cluster, workloads.pods, state.spec.replicas, stable=True)
    driver = RoundDriver(
        state.spec,
        addresses,
        strategy=strategy(cluster),
        round_number=version,
        state=state,
        persist=persist,
        clock=clock,
        poll_s=0.5,
        rpc_timeout_s=30.0,
        credentials=pool.active,
    )
    result = driver.run(stop=stop)
    if not result.finished:
        return result
    summary = result.conditions[R.Condition.SUCCEEDED]
    ended(result.result.value)
    if result.succeeded:
        adapter = {"version": version, "round": name, "sha256": result.version_sha256}
        if result.eval_loss_after is not None:
            adapter["evalLoss"] = f"{result.eval_loss_after:.4f}"
        kube.patch_status(api.API_VERSION, api.CLUSTER_KIND, ns, cluster.name, {"adapter": adapter, "lastRound": name})
        event(
            "Normal",
            "Published",
            f"version {version} ({result.version_sha256[:12]}) serves on {len(result.publishes)} replicas; "
            f"eval loss {_num(result.eval_loss_before)} -> {_num(result.eval_loss_after)}",
        )
    else:
        event("Warning", summary.reason or "RoundFailed", summary.message)
    return result
