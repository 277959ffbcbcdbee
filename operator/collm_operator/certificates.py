"""The operator's certificates and tokens: the installation CA, the operator's own certificate, and
per cluster a TLS Secret (one certificate per replica) and an admin-token Secret.

- The CA lives in the Secret `collm-ca` of the operator's namespace (POD_NAMESPACE; `default` when
  run outside a pod). The first operator to start creates it; every later start reads it back, so
  certificates issued before a restart stay valid.
- The operator's client certificate (identity `spiffe://collm.io/operator`) is issued in memory at
  start and never written anywhere.
- `<cluster>-tls` holds `ca.crt` and `<replica>.crt` / `<replica>.key` for every replica. One Secret
  is mounted in every pod of the StatefulSet (a pod template cannot name a Secret per pod), so a
  replica holds its siblings' keys too: replicas of one cluster are one trust domain.
  `replica_certificates` is the pure decision: a replica gets a new certificate when it has none,
  when the CA changed, or when its certificate ends within RENEW_BEFORE; certificates of replicas
  scaled away are dropped. Agents read their certificate at start, so a renewed one is used from
  the pod's next restart (certificates last a year and are renewed 30 days before they end).
- `<cluster>-admin` holds a random bearer token (key `token`) for the agents' /publish and
  /feedback and the router's /admin/* routes; the operator reads it to push routing weights.

Both Secrets are owned by the cluster (deleted with it) and written with create/merge-patch, not
apply: apply would copy the private keys into a last-applied annotation.
"""

from __future__ import annotations

import base64
import datetime
import logging
import os
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography import x509

from collm_operator import api, objects
from collm_operator.kube import Kube
from collm_rpc import tls

log = logging.getLogger(__name__)

CA_SECRET = "collm-ca"
RENEW_BEFORE = datetime.timedelta(days=30)


def operator_namespace() -> str:
    return os.environ.get("POD_NAMESPACE") or "default"


def _decode(secret: Mapping[str, Any] | None) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in ((secret or {}).get("data") or {}).items()}


def _encode(data: Mapping[str, bytes]) -> dict[str, str]:
    return {k: base64.b64encode(v).decode() for k, v in sorted(data.items())}


def load_or_create_ca(kube: Kube, namespace: str) -> tls.CertificateAuthority:
    """The installation's CA from its Secret, created on first use (a racing operator's wins)."""
    for _ in range(2):
        data = _decode(kube.get("v1", "Secret", namespace, CA_SECRET))
        if "tls.crt" in data and "tls.key" in data:
            return tls.CertificateAuthority(data["tls.crt"], data["tls.key"])
        ca = tls.CertificateAuthority.create()
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/tls",
            "metadata": {"name": CA_SECRET, "namespace": namespace, "labels": {"app.kubernetes.io/name": "collm", "app.kubernetes.io/component": "ca"}},
            "data": _encode({"tls.crt": ca.cert_pem, "tls.key": ca.key_pem, "ca.crt": ca.cert_pem}),
        }
        if kube.create(secret) is not None:
            return ca
    raise RuntimeError(f"Secret {namespace}/{CA_SECRET} exists but holds no tls.crt/tls.key: delete it and the operator creates a new CA")


def _fresh(cert_pem: bytes | None, key_pem: bytes | None, identity: tls.Identity, now: datetime.datetime) -> bool:
    if not cert_pem or not key_pem:
        return False
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return False
    return tls.identity_of(cert) == identity and cert.not_valid_after_utc - now > RENEW_BEFORE


