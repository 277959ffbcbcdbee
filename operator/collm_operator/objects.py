"""Pure builders of a CollmCluster's child objects: plain dicts, no client, no cluster.

Each builder takes the typed `api.Cluster` and returns one object with the common labels and an
owner reference to the cluster (so deleting the cluster deletes its children). `build_all()` is the
complete desired state the operator applies; tests validate every object against the Kubernetes
schemas. Names: the StatefulSet is named after the cluster, so pod `<cluster>-<i>` is replica i.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import yaml

from collm_operator import agent_settings, api
from collm_operator.api import Cluster
from collm_rpc import tls

MANAGED_BY = "collm-operator"
AGENT, ROUTER = "agent", "router"
ROUTER_PORT = 8080
_CACHE_VOLUME, _TMP_VOLUME, _DATA_VOLUME, _CONFIG_VOLUME = "model-cache", "tmp", "training-data", "agent-settings"
_TLS_VOLUME, _ADMIN_VOLUME, _CLIENT_TOKENS_VOLUME, STATE_VOLUME = "tls", "admin-token", "client-tokens", "state"
CLIENT_TOKENS_DIR = "/etc/collm/client-tokens"


def labels(cluster: Cluster, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "collm",
        "app.kubernetes.io/instance": cluster.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def selector(cluster: Cluster, component: str) -> dict[str, str]:
    """The immutable subset of the labels that selects a component's pods."""
    return {k: v for k, v in labels(cluster, component).items() if k != "app.kubernetes.io/managed-by"}


def owner_reference(cluster: Cluster) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.CLUSTER_KIND,
        "name": cluster.name,
        "uid": cluster.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(cluster: Cluster, name: str, component: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": cluster.namespace,
        "labels": labels(cluster, component),
        "ownerReferences": [owner_reference(cluster)],
    }


def statefulset_name(cluster: Cluster) -> str:
    return cluster.name


def headless_service_name(cluster: Cluster) -> str:
    return f"{cluster.name}-agents"


def router_name(cluster: Cluster) -> str:
    return f"{cluster.name}-router"


def configmap_name(cluster: Cluster) -> str:
    return f"{cluster.name}-agent-settings"


def service_account_name(cluster: Cluster) -> str:
    return f"{cluster.name}-agent"


def tls_secret_name(cluster: Cluster) -> str:
    return f"{cluster.name}-tls"


def admin_secret_name(cluster: Cluster) -> str:
    return f"{cluster.name}-admin"


def replica_tls_secret_name(replica: str) -> str:
    """With cert-manager: the Secret of one replica's Certificate."""
    return f"{replica}-tls"


def edge_service_name(cluster: Cluster) -> str:
    return f"{cluster.name}-edge"


def edge_secret_name(cluster: Cluster, edge: str) -> str:
    """The client certificate of edge device `edge` (ca.crt, tls.crt, tls.key): copy it to the device."""
    return f"{cluster.name}-edge-{edge}"


def operator_tls_secret_name(cluster: Cluster) -> str:
    """With cert-manager: the Secret of the operator's Certificate for this cluster."""
    return f"{cluster.name}-operator-tls"


def replica_names(cluster: Cluster) -> list[str]:
    return [f"{statefulset_name(cluster)}-{i}" for i in range(cluster.spec.replicas)]


def replica_url(cluster: Cluster, index: int, port: int = api.HTTP_PORT) -> str:
    """The stable DNS name of replica `index` through the headless Service."""
    return f"http://{statefulset_name(cluster)}-{index}.{headless_service_name(cluster)}.{cluster.namespace}.svc:{port}"


def restricted_security_context() -> dict[str, Any]:
    """Pod Security Standards 'restricted', container level."""
    return {
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security_context() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}}


