"""The operator's CA, the clusters' TLS and admin-token Secrets: the pure renewal decision, and the
Secrets as the emulated API server stores them (created once, kept across operator restarts,
renewed for a new replica, pruned on scale-down)."""

from __future__ import annotations

import base64
import datetime

import pytest

from collm_operator import api, certificates, objects
from collm_operator.kube import Kube
from collm_rpc import tls

NOW = datetime.datetime.now(datetime.UTC)


def cluster(replicas: int = 2, **security) -> api.Cluster:
    return api.parse_cluster(
        {
            "metadata": {"name": "demo", "namespace": "default", "uid": "uid-demo", "generation": 1},
            "spec": {"model": {"source": "tiny"}, "replicas": replicas, "security": security, "federation": {"minParticipants": 1}},
        }
    )


@pytest.fixture(scope="module")
def ca() -> tls.CertificateAuthority:
    return tls.CertificateAuthority.create()


def test_each_replica_gets_its_own_identity_and_a_right_secret_is_left_alone(ca):
    data = certificates.replica_certificates({}, ca, "ns", "demo", ["demo-0", "demo-1"], NOW)
    assert data is not None and data["ca.crt"] == ca.cert_pem
    for name in ("demo-0", "demo-1"):
        creds = tls.Credentials(data["ca.crt"], data[f"{name}.crt"], data[f"{name}.key"])
        assert creds.identity == tls.Identity.replica("ns", "demo", name)
    assert certificates.replica_certificates(data, ca, "ns", "demo", ["demo-0", "demo-1"], NOW) is None


def test_renewal_new_replicas_scale_down_and_a_new_ca(ca):
    data = certificates.replica_certificates({}, ca, "ns", "demo", ["demo-0", "demo-1"], NOW)
    assert data is not None
    grown = certificates.replica_certificates(data, ca, "ns", "demo", ["demo-0", "demo-1", "demo-2"], NOW)
    assert grown is not None and grown["demo-0.crt"] == data["demo-0.crt"] and "demo-2.crt" in grown  # kept, added
    shrunk = certificates.replica_certificates(grown, ca, "ns", "demo", ["demo-0"], NOW)
    assert shrunk is not None and set(shrunk) == {"ca.crt", "demo-0.crt", "demo-0.key"}
    late = NOW + datetime.timedelta(days=tls.LEAF_DAYS) - certificates.RENEW_BEFORE + datetime.timedelta(days=1)
    renewed = certificates.replica_certificates(data, ca, "ns", "demo", ["demo-0", "demo-1"], late)
    assert renewed is not None and renewed["demo-0.crt"] != data["demo-0.crt"]
    other = tls.CertificateAuthority.create()
    reissued = certificates.replica_certificates(data, other, "ns", "demo", ["demo-0", "demo-1"], NOW)
    assert reissued is not None and reissued["ca.crt"] == other.cert_pem and reissued["demo-1.crt"] != data["demo-1.crt"]
    # A certificate of another cluster's replica under this name is not taken.
    foreign = certificates.replica_certificates({}, ca, "ns", "other", ["demo-0"], NOW)
    assert foreign is not None
    swapped = {**data, "demo-0.crt": foreign["demo-0.crt"], "demo-0.key": foreign["demo-0.key"]}
    fixed = certificates.replica_certificates(swapped, ca, "ns", "demo", ["demo-0", "demo-1"], NOW)
    assert fixed is not None and fixed["demo-0.crt"] != foreign["demo-0.crt"]


def _data(kube: Kube, name: str) -> dict[str, bytes]:
    secret = kube.get("v1", "Secret", "default", name) or {}
    return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}


def test_the_ca_is_created_once_and_read_back(kube):
    first = certificates.load_or_create_ca(kube, "default")
    again = certificates.load_or_create_ca(kube, "default")
    assert again.cert_pem == first.cert_pem and again.key_pem == first.key_pem


