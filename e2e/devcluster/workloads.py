"""The StatefulSet and Deployment controllers of the dev cluster: pods for workloads, pure store edits.

StatefulSets get pods ``<name>-0..N-1`` (hostname and subdomain set for their DNS names);
Deployments get pods ``<name>-<i>``. Both are owned by their workload, scale with
``spec.replicas``, roll a changed pod template one pod at a time (the highest ordinal first, only
while the others are ready), and get a status that counts replicas, updated and ready ones.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from .emulator import ApiEmulator, ApiError

Obj = dict[str, Any]

POD_RT = ("", "v1", "pods")
STS_RT = ("apps", "v1", "statefulsets")
DEPLOY_RT = ("apps", "v1", "deployments")
PVC_RT = ("", "v1", "persistentvolumeclaims")


def reconcile_workloads(emu: ApiEmulator) -> None:
    """One pass of the StatefulSet and Deployment controllers over the emulator's store."""
    pod_rt = emu.types[POD_RT]
    # The pods by their controller's uid, listed once per pass: listing them again for each workload
    # made a pass quadratic, and it runs on the API's loop (at 100 clusters, 120 ms in which the
    # emulated API answered nobody).
    pods_of: dict[str, list[Obj]] = {}
    for pod in emu.list_objects(pod_rt):
        for ref in pod["metadata"].get("ownerReferences") or []:
            pods_of.setdefault(ref.get("uid"), []).append(pod)
    for rt_key in (STS_RT, DEPLOY_RT):
        rt = emu.types[rt_key]
        for wl in list(emu.list_objects(rt)):
            meta, spec = wl["metadata"], wl.get("spec") or {}
            if meta.get("deletionTimestamp"):
                continue
            ns, name = meta["namespace"], meta["name"]
            replicas = int(spec.get("replicas", 1))
            template = spec.get("template") or {}
            revision = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]
            by_name = {p["metadata"]["name"]: p for p in pods_of.get(meta["uid"], ())}
            wanted = [f"{name}-{i}" for i in range(replicas)]
            for i, pod_name in enumerate(wanted):
                if pod_name in by_name:
                    continue
                labels = dict((template.get("metadata") or {}).get("labels") or {})
                labels["controller-revision-hash"] = revision
                if rt_key == STS_RT:
                    labels["statefulset.kubernetes.io/pod-name"] = pod_name
                    labels["apps.kubernetes.io/pod-index"] = str(i)
                pod_spec = copy.deepcopy(template.get("spec") or {})
                if rt_key == STS_RT:
                    _claim_volumes(emu, ns, pod_name, spec.get("volumeClaimTemplates") or [], pod_spec)
                    pod_spec.setdefault("hostname", pod_name)
                    if spec.get("serviceName"):
                        pod_spec.setdefault("subdomain", spec["serviceName"])
                pod = {
                    "metadata": {
                        "name": pod_name,
                        "namespace": ns,
                        "labels": labels,
                        "annotations": dict((template.get("metadata") or {}).get("annotations") or {}),
                        "ownerReferences": [
                            {"apiVersion": rt.api_version, "kind": rt.kind, "name": name, "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}
                        ],
                    },
                    "spec": pod_spec,
                    "status": {"phase": "Pending"},
                }
                try:
                    emu.create_object(pod_rt, pod, ns)
                except ApiError:
                    pass
            for pod_name, pod in by_name.items():
                if pod_name not in wanted and not pod["metadata"].get("deletionTimestamp"):
                    try:
                        emu.delete_object(pod_rt, ns, pod_name)
                    except ApiError:
                        pass
            live = [by_name[n] for n in wanted if n in by_name]
            ready = sum(1 for p in live if pod_ready(p))
            updated = [p for p in live if (p["metadata"].get("labels") or {}).get("controller-revision-hash") == revision]
            # Rolling update of a changed template: replace one outdated pod at a time (highest
            # ordinal first), and only while every other pod is ready.
            outdated = [p for p in live if p not in updated]
            if outdated and len(live) == replicas and not any(p["metadata"].get("deletionTimestamp") for p in live):
                victim = max(outdated, key=lambda p: int(p["metadata"]["name"].rsplit("-", 1)[1]))
                others_ready = all(pod_ready(p) for p in live if p is not victim)
                if others_ready or not pod_ready(victim):
                    try:
                        emu.delete_object(pod_rt, ns, victim["metadata"]["name"])
                    except ApiError:
                        pass
            status = {
                "observedGeneration": meta.get("generation", 1),
                "replicas": len(live),
                "readyReplicas": ready,
                "currentReplicas": len(live),
                "updatedReplicas": len(updated),
                "availableReplicas": ready,
                "currentRevision": f"{name}-{revision}",
                "updateRevision": f"{name}-{revision}",
            }
            if rt_key == DEPLOY_RT:
                status["conditions"] = [{"type": "Available", "status": "True" if ready >= replicas else "False", "reason": "MinimumReplicasAvailable"}]
            if (wl.get("status") or {}) != status:
                try:
                    emu.replace_object(rt, ns, name, {**wl, "status": status}, subresource="status")
                except ApiError:
                    pass


def _claim_volumes(emu: ApiEmulator, ns: str, pod_name: str, templates: list, pod_spec: dict) -> None:
    """As the StatefulSet controller: a PVC `<template>-<pod>` per volumeClaimTemplate (created once,
    kept when the pod or the StatefulSet goes, as Kubernetes' default retention does), and the
    pod's volume of that name bound to it."""
    pvc_rt = emu.types[PVC_RT]
    for t in templates:
        template_name = (t.get("metadata") or {}).get("name")
        claim = f"{template_name}-{pod_name}"
        try:
            emu.get_object(pvc_rt, ns, claim)
        except ApiError:
            body = {
                "metadata": {"name": claim, "namespace": ns, "labels": dict((t.get("metadata") or {}).get("labels") or {})},
                "spec": copy.deepcopy(t.get("spec") or {}),
            }
            try:
                emu.create_object(pvc_rt, body, ns)
            except ApiError:
                pass
        volumes = [v for v in pod_spec.get("volumes") or [] if v.get("name") != template_name]
        pod_spec["volumes"] = [*volumes, {"name": template_name, "persistentVolumeClaim": {"claimName": claim}}]


def pod_ready(pod: Obj) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in (pod.get("status") or {}).get("conditions") or [])