def build_service_account(cluster: Cluster) -> dict[str, Any]:
    """The agents' identity: no Role binds it and no token is mounted (agents never call the API)."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(cluster, service_account_name(cluster), AGENT),
        "automountServiceAccountToken": False,
    }


def build_configmap(cluster: Cluster) -> dict[str, Any]:
    """The agent settings as `collm-agent --config` reads them. The container gets the same
    settings as flags (which win), except api.RUNTIME_SETTINGS, which only this file carries."""
    text = yaml.safe_dump(agent_settings.agent_settings(cluster), sort_keys=True)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(cluster, configmap_name(cluster), AGENT), "data": {"agent.yaml": text}}


def _settings_hash(cluster: Cluster) -> str:
    """Changes when a restart-only setting changes (the pods then roll); the runtime ones travel in plans."""
    settings = {k: v for k, v in agent_settings.agent_settings(cluster).items() if k not in api.RUNTIME_SETTINGS}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _agent_container(cluster: Cluster) -> dict[str, Any]:
    spec = cluster.spec
    mounts = [
        {"name": _TMP_VOLUME, "mountPath": "/tmp"},
        {"name": _CACHE_VOLUME, "mountPath": api.CACHE_DIR},
        {"name": _CONFIG_VOLUME, "mountPath": api.CONFIG_DIR, "readOnly": True},
        {"name": STATE_VOLUME, "mountPath": api.STATE_DIR},
    ]
    if spec.training.data_volume is not None:
        # Read-write: /feedback may append to the local data; the data never leaves the pod.
        mounts.append({"name": _DATA_VOLUME, "mountPath": spec.training.data_path})
    if spec.security.mutual_tls:
        mounts.append({"name": _TLS_VOLUME, "mountPath": api.TLS_DIR, "readOnly": True})
    mounts.append({"name": _ADMIN_VOLUME, "mountPath": api.ADMIN_DIR, "readOnly": True})
    container: dict[str, Any] = {
        "name": "agent",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["collm-agent"],
        "args": agent_settings.agent_args(cluster),
        "env": agent_settings.agent_env(cluster),
        "ports": [
            {"name": "http", "containerPort": api.HTTP_PORT, "protocol": "TCP"},
            {"name": "grpc", "containerPort": api.GRPC_PORT, "protocol": "TCP"},
        ],
        # Loading a model can take minutes: the startup probe holds liveness off until /health answers.
        "startupProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5, "failureThreshold": 120},
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5, "failureThreshold": 3},
        # A busy engine may answer /health slowly; liveness only asks whether the process listens.
        "livenessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 10, "failureThreshold": 6},
        "securityContext": restricted_security_context(),
        "volumeMounts": mounts,
    }
    if spec.resources:
        container["resources"] = dict(spec.resources)
    return container


def _agent_volumes(cluster: Cluster) -> list[dict[str, Any]]:
    spec = cluster.spec
    volumes: list[dict[str, Any]] = [
        {"name": _TMP_VOLUME, "emptyDir": {}},
        {"name": _CACHE_VOLUME, "emptyDir": {}},
        {"name": _CONFIG_VOLUME, "configMap": {"name": configmap_name(cluster)}},
    ]
    if spec.state.volume == "EmptyDir":  # else the StatefulSet's volumeClaimTemplates give each pod its claim
        volumes.append({"name": STATE_VOLUME, "emptyDir": {}})
    if spec.training.data_volume is not None:
        volumes.append({**dict(spec.training.data_volume), "name": _DATA_VOLUME})
    if spec.security.mutual_tls:
        volumes.append(_tls_volume(cluster))
    volumes.append(_admin_volume(cluster))
    return volumes


def _tls_volume(cluster: Cluster) -> dict[str, Any]:
    """The layout agents read (ca.crt, <replica>.crt/.key): the operator's Secret, or with cert-manager
    a projection of every replica's Certificate Secret (so scaling changes the template: pods roll)."""
    if cluster.spec.security.cert_manager_issuer is None:
        return {"name": _TLS_VOLUME, "secret": {"secretName": tls_secret_name(cluster), "defaultMode": 0o440}}
    sources = []
    for i, replica in enumerate(replica_names(cluster)):
        items = [{"key": "tls.crt", "path": f"{replica}.crt"}, {"key": "tls.key", "path": f"{replica}.key"}]
        if i == 0:
            items.append({"key": "ca.crt", "path": "ca.crt"})
        sources.append({"secret": {"name": replica_tls_secret_name(replica), "items": items}})
    return {"name": _TLS_VOLUME, "projected": {"sources": sources, "defaultMode": 0o440}}


