"""The operator's own Prometheus metrics, served on COLLM_OPERATOR_METRICS_PORT (9108; 0 turns it off)."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

RECONCILES = Counter("collm_operator_reconciles", "Spec reconciliations of CollmClusters by result (applied, invalid)", ["result"])
CONTROL_STEPS = Histogram(
    "collm_operator_control_step_seconds",
    "Wall time of one slow-timescale step of a cluster",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
CONTROL_ERRORS = Counter("collm_operator_control_step_errors", "Slow-timescale steps that failed (retried next interval)")
ROUNDS = Counter("collm_operator_rounds", "AdapterRounds that ended, by result", ["result"])
READY_REPLICAS = Gauge("collm_operator_ready_replicas", "Replicas that serve, per cluster", ["namespace", "cluster"])
GOODPUT = Gauge("collm_operator_goodput", "SLO-met requests/s x 1/held-out loss over the last minute", ["namespace", "cluster"])
SLO_ATTAINMENT = Gauge("collm_operator_slo_attainment", "Share of the last minute's requests that met the SLO", ["namespace", "cluster"])
TRAIN_CAP = Gauge("collm_operator_train_cap_tokens", "Training cap of the current plan", ["namespace", "cluster", "replica"])
PRIVACY_EPSILON = Gauge(
    "collm_operator_privacy_epsilon", "Participant-level epsilon spent by the cluster's DP rounds (at status.privacy.delta)", ["namespace", "cluster"]
)
EDGE_SESSIONS = Gauge("collm_operator_edge_sessions", "Edge devices' sessions open on the cluster's replicas", ["namespace", "cluster"])
_PER_CLUSTER = (READY_REPLICAS, GOODPUT, SLO_ATTAINMENT, PRIVACY_EPSILON, EDGE_SESSIONS)


def serve(port: int) -> None:
    if port <= 0:
        return
    try:
        start_http_server(port)
    except OSError as exc:  # metrics are not worth a crash loop
        log.warning("operator metrics not served on port %d: %s", port, exc)


def observe_cluster(namespace: str, cluster: str, status: dict) -> None:
    """Mirror the status the control loop just wrote."""
    READY_REPLICAS.labels(namespace, cluster).set(status.get("readyReplicas") or 0)
    for gauge, key in ((GOODPUT, "goodput"), (SLO_ATTAINMENT, "sloAttainment")):
        if status.get(key) is not None:
            gauge.labels(namespace, cluster).set(float(status[key]))
    if status.get("edgeSessions") is not None:
        EDGE_SESSIONS.labels(namespace, cluster).set(status["edgeSessions"])
    epsilon = (status.get("privacy") or {}).get("epsilon")
    if epsilon is not None:
        PRIVACY_EPSILON.labels(namespace, cluster).set(float(epsilon))
    for replica, plan in (status.get("allocation") or {}).items():
        TRAIN_CAP.labels(namespace, cluster, replica).set(plan.get("trainCapTokens") or 0)


def forget_cluster(namespace: str, cluster: str) -> None:
    for gauge in _PER_CLUSTER:
        try:
            gauge.remove(namespace, cluster)
        except KeyError:
            pass
    for labels in [key for key in TRAIN_CAP._metrics if key[:2] == (namespace, cluster)]:  # noqa: SLF001
        TRAIN_CAP.remove(*labels)
