"""The patch and defaulting semantics of the emulated API server: pure functions on JSON objects.

- ``merge_patch``: RFC 7386 JSON merge patch.
- ``strategic_merge_patch``: a simplified strategic merge patch (lists of objects merge by the keys
  in ``MERGE_KEYS``; ``$patch``, ``$retainKeys``, ``$setElementOrder`` and ``$deleteFromPrimitiveList``).
- ``json_patch``: RFC 6902 JSON patch (a failed ``test`` raises ``ApiError`` 422, for optimistic concurrency).
- ``apply_defaults``: structural-schema defaulting of custom resources (``default`` in openAPIV3Schema).
"""

from __future__ import annotations

import copy
from typing import Any

from collm_operator.kube import merge_patch  # RFC 7386: the operator's own, so the emulator applies what the operator computes

from .errors import ApiError

__all__ = ["MERGE_KEYS", "merge_patch", "strategic_merge_patch", "json_patch", "apply_defaults"]

Obj = dict[str, Any]


# List merge keys of the strategic merge patch (the subset used by our manifests and kubectl apply).
MERGE_KEYS: dict[str, tuple[str, ...]] = {
    "containers": ("name",),
    "initContainers": ("name",),
    "env": ("name",),
    "volumes": ("name",),
    "volumeMounts": ("mountPath",),
    "ports": ("containerPort", "port"),
    "conditions": ("type",),
    "ownerReferences": ("uid",),
    "tolerations": ("key",),
    "imagePullSecrets": ("name",),
}


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
    if isinstance(patch, list) and field in MERGE_KEYS and isinstance(target, list) and all(isinstance(x, dict) for x in patch):
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
                raise ApiError(422, "Invalid", f"the JSON-patch test failed at {path}: {current!r} != {op.get('value')!r}")
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