def build_certificates(cluster: Cluster) -> list[dict[str, Any]]:
    """With spec.security.certManager: a cert-manager Certificate per replica (its identity URI, the
    agents' DNS name, server and client use) and one for the operator's identity towards this cluster."""
    issuer = cluster.spec.security.cert_manager_issuer
    if issuer is None or not cluster.spec.security.mutual_tls:
        return []
    common = {
        "issuerRef": dict(issuer),
        "duration": "8760h",
        "renewBefore": "720h",
        "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
    }

    def certificate(name: str, secret: str, identity: tls.Identity, usages: list[str], dns: list[str]) -> dict[str, Any]:
        spec = {**common, "secretName": secret, "commonName": identity.name or tls.OPERATOR, "uris": [identity.uri], "usages": usages}
        if dns:
            spec["dnsNames"] = dns
        return {"apiVersion": "cert-manager.io/v1", "kind": "Certificate", "metadata": _metadata(cluster, name, AGENT), "spec": spec}

    out = [
        certificate(
            replica_tls_secret_name(r),
            replica_tls_secret_name(r),
            tls.Identity.replica(cluster.namespace, cluster.name, r),
            ["digital signature", "key encipherment", "server auth", "client auth"],
            [tls.TARGET_NAME],
        )
        for r in replica_names(cluster)
    ]
    out.append(
        certificate(operator_tls_secret_name(cluster), operator_tls_secret_name(cluster), tls.Identity.operator(), ["digital signature", "client auth"], [])
    )
    if cluster.spec.cloud_edge.enabled:
        for edge in cluster.spec.cloud_edge.edges:
            name = edge_secret_name(cluster, edge)
            out.append(certificate(name, name, tls.Identity.edge(cluster.namespace, cluster.name, edge), ["digital signature", "client auth"], []))
    return out


def _admin_volume(cluster: Cluster) -> dict[str, Any]:
    items = [{"key": api.ADMIN_TOKEN_KEY, "path": api.ADMIN_TOKEN_KEY}]
    return {"name": _ADMIN_VOLUME, "secret": {"secretName": admin_secret_name(cluster), "items": items, "defaultMode": 0o440}}


def _state_claim(cluster: Cluster) -> dict[str, Any]:
    """Each replica's PersistentVolumeClaim `state-<pod>`: it outlives the pod (and a scale-down), so a
    replica that comes back serves the adapter version it served before, without the operator."""
    spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": cluster.spec.state.size}}}
    if cluster.spec.state.storage_class_name:
        spec["storageClassName"] = cluster.spec.state.storage_class_name
    return {"metadata": {"name": STATE_VOLUME, "labels": selector(cluster, AGENT)}, "spec": spec}


def build_statefulset(cluster: Cluster) -> dict[str, Any]:
    """One agent pod per replica; Parallel so replicas start (and load the model) at once."""
    spec = cluster.spec
    pod_spec: dict[str, Any] = {
        "serviceAccountName": service_account_name(cluster),
        "automountServiceAccountToken": False,
        "securityContext": pod_security_context(),
        "containers": [_agent_container(cluster)],
        "volumes": _agent_volumes(cluster),
        # Finish in-flight requests and hand over the shadow adapter before the kill.
        "terminationGracePeriodSeconds": 60,
    }
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in spec.tolerations]
    claims = [_state_claim(cluster)] if spec.state.volume == "PersistentVolumeClaim" else []
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(cluster, statefulset_name(cluster), AGENT),
        "spec": {
            **({"volumeClaimTemplates": claims} if claims else {}),
            "replicas": spec.replicas,
            "serviceName": headless_service_name(cluster),
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector(cluster, AGENT)},
            "template": {
                "metadata": {"labels": labels(cluster, AGENT), "annotations": {"collm.io/settings-sha256": _settings_hash(cluster)}},
                "spec": pod_spec,
            },
        },
    }


