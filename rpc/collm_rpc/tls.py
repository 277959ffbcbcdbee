"""Mutual TLS for every gRPC connection: a CA, certificates that say who holds them, and the checks.

One CA per operator installation signs every certificate. A certificate's identity is a URI SAN:

- ``spiffe://collm.io/operator``: the operator (and the local mode's controller);
- ``spiffe://collm.io/ns/<namespace>/cluster/<cluster>/replica/<name>``: one replica of one cluster;
- ``spiffe://collm.io/ns/<namespace>/cluster/<cluster>/edge/<name>``: an edge device of one cluster,
  which may only open edge sessions (cloud-edge collaborative inference) on that cluster's replicas.

Agent certificates also carry the DNS name ``collm-agent``, which clients verify (``ssl_target_name_override``):
pods are reached by IP, and the identity check that matters is the caller's, done by the server.
Files follow the kubernetes.io/tls layout: ``ca.crt``, ``tls.crt``, ``tls.key``; a directory that
holds the certificates of several replicas (one Secret mounted in every pod of a StatefulSet) names
them ``<replica>.crt`` / ``<replica>.key``. This module needs no torch: the operator imports it.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TARGET_NAME = "collm-agent"
SCHEME = "spiffe://collm.io/"
OPERATOR = "operator"
REPLICA, EDGE = "replica", "edge"
_MEMBER = re.compile(r"^ns/(?P<namespace>[^/]+)/cluster/(?P<cluster>[^/]+)/(?P<role>replica|edge)/(?P<name>[^/]+)$")
CA_DAYS, LEAF_DAYS = 3650, 365


@dataclass(frozen=True)
class Identity:
    """Who holds a certificate: the operator, one replica of one cluster, or an edge device of one cluster."""

    role: str  # "operator", "replica" or "edge"
    namespace: str = ""
    cluster: str = ""
    name: str = ""

    @classmethod
    def operator(cls) -> Identity:
        return cls(OPERATOR)

    @classmethod
    def replica(cls, namespace: str, cluster: str, name: str) -> Identity:
        return cls._member(REPLICA, namespace, cluster, name)

    @classmethod
    def edge(cls, namespace: str, cluster: str, name: str) -> Identity:
        return cls._member(EDGE, namespace, cluster, name)

    @classmethod
    def _member(cls, role: str, namespace: str, cluster: str, name: str) -> Identity:
        for part in (namespace, cluster, name):
            if not part or "/" in part:
                raise ValueError(f"{role} identity parts must be non-empty and without '/': {namespace!r}, {cluster!r}, {name!r}")
        return cls(role, namespace, cluster, name)

    @property
    def uri(self) -> str:
        if self.role == OPERATOR:
            return SCHEME + OPERATOR
        return f"{SCHEME}ns/{self.namespace}/cluster/{self.cluster}/{self.role}/{self.name}"

    @classmethod
    def from_uri(cls, uri: str) -> Identity | None:
        if not uri.startswith(SCHEME):
            return None
        rest = uri[len(SCHEME) :]
        if rest == OPERATOR:
            return cls.operator()
        match = _MEMBER.match(rest)
        return cls(**match.groupdict()) if match else None

    def same_cluster(self, other: Identity) -> bool:
        """Both are replicas of one cluster (peers)."""
        return self.role == other.role == REPLICA and (self.namespace, self.cluster) == (other.namespace, other.cluster)

    def edge_of(self, replica: Identity) -> bool:
        """This is an edge device of `replica`'s cluster."""
        return self.role == EDGE and replica.role == REPLICA and (self.namespace, self.cluster) == (replica.namespace, replica.cluster)

    def __str__(self) -> str:
        return self.uri


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Credentials:
    """PEM bytes of one holder: its certificate and key, and the CA it trusts."""

    ca: bytes
    cert: bytes
    key: bytes

    @property
    def identity(self) -> Identity:
        identity = identity_of(x509.load_pem_x509_certificate(self.cert))
        if identity is None:
            raise ValueError("the certificate carries no CoLLM identity (a spiffe://collm.io/ URI SAN)")
        return identity

    def write(self, directory: str | Path, name: str = "tls") -> None:
        """Write ca.crt, <name>.crt and <name>.key (the key readable by the owner only)."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / "ca.crt").write_bytes(self.ca)
        (path / f"{name}.crt").write_bytes(self.cert)
        key = path / f"{name}.key"
        key.write_bytes(self.key)
        key.chmod(0o600)

    @classmethod
    def read(cls, directory: str | Path, name: str | None = None) -> Credentials:
        """ca.crt with <name>.crt/.key when the directory has them, else tls.crt/tls.key."""
        path = Path(directory)
        stem = name if name is not None and (path / f"{name}.crt").is_file() else "tls"
        files = [path / "ca.crt", path / f"{stem}.crt", path / f"{stem}.key"]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"TLS directory {path} lacks {', '.join(missing)}: mount the cluster's TLS Secret there")
        return cls(*(f.read_bytes() for f in files))


class CertificateAuthority:
    """The installation's CA: issues the operator's and the replicas' certificates."""

    def __init__(self, cert_pem: bytes, key_pem: bytes) -> None:
        self.cert_pem, self.key_pem = cert_pem, key_pem
        self._cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the CA key must be an EC key")
        self._key = key

    @classmethod
    def create(cls, common_name: str = "collm-ca") -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)  # key_cert_sign, crl_sign
            .sign(key, hashes.SHA256())
        )
        return cls(_pem_cert(cert), _pem_key(key))

    def issue(self, identity: Identity, *, days: int = LEAF_DAYS) -> Credentials:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if identity.role == REPLICA:  # agents also serve
            names.append(x509.DNSName(TARGET_NAME))
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        cn = identity.name or OPERATOR
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        return Credentials(self.cert_pem, _pem_cert(cert), _pem_key(key))


