"""CollmCluster reconciliation: apply the children, then judge what is observed into conditions.

`apply_children` writes the builders' desired state (objects.build_all) and removes what the spec
no longer wants (a ServiceMonitor switched off). `workloads_from` reads the StatefulSet, its pods
and the router Deployment, wherever they came from (`observe_workloads`: the API; observers.py:
kopf's indexes too). `cluster_conditions` is pure: previous conditions + what was observed -> the
new condition list (Progressing, Degraded, TrainingActive, then the Ready summary). The kopf
handlers (main.py) and the control loop (control.py) call these.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from collm_operator import api, certificates, objects
from collm_operator.conditions import FALSE, TRUE, Reason, invalid_spec, set_condition, summarize_ready
from collm_operator.kube import ApiException, Kube, NotOwned, ResourceNotFoundError
from collm_rpc import tls

SLO_DEGRADED_BELOW = 0.9  # attainment under this (with enough requests) marks the cluster Degraded
SLO_MIN_REQUESTS = 20  # fewer finished requests in the window say nothing about the SLO
# Every kind a cluster may own, for deletion (the builders' kinds plus the rounds it schedules).
CHILD_KINDS = (
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("cert-manager.io/v1", "Certificate"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("policy/v1", "PodDisruptionBudget"),
    ("apps/v1", "StatefulSet"),
    ("v1", "ConfigMap"),
    ("v1", "ServiceAccount"),
    ("v1", "Secret"),
)
MISSING_CRD_FIX = {
    "ServiceMonitor": "install the Prometheus Operator CRDs or set spec.monitoring.serviceMonitor: false",
    "Certificate": "install cert-manager or remove spec.security.certManager",
}
PLAINTEXT_WARNING = (
    "spec.security.mutualTLS is false: the agents' gRPC port takes plaintext calls from anyone who can reach a pod, "
    "who can then change what the cluster serves. Development only: remove the field for production."
)


@dataclass(frozen=True)
class Applied:
    kinds: tuple[str, ...]
    changed: bool  # some child was created or patched
    warnings: tuple[str, ...] = ()  # objects the cluster cannot take (e.g. ServiceMonitor without its CRD)


class ChildRejected(Exception):
    """The API server refused a child built from the spec (e.g. a resource quantity it cannot parse)."""


def apply_children(kube: Kube, cluster: api.Cluster) -> Applied:
    kinds, warnings, changed = [], [], False
    for obj in objects.build_all(cluster, certificates.operator_namespace()):
        try:
            changed |= kube.apply(obj)
        except ResourceNotFoundError:
            fix = MISSING_CRD_FIX.get(obj["kind"], "install its CRD")
            warnings.append(f"{obj['kind']} {obj['metadata']['name']} not created: the API server does not serve {obj['apiVersion']} ({fix})")
            continue
        except NotOwned as exc:
            raise ChildRejected(f"{exc}; delete or rename that object, or give the CollmCluster another name") from exc
        except ApiException as exc:
            if exc.status in (400, 422):
                raise ChildRejected(
                    f"the API server refused {obj['kind']} {obj['metadata']['name']} built from this spec: {_api_message(exc)}; fix the spec fields it names"
                ) from exc
            raise
        kinds.append(obj["kind"])
    if objects.build_service_monitor(cluster) is None:
        changed |= kube.delete("monitoring.coreos.com/v1", "ServiceMonitor", cluster.namespace, cluster.name)
    if not cluster.spec.security.network_policy:
        changed |= kube.delete("networking.k8s.io/v1", "NetworkPolicy", cluster.namespace, f"{cluster.name}-agents")
    return Applied(tuple(kinds), changed, tuple(warnings))


def _api_message(exc: ApiException) -> str:
    try:
        return json.loads(exc.body).get("message") or str(exc.reason)
    except (TypeError, ValueError, AttributeError):
        return str(exc.reason)


def delete_children(kube: Kube, name: str, namespace: str) -> int:
    """Delete what the cluster owns (its rounds too); owner references make the API's garbage
    collector do the same, this makes it immediate and independent of the collector. Returns the count."""
    instance = f"app.kubernetes.io/instance={name},app.kubernetes.io/managed-by={objects.MANAGED_BY}"
    deleted = 0
    for api_version, kind in CHILD_KINDS:
        try:
            found = kube.list(api_version, kind, namespace, instance)
        except ResourceNotFoundError:
            continue
        for obj in found:
            deleted += kube.delete(api_version, kind, namespace, obj["metadata"]["name"])
    for obj in kube.list(api.API_VERSION, api.ROUND_KIND, namespace, f"{objects.CLUSTER_LABEL}={name}"):
        if any(ref.get("kind") == api.CLUSTER_KIND and ref.get("name") == name for ref in obj["metadata"].get("ownerReferences") or []):
            deleted += kube.delete(api.API_VERSION, api.ROUND_KIND, namespace, obj["metadata"]["name"])
    return deleted


# --- what is observed ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pod:
    name: str
    ip: str | None
    ready: bool
    restarts: int = 0  # container restarts: a pod that was never restarted and is not ready is starting


@dataclass(frozen=True)
class Workloads:
    pods: dict[str, Pod]  # the agent pods that should exist, by name (missing ones absent)
    updated: int  # pods on the current template
    rolled_out: bool  # the StatefulSet controller saw the latest spec and every pod is on it
    router_available: bool
    router_ips: tuple[str, ...] = ()  # the router pods' addresses (routing weights go there)


def pod_selector(cluster: api.Cluster) -> dict[str, str]:
    """The labels the agents' and the router's pods share: one list (or index entry) holds both."""
    agent, router = objects.selector(cluster, objects.AGENT), objects.selector(cluster, objects.ROUTER)
    return {k: v for k, v in agent.items() if router.get(k) == v}


def observe_workloads(kube: Kube, cluster: api.Cluster) -> Workloads:
    """From the API: the StatefulSet, the pods and the router Deployment (three reads)."""
    ns = cluster.namespace
    sts = kube.get("apps/v1", "StatefulSet", ns, objects.statefulset_name(cluster))
    pods = kube.list("v1", "Pod", ns, ",".join(f"{k}={v}" for k, v in pod_selector(cluster).items()))
    router = kube.get("apps/v1", "Deployment", ns, objects.router_name(cluster))
    return workloads_from(cluster, sts, pods, router)


def workloads_from(cluster: api.Cluster, sts: Mapping[str, Any] | None, pods: Iterable[Mapping[str, Any]], router: Mapping[str, Any] | None) -> Workloads:
    """What the StatefulSet, the pods (agents' and router's) and the router Deployment say. Pure:
    the objects come from the API or from kopf's indexes (observers.py keeps the fields read here)."""
    sts, router = sts or {}, router or {}
    sts_status = sts.get("status") or {}
    wanted = set(objects.replica_names(cluster))
    agent, router_labels = objects.selector(cluster, objects.AGENT), objects.selector(cluster, objects.ROUTER)
    found, router_ips = {}, []
    for p in pods:
        meta, status = p["metadata"], p.get("status") or {}
        labels = meta.get("labels") or {}
        if all(labels.get(k) == v for k, v in router_labels.items()):
            if status.get("podIP") and not meta.get("deletionTimestamp"):
                router_ips.append(status["podIP"])
            continue
        if not all(labels.get(k) == v for k, v in agent.items()) or meta["name"] not in wanted or meta.get("deletionTimestamp"):
            continue
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        restarts = sum(int(c.get("restartCount") or 0) for c in status.get("containerStatuses") or [])
        found[meta["name"]] = Pod(meta["name"], status.get("podIP"), ready, restarts)
    generation = (sts.get("metadata") or {}).get("generation")
    updated = int(sts_status.get("updatedReplicas") or 0)
    rolled_out = bool(sts) and sts_status.get("observedGeneration") == generation and updated >= cluster.spec.replicas
    router_ok = int((router.get("status") or {}).get("availableReplicas") or 0) >= 1
    return Workloads(found, updated, rolled_out, router_ok, tuple(sorted(router_ips)))