def _service(cluster: Cluster, name: str, component: str, ports: dict[str, int], **spec: Any) -> dict[str, Any]:
    port_list = [{"name": n, "port": p, "targetPort": n, "protocol": "TCP"} for n, p in ports.items()]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(cluster, name, component),
        "spec": {**spec, "selector": selector(cluster, component), "ports": port_list},
    }


def build_headless_service(cluster: Cluster) -> dict[str, Any]:
    """Stable per-pod DNS names; not-ready pods are published so rounds can reach loading replicas."""
    ports = {"http": api.HTTP_PORT, "grpc": api.GRPC_PORT}
    return _service(cluster, headless_service_name(cluster), AGENT, ports, clusterIP="None", publishNotReadyAddresses=True)


def router_args(cluster: Cluster) -> list[str]:
    args = ["--host", "0.0.0.0", "--port", str(ROUTER_PORT), "--admin-token-file", f"{api.ADMIN_DIR}/{api.ADMIN_TOKEN_KEY}"]
    if cluster.spec.security.client_token_secret_ref:
        args += ["--client-tokens-dir", CLIENT_TOKENS_DIR]
    for i, name in enumerate(replica_names(cluster)):
        args += ["--replica", f"{name}={replica_url(cluster, i)}"]
    return args


def build_router_deployment(cluster: Cluster) -> dict[str, Any]:
    mounts = [{"name": _TMP_VOLUME, "mountPath": "/tmp"}, {"name": _ADMIN_VOLUME, "mountPath": api.ADMIN_DIR, "readOnly": True}]
    volumes = [{"name": _TMP_VOLUME, "emptyDir": {}}, _admin_volume(cluster)]
    if cluster.spec.security.client_token_secret_ref:
        mounts.append({"name": _CLIENT_TOKENS_VOLUME, "mountPath": CLIENT_TOKENS_DIR, "readOnly": True})
        volumes.append({"name": _CLIENT_TOKENS_VOLUME, "secret": {"secretName": cluster.spec.security.client_token_secret_ref, "defaultMode": 0o440}})
    container = {
        "name": "router",
        "image": cluster.spec.image,
        "imagePullPolicy": cluster.spec.image_pull_policy,
        "command": ["collm-router"],
        "args": router_args(cluster),
        "env": [{"name": "HOME", "value": "/tmp"}],
        "ports": [{"name": "http", "containerPort": ROUTER_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 10, "failureThreshold": 6},
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "securityContext": restricted_security_context(),
        "volumeMounts": mounts,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(cluster, router_name(cluster), ROUTER),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector(cluster, ROUTER)},
            "template": {
                "metadata": {"labels": labels(cluster, ROUTER)},
                "spec": {
                    "serviceAccountName": service_account_name(cluster),
                    "automountServiceAccountToken": False,
                    "securityContext": pod_security_context(),
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def build_edge_service(cluster: Cluster) -> dict[str, Any] | None:
    """With spec.cloudEdge: the replicas' gRPC port for edge devices (EdgeSession over mutual TLS);
    NodePort or LoadBalancer to reach it from outside the cluster."""
    if not cluster.spec.cloud_edge.enabled:
        return None
    return _service(cluster, edge_service_name(cluster), AGENT, {"grpc": api.GRPC_PORT}, type=cluster.spec.cloud_edge.service_type)


def build_router_service(cluster: Cluster) -> dict[str, Any]:
    """The cluster's endpoint for clients (TGI and OpenAI routes)."""
    return _service(cluster, router_name(cluster), ROUTER, {"http": ROUTER_PORT}, type="ClusterIP")


def build_pod_disruption_budget(cluster: Cluster) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(cluster, f"{cluster.name}-agents", AGENT),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(cluster, AGENT)}},
    }


