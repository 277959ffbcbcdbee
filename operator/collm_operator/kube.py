"""The operator's few Kubernetes calls, on the official client's DynamicClient (any kind by apiVersion + kind).

kopf watches and posts Events; this module writes what kopf does not: child objects, status
patches from daemon threads, AdapterRounds created on schedule, pod listings. Every call has a
timeout, so a half-open connection cannot hang a daemon thread.

Apply is kubectl's client-side three-way merge: the desired object, plus a null for every field
the previous apply set and the desired one no longer has (so removing `nodeSelector` from a
CollmCluster removes it from the StatefulSet), sent as a JSON merge patch; the object applied last
is kept in the annotation `collm.io/last-applied`. Fields set by others (status, defaults, another
controller) are left alone. A patch that would change nothing is not sent.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from kubernetes import client, config, dynamic
from kubernetes.dynamic.exceptions import ApiException, ConflictError, NotFoundError, ResourceNotFoundError

MERGE_PATCH = "application/merge-patch+json"
LAST_APPLIED = "collm.io/last-applied"
TIMEOUT = (10, 60)  # connect, read (seconds)

__all__ = ["Kube", "ApiException", "NotFoundError", "ResourceNotFoundError", "three_way_patch", "merge_patch"]


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


def three_way_patch(last: Any, desired: Any) -> Any:
    """`desired`, with None for every key of `last` that `desired` dropped (recursively in objects;
    lists are replaced whole, as merge patches do)."""
    if not isinstance(desired, dict) or not isinstance(last, dict):
        return copy.deepcopy(desired)
    out = {key: three_way_patch(last.get(key), value) for key, value in desired.items()}
    for key in last:
        if key not in desired:
            out[key] = None
    return out


class NotOwned(Exception):
    """An object of the desired name exists and another owner (or nobody) controls it: apply leaves it alone."""


def _controller(obj: dict[str, Any]) -> dict[str, Any] | None:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return next((ref for ref in refs if ref.get("controller")), None)


def foreign_holder(existing: dict[str, Any], desired: dict[str, Any]) -> str | None:
    """Who holds `existing` when it is not the controller `desired` names ("nobody" for an object no
    controller owns, such as one made by hand); None when `desired` has no controller or it is the same."""
    wanted = _controller(desired)
    if wanted is None:
        return None
    holder = _controller(existing)
    if holder is not None and holder.get("uid") == wanted.get("uid"):
        return None
    return f"{holder.get('kind')} {holder.get('name')} (uid {holder.get('uid')})" if holder else "nobody (no controller owner: made by hand?)"


class Kube:
    def __init__(self, api_client: client.ApiClient) -> None:
        self.dynamic = dynamic.DynamicClient(api_client)

    @classmethod
    def from_environment(cls) -> Kube:
        """In a pod: the ServiceAccount; elsewhere: KUBECONFIG or ~/.kube/config (as kubectl)."""
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return cls(client.ApiClient())

    def resource(self, api_version: str, kind: str):
        """Raises ResourceNotFoundError when the API does not serve the kind (a CRD not installed)."""
        return self.dynamic.resources.get(api_version=api_version, kind=kind)

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.resource(api_version, kind).get(name=name, namespace=namespace, _request_timeout=TIMEOUT).to_dict()
        except NotFoundError:
            return None

    def list(self, api_version: str, kind: str, namespace: str, label_selector: str | None = None) -> list[dict[str, Any]]:
        found = self.resource(api_version, kind).get(namespace=namespace, label_selector=label_selector, _request_timeout=TIMEOUT)
        return [item.to_dict() for item in found.items]

    def apply(self, obj: dict[str, Any]) -> bool:
        """Bring the object to the desired state (create, or three-way merge patch); True when it changed.
        Raises NotOwned, changing nothing, when an object of that name has another controller."""
        meta = obj["metadata"]
        res = self.resource(obj["apiVersion"], obj["kind"])
        desired = copy.deepcopy(obj)
        desired["metadata"].setdefault("annotations", {})[LAST_APPLIED] = json.dumps(obj, sort_keys=True, separators=(",", ":"))
        existing = self.get(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        if existing is None:
            try:
                res.create(body=desired, namespace=meta.get("namespace"), _request_timeout=TIMEOUT)
                return True
            except ConflictError:  # created meanwhile: patch it below
                existing = self.get(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"]) or {}
        holder = foreign_holder(existing, obj)
        if holder is not None:
            wanted = _controller(obj) or {}
            raise NotOwned(
                f"{obj['kind']} {meta.get('namespace')}/{meta['name']} exists and belongs to {holder}, not to {wanted.get('kind')} {wanted.get('name')}"
            )
        last_text = ((existing.get("metadata") or {}).get("annotations") or {}).get(LAST_APPLIED)
        last = json.loads(last_text) if last_text else {}
        patch = three_way_patch(last, obj)
        patch["metadata"].setdefault("annotations", {})[LAST_APPLIED] = desired["metadata"]["annotations"][LAST_APPLIED]
        if merge_patch(existing, patch) == existing:
            return False
        res.patch(body=patch, name=meta["name"], namespace=meta.get("namespace"), content_type=MERGE_PATCH, _request_timeout=TIMEOUT)
        return True

    def create(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """Create the object; None when one of that name exists already (creating is then idempotent)."""
        try:
            return (
                self.resource(obj["apiVersion"], obj["kind"]).create(body=obj, namespace=obj["metadata"].get("namespace"), _request_timeout=TIMEOUT).to_dict()
            )
        except ConflictError:
            return None

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """Delete (background propagation); False when it was gone already or the kind is not served."""
        try:
            self.resource(api_version, kind).delete(name=name, namespace=namespace, body={"propagationPolicy": "Background"}, _request_timeout=TIMEOUT)
            return True
        except (NotFoundError, ResourceNotFoundError):
            return False

    def patch(self, api_version: str, kind: str, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """Merge-patch the object (metadata, spec); None when it is gone."""
        try:
            return (
                self.resource(api_version, kind).patch(body=body, name=name, namespace=namespace, content_type=MERGE_PATCH, _request_timeout=TIMEOUT).to_dict()
            )
        except NotFoundError:
            return None

    def patch_status(self, api_version: str, kind: str, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any] | None:
        """Merge-patch the status subresource; None when the object is gone."""
        res = self.resource(api_version, kind)
        try:
            return res.status.patch(body={"status": status}, name=name, namespace=namespace, content_type=MERGE_PATCH, _request_timeout=TIMEOUT).to_dict()
        except NotFoundError:
            return None