@dataclass(frozen=True)
class Health:
    """The control loop's view of the agents, on top of the workloads."""

    reachable: frozenset[str] = frozenset()  # agents that answered GetStats
    laggards: tuple[str, ...] = ()  # serving an older adapter than the cluster's current one
    slo_attainment: float | None = None
    slo_requests: int = 0
    training: tuple[str, ...] = ()  # replicas with a training cap > 0 and data
    with_data: int = 0
    adapter_lost: str = ""  # why the cluster's adapter cannot be restored ("" when it can)
    state_errors: tuple[str, ...] = ()  # "<replica>: <why>" for each replica whose state volume took no write


@dataclass
class Judgement:
    conditions: list[dict[str, Any]]
    ready_replicas: int


def cluster_conditions(previous: Sequence[dict[str, Any]] | None, cluster: api.Cluster, w: Workloads, h: Health, now: datetime) -> Judgement:
    """Progressing, Degraded, TrainingActive and the Ready summary, for this generation. Pure."""
    gen, desired = cluster.generation, cluster.spec.replicas
    serving = sorted(n for n, p in w.pods.items() if p.ready and n in h.reachable)
    ready = len(serving)
    c = list(previous or ())
    if not w.rolled_out or len(w.pods) < desired:
        c = set_condition(
            c, "Progressing", TRUE, Reason.ROLLING_OUT, f"{w.updated} of {desired} replicas on the current spec, {len(w.pods)} pods exist", gen, now
        )
    elif starting := sorted(n for n, p in w.pods.items() if not p.ready and p.restarts == 0):
        c = set_condition(c, "Progressing", TRUE, Reason.ROLLING_OUT, f"{ready} of {desired} replicas serve; starting: {', '.join(starting)}", gen, now)
    elif h.laggards and ready == desired:
        c = set_condition(c, "Progressing", TRUE, Reason.PUBLISHING_ADAPTER, f"publishing the current adapter to {', '.join(h.laggards)}", gen, now)
    else:
        c = set_condition(c, "Progressing", FALSE, Reason.AS_EXPECTED, f"{desired} replicas on the current spec", gen, now)
    progressing = c[[x["type"] for x in c].index("Progressing")]["status"] == TRUE
    if ready < desired and not progressing:
        missing = sorted(set(objects.replica_names(cluster)) - set(serving))
        c = set_condition(c, "Degraded", TRUE, Reason.REPLICAS_UNAVAILABLE, f"{ready} of {desired} replicas serve; not serving: {', '.join(missing)}", gen, now)
    elif h.adapter_lost:
        c = set_condition(c, "Degraded", TRUE, Reason.ADAPTER_LOST, h.adapter_lost, gen, now)
    elif h.state_errors:
        c = set_condition(c, "Degraded", TRUE, Reason.STATE_NOT_SAVED, "; ".join(h.state_errors), gen, now)
    elif not w.router_available and not progressing:
        c = set_condition(
            c, "Degraded", TRUE, Reason.ROUTER_UNAVAILABLE, f"the router Deployment {objects.router_name(cluster)} has no available pod", gen, now
        )
    elif h.slo_attainment is not None and h.slo_requests >= SLO_MIN_REQUESTS and h.slo_attainment < SLO_DEGRADED_BELOW:
        c = set_condition(
            c,
            "Degraded",
            TRUE,
            Reason.SLO_MISSED,
            f"{h.slo_attainment:.1%} of the last {h.slo_requests} requests met the SLO "
            f"(TTFT <= {cluster.spec.serving.ttft_milliseconds} ms, TPOT <= {cluster.spec.serving.tpot_milliseconds} ms)",
            gen,
            now,
        )
    else:
        c = set_condition(c, "Degraded", FALSE, Reason.AS_EXPECTED, "", gen, now)
    spec = cluster.spec
    if spec.scheduling.policy == "inferenceOnly" or spec.training.data_volume is None:
        why = "scheduling.policy is inferenceOnly" if spec.scheduling.policy == "inferenceOnly" else "spec.training.dataVolume is not set"
        c = set_condition(c, "TrainingActive", FALSE, Reason.TRAINING_DISABLED, why, gen, now)
    elif h.training:
        c = set_condition(c, "TrainingActive", TRUE, Reason.TRAINING, f"{len(h.training)} replicas fine-tune: {', '.join(h.training)}", gen, now)
    elif h.reachable and h.with_data == 0:
        c = set_condition(
            c, "TrainingActive", FALSE, Reason.NO_DATA, f"no replica found training data under {spec.training.data_path}: put files there", gen, now
        )
    else:
        c = set_condition(c, "TrainingActive", FALSE, Reason.WAITING, "the current plan gives no replica a training cap (serving needs the capacity)", gen, now)
    c = summarize_ready(c, api.CLUSTER_KIND, gen, now)
    return Judgement(c, ready)