OPERATOR_POD_LABELS = {"app.kubernetes.io/name": "collm-operator"}  # the chart's and the kustomize base's operator pods
METRICS_SCRAPER_LABEL = "collm.io/metrics-scraper"


def build_network_policy(cluster: Cluster, operator_namespace: str) -> dict[str, Any] | None:
    """Who may reach the agents: the router (HTTP), the cluster's own agents (HTTP and gRPC: round
    uploads and adapter fetches), the operator (both), and pods labelled collm.io/metrics-scraper=true
    in any namespace (HTTP: /metrics). Nothing else, so a pod elsewhere cannot use a replica's ports
    even before authentication. None unless spec.security.networkPolicy. Egress stays open (models
    may be fetched from a hub)."""
    if not cluster.spec.security.network_policy:
        return None
    http, grpc = {"protocol": "TCP", "port": "http"}, {"protocol": "TCP", "port": "grpc"}
    operator = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": operator_namespace}}, "podSelector": {"matchLabels": OPERATOR_POD_LABELS}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(cluster, f"{cluster.name}-agents", AGENT),
        "spec": {
            "podSelector": {"matchLabels": selector(cluster, AGENT)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": selector(cluster, ROUTER)}}], "ports": [http]},
                {"from": [{"podSelector": {"matchLabels": selector(cluster, AGENT)}}, operator], "ports": [http, grpc]},
                {"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {METRICS_SCRAPER_LABEL: "true"}}}], "ports": [http]},
                # Edge devices come from anywhere (outside the cluster too); their certificate says who they are.
                *([{"ports": [grpc]}] if cluster.spec.cloud_edge.enabled else []),
            ],
        },
    }


def build_service_monitor(cluster: Cluster) -> dict[str, Any] | None:
    """Prometheus Operator scrape config for agents and router; None unless spec.monitoring.serviceMonitor."""
    if not cluster.spec.service_monitor:
        return None
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _metadata(cluster, cluster.name, "monitoring"),
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": "collm", "app.kubernetes.io/instance": cluster.name}},
            "namespaceSelector": {"matchNames": [cluster.namespace]},
            "endpoints": [{"port": "http", "path": "/metrics", "interval": "30s"}],
        },
    }


def build_all(cluster: Cluster, operator_namespace: str = "default") -> list[dict[str, Any]]:
    """The whole desired state, in apply order (identity and settings before the pods that use them)."""
    objects = [
        build_service_account(cluster),
        build_configmap(cluster),
        build_headless_service(cluster),
        build_statefulset(cluster),
        build_pod_disruption_budget(cluster),
        build_router_deployment(cluster),
        build_router_service(cluster),
        *build_certificates(cluster),
    ]
    for optional in (build_edge_service(cluster), build_network_policy(cluster, operator_namespace), build_service_monitor(cluster)):
        if optional is not None:
            objects.append(optional)
    return objects


SCHEDULED_LABEL = "collm.io/scheduled"
CLUSTER_LABEL = "collm.io/cluster"


def round_name(cluster: Cluster, number: int) -> str:
    return f"{cluster.name}-round-{number}"


def build_round(cluster: Cluster, number: int, participants: list[str], aggregator: str | None) -> dict[str, Any]:
    """A scheduled AdapterRound, owned by the cluster (deleted with it; pruned by roundHistoryLimit).
    Steps, deadline and minimum participants come from the cluster's federation settings."""
    spec: dict[str, Any] = {"clusterRef": {"name": cluster.name}, "participants": list(participants)}
    if aggregator is not None:
        spec["aggregator"] = aggregator
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.ROUND_KIND,
        "metadata": {
            "name": round_name(cluster, number),
            "namespace": cluster.namespace,
            "labels": {**labels(cluster, "round"), CLUSTER_LABEL: cluster.name, SCHEDULED_LABEL: "true"},
            "ownerReferences": [owner_reference(cluster)],
        },
        "spec": spec,
    }
