"""The operator's few Kubernetes calls, on the official client's DynamicClient (any kind by apiVersion + kind).

kopf watches and posts Events; this module writes what kopf does not: child objects, status
patches from daemon threads, AdapterRounds created on schedule, pod listings. Apply is
create-or-merge-patch: the builders return the whole desired object, so a merge patch puts every
field the operator owns back (lists are replaced whole) and leaves the rest (status, fields set
by other controllers) alone.
"""

from __future__ import annotations

import logging
from typing import Any

from kubernetes import client, config, dynamic
from kubernetes.dynamic.exceptions import ApiException, ConflictError, NotFoundError, ResourceNotFoundError

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"

__all__ = ["Kube", "ApiException", "NotFoundError", "ResourceNotFoundError"]


class Kube:
    def __init__(self, api_client: client.ApiClient) -> None:
        self.dynamic = dynamic.DynamicClient(api_client)

    @classmethod
    def from_environment(cls) -> "Kube":
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
            return self.resource(api_version, kind).get(name=name, namespace=namespace).to_dict()
        except NotFoundError:
            return None

    def list(self, api_version: str, kind: str, namespace: str, label_selector: str | None = None) -> list[dict[str, Any]]:
        found = self.resource(api_version, kind).get(namespace=namespace, label_selector=label_selector)
        return [item.to_dict() for item in found.items]

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create the object, or merge-patch it to the desired state when it exists."""
        meta = obj["metadata"]
        res = self.resource(obj["apiVersion"], obj["kind"])
        try:
            return res.create(body=obj, namespace=meta.get("namespace")).to_dict()
        except ConflictError:
            return res.patch(body=obj, name=meta["name"], namespace=meta.get("namespace"), content_type=MERGE_PATCH).to_dict()

    def create(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """Create the object; None when one of that name exists already (creating is then idempotent)."""
        try:
            return self.resource(obj["apiVersion"], obj["kind"]).create(body=obj, namespace=obj["metadata"].get("namespace")).to_dict()
        except ConflictError:
            return None

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """Delete (background propagation); False when it was gone already or the kind is not served."""
        try:
            self.resource(api_version, kind).delete(name=name, namespace=namespace, body={"propagationPolicy": "Background"})
            return True
        except (NotFoundError, ResourceNotFoundError):
            return False

    def patch(self, api_version: str, kind: str, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """Merge-patch the object (metadata, spec); None when it is gone."""
        try:
            return self.resource(api_version, kind).patch(body=body, name=name, namespace=namespace, content_type=MERGE_PATCH).to_dict()
        except NotFoundError:
            return None

    def patch_status(self, api_version: str, kind: str, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any] | None:
        """Merge-patch the status subresource; None when the object is gone."""
        res = self.resource(api_version, kind)
        try:
            return res.status.patch(body={"status": status}, name=name, namespace=namespace, content_type=MERGE_PATCH).to_dict()
        except NotFoundError:
            return None
