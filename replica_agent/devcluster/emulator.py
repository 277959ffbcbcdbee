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
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import json
import re
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp.web
import kmock

__all__ = ["ApiEmulator", "ApiError", "ResourceType", "BUILTIN_RESOURCES"]

Obj = dict[str, Any]


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> Obj:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}


class ResourceType:
    def __init__(self, group: str, version: str, plural: str, kind: str, namespaced: bool = True,
                 singular: str | None = None, short_names: tuple[str, ...] = (), subresources: tuple[str, ...] = (),
                 printer_columns: list[Obj] | None = None, categories: tuple[str, ...] = ()):
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
        out = [{"name": self.plural, "singularName": self.singular, "namespaced": self.namespaced,
                "kind": self.kind, "verbs": verbs, "shortNames": list(self.short_names),
                "categories": list(self.categories)}]
        for sub in self.subresources:
            kind = "Scale" if sub == "scale" else self.kind
            out.append({"name": f"{self.plural}/{sub}", "singularName": "", "namespaced": self.namespaced,
                        "kind": kind, "verbs": ["get", "patch", "update"]})
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
    ResourceType("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", short_names=("pvc",),
                 subresources=("status",)),
    ResourceType("", "v1", "nodes", "Node", namespaced=False, short_names=("no",), subresources=("status",)),
    ResourceType("apps", "v1", "statefulsets", "StatefulSet", short_names=("sts",),
                 subresources=("status", "scale"), categories=("all",)),
    ResourceType("apps", "v1", "deployments", "Deployment", short_names=("deploy",),
                 subresources=("status", "scale"), categories=("all",)),
    ResourceType("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", short_names=("pdb",),
                 subresources=("status",)),
    ResourceType("events.k8s.io", "v1", "events", "Event", short_names=("ev",)),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease"),
    ResourceType("rbac.authorization.k8s.io", "v1", "roles", "Role"),
    ResourceType("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding"),
    ResourceType("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", namespaced=False),
    ResourceType("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", namespaced=False),
    ResourceType("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition",
                 namespaced=False, short_names=("crd", "crds"), subresources=("status",)),
    ResourceType("monitoring.coreos.com", "v1", "servicemonitors", "ServiceMonitor", short_names=("smon",)),
]

# List merge keys of the strategic merge patch (the subset used by our manifests and kubectl apply).
MERGE_KEYS: dict[str, tuple[str, ...]] = {
    "containers": ("name",), "initContainers": ("name",), "env": ("name",), "volumes": ("name",),
    "volumeMounts": ("mountPath",), "ports": ("containerPort", "port"), "conditions": ("type",),
    "ownerReferences": ("uid",), "tolerations": ("key",), "imagePullSecrets": ("name",),
}


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------------------- patching

def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target: Any, patch: Any, field: str | None = None) -> Any:
    """A simplified strategic merge patch: lists of objects merge by their known merge key."""
    if isinstance(patch, dict):
        if patch.get("$patch") == "replace":
            return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
        if patch.get("$patch") == "delete":
            return None
        result = dict(target) if isinstance(target, dict) else {}
        retain = patch.get("$retainKeys")
        for key, value in patch.items():
            if key.startswith("$setElementOrder/") or key in ("$retainKeys", "$patch"):
                continue
            if key.startswith("$deleteFromPrimitiveList/"):
                name = key.split("/", 1)[1]
                if isinstance(result.get(name), list):
                    result[name] = [x for x in result[name] if x not in value]
                continue
            if value is None:
                result.pop(key, None)
            else:
                merged = strategic_merge_patch(result.get(key), value, key)
                if merged is None and isinstance(value, dict) and value.get("$patch") == "delete":
                    result.pop(key, None)
                else:
                    result[key] = merged
        if retain is not None:
            result = {k: v for k, v in result.items() if k in retain}
        return result
    if isinstance(patch, list) and field in MERGE_KEYS and isinstance(target, list) \
            and all(isinstance(x, dict) for x in patch):
        # Container ports merge on containerPort, Service ports on port.
        key = next((k for k in MERGE_KEYS[field] if any(k in x for x in patch + target)), MERGE_KEYS[field][0])
        result = [copy.deepcopy(x) for x in target]
        for item in patch:
            if item.get("$patch") == "replace":
                return [copy.deepcopy({k: v for k, v in x.items() if k != "$patch"}) for x in patch]
            idx = next((i for i, x in enumerate(result) if isinstance(x, dict) and x.get(key) == item.get(key)), None)
            if item.get("$patch") == "delete":
                if idx is not None:
                    result.pop(idx)
            elif idx is None:
                result.append(strategic_merge_patch({}, item))
            else:
                result[idx] = strategic_merge_patch(result[idx], item)
        return result
    return copy.deepcopy(patch)


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]


