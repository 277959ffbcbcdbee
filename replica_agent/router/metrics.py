"""Prometheus metrics of the router, on a registry of its own (tests run several routers in one process).

Counters are fed by the proxy as attempts end; per-replica state (outstanding requests, health,
routing weight) is read at scrape time, so it can never go stale.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# Outcomes of one attempt on one replica.
OK = "ok"  # answered (2xx/3xx), stream complete
CLIENT_ERROR = "client_error"  # the replica answered 4xx (validation, unknown model): passed through, not retried
UPSTREAM_ERROR = "upstream_error"  # failed before the first byte (refused, timeout, 5xx, 429): retried elsewhere
STREAM_BROKEN = "stream_broken"  # failed after tokens were relayed: the client got an error event
CLIENT_GONE = "client_gone"  # the client disconnected first


class RouterMetrics:
    def __init__(self, router) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("collm_router_requests", "Attempts on a replica by outcome", ["replica", "outcome"], registry=r)
        self.retries = Counter(
            "collm_router_retries",
            "Attempts that failed before the first byte and were retried on another replica (by the replica that failed)",
            ["replica"],
            registry=r,
        )
        self.shed = Counter(
            "collm_router_shed_requests",
            "Requests answered 429: every eligible replica was at its limit of outstanding requests or shed them to keep its TTFT SLO",
            registry=r,
        )
        self.unserved = Counter(
            "collm_router_unserved_requests", "Requests answered 502/503: no healthy replica, or every attempt failed", ["reason"], registry=r
        )
        self.first_byte = Histogram(
            "collm_router_upstream_first_byte_seconds",
            "Time from sending a request to a replica until its first byte (first event of a stream)",
            ["replica"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "collm_router_upstream_seconds", "Time from sending a request to a replica until its answer ended", ["replica"], buckets=LATENCY_BUCKETS, registry=r
        )
        r.register(_ReplicaCollector(router))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ReplicaCollector:
    def __init__(self, router) -> None:
        self.router = router

    def collect(self):
        replicas = list(self.router.replicas.values())
        for name, doc, value in (
            ("collm_router_outstanding_requests", "Requests the router has in flight on each replica", lambda s: s.outstanding),
            ("collm_router_replica_healthy", "1 when the replica passes its health check and gets traffic", lambda s: float(s.healthy)),
            ("collm_router_replica_weight", "Routing weight of each replica (PUT /admin/weights)", lambda s: s.weight),
        ):
            family = GaugeMetricFamily(name, doc, labels=["replica"])
            for state in replicas:
                family.add_metric([state.name], float(value(state)))
            yield family