def test_secrets_are_issued_kept_and_pruned_without_keys_in_annotations(kube, ca):
    c = cluster(2)
    assert certificates.ensure_secrets(kube, c, ca, NOW) is True
    stored = _data(kube, objects.tls_secret_name(c))
    assert set(stored) == {"ca.crt", "demo-0.crt", "demo-0.key", "demo-1.crt", "demo-1.key"}
    token = certificates.admin_token(kube, c)
    assert token is not None and len(token) >= 32
    assert certificates.ensure_secrets(kube, c, ca, NOW) is False  # an operator restart changes nothing
    assert certificates.admin_token(kube, c) == token
    secret = kube.get("v1", "Secret", "default", objects.tls_secret_name(c)) or {}
    assert "PRIVATE KEY" not in str(secret["metadata"].get("annotations") or {})
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "uid-demo"

    assert certificates.ensure_secrets(kube, cluster(1), ca, NOW) is True
    assert set(_data(kube, objects.tls_secret_name(c))) == {"ca.crt", "demo-0.crt", "demo-0.key"}
    assert _data(kube, objects.tls_secret_name(c))["demo-0.crt"] == stored["demo-0.crt"]


def test_plaintext_clusters_get_no_tls_secret_but_an_admin_token(kube, ca):
    c = api.parse_cluster(
        {"metadata": {"name": "plain", "namespace": "default", "uid": "uid-plain"}, "spec": {"model": {"source": "tiny"}, "security": {"mutualTLS": False}}}
    )
    certificates.ensure_secrets(kube, c, ca, NOW)
    assert kube.get("v1", "Secret", "default", objects.tls_secret_name(c)) is None
    assert certificates.admin_token(kube, c) is not None


def test_the_operator_presents_what_the_cluster_asks_for(kube, ca):
    own = ca.issue(tls.Identity.operator())
    assert certificates.operator_credentials(kube, cluster(mutualTLS=False), own) is None  # plaintext, development only
    assert certificates.operator_credentials(kube, cluster(), own) is own
    managed = cluster(certManager={"issuerRef": {"name": "corp-ca"}})
    assert certificates.operator_credentials(kube, managed, own) is own  # cert-manager has not issued it yet
    corp = tls.CertificateAuthority.create("corp-ca")
    issued = corp.issue(tls.Identity.operator())  # what cert-manager would write for the operator's Certificate
    data = {"ca.crt": issued.ca, "tls.crt": issued.cert, "tls.key": issued.key}
    secret = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls", "metadata": {"name": "demo-operator-tls", "namespace": "default"}}
    kube.create({**secret, "data": {k: base64.b64encode(v).decode() for k, v in data.items()}})
    got = certificates.operator_credentials(kube, managed, own)
    assert got is not None and got.cert == issued.cert and got.identity == tls.Identity.operator()
    certificates.ensure_secrets(kube, api.parse_cluster({**managed_body(), "metadata": {"name": "cm", "namespace": "default", "uid": "u-cm"}}), ca, NOW)
    assert kube.get("v1", "Secret", "default", "cm-tls") is None  # cert-manager's Secrets replace the operator's


def managed_body() -> dict:
    return {"spec": {"model": {"source": "tiny"}, "federation": {"minParticipants": 1}, "security": {"certManager": {"issuerRef": {"name": "corp-ca"}}}}}


def test_each_listed_edge_device_gets_its_own_identity_once(kube, ca):
    c = api.parse_cluster(
        {
            "metadata": {"name": "ce", "namespace": "default", "uid": "u-ce"},
            "spec": {"model": {"source": "tiny"}, "federation": {"minParticipants": 1}, "cloudEdge": {"enabled": True, "edges": ["kiosk-1", "kiosk-2"]}},
        }
    )
    certificates.ensure_secrets(kube, c, ca, NOW)
    first = _data(kube, "ce-edge-kiosk-1")
    creds = tls.Credentials(first["ca.crt"], first["tls.crt"], first["tls.key"])
    assert creds.identity == tls.Identity.edge("default", "ce", "kiosk-1") and creds.ca == ca.cert_pem
    certificates.ensure_secrets(kube, c, ca, NOW)
    assert _data(kube, "ce-edge-kiosk-1") == first and _data(kube, "ce-edge-kiosk-2")["tls.crt"] != first["tls.crt"]
