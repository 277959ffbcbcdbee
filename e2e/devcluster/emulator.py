"""A stateful Kubernetes API emulator over HTTP, good enough for kopf and the real kubectl.

Built on kmock's ``KubernetesEmulator`` (its aiohttp server, request parsing and error rendering)
with the storage semantics a real API server has and kmock leaves out: monotonic resourceVersion,
uid and creationTimestamp stamping, generation, optimistic concurrency (JSON-patch ``test`` -> 422,
PUT with a stale resourceVersion -> 409), merge / strategic-merge / JSON patches, the ``status`` and
``scale`` subresources, label and field selectors, list metadata, watches that subscribe before the
snapshot and replay from ``?resourceVersion=``, finalizers, owner-reference garbage collection,
namespace deletion, CRDs that register their custom resources, discovery and server-side Tables
(``kubectl get -o wide``).

Everything runs on one asyncio loop; in-process callers (the kubelet stand-in) use the ``*_object``
methods from that loop.

Its parts: ``errors`` (``ApiError``), ``patching`` (merge / strategic-merge / JSON patches and
defaulting), ``matching`` (label and field selectors, JSONPath), ``tables`` (server-side Tables) and
``http_api`` (request dispatch, discovery, watches); this module keeps the resource types and the
storage, and re-exports the helpers.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import uuid
from collections.abc import Callable
from typing import Any

import kmock

from .errors import ApiError
from .http_api import HttpApiMixin, Watcher, parse_api_path
from .matching import dig, jsonpath, match_fields, match_labels, match_selector_obj
from .patching import apply_defaults, json_patch, merge_patch, strategic_merge_patch

__all__ = [
    "ApiEmulator",
    "ApiError",
    "ResourceType",
    "BUILTIN_RESOURCES",
    # re-exported helpers (they live in patching, matching and http_api)
    "apply_defaults",
    "json_patch",
    "merge_patch",
    "strategic_merge_patch",
    "dig",
    "jsonpath",
    "match_fields",
    "match_labels",
    "match_selector_obj",
    "parse_api_path",
]

Obj = dict[str, Any]


class ResourceType:
    def __init__(
        self,
        group: str,
        version: str,
        plural: str,
        kind: str,
        namespaced: bool = True,
        singular: str | None = None,
        short_names: tuple[str, ...] = (),
        subresources: tuple[str, ...] = (),
        printer_columns: list[Obj] | None = None,
        categories: tuple[str, ...] = (),
    ):
        self.group, self.version, self.plural, self.kind = group, version, plural, kind
        self.namespaced = namespaced
        self.singular = singular or kind.lower()
        self.short_names = short_names
        self.subresources = subresources
        self.printer_columns = printer_columns
        self.categories = categories
        self.schema: Obj | None = None  # openAPIV3Schema of a custom resource (for defaulting)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.group, self.version, self.plural)

    def discovery(self) -> list[Obj]:
        verbs = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
        out = [
            {
                "name": self.plural,
                "singularName": self.singular,
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": verbs,
                "shortNames": list(self.short_names),
                "categories": list(self.categories),
            }
        ]
        for sub in self.subresources:
            kind = "Scale" if sub == "scale" else self.kind
            out.append({"name": f"{self.plural}/{sub}", "singularName": "", "namespaced": self.namespaced, "kind": kind, "verbs": ["get", "patch", "update"]})
        return out


BUILTIN_RESOURCES = [
    ResourceType("", "v1", "namespaces", "Namespace", namespaced=False, short_names=("ns",), subresources=("status",)),
    ResourceType("", "v1", "pods", "Pod", short_names=("po",), subresources=("status",), categories=("all",)),
    ResourceType("", "v1", "services", "Service", short_names=("svc",), subresources=("status",), categories=("all",)),
    ResourceType("", "v1", "configmaps", "ConfigMap", short_names=("cm",)),
    ResourceType("", "v1", "secrets", "Secret"),
    ResourceType("", "v1", "events", "Event", short_names=("ev",)),
    ResourceType("", "v1", "serviceaccounts", "ServiceAccount", short_names=("sa",)),
    ResourceType("", "v1", "endpoints", "Endpoints", short_names=("ep",)),
    ResourceType("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", short_names=("pvc",), subresources=("status",)),
    ResourceType("", "v1", "nodes", "Node", namespaced=False, short_names=("no",), subresources=("status",)),
    ResourceType("apps", "v1", "statefulsets", "StatefulSet", short_names=("sts",), subresources=("status", "scale"), categories=("all",)),
    ResourceType("apps", "v1", "deployments", "Deployment", short_names=("deploy",), subresources=("status", "scale"), categories=("all",)),
    ResourceType("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", short_names=("netpol",)),
    ResourceType("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", short_names=("pdb",), subresources=("status",)),
    ResourceType("events.k8s.io", "v1", "events", "Event", short_names=("ev",)),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease"),
    ResourceType("rbac.authorization.k8s.io", "v1", "roles", "Role"),
    ResourceType("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding"),
    ResourceType("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", namespaced=False),
    ResourceType("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", namespaced=False),
    ResourceType(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        namespaced=False,
        short_names=("crd", "crds"),
        subresources=("status",),
    ),
    ResourceType("monitoring.coreos.com", "v1", "servicemonitors", "ServiceMonitor", short_names=("smon",)),
]


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiEmulator(HttpApiMixin, kmock.KubernetesEmulator):
    """kmock's emulator with the semantics of a real API server (see the module docstring)."""

    EVENT_LOG_SIZE = 20000

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.types: dict[tuple[str, str, str], ResourceType] = {}
        self.store: dict[tuple[tuple[str, str, str], str | None, str], Obj] = {}
        self.rv = 0
        self.event_log: list[tuple[int, tuple[str, str, str], Obj]] = []
        self.watchers: set[Watcher] = set()
        self.listeners: list[Callable[[ResourceType, str, Obj], None]] = []
        self._gc_task: asyncio.Task | None = None
        self._server: kmock.Server | None = None
        for rt in BUILTIN_RESOURCES:
            self.types[rt.key] = rt
        for ns in ("default", "kube-system", "kube-public"):
            self.create_object(self.rt("", "v1", "namespaces"), {"metadata": {"name": ns}})

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: str = "127.0.0.1", port: int | None = None) -> str:
        await self.__aenter__()
        self._server = kmock.Server(self, host=host, port=port, user_agent="")
        await self._server.__aenter__()
        self._gc_task = asyncio.create_task(self._gc_loop())
        return self.url_str

    async def stop(self) -> None:
        if self._gc_task:
            self._gc_task.cancel()
        for w in list(self.watchers):
            w.queue.put_nowait(None)
        await asyncio.sleep(0)
        if self._server is not None:
            await self._server.__aexit__(None, None, None)
            self._server = None
        await self.__aexit__(None, None, None)

    @property
    def url_str(self) -> str:
        assert self._server is not None
        return f"http://{self._server.host}:{self._server.port}"

    # ------------------------------------------------------------------ types

    def rt(self, group: str, version: str, plural: str) -> ResourceType:
        try:
            return self.types[(group, version, plural)]
        except KeyError:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({group}/{version}/{plural})") from None

    def rt_by_kind(self, api_version: str, kind: str) -> ResourceType:
        for rt in self.types.values():
            if rt.api_version == api_version and rt.kind == kind:
                return rt
        raise ApiError(404, "NotFound", f"no resource for {api_version} {kind}")

    def _register_crd(self, crd: Obj) -> None:
        spec = crd.get("spec") or {}
        names = spec.get("names") or {}
        for v in spec.get("versions") or []:
            if not v.get("served", True):
                continue
            subs = tuple(k for k in ("status", "scale") if k in (v.get("subresources") or {}))
            rt = ResourceType(
                spec["group"],
                v["name"],
                names["plural"],
                names["kind"],
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                singular=names.get("singular"),
                short_names=tuple(names.get("shortNames") or ()),
                subresources=subs,
                printer_columns=v.get("additionalPrinterColumns"),
                categories=tuple(names.get("categories") or ()),
            )
            rt.schema = (v.get("schema") or {}).get("openAPIV3Schema")
            self.types[(spec["group"], v["name"], names["plural"])] = rt

    def _unregister_crd(self, crd: Obj) -> None:
        spec = crd.get("spec") or {}
        for v in spec.get("versions") or []:
            rt = self.types.pop((spec.get("group"), v.get("name"), (spec.get("names") or {}).get("plural")), None)
            if rt is not None:
                for key in [k for k in self.store if k[0] == rt.key]:
                    self._remove(rt, key)

    # ------------------------------------------------------------------ storage (sync, loop thread)

    def _next_rv(self) -> str:
        self.rv += 1
        return str(self.rv)

    def _emit(self, rt: ResourceType, etype: str, obj: Obj) -> None:
        event = {"type": etype, "object": copy.deepcopy(obj)}
        self.event_log.append((int(obj["metadata"]["resourceVersion"]), rt.key, event))
        if len(self.event_log) > self.EVENT_LOG_SIZE:
            del self.event_log[: len(self.event_log) - self.EVENT_LOG_SIZE]
        ns = obj["metadata"].get("namespace")
        for w in list(self.watchers):
            if w.rt_key == rt.key and (w.namespace is None or w.namespace == ns):
                w.queue.put_nowait(event)
        for listener in list(self.listeners):
            try:
                listener(rt, etype, obj)
            except Exception:  # noqa: BLE001  a listener must never break the API
                pass

    def _key(self, rt: ResourceType, namespace: str | None, name: str) -> tuple:
        return (rt.key, namespace if rt.namespaced else None, name)

    def get_object(self, rt: ResourceType, namespace: str | None, name: str) -> Obj:
        obj = self.store.get(self._key(rt, namespace, name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{rt.plural}.{rt.group or "core"} "{name}" not found')
        return obj

    def list_objects(self, rt: ResourceType, namespace: str | None = None, label_selector: str | None = None, field_selector: str | None = None) -> list[Obj]:
        out = []
        for (key, ns, _), obj in self.store.items():
            if key != rt.key or (namespace is not None and ns != namespace):
                continue
            if match_labels(obj["metadata"].get("labels") or {}, label_selector) and match_fields(obj, field_selector):
                out.append(obj)
        out.sort(key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]))
        return out

    def create_object(self, rt: ResourceType, body: Obj, namespace: str | None = None) -> Obj:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if rt.namespaced:
            meta["namespace"] = namespace or meta.get("namespace") or "default"
        else:
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not meta.get("name"):
            raise ApiError(422, "Invalid", "metadata.name: Required value")
        key = self._key(rt, meta.get("namespace"), meta["name"])
        if key in self.store:
            raise ApiError(409, "AlreadyExists", f'{rt.plural}.{rt.group or "core"} "{meta["name"]}" already exists')
        if rt.namespaced and rt.key != ("", "v1", "namespaces"):
            ns_obj = self.store.get((("", "v1", "namespaces"), None, meta["namespace"]))
            if ns_obj is not None and ns_obj["metadata"].get("deletionTimestamp"):
                raise ApiError(403, "Forbidden", f"namespace {meta['namespace']} is being terminated")
        obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
        if "status" in rt.subresources and rt.group not in ("",) and rt.key[0] != "apiextensions.k8s.io":
            obj.pop("status", None)  # status is set through the subresource only (custom resources, apps)
        if rt.schema:
            obj = apply_defaults(obj, rt.schema)
            meta = obj["metadata"]
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_iso()
        meta["generation"] = 1
        meta.pop("deletionTimestamp", None)
        meta["resourceVersion"] = self._next_rv()
        if rt.key == ("apiextensions.k8s.io", "v1", "customresourcedefinitions"):
            self._register_crd(obj)
            obj["status"] = {
                "conditions": [
                    {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "lastTransitionTime": now_iso()},
                    {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "lastTransitionTime": now_iso()},
                ],
                "acceptedNames": (obj.get("spec") or {}).get("names") or {},
                "storedVersions": [v["name"] for v in (obj.get("spec") or {}).get("versions") or [] if v.get("storage")],
            }
        if rt.kind == "Namespace":
            obj.setdefault("status", {"phase": "Active"})
            obj.setdefault("spec", {"finalizers": ["kubernetes"]})
        self.store[key] = obj
        self._emit(rt, "ADDED", obj)
        return obj

    def _apply_change(self, rt: ResourceType, old: Obj, new: Obj, subresource: str | None) -> Obj:
        """Store ``new`` as the next version of ``old`` (with subresource rules), emit MODIFIED."""
        new = copy.deepcopy(new)
        if subresource == "status":
            merged = copy.deepcopy(old)
            if "status" in new:
                merged["status"] = new["status"]
            else:
                merged.pop("status", None)
            new = merged
        elif "status" in rt.subresources and rt.key[0] != "apiextensions.k8s.io":
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
        if rt.schema:
            new = apply_defaults(new, rt.schema)
        meta, old_meta = new.setdefault("metadata", {}), old["metadata"]
        for field in ("uid", "creationTimestamp", "name", "namespace", "generation"):
            if field in old_meta:
                meta[field] = old_meta[field]
            else:
                meta.pop(field, None)
        if old_meta.get("deletionTimestamp"):
            meta["deletionTimestamp"] = old_meta["deletionTimestamp"]
        else:
            meta.pop("deletionTimestamp", None)
        new["apiVersion"], new["kind"] = rt.api_version, rt.kind
        spec_changed = {k: v for k, v in new.items() if k not in ("metadata", "status")} != {k: v for k, v in old.items() if k not in ("metadata", "status")}
        if spec_changed:
            meta["generation"] = int(old_meta.get("generation") or 1) + 1
        if new == old:
            return old  # no-op: no new version, no event
        meta["resourceVersion"] = self._next_rv()
        key = self._key(rt, meta.get("namespace"), meta["name"])
        if rt.key == ("apiextensions.k8s.io", "v1", "customresourcedefinitions"):
            self._register_crd(new)
        self.store[key] = new
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._remove(rt, key)
        else:
            self._emit(rt, "MODIFIED", new)
        return new

    def patch_object(self, rt: ResourceType, namespace: str | None, name: str, patch: Any, patch_type: str = "merge", subresource: str | None = None) -> Obj:
        old = self.get_object(rt, namespace, name)
        if patch_type == "json":
            new = json_patch(old, patch)
        elif patch_type == "strategic":
            new = strategic_merge_patch(old, patch)
        else:
            new = merge_patch(old, patch)
        rv = ((patch if isinstance(patch, dict) else {}).get("metadata") or {}).get("resourceVersion")
        if rv and rv != old["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", "the object has been modified; please apply your changes to the latest version and try again")
        new.setdefault("metadata", {})["resourceVersion"] = old["metadata"]["resourceVersion"]
        return self._apply_change(rt, old, new, subresource)

    def replace_object(self, rt: ResourceType, namespace: str | None, name: str, body: Obj, subresource: str | None = None) -> Obj:
        old = self.get_object(rt, namespace, name)
        rv = (body.get("metadata") or {}).get("resourceVersion")
        if rv and rv != old["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", "the object has been modified; please apply your changes to the latest version and try again")
        body = copy.deepcopy(body)
        body.setdefault("metadata", {})["resourceVersion"] = old["metadata"]["resourceVersion"]
        return self._apply_change(rt, old, body, subresource)

    def delete_object(self, rt: ResourceType, namespace: str | None, name: str, propagation: str = "Background") -> Obj:
        key = self._key(rt, namespace, name)
        obj = self.get_object(rt, namespace, name)
        if propagation == "Orphan":
            self._orphan(obj["metadata"]["uid"])
        meta = obj["metadata"]
        if rt.kind == "Namespace" and not meta.get("deletionTimestamp"):
            new = copy.deepcopy(obj)
            new["metadata"]["deletionTimestamp"] = now_iso()
            new["status"] = {"phase": "Terminating"}
            new["metadata"]["resourceVersion"] = self._next_rv()
            self.store[key] = new
            self._emit(rt, "MODIFIED", new)
            return new  # the GC loop empties it, then removes it
        if meta.get("finalizers"):
            if meta.get("deletionTimestamp"):
                return obj
            new = copy.deepcopy(obj)
            new["metadata"]["deletionTimestamp"] = now_iso()
            new["metadata"]["resourceVersion"] = self._next_rv()
            self.store[key] = new
            self._emit(rt, "MODIFIED", new)
            return new
        return self._remove(rt, key)

    def _remove(self, rt: ResourceType, key: tuple) -> Obj:
        obj = self.store.pop(key)
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = self._next_rv()
        if rt.key == ("apiextensions.k8s.io", "v1", "customresourcedefinitions"):
            self._emit(rt, "DELETED", obj)
            self._unregister_crd(obj)
            return obj
        self._emit(rt, "DELETED", obj)
        return obj

    def _orphan(self, uid: str) -> None:
        for key, obj in list(self.store.items()):
            refs = obj["metadata"].get("ownerReferences") or []
            if any(r.get("uid") == uid for r in refs):
                rt = self.types[key[0]]
                new = copy.deepcopy(obj)
                new["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != uid]
                self._apply_change(rt, obj, new, None)

    def collect_garbage(self) -> int:
        """One GC pass: dependents of vanished owners, and the contents of terminating namespaces."""
        removed = 0
        uids = {obj["metadata"]["uid"] for obj in self.store.values()}
        terminating = {name for (k, _, name), obj in self.store.items() if k == ("", "v1", "namespaces") and obj["metadata"].get("deletionTimestamp")}
        emptied = set(terminating)
        for key, obj in list(self.store.items()):
            if key not in self.store:
                continue
            rt = self.types.get(key[0])
            if rt is None:
                continue
            refs = obj["metadata"].get("ownerReferences") or []
            gone = refs and all(r.get("uid") not in uids for r in refs)
            in_dead_ns = key[1] in terminating
            if in_dead_ns:
                emptied.discard(key[1])
            if (gone or in_dead_ns) and not obj["metadata"].get("deletionTimestamp"):
                try:
                    self.delete_object(rt, key[1], key[2])
                    removed += 1
                except ApiError:
                    pass
        for ns in emptied:
            key = (("", "v1", "namespaces"), None, ns)
            if key in self.store:
                self._remove(self.types[key[0]], key)
                removed += 1
        return removed

    async def _gc_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            try:
                self.collect_garbage()
            except Exception:  # noqa: BLE001
                pass