# --- the spec handler -----------------------------------------------------------------------------


@dataclass
class Reconciled:
    status: dict[str, Any]  # merged into the cluster's status
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    invalid: bool = False


def reconcile_cluster(
    kube: Kube, body: dict[str, Any], old_spec: dict[str, Any] | None, now: datetime, *, ca: tls.CertificateAuthority | None = None
) -> Reconciled:
    """Validate the spec, issue the cluster's certificates and admin token (with `ca`), and apply the
    children. An invalid spec leaves the running children as they are and says what to fix in
    Ready=False/InvalidSpec (no exception: kopf must not retry)."""
    meta = body.get("metadata") or {}
    generation = int(meta.get("generation") or 0)
    conditions = (body.get("status") or {}).get("conditions")
    try:
        if old_spec is not None:
            api.check_cluster_update(old_spec, body.get("spec"))
        cluster = api.parse_cluster(body)
    except api.SpecError as exc:
        c = invalid_spec(conditions, api.CLUSTER_KIND, exc.message, generation, now)
        return Reconciled({"observedGeneration": generation, "conditions": c}, [("Warning", Reason.INVALID_SPEC, exc.message)], True)
    try:
        secrets_changed = certificates.ensure_secrets(kube, cluster, ca, now) if ca is not None else False
        applied = apply_children(kube, cluster)
    except ChildRejected as exc:
        c = invalid_spec(conditions, api.CLUSTER_KIND, str(exc), generation, now)
        return Reconciled({"observedGeneration": generation, "conditions": c}, [("Warning", Reason.INVALID_SPEC, str(exc))], True)
    events = [("Warning", "ChildNotCreated", w) for w in applied.warnings]
    if not cluster.spec.security.mutual_tls:
        events.append(("Warning", "PlaintextControlPlane", PLAINTEXT_WARNING))
    if not (applied.changed or secrets_changed):  # an operator restart or a label edit: nothing to roll out, no condition flips
        return Reconciled({}, events)
    c = set_condition(conditions, "Progressing", TRUE, Reason.ROLLING_OUT, f"applied {len(applied.kinds)} objects for generation {generation}", generation, now)
    c = summarize_ready(c, api.CLUSTER_KIND, generation, now)
    events.insert(0, ("Normal", "Applied", f"{len(applied.kinds)} child objects: {', '.join(sorted(set(applied.kinds)))}"))
    return Reconciled({"observedGeneration": generation, "conditions": c}, events)