def json_patch(doc: Any, ops: list[Obj]) -> Any:
    """RFC 6902 JSON patch; a failed ``test`` raises ApiError 422."""
    doc = copy.deepcopy(doc)

    def parent(parts: list[str], create: bool = False) -> tuple[Any, str]:
        cur = doc
        for p in parts[:-1]:
            if isinstance(cur, list):
                cur = cur[int(p)]
            else:
                if p not in cur:
                    if not create:
                        raise ApiError(422, "Invalid", f"path not found: {'/'.join(parts)}")
                    cur[p] = {}
                cur = cur[p]
        return cur, parts[-1]

    def get(path: str) -> Any:
        cur = doc
        for p in _pointer(path):
            try:
                cur = cur[int(p)] if isinstance(cur, list) else cur[p]
            except (KeyError, IndexError, ValueError, TypeError):
                raise ApiError(422, "Invalid", f"path not found: {path}") from None
        return cur

    def add(path: str, value: Any) -> None:
        nonlocal doc
        parts = _pointer(path)
        if not parts:
            doc = copy.deepcopy(value)
            return
        obj, last = parent(parts)
        if isinstance(obj, list):
            if last == "-":
                obj.append(copy.deepcopy(value))
            else:
                obj.insert(int(last), copy.deepcopy(value))
        else:
            obj[last] = copy.deepcopy(value)

    def remove(path: str) -> None:
        obj, last = parent(_pointer(path))
        try:
            if isinstance(obj, list):
                obj.pop(int(last))
            else:
                del obj[last]
        except (KeyError, IndexError, ValueError):
            raise ApiError(422, "Invalid", f"path not found: {path}") from None

    for op in ops:
        kind, path = op.get("op"), op.get("path", "")
        if kind == "test":
            try:
                current = get(path)
            except ApiError:
                current = None
            if current != op.get("value"):
                raise ApiError(422, "Invalid", f"the JSON-patch test failed at {path}: "
                               f"{current!r} != {op.get('value')!r}")
        elif kind == "add":
            add(path, op.get("value"))
        elif kind == "remove":
            remove(path)
        elif kind == "replace":
            get(path)
            remove(path) if _pointer(path) else None
            add(path, op.get("value"))
        elif kind == "move":
            value = get(op["from"])
            remove(op["from"])
            add(path, value)
        elif kind == "copy":
            add(path, get(op["from"]))
        else:
            raise ApiError(422, "Invalid", f"unknown JSON-patch op {kind!r}")
    return doc


def apply_defaults(value: Any, schema: Obj | None) -> Any:
    """Structural-schema defaulting (``default`` of object properties, recursively; arrays' items)."""
    if not isinstance(schema, dict):
        return value
    if isinstance(value, dict) and schema.get("properties"):
        for prop, sub in schema["properties"].items():
            if prop not in value and isinstance(sub, dict) and "default" in sub:
                value[prop] = copy.deepcopy(sub["default"])
            if prop in value:
                value[prop] = apply_defaults(value[prop], sub)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(x, schema["items"]) for x in value]
    return value


# ---------------------------------------------------------------------------------------- selectors

