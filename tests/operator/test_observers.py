"""What a control step observes is the same from the API (ApiObserver) and from kopf's indexes
(IndexObserver over what observers.*_entry keep of each watched object), and a Secret the step
needs is read again only every SECRET_REREAD_S."""

from __future__ import annotations

import copy
from collections import defaultdict

import pytest

from collm_operator import api, control, objects, observers
from collm_operator.observers import ApiObserver, IndexObserver, pod_entry, round_entry, workload_entry
from collm_operator.reconcile import workloads_from

NS = "observed"


def cluster(name: str = "demo", replicas: int = 3) -> api.Cluster:
    return api.parse_cluster(
        {"metadata": {"name": name, "namespace": NS, "uid": f"{name}-uid", "generation": 1}, "spec": {"model": {"source": "tiny"}, "replicas": replicas}}
    )


def pod(c: api.Cluster, name: str, component: str, ip: str | None, *, ready=True, restarts=0, deleting=False) -> dict:
    meta = {"name": name, "namespace": c.namespace, "labels": objects.labels(c, component), "uid": f"{name}-uid", "annotations": {"x": "y" * 100}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status = {
        "phase": "Running",
        "podIP": ip,
        "hostIP": "10.1.0.1",
        "conditions": [{"type": "Initialized", "status": "True"}, {"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": "t"}],
        "containerStatuses": [{"name": "agent", "restartCount": restarts, "ready": ready, "image": "collm"}],
    }
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {"containers": [{"name": "agent", "image": "collm"}]}, "status": status}


def pods(c: api.Cluster) -> list[dict]:
    return [
        pod(c, f"{c.name}-0", objects.AGENT, "10.0.0.1"),
        pod(c, f"{c.name}-1", objects.AGENT, "10.0.0.2", ready=False, restarts=2),
        pod(c, f"{c.name}-2", objects.AGENT, None, ready=False),  # starting: no address yet
        pod(c, f"{c.name}-7", objects.AGENT, "10.0.0.7"),  # scaled away
        pod(c, f"{c.name}-router-a", objects.ROUTER, "10.0.1.1"),
        pod(c, f"{c.name}-router-b", objects.ROUTER, "10.0.1.2", deleting=True),
    ]


def statefulset(c: api.Cluster, generation: int = 4) -> dict:
    obj = objects.build_statefulset(c)
    obj["metadata"] |= {"generation": generation, "creationTimestamp": "2026-01-01T00:00:00Z"}
    obj["status"] = {"observedGeneration": generation, "updatedReplicas": 2, "replicas": 3, "readyReplicas": 1, "currentRevision": "r"}
    return obj


def router(c: api.Cluster, available: int = 1) -> dict:
    obj = objects.build_router_deployment(c)
    obj["metadata"] |= {"generation": 2, "creationTimestamp": "2026-01-01T00:00:00Z"}
    obj["status"] = {"availableReplicas": available, "replicas": 1, "observedGeneration": 2}
    return obj


def indexed(entry, found: list[dict]) -> dict:
    """What kopf's index holds after these objects' watch events: entry's values under entry's keys."""
    index: dict = defaultdict(list)
    for obj in found:
        for key, value in entry(obj).items():
            index[key].append(value)
    return index


def index_observer(sts: list[dict], deployments: list[dict], found_pods: list[dict], rounds: list[dict]) -> IndexObserver:
    return IndexObserver(
        pods=indexed(pod_entry, found_pods),
        statefulsets=indexed(workload_entry, sts),
        deployments=indexed(workload_entry, deployments),
        rounds=indexed(round_entry, rounds),
    )


@pytest.mark.parametrize("variant", ["as-built", "rolled-out", "no-router", "no-statefulset"])
def test_the_index_keeps_everything_workloads_from_reads(variant):
    c = cluster()
    sts, dep = statefulset(c), router(c, available=0 if variant == "no-router" else 1)
    if variant == "rolled-out":
        sts["status"]["updatedReplicas"] = 3
    found = pods(c) + pods(cluster("other"))  # another cluster's pods in the namespace
    sts_list = [] if variant == "no-statefulset" else [sts]
    full = workloads_from(c, sts_list[0] if sts_list else None, found, dep)
    from_index = index_observer(sts_list, [dep], found, []).workloads(c)
    assert from_index == full
    assert set(full.pods) == {"demo-0", "demo-1", "demo-2"} and full.router_ips == ("10.0.1.1",)
    assert full.pods["demo-1"].restarts == 2 and not full.pods["demo-2"].ready


def test_a_replaced_statefulset_whose_deletion_is_on_its_way_does_not_hide_the_new_one():
    c = cluster()
    old, new = statefulset(c, generation=9), statefulset(c, generation=1)
    old["metadata"]["creationTimestamp"], new["metadata"]["uid"] = "2025-01-01T00:00:00Z", "new"
    observer = index_observer([new, old], [router(c)], pods(c), [])
    assert observer.workloads(c) == workloads_from(c, new, pods(c), router(c))