def identity_of(cert: x509.Certificate) -> Identity | None:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
        identity = Identity.from_uri(uri)
        if identity is not None:
            return identity
    return None


def peer_identity(context: grpc.ServicerContext) -> Identity | None:
    """The verified identity of the caller of an RPC, or None on an insecure connection."""
    pems = context.auth_context().get("x509_pem_cert") or []
    if not pems:
        return None
    return identity_of(x509.load_pem_x509_certificate(pems[0]))


def server_credentials(creds: Credentials) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(creds.key, creds.cert)], root_certificates=creds.ca, require_client_auth=True)


def channel_credentials(creds: Credentials) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=creds.ca, private_key=creds.key, certificate_chain=creds.cert)


# -- who may call what -------------------------------------------------------------------------
# Control of a replica (plans, rounds, publishing, rollback, evaluation on its private held-out data,
# its stats) belongs to the operator. Uploads, and the announcements of secure rounds that precede
# them, go between replicas of one cluster; adapters are fetched by those replicas and by the operator.
# SharePublicKeys is the operator's alone: a replica that could hand out public keys could swap a
# peer's for its own and derive that peer's pair seeds (secure aggregation).
# EdgeSession is the edge devices' of the cluster, and all they may call: an edge certificate lives on
# a device outside the cluster, so it opens no door to rounds, adapters or another cluster.
OPERATOR_METHODS = frozenset(
    {"GetStats", "ApplyPlan", "StartRound", "GetRoundStatus", "Aggregate", "Evaluate", "Publish", "RevealSeeds", "Rollback", "SharePublicKeys"}
)
PEER_METHODS = frozenset({"UploadUpdate", "FetchAdapter", "AnnounceUpload"})
EDGE_METHODS = frozenset({"EdgeSession"})


def authorize(method: str, caller: Identity | None, me: Identity) -> str | None:
    """None when `caller` may call `method` on the agent `me`; otherwise the reason it may not."""
    if caller is None:
        return f"{method} needs a client certificate of this installation's CA"
    if method in OPERATOR_METHODS:
        return None if caller.role == OPERATOR else f"{method} is the operator's; {caller} is not"
    if method in PEER_METHODS:
        if caller.same_cluster(me) or (method == "FetchAdapter" and caller.role == OPERATOR):
            return None
        return f"{method} is open to replicas of {me.namespace}/{me.cluster} only; {caller} is not one"
    if method in EDGE_METHODS:
        return None if caller.edge_of(me) else f"{method} is open to edge devices of {me.namespace}/{me.cluster} only; {caller} is not one"
    return f"{method} is not a known method"
