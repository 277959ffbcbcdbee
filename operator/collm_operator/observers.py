"""Where a control step reads a cluster's children and rounds from: the API, or kopf's indexes.

`ApiObserver` asks the API server (three reads for the workloads, one list for the rounds): tests
and tools use it, and it needs nothing but a Kube. `IndexObserver` reads the in-memory indexes that
kopf keeps current from its own watches (the @kopf.index handlers of main.py store what
`pod_entry`, `workload_entry` and `round_entry` return), so a step of the operator makes no API
read at all. Both hand the same objects to the same pure reconcile.workloads_from; an index keeps
of an object only the fields that function and the control step read (tests/operator/test_observers.py
checks that nothing they read is dropped).

The operator's watches carry only its own children (a server-side label selector on
app.kubernetes.io/managed-by, main.py): a pod, StatefulSet or Deployment without that label is not
seen. AdapterRounds are watched whole already (their daemon); the index files them under their
collm.io/cluster label, as ApiObserver's list selects them.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping
from typing import Any, Protocol

from collm_operator import api, objects
from collm_operator.kube import Kube
from collm_operator.reconcile import Workloads, observe_workloads, workloads_from

INSTANCE_LABEL = "app.kubernetes.io/instance"
Key = tuple[str, str]  # (namespace, the cluster's or the object's name)
Index = Mapping[Key, Collection[dict[str, Any]]]  # kopf.Index, or a plain dict in tests


class Observer(Protocol):
    def workloads(self, cluster: api.Cluster) -> Workloads: ...

    def rounds(self, cluster: api.Cluster) -> list[dict[str, Any]]: ...


class ApiObserver:
    def __init__(self, kube: Kube) -> None:
        self.kube = kube

    def workloads(self, cluster: api.Cluster) -> Workloads:
        return observe_workloads(self.kube, cluster)

    def rounds(self, cluster: api.Cluster) -> list[dict[str, Any]]:
        return self.kube.list(api.API_VERSION, api.ROUND_KIND, cluster.namespace, f"{objects.CLUSTER_LABEL}={cluster.name}")


class IndexObserver:
    """`pods`: by (namespace, app.kubernetes.io/instance); `statefulsets`, `deployments`: by
    (namespace, name); `rounds`: by (namespace, collm.io/cluster). Read on an executor thread while
    kopf updates them on the event loop: each read copies the entries first (see `_entries`)."""

    def __init__(self, *, pods: Index, statefulsets: Index, deployments: Index, rounds: Index) -> None:
        self._pods, self._statefulsets, self._deployments, self._rounds = pods, statefulsets, deployments, rounds

    def workloads(self, cluster: api.Cluster) -> Workloads:
        ns = cluster.namespace
        sts = _newest(_entries(self._statefulsets, (ns, objects.statefulset_name(cluster))))
        router = _newest(_entries(self._deployments, (ns, objects.router_name(cluster))))
        return workloads_from(cluster, sts, _entries(self._pods, (ns, cluster.name)), router)

    def rounds(self, cluster: api.Cluster) -> list[dict[str, Any]]:
        """In the API's order (by name), as ApiObserver lists them."""
        return sorted(_entries(self._rounds, (cluster.namespace, cluster.name)), key=lambda r: r["metadata"]["name"])


def _entries(index: Index, key: Key) -> list[dict[str, Any]]:
    """A copy of the entries under `key`. Copying a store is one C-level pass over a dict, which the
    event loop cannot change halfway; should another interpreter allow that, the copy is retried."""
    while True:
        try:
            return list(index.get(key) or ())
        except RuntimeError:  # "changed size during iteration"
            continue


def _newest(found: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One object of a name: while a replaced one's deletion is still on its way, the newer one."""
    return max(found, key=lambda o: o["metadata"].get("creationTimestamp") or "", default=None)


# --- what the indexes keep (kopf calls these with each watched object) -----------------------------


def pod_entry(body: Mapping[str, Any]) -> dict[Key, dict[str, Any]]:
    """A pod of some cluster (agent or router), with what workloads_from reads of it."""
    meta, status = body.get("metadata") or {}, body.get("status") or {}
    labels = dict(meta.get("labels") or {})
    if INSTANCE_LABEL not in labels:
        return {}
    pod = {
        "metadata": {"name": meta.get("name"), "labels": labels, "deletionTimestamp": meta.get("deletionTimestamp")},
        "status": {
            "podIP": status.get("podIP"),
            "conditions": [{"type": c.get("type"), "status": c.get("status")} for c in status.get("conditions") or []],
            "containerStatuses": [{"restartCount": c.get("restartCount")} for c in status.get("containerStatuses") or []],
        },
    }
    return {(meta.get("namespace") or "", labels[INSTANCE_LABEL]): pod}


def workload_entry(body: Mapping[str, Any]) -> dict[Key, dict[str, Any]]:
    """A StatefulSet or Deployment, with what workloads_from reads of it (generation and rollout status)."""
    meta, status = body.get("metadata") or {}, body.get("status") or {}
    kept = {
        "metadata": {"name": meta.get("name"), "generation": meta.get("generation"), "creationTimestamp": meta.get("creationTimestamp")},
        "status": {k: status[k] for k in ("observedGeneration", "updatedReplicas", "availableReplicas") if k in status},
    }
    return {(meta.get("namespace") or "", meta.get("name") or ""): kept}


def round_entry(body: Mapping[str, Any]) -> dict[Key, dict[str, Any]]:
    """An AdapterRound under its cluster's label (none yet: a hand-made round until its daemon labels
    it), with what the control step reads: name, labels, creation time and the whole status."""
    meta = body.get("metadata") or {}
    labels = dict(meta.get("labels") or {})
    if not labels.get(objects.CLUSTER_LABEL):
        return {}
    kept = {
        "metadata": {"name": meta.get("name"), "labels": labels, "creationTimestamp": meta.get("creationTimestamp")},
        "status": copy.deepcopy(dict(body.get("status") or {})),
    }
    return {(meta.get("namespace") or "", labels[objects.CLUSTER_LABEL]): kept}