def replica_certificates(
    existing: Mapping[str, bytes], ca: tls.CertificateAuthority, namespace: str, cluster: str, replicas: Sequence[str], now: datetime.datetime
) -> dict[str, bytes] | None:
    """The TLS Secret's data with a valid certificate for each replica; None when `existing` is right as it is."""
    same_ca = existing.get("ca.crt") == ca.cert_pem
    data: dict[str, bytes] = {"ca.crt": ca.cert_pem}
    for name in replicas:
        identity = tls.Identity.replica(namespace, cluster, name)
        cert, key = existing.get(f"{name}.crt"), existing.get(f"{name}.key")
        if not (same_ca and _fresh(cert, key, identity, now)):
            issued = ca.issue(identity)
            cert, key = issued.cert, issued.key
        data[f"{name}.crt"], data[f"{name}.key"] = cert or b"", key or b""
    return None if data == dict(existing) else data


def _secret(cluster: api.Cluster, name: str, data: Mapping[str, bytes], component: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": name,
            "namespace": cluster.namespace,
            "labels": objects.labels(cluster, component),
            "ownerReferences": [objects.owner_reference(cluster)],
        },
        "data": _encode(data),
    }


def ensure_secrets(kube: Kube, cluster: api.Cluster, ca: tls.CertificateAuthority, now: datetime.datetime | None = None) -> bool:
    """Create or renew the cluster's TLS Secret (with mutual TLS on) and its admin-token Secret; True when one changed."""
    changed = False
    ns = cluster.namespace
    if cluster.spec.security.own_ca:
        name = objects.tls_secret_name(cluster)
        current = kube.get("v1", "Secret", ns, name)
        data = replica_certificates(_decode(current), ca, ns, cluster.name, objects.replica_names(cluster), now or datetime.datetime.now(datetime.UTC))
        if data is not None:
            if current is None:
                kube.create(_secret(cluster, name, data, "tls"))
            else:  # a merge patch replaces data key by key: null the keys of replicas scaled away
                gone = {k: None for k in (current.get("data") or {}) if k not in data}
                kube.patch("v1", "Secret", ns, name, {"data": {**_encode(data), **gone}})
            changed = True
    if cluster.spec.security.own_ca and cluster.spec.cloud_edge.enabled:
        for edge in cluster.spec.cloud_edge.edges:  # issued once; delete the Secret to issue a new one
            name = objects.edge_secret_name(cluster, edge)
            if kube.get("v1", "Secret", ns, name) is None:
                issued = ca.issue(tls.Identity.edge(ns, cluster.name, edge))
                data = {"ca.crt": issued.ca, "tls.crt": issued.cert, "tls.key": issued.key}
                changed |= kube.create(_secret(cluster, name, data, "edge")) is not None
    name = objects.admin_secret_name(cluster)
    if kube.get("v1", "Secret", ns, name) is None:
        token = secrets.token_urlsafe(32).encode()
        changed |= kube.create(_secret(cluster, name, {api.ADMIN_TOKEN_KEY: token}, "admin")) is not None
    return changed


def operator_credentials(kube: Kube, cluster: api.Cluster, own: tls.Credentials | None) -> tls.Credentials | None:
    """What the operator presents to this cluster's agents: None with mutualTLS false (plaintext), the
    certificate cert-manager issued for it with spec.security.certManager (`own` until it exists), or
    `own`, the certificate of the installation's CA."""
    if not cluster.spec.security.mutual_tls:
        return None
    if cluster.spec.security.cert_manager_issuer is None:
        return own
    data = _decode(kube.get("v1", "Secret", cluster.namespace, objects.operator_tls_secret_name(cluster)))
    if not all(data.get(k) for k in ("ca.crt", "tls.crt", "tls.key")):
        log.info("%s/%s: cert-manager has not issued the operator's certificate yet", cluster.namespace, cluster.name)
        return own
    return tls.Credentials(data["ca.crt"], data["tls.crt"], data["tls.key"])


def admin_token(kube: Kube, cluster: api.Cluster) -> str | None:
    """The cluster's admin token, None while its Secret does not exist yet."""
    token = _decode(kube.get("v1", "Secret", cluster.namespace, objects.admin_secret_name(cluster))).get(api.ADMIN_TOKEN_KEY)
    return token.decode().strip() if token else None
