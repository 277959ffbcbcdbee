"""The kopf layer: decorators that hand kopf's arguments to the pure-ish modules, nothing more.

    kopf run --standalone --all-namespaces --liveness=http://0.0.0.0:8080/healthz -m collm_operator.main

- CollmCluster create/update/resume -> reconcile.reconcile_cluster (children, InvalidSpec, Events)
- CollmCluster daemon               -> control.ClusterController.step every slowIntervalSeconds
- indexes of the clusters' pods, StatefulSets, Deployments and AdapterRounds -> observers.*_entry
  (what a step observes, kept current by kopf's watches: a step reads no object from the API)
- CollmCluster delete               -> reconcile.delete_children (then kopf removes our finalizer)
- AdapterRound daemon, until done   -> round_control.drive (resumes from status after a restart)

kopf keeps its bookkeeping under the collm.io prefix (finalizer collm.io/finalizer, progress and
last-handled-configuration annotations), so it never mixes with another kopf operator's.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import os
import random
import time
from datetime import UTC, datetime
from typing import Any

import kopf

from collm_operator import api, certificates, metrics, objects, observers, reconcile, round_control
from collm_operator.agents import AgentPool
from collm_operator.control import ClusterController
from collm_operator.kube import Kube
from collm_rpc import tls

PREFIX = "collm.io"
CLUSTERS: dict[str, Any] = dict(group=api.GROUP, version=api.VERSION, plural=api.CLUSTER_PLURAL)
ROUNDS: dict[str, Any] = dict(group=api.GROUP, version=api.VERSION, plural=api.ROUND_PLURAL)
# The children a step observes; the operator watches only those it manages (server-side selector).
CHILDREN: dict[str, dict[str, Any]] = {
    "pods": dict(group="", version="v1", plural="pods"),
    "statefulsets": dict(group="apps", version="v1", plural="statefulsets"),
    "deployments": dict(group="apps", version="v1", plural="deployments"),
}
MANAGED = {"app.kubernetes.io/managed-by": objects.MANAGED_BY}


def _events(body):
    """(type, reason, message) -> a Kubernetes Event on the object."""

    def post(type_: str, reason: str, message: str) -> None:
        (kopf.info if type_ == "Normal" else kopf.warn)(body, reason=reason, message=message[:1024])

    return post


def watch_managed_children_only(settings: kopf.OperatorSettings) -> None:
    """The server filters the children's watches: the operator holds (and is sent) only its own pods,
    StatefulSets and Deployments, not every one of the cluster."""
    for child in CHILDREN.values():
        settings.watching.label_selectors[child["group"], child["version"], child["plural"]] = ",".join(f"{k}={v}" for k, v in MANAGED.items())


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    logging.getLogger().setLevel(os.environ.get("COLLM_LOG_LEVEL", "INFO").upper())
    settings.persistence.finalizer = f"{PREFIX}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=PREFIX, key="last-handled-configuration")
    # Watches end server-side before the client gives up, so a silent connection never hangs the operator.
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    watch_managed_children_only(settings)
    settings.posting.level = logging.INFO
    # Every running round holds a thread (a sync daemon) and every control step takes one while it
    # runs (clusters' daemons are async and hold none between steps): the default pool is cores + 4.
    settings.execution.max_workers = int(os.environ.get("COLLM_OPERATOR_WORKERS", "64"))
    memo.executor = settings.execution.executor  # the control steps of async daemons run here too
    memo.kube = Kube.from_environment()
    # The installation's CA (created on first start) and the operator's own certificate, in memory only.
    memo.ca = certificates.load_or_create_ca(memo.kube, certificates.operator_namespace())
    memo.credentials = memo.ca.issue(tls.Identity.operator())
    memo.controllers = {}  # shared by every object's shallow copy of this memo (the probe reads it)
    metrics.serve(int(os.environ.get("COLLM_OPERATOR_METRICS_PORT", "9108")))
    # What exists now lives as long as the process (the modules: the Kubernetes client alone defines
    # thousands of classes): left out of the collector's full passes, which otherwise stop every
    # thread, so every control step in flight, for tens to hundreds of ms (docs/reliability.md).
    gc.freeze()


@kopf.on.probe(id="clusters")
def clusters_controlled(memo: kopf.Memo, **_) -> int:
    return len(memo.controllers)


@kopf.on.resume(**CLUSTERS)
@kopf.on.create(**CLUSTERS)
@kopf.on.update(**CLUSTERS)
def reconcile_cluster(body, old, patch, memo: kopf.Memo, **_) -> None:
    result = reconcile.reconcile_cluster(memo.kube, body, (old or {}).get("spec"), datetime.now(UTC), ca=memo.ca)
    metrics.RECONCILES.labels("invalid" if result.invalid else "applied").inc()
    for key, value in result.status.items():
        patch.status[key] = value
    post = _events(body)
    for event in result.events:
        post(*event)


# Async, so that kopf calls them on the event loop as each watch event arrives (no executor thread).
@kopf.index(**CHILDREN["pods"], labels=MANAGED)
async def pods_by_cluster(body, **_) -> dict:
    return observers.pod_entry(body)


@kopf.index(**CHILDREN["statefulsets"], labels=MANAGED)
async def statefulsets_by_name(body, **_) -> dict:
    return observers.workload_entry(body)


@kopf.index(**CHILDREN["deployments"], labels=MANAGED)
async def deployments_by_name(body, **_) -> dict:
    return observers.workload_entry(body)


@kopf.index(**ROUNDS)
async def rounds_by_cluster(body, **_) -> dict:
    return observers.round_entry(body)


@kopf.daemon(**CLUSTERS, cancellation_timeout=30, initial_delay=1)
async def control_loop(stopped, body, meta, memo: kopf.Memo, logger, **kwargs) -> None:
    """Async, so that a cluster holds no thread between steps: each step runs on the loop's executor
    and the daemon waits on the event loop (one operator drives many clusters). The step observes
    through kopf's indexes, which kopf passes by the index handlers' names (live for the daemon's life)."""
    pool = AgentPool(credentials=memo.credentials)
    observer = observers.IndexObserver(
        pods=kwargs["pods_by_cluster"],
        statefulsets=kwargs["statefulsets_by_name"],
        deployments=kwargs["deployments_by_name"],
        rounds=kwargs["rounds_by_cluster"],
    )
    controller = ClusterController(memo.kube, observer=observer, event=_events(body), pool=pool, decision_log=os.environ.get("COLLM_DECISION_LOG") or None)
    memo.controllers[meta["uid"]] = controller
    loop = asyncio.get_running_loop()
    # Spread the clusters over the interval: clusters created (or resumed by a restarted operator)
    # together would otherwise step together, every interval, in one burst.
    slow = ((body.get("spec") or {}).get("scheduling") or {}).get("slowIntervalSeconds") or api.Scheduling.slow_interval_seconds
    await stopped.wait(random.uniform(0, float(slow)))
    try:
        while not stopped:
            started = time.monotonic()
            try:
                # kopf's context (its settings, for the Events a step posts) goes along to the thread.
                step = contextvars.copy_context().run
                interval = await loop.run_in_executor(memo.executor, step, controller.step, body)
            except Exception:  # the next interval retries; a crash loop helps nobody
                metrics.CONTROL_ERRORS.inc()
                logger.exception("slow-timescale step failed")
                interval = 10.0
            metrics.CONTROL_STEPS.observe(time.monotonic() - started)
            metrics.observe_cluster(meta["namespace"], meta["name"], dict(body.get("status") or {}))
            await stopped.wait(interval)
    finally:
        memo.controllers.pop(meta["uid"], None)
        controller.close()


@kopf.on.delete(**CLUSTERS)
def delete_cluster(meta, memo: kopf.Memo, logger, **_) -> None:
    count = reconcile.delete_children(memo.kube, meta["name"], meta["namespace"])
    metrics.forget_cluster(meta["namespace"], meta["name"])
    logger.info("deleted %d child objects of %s", count, meta["name"])


@kopf.daemon(**ROUNDS, cancellation_timeout=30, backoff=5)
def drive_round(stopped, body, memo: kopf.Memo, **_) -> None:
    # No `when` filter on the status: kopf would cancel the daemon the moment it writes the final
    # status, before it records the result on the cluster. A finished round returns at once.
    if round_control.finished(body.get("status")):
        return
    pool = AgentPool(credentials=memo.credentials)
    try:
        round_control.drive(
            memo.kube, body, stop=lambda: bool(stopped), event=_events(body), pool=pool, ended=lambda result: metrics.ROUNDS.labels(result).inc()
        )
    finally:
        pool.close()