_SET_RE = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_selector(sel: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in sel:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def match_labels(labels: dict[str, str], selector: str | None) -> bool:
    if not selector:
        return True
    for term in _split_selector(selector):
        m = _SET_RE.match(term)
        if m:
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            if (op == "in") != (labels.get(key) in values if key in labels else False):
                if op == "in" or key in labels:
                    return False
        elif "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def match_selector_obj(labels: dict[str, str], selector: Obj | None) -> bool:
    """A LabelSelector object (matchLabels + matchExpressions)."""
    if not selector:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def dig(obj: Any, dotted: str) -> Any:
    cur = obj
    for part in dotted.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def match_fields(obj: Obj, selector: str | None) -> bool:
    if not selector:
        return True
    for term in _split_selector(selector):
        neg = "!=" in term
        key, value = term.replace("==", "=").split("!=" if neg else "=", 1)
        actual = dig(obj, key.strip())
        actual = "" if actual is None else str(actual)
        if (actual == value.strip()) == neg:
            return False
    return True


def jsonpath(obj: Any, path: str) -> Any:
    """A tiny JSONPath: ``.a.b``, ``[0]``, ``[?(@.type=="Ready")]`` (first match)."""
    tokens = re.findall(r"\[\?\(@\.([\w.]+)\s*==\s*['\"]([^'\"]*)['\"]\)\]|\[(\d+)\]|\.?([\w-]+)", path)
    cur = obj
    for fkey, fval, idx, name in tokens:
        if cur is None:
            return None
        if fkey:
            cur = next((x for x in cur if isinstance(x, dict) and str(dig(x, fkey)) == fval), None) \
                if isinstance(cur, list) else None
        elif idx:
            cur = cur[int(idx)] if isinstance(cur, list) and int(idx) < len(cur) else None
        else:
            cur = cur.get(name) if isinstance(cur, dict) else None
    return cur


# ------------------------------------------------------------------------------------------- tables

def _age(ts: str | None) -> str:
    if not ts:
        return "<unknown>"
    try:
        then = datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    except ValueError:
        return "<unknown>"
    s = int((datetime.datetime.now(datetime.UTC) - then).total_seconds())
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def _col(name: str, type_: str = "string", priority: int = 0, fmt: str = "") -> Obj:
    return {"name": name, "type": type_, "format": fmt, "description": "", "priority": priority}


def _pod_cells(o: Obj) -> tuple[list[Obj], list[Any]]:
    spec, status = o.get("spec") or {}, o.get("status") or {}
    cstat = status.get("containerStatuses") or []
    ready = sum(1 for c in cstat if c.get("ready"))
    restarts = sum(int(c.get("restartCount") or 0) for c in cstat)
    phase = status.get("phase") or "Pending"
    if (o.get("metadata") or {}).get("deletionTimestamp"):
        phase = "Terminating"
    cols = [_col("Name", fmt="name"), _col("Ready"), _col("Status"), _col("Restarts", "string"), _col("Age"),
            _col("IP", priority=1), _col("Node", priority=1), _col("Nominated Node", priority=1),
            _col("Readiness Gates", priority=1)]
    cells = [o["metadata"]["name"], f"{ready}/{len(spec.get('containers') or [])}", phase, str(restarts),
             _age(o["metadata"].get("creationTimestamp")), status.get("podIP") or "<none>",
             spec.get("nodeName") or "<none>", "<none>", "<none>"]
    return cols, cells


def _workload_cells(o: Obj) -> tuple[list[Obj], list[Any]]:
    spec, status = o.get("spec") or {}, o.get("status") or {}
    containers = ((spec.get("template") or {}).get("spec") or {}).get("containers") or []
    cols = [_col("Name", fmt="name"), _col("Ready"), _col("Age"), _col("Containers", priority=1),
            _col("Images", priority=1)]
    cells = [o["metadata"]["name"], f"{status.get('readyReplicas') or 0}/{spec.get('replicas', 1)}",
             _age(o["metadata"].get("creationTimestamp")), ",".join(c.get("name", "") for c in containers),
             ",".join(c.get("image", "") for c in containers)]
    return cols, cells


def _service_cells(o: Obj) -> tuple[list[Obj], list[Any]]:
    spec = o.get("spec") or {}
    ports = ",".join(f"{p.get('port')}/{p.get('protocol', 'TCP')}" for p in spec.get("ports") or [])
    cols = [_col("Name", fmt="name"), _col("Type"), _col("Cluster-IP"), _col("External-IP"), _col("Port(s)"),
            _col("Age"), _col("Selector", priority=1)]
    cells = [o["metadata"]["name"], spec.get("type", "ClusterIP"), spec.get("clusterIP", "None"), "<none>",
             ports or "<none>", _age(o["metadata"].get("creationTimestamp")),
             ",".join(f"{k}={v}" for k, v in (spec.get("selector") or {}).items()) or "<none>"]
    return cols, cells


def _data_cells(o: Obj) -> tuple[list[Obj], list[Any]]:
    n = len(o.get("data") or {}) + len(o.get("binaryData") or {})
    return ([_col("Name", fmt="name"), _col("Data", "integer"), _col("Age")],
            [o["metadata"]["name"], n, _age(o["metadata"].get("creationTimestamp"))])


def _event_cells(o: Obj) -> tuple[list[Obj], list[Any]]:
    inv = o.get("involvedObject") or {}
    return ([_col("Last Seen"), _col("Type"), _col("Reason"), _col("Object"), _col("Message")],
            [_age(o.get("lastTimestamp") or o["metadata"].get("creationTimestamp")), o.get("type", ""),
             o.get("reason", ""), f"{(inv.get('kind') or '').lower()}/{inv.get('name', '')}", o.get("message", "")])


TABLE_BUILDERS: dict[str, Callable[[Obj], tuple[list[Obj], list[Any]]]] = {
    "Pod": _pod_cells, "StatefulSet": _workload_cells, "Deployment": _workload_cells,
    "Service": _service_cells, "ConfigMap": _data_cells, "Secret": _data_cells, "Event": _event_cells,
}


def _printer_cells(rt: ResourceType, o: Obj) -> tuple[list[Obj], list[Any]]:
    cols, cells = [_col("Name", fmt="name")], [o["metadata"]["name"]]
    age_done = False
    for c in rt.printer_columns or []:
        if c.get("jsonPath") == ".metadata.creationTimestamp":
            cols.append(_col(c.get("name", "Age")))
            cells.append(_age(o["metadata"].get("creationTimestamp")))
            age_done = True
            continue
        cols.append(_col(c.get("name", ""), "string", int(c.get("priority", 0))))
        value = jsonpath(o, c.get("jsonPath", ""))
        cells.append("" if value is None else (value if isinstance(value, (int, float, str)) else json.dumps(value)))
    if not age_done:
        cols.append(_col("Age"))
        cells.append(_age(o["metadata"].get("creationTimestamp")))
    return cols, cells


# ----------------------------------------------------------------------------------------- emulator

def parse_api_path(path: str) -> tuple[str, str, str | None, str, str | None, str | None] | None:
    """``/api/v1/namespaces/ns/pods/x/status`` -> (group, version, namespace, plural, name, subresource)."""
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 3 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 4 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3 and not (len(rest) == 3 and rest[2] in ("status", "finalize")):
        namespace, rest = rest[1], rest[2:]
    plural = rest[0]
    name = rest[1] if len(rest) > 1 else None
    sub = "/".join(rest[2:]) or None
    if plural == "namespaces" and name is None and namespace is not None:
        name, namespace = namespace, None
    return group, version, namespace, plural, name, sub


class _Watcher:
    def __init__(self, rt_key: tuple[str, str, str], namespace: str | None):
        self.rt_key, self.namespace = rt_key, namespace
        self.queue: asyncio.Queue[Obj | None] = asyncio.Queue()


class ApiEmulator(kmock.KubernetesEmulator):
    """kmock's emulator with the semantics of a real API server (see the module docstring)."""

    EVENT_LOG_SIZE = 20000

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.types: dict[tuple[str, str, str], ResourceType] = {}
        self.store: dict[tuple[tuple[str, str, str], str | None, str], Obj] = {}
        self.rv = 0
        self.event_log: list[tuple[int, tuple[str, str, str], Obj]] = []
        self.watchers: set[_Watcher] = set()
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
            raise ApiError(404, "NotFound", f"the server could not find the requested resource "
                                            f"({group}/{version}/{plural})") from None

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
                spec["group"], v["name"], names["plural"], names["kind"],
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                singular=names.get("singular"), short_names=tuple(names.get("shortNames") or ()),
                subresources=subs, printer_columns=v.get("additionalPrinterColumns"),
                categories=tuple(names.get("categories") or ()))
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

    def list_objects(self, rt: ResourceType, namespace: str | None = None, label_selector: str | None = None,
                     field_selector: str | None = None) -> list[Obj]:
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
            obj["status"] = {"conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "lastTransitionTime": now_iso()},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                 "lastTransitionTime": now_iso()}],
                "acceptedNames": (obj.get("spec") or {}).get("names") or {}, "storedVersions":
                [v["name"] for v in (obj.get("spec") or {}).get("versions") or [] if v.get("storage")]}
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
        spec_changed = {k: v for k, v in new.items() if k not in ("metadata", "status")} != \
                       {k: v for k, v in old.items() if k not in ("metadata", "status")}
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

    def patch_object(self, rt: ResourceType, namespace: str | None, name: str, patch: Any,
                     patch_type: str = "merge", subresource: str | None = None) -> Obj:
        old = self.get_object(rt, namespace, name)
        if patch_type == "json":
            new = json_patch(old, patch)
        elif patch_type == "strategic":
            new = strategic_merge_patch(old, patch)
        else:
            new = merge_patch(old, patch)
        rv = ((patch if isinstance(patch, dict) else {}).get("metadata") or {}).get("resourceVersion")
        if rv and rv != old["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", "the object has been modified; please apply your changes "
                                            "to the latest version and try again")
        new.setdefault("metadata", {})["resourceVersion"] = old["metadata"]["resourceVersion"]
        return self._apply_change(rt, old, new, subresource)

    def replace_object(self, rt: ResourceType, namespace: str | None, name: str, body: Obj,
                       subresource: str | None = None) -> Obj:
        old = self.get_object(rt, namespace, name)
        rv = (body.get("metadata") or {}).get("resourceVersion")
        if rv and rv != old["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", "the object has been modified; please apply your changes "
                                            "to the latest version and try again")
        body = copy.deepcopy(body)
        body.setdefault("metadata", {})["resourceVersion"] = old["metadata"]["resourceVersion"]
        return self._apply_change(rt, old, body, subresource)

    def delete_object(self, rt: ResourceType, namespace: str | None, name: str,
                      propagation: str = "Background") -> Obj:
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
        terminating = {name for (k, _, name), obj in self.store.items()
                       if k == ("", "v1", "namespaces") and obj["metadata"].get("deletionTimestamp")}
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

    # ------------------------------------------------------------------ HTTP

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # Our own request parsing: kmock's path parser fails on cluster-scoped collections such as
        # POST /api/v1/namespaces, and kmock keeps every request for assertions (a long-running dev
        # cluster must not).
        body = await raw_request.read()
        text = body.decode("utf-8", "replace")
        data = None
        if body:
            try:
                data = json.loads(text)
            except ValueError:
                data = None
        request = kmock.Request(method=raw_request.method, url=raw_request.url, params=dict(raw_request.query),
                                headers=dict(raw_request.headers), body=body, text=text, data=data,
                                raw_request=raw_request)
        return await self._handle(request)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:  # type: ignore[override]
        ctype = request.headers.get("Content-Type", "")
        if request.body and ("protobuf" in ctype or "cbor" in ctype):
            # Only JSON is spoken here (kubectl create <generator> / run send protobuf: unsupported).
            return aiohttp.web.json_response(ApiError(415, "UnsupportedMediaType",
                                                      "the body of the request was in an unknown format - "
                                                      "accepted media types include: application/json, "
                                                      "application/yaml").status(), status=415)
        try:
            return await self._dispatch(request)
        except ApiError as e:
            return aiohttp.web.json_response(e.status(), status=e.code)
        except (ValueError, TypeError, KeyError, IndexError) as e:
            return aiohttp.web.json_response(ApiError(400, "BadRequest", f"{type(e).__name__}: {e}").status(),
                                             status=400)
        except Exception as e:  # noqa: BLE001  answer like an API server, never drop the connection
            return aiohttp.web.json_response(ApiError(500, "InternalError", repr(e)).status(), status=500)

    async def _dispatch(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        path = request.url.path.rstrip("/") or "/"
        method = str(request.method.value).upper()
        if method == "GET":
            if path in ("/", ""):
                return self._json({"paths": ["/api", "/api/v1", "/apis", "/version", "/healthz", "/readyz"]})
            if path in ("/healthz", "/readyz", "/livez"):
                return aiohttp.web.Response(text="ok")
            if path == "/version":
                return self._json({"major": "1", "minor": "31", "gitVersion": "v1.31.0-collm-devcluster",
                                   "gitCommit": "0" * 40, "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
                                   "goVersion": "go1.22", "compiler": "gc", "platform": "linux/amd64"})
            if path == "/api":
                return self._json({"kind": "APIVersions", "versions": ["v1"],
                                   "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                                                                   "serverAddress": "127.0.0.1"}]})
            if path == "/apis":
                return self._json(self._group_list())
            if path == "/openapi/v3":
                return self._json({"paths": {gv: {"serverRelativeURL": f"/openapi/v3/{gv}"}
                                             for gv in self._group_versions()}})
            if path.startswith("/openapi/v3/"):
                return self._json(self._openapi_v3(path[len("/openapi/v3/"):]))
            if path.startswith("/openapi"):
                raise ApiError(404, "NotFound", "openapi v2 is not served by the dev cluster")
            m = re.fullmatch(r"/apis/([^/]+)", path)
            if m:
                for g in self._group_list()["groups"]:
                    if g["name"] == m.group(1):
                        return self._json({"kind": "APIGroup", "apiVersion": "v1", **g})
                raise ApiError(404, "NotFound", "group not found")
            m = re.fullmatch(r"/api/(v1)|/apis/([^/]+)/([^/]+)", path)
            if m:
                group, version = ("", "v1") if m.group(1) else (m.group(2), m.group(3))
                resources = [d for rt in self.types.values() if rt.group == group and rt.version == version
                             for d in rt.discovery()]
                if not resources:
                    raise ApiError(404, "NotFound", "group version not found")
                return self._json({"kind": "APIResourceList", "apiVersion": "v1",
                                   "groupVersion": f"{group}/{version}" if group else version,
                                   "resources": resources})
        parsed = parse_api_path(path)
        if parsed is None:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        group, version, ns, plural, name, sub = parsed
        rt = self.rt(group, version, plural)
        if not rt.namespaced:
            ns = None
        params = request.params
        if method == "GET" and params.get("watch") in ("true", "1"):
            return await self._watch(request, rt, ns, name)
        if name is None:
            if method == "GET":
                return self._list(request, rt, ns)
            if method == "POST":
                body = self._body(request)
                if params.get("dryRun"):
                    return self._json(body, 201)
                return self._json(self.create_object(rt, body, ns), 201)
            if method == "DELETE":
                objs = self.list_objects(rt, ns, params.get("labelSelector"), params.get("fieldSelector"))
                for o in objs:
                    self.delete_object(rt, o["metadata"].get("namespace"), o["metadata"]["name"])
                return self._json({"kind": rt.kind + "List", "apiVersion": rt.api_version,
                                   "metadata": {"resourceVersion": str(self.rv)}, "items": objs})
            raise ApiError(405, "MethodNotAllowed", f"{method} is not allowed on a collection")
        if sub == "log" and rt.kind == "Pod" and method == "GET":
            self.get_object(rt, ns, name)
            reader = getattr(self, "pod_log_reader", None)
            text = reader(ns, name, params.get("container")) if reader else ""
            if params.get("tailLines"):
                text = "".join(text.splitlines(keepends=True)[-int(params["tailLines"]):])
            return aiohttp.web.Response(text=text, content_type="text/plain")
        if sub == "scale":
            return self._scale(request, rt, ns, name, method)
        if sub not in (None, "status"):
            raise ApiError(404, "NotFound", f"subresource {sub!r} is not served")
        if sub == "status" and "status" not in rt.subresources:
            raise ApiError(404, "NotFound", f"{rt.plural} has no status subresource")
        if method == "GET":
            obj = self.get_object(rt, ns, name)
            return self._table([obj], rt, request) if self._wants_table(request) else self._json(obj)
        if method == "PATCH":
            ctype = request.headers.get("Content-Type", "application/merge-patch+json").split(";")[0].strip()
            kind = {"application/json-patch+json": "json", "application/strategic-merge-patch+json": "strategic",
                    "application/apply-patch+yaml": "apply"}.get(ctype, "merge")
            patch = self._body(request)
            if kind == "apply":
                kind = "strategic" if not rt.group or rt.group in ("apps", "policy") else "merge"
                try:
                    self.get_object(rt, ns, name)
                except ApiError:
                    return self._json(self.create_object(rt, patch, ns), 201)
            if params.get("dryRun"):
                return self._json(self.get_object(rt, ns, name))
            return self._json(self.patch_object(rt, ns, name, patch, kind, sub))
        if method == "PUT":
            return self._json(self.replace_object(rt, ns, name, self._body(request), sub))
        if method == "DELETE":
            body = request.data if isinstance(request.data, dict) else {}
            policy = params.get("propagationPolicy") or body.get("propagationPolicy") or "Background"
            if body.get("orphanDependents") is True:
                policy = "Orphan"
            obj = self.delete_object(rt, ns, name, policy)
            return self._json(obj)
        raise ApiError(405, "MethodNotAllowed", f"{method} is not allowed")

    @staticmethod
    def _json(data: Any, status: int = 200) -> aiohttp.web.Response:
        return aiohttp.web.Response(body=json.dumps(data).encode(), status=status, content_type="application/json")

    @staticmethod
    def _body(request: kmock.Request) -> Any:
        data = request.data
        if data is None and request.text:
            try:
                data = json.loads(request.text)
            except ValueError:
                import yaml  # apply-patch+yaml bodies
                data = yaml.safe_load(request.text)
        if data is None:
            raise ApiError(400, "BadRequest", "a request body is required")
        return data

    def _group_list(self) -> Obj:
        groups: dict[str, list[str]] = {}
        for rt in self.types.values():
            if rt.group:
                versions = groups.setdefault(rt.group, [])
                if rt.version not in versions:
                    versions.append(rt.version)
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
             "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]}}
            for g, vs in sorted(groups.items())]}

    def _group_versions(self) -> list[str]:
        return sorted({f"apis/{rt.group}/{rt.version}" if rt.group else "api/v1" for rt in self.types.values()})

    def _openapi_v3(self, gv: str) -> Obj:
        """Just enough OpenAPI v3 for kubectl: it sees server-side field validation (no schemas, so
        kubectl validates nothing on the client side and sends ``fieldValidation``, which we accept)."""
        parts = gv.split("/")
        group, version = ("", parts[1]) if parts[0] == "api" else (parts[1], parts[2])
        params = [{"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": True}}]
        paths: Obj = {}
        for rt in self.types.values():
            if rt.group != group or rt.version != version:
                continue
            prefix = f"/apis/{group}/{version}" if group else "/api/v1"
            ns_part = "/namespaces/{namespace}" if rt.namespaced else ""
            gvk = {"group": group, "version": version, "kind": rt.kind}
            op = {"x-kubernetes-group-version-kind": gvk, "parameters": params, "responses": {}}
            paths[f"{prefix}{ns_part}/{rt.plural}/{{name}}"] = {"patch": dict(op, **{"x-kubernetes-action": "patch"}),
                                                               "get": dict(op, **{"x-kubernetes-action": "get"})}
            paths[f"{prefix}{ns_part}/{rt.plural}"] = {"post": dict(op, **{"x-kubernetes-action": "post"})}
        return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.31.0"}, "paths": paths,
                "components": {"schemas": {}}}

    @staticmethod
    def _wants_table(request: kmock.Request) -> bool:
        return "as=Table" in request.headers.get("Accept", "")

    def _list(self, request: kmock.Request, rt: ResourceType, ns: str | None) -> aiohttp.web.Response:
        p = request.params
        objs = self.list_objects(rt, ns, p.get("labelSelector"), p.get("fieldSelector"))
        if self._wants_table(request):
            return self._table(objs, rt, request)
        return self._json({"kind": rt.kind + "List", "apiVersion": rt.api_version,
                           "metadata": {"resourceVersion": str(self.rv)}, "items": objs})

    def _table(self, objs: list[Obj], rt: ResourceType, request: kmock.Request) -> aiohttp.web.Response:
        builder = TABLE_BUILDERS.get(rt.kind) if rt.group in ("", "apps") else None
        if rt.printer_columns is not None:
            builder = lambda o: _printer_cells(rt, o)  # noqa: E731
        if builder is None:
            builder = lambda o: ([_col("Name", fmt="name"), _col("Age")],  # noqa: E731
                                 [o["metadata"]["name"], _age(o["metadata"].get("creationTimestamp"))])
        include = request.params.get("includeObject", "Metadata")
        rows, cols = [], None
        for o in objs:
            cols, cells = builder(o)
            if include == "Object":
                row_obj = o
            elif include == "None":
                row_obj = None
            else:
                row_obj = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]}
            rows.append({"cells": cells, "object": row_obj})
        if cols is None:
            cols, _ = builder({"metadata": {"name": ""}})
        return self._json({"kind": "Table", "apiVersion": "meta.k8s.io/v1",
                           "metadata": {"resourceVersion": str(self.rv)}, "columnDefinitions": cols, "rows": rows})

    def _scale(self, request: kmock.Request, rt: ResourceType, ns: str | None, name: str,
               method: str) -> aiohttp.web.Response:
        if "scale" not in rt.subresources:
            raise ApiError(404, "NotFound", f"{rt.plural} has no scale subresource")
        obj = self.get_object(rt, ns, name)
        if method in ("PATCH", "PUT"):
            body = self._body(request)
            ctype = request.headers.get("Content-Type", "")
            scale_now = self._scale_obj(obj)
            new_scale = json_patch(scale_now, body) if "json-patch" in ctype else merge_patch(scale_now, body)
            replicas = (new_scale.get("spec") or {}).get("replicas")
            if replicas is not None:
                obj = self.patch_object(rt, ns, name, {"spec": {"replicas": int(replicas)}})
        return self._json(self._scale_obj(obj))

    @staticmethod
    def _scale_obj(obj: Obj) -> Obj:
        meta = obj["metadata"]
        return {"kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {k: meta.get(k) for k in ("name", "namespace", "uid", "resourceVersion",
                                                      "creationTimestamp")},
                "spec": {"replicas": (obj.get("spec") or {}).get("replicas", 1)},
                "status": {"replicas": (obj.get("status") or {}).get("replicas", 0)}}

    async def _watch(self, request: kmock.Request, rt: ResourceType, ns: str | None,
                     name: str | None) -> aiohttp.web.StreamResponse:
        p = request.params
        labels, fields = p.get("labelSelector"), p.get("fieldSelector")
        if name:
            fields = ",".join(x for x in (fields, f"metadata.name={name}") if x)
        since = p.get("resourceVersion") or ""
        timeout = float(p.get("timeoutSeconds") or 1800)

        def wanted(event: Obj) -> bool:
            o = event["object"]
            return match_labels(o["metadata"].get("labels") or {}, labels) and match_fields(o, fields)

        # Subscribe first, then take the snapshot or the replay: nothing can fall in between.
        watcher = _Watcher(rt.key, ns)
        self.watchers.add(watcher)
        initial: list[Obj]
        if since in ("", "0"):
            initial = [{"type": "ADDED", "object": copy.deepcopy(o)}
                       for o in self.list_objects(rt, ns, labels, fields)]
        else:
            start = int(since)
            oldest = self.event_log[0][0] if self.event_log else self.rv + 1
            if start < oldest - 1 and start < self.rv:
                initial = [{"type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "code": 410,
                    "reason": "Expired", "message": f"too old resource version: {start} ({oldest})"}}]
            else:
                initial = [e for rv, key, e in self.event_log if rv > start and key == rt.key
                           and (ns is None or e["object"]["metadata"].get("namespace") == ns) and wanted(e)]
        if p.get("sendInitialEvents") == "true":  # WatchList (kubectl delete/wait): end the snapshot with a bookmark
            initial = [{"type": "ADDED", "object": copy.deepcopy(o)} for o in self.list_objects(rt, ns, labels, fields)]
            initial.append({"type": "BOOKMARK", "object": {
                "kind": rt.kind, "apiVersion": rt.api_version,
                "metadata": {"resourceVersion": str(self.rv), "annotations": {"k8s.io/initial-events-end": "true"}}}})
            since = ""
        replay_rv = self.rv
        raw = request._raw_request
        assert raw is not None
        response = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        try:
            await response.prepare(raw)
            for event in initial:
                await response.write(json.dumps(event).encode() + b"\n")
            if initial and initial[0]["type"] == "ERROR":
                return response
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    event = await asyncio.wait_for(watcher.queue.get(), timeout=min(remaining, 30))
                except asyncio.TimeoutError:
                    continue
                if event is None:
                    break
                if int(event["object"]["metadata"]["resourceVersion"]) <= replay_rv and since not in ("", "0"):
                    continue  # already replayed from the log
                if wanted(event):
                    await response.write(json.dumps(event).encode() + b"\n")
        except ConnectionResetError:
            pass
        finally:
            self.watchers.discard(watcher)
        try:
            await response.write_eof()
        except Exception:  # noqa: BLE001
            pass
        return response