def test_rounds_are_filed_under_their_cluster_and_listed_by_name():
    c = cluster()
    labelled = {"metadata": {"labels": {objects.CLUSTER_LABEL: "demo", objects.SCHEDULED_LABEL: "true"}, "namespace": NS, "creationTimestamp": "t"}}
    rounds = [
        {**copy.deepcopy(labelled), "metadata": {**labelled["metadata"], "name": "demo-round-2"}, "status": {"version": 2, "state": {"spec": {}}}},
        {**copy.deepcopy(labelled), "metadata": {**labelled["metadata"], "name": "demo-round-1"}},
        {"metadata": {"name": "by-hand", "namespace": NS}, "spec": {"clusterRef": {"name": "demo"}}},  # labelled by its daemon later
    ]
    got = index_observer([], [], [], rounds).rounds(c)
    assert [r["metadata"]["name"] for r in got] == ["demo-round-1", "demo-round-2"]
    assert got[1]["status"] == {"version": 2, "state": {"spec": {}}} and got[0]["status"] == {}
    assert got[1]["metadata"]["labels"][objects.SCHEDULED_LABEL] == "true"
    assert round_entry(rounds[2]) == {}
    rounds[0]["status"]["version"] = 3  # the index holds a copy, not kopf's body
    assert got[1]["status"]["version"] == 2


def test_a_store_kopf_changes_meanwhile_is_read_again():
    class Racing:
        def __init__(self):
            self.calls = 0

        def __iter__(self):
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("dictionary changed size during iteration")
            return iter([{"x": 1}])

    store = Racing()
    assert observers._entries({("ns", "c"): store}, ("ns", "c")) == [{"x": 1}] and store.calls == 2
    assert observers._entries({}, ("ns", "c")) == []


def test_the_api_and_the_index_observe_the_same(kube):
    """On the emulated API server: what the API lists and what the index would hold agree."""
    c = cluster("same")
    for obj in (statefulset(c), router(c)):
        status = obj.pop("status")
        kube.create(obj)
        kube.patch_status("apps/v1", obj["kind"], NS, obj["metadata"]["name"], status)
    for p in pods(c):
        kube.create(p)
    for i in (2, 1):
        kube.create(objects.build_round(c, i, [f"same-{i}"], "same-0"))
    api_view = ApiObserver(kube)
    listed = {
        "sts": kube.list("apps/v1", "StatefulSet", NS),
        "dep": kube.list("apps/v1", "Deployment", NS),
        "pods": kube.list("v1", "Pod", NS),
        "rounds": kube.list(api.API_VERSION, api.ROUND_KIND, NS),
    }
    index_view = index_observer(listed["sts"], listed["dep"], listed["pods"], listed["rounds"])
    assert index_view.workloads(c) == api_view.workloads(c)
    read = lambda r: (r["metadata"]["name"], r["metadata"].get("labels"), r["metadata"].get("creationTimestamp"), r.get("status") or {})  # noqa: E731
    assert [read(r) for r in index_view.rounds(c)] == [read(r) for r in api_view.rounds(c)] and len(api_view.rounds(c)) == 2


def test_the_operator_indexes_what_its_daemon_reads():
    import kopf

    from collm_operator import main

    registry = kopf.get_default_registry()
    ids = {h.id for h in registry._indexing.get_all_handlers()}
    assert ids == {"pods_by_cluster", "statefulsets_by_name", "deployments_by_name", "rounds_by_cluster"}
    settings = kopf.OperatorSettings()
    main.watch_managed_children_only(settings)
    managed = "app.kubernetes.io/managed-by=collm-operator"
    for resource, selector in (
        (kopf.Resource("", "v1", "pods"), [managed]),
        (kopf.Resource("apps", "v1", "statefulsets"), [managed]),
        (kopf.Resource("apps", "v1", "deployments"), [managed]),
        (kopf.Resource("metrics.k8s.io", "v1beta1", "pods"), []),  # only the core pods
        (kopf.Resource(api.GROUP, api.VERSION, api.ROUND_PLURAL), []),  # rounds made by hand carry no such label
        (kopf.Resource(api.GROUP, api.VERSION, api.CLUSTER_PLURAL), []),
    ):
        assert list(settings.watching.label_selectors.collect(resource)) == selector, resource


def test_a_secret_is_read_again_only_after_the_reread_interval_or_while_missing(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(control.time, "monotonic", lambda: now[0])
    reads: list[str | None] = [None, "a", "b"]
    cached: control.Reread[str | None] = control.Reread(lambda token: token is None)
    read = lambda: reads.pop(0)  # noqa: E731
    assert cached.get(read) is None  # not created yet: the next call reads again
    assert cached.get(read) == "a"
    now[0] += control.SECRET_REREAD_S / 2
    assert cached.get(read) == "a" and reads == ["b"]
    now[0] += control.SECRET_REREAD_S
    assert cached.get(read) == "b"
