"""Pure builders of a CollmCluster's children, and the condition catalog's helpers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import yaml

from collm_operator import agent_settings, api, conditions, objects
from collm_operator.api import parse_cluster
from collm_operator.conditions import FALSE, TRUE, UNKNOWN, set_condition, summarize_ready

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def cluster(spec: dict | None = None) -> api.Cluster:
    return parse_cluster(
        {
            "metadata": {"name": "demo", "namespace": "team-a", "uid": "0000-uid", "generation": 2},
            "spec": {"model": {"source": "tiny"}, "replicas": 3, "training": {"dataVolume": {"hostPath": {"path": "/srv/data"}}}, **(spec or {})},
        }
    )


def by_kind(objs):
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


def test_build_all_lists_each_child_once_with_owner_and_labels():
    c = cluster()
    objs = objects.build_all(c)
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == ["ConfigMap", "Deployment", "NetworkPolicy", "PodDisruptionBudget", "Service", "Service", "ServiceAccount", "StatefulSet"]
    assert len(by_kind(objs)) == len(objs)
    for o in objs:
        meta = o["metadata"]
        assert meta["namespace"] == "team-a"
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "collm.io/v1alpha1",
                "kind": "CollmCluster",
                "name": "demo",
                "uid": "0000-uid",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        labels = meta["labels"]
        assert labels["app.kubernetes.io/name"] == "collm"
        assert labels["app.kubernetes.io/instance"] == "demo"
        assert labels["app.kubernetes.io/managed-by"] == "collm-operator"
        assert labels["app.kubernetes.io/component"] in ("agent", "router", "monitoring")


def test_network_policy_admits_router_agents_operator_and_scrapers_only():
    c = cluster()
    policy = objects.build_network_policy(c, "collm-system")
    assert policy is not None and policy["spec"]["podSelector"]["matchLabels"] == objects.selector(c, objects.AGENT)
    rules = [(r["from"], sorted(p["port"] for p in r["ports"])) for r in policy["spec"]["ingress"]]
    router, peers, scrapers = rules
    assert router == ([{"podSelector": {"matchLabels": objects.selector(c, objects.ROUTER)}}], ["http"])
    assert peers[1] == ["grpc", "http"] and peers[0][0] == {"podSelector": {"matchLabels": objects.selector(c, objects.AGENT)}}
    assert peers[0][1]["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "collm-system"}}
    assert scrapers == ([{"namespaceSelector": {}, "podSelector": {"matchLabels": {"collm.io/metrics-scraper": "true"}}}], ["http"])
    assert objects.build_network_policy(cluster({"security": {"networkPolicy": False}}), "x") is None


def test_service_monitor_only_when_enabled():
    assert objects.build_service_monitor(cluster()) is None
    assert all(o["kind"] != "ServiceMonitor" for o in objects.build_all(cluster()))
    enabled = cluster({"monitoring": {"serviceMonitor": True}})
    monitor = objects.build_service_monitor(enabled)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    # it selects both the agents' and the router's Service
    selected = monitor["spec"]["selector"]["matchLabels"]
    for service in (objects.build_headless_service(enabled), objects.build_router_service(enabled)):
        assert selected.items() <= service["metadata"]["labels"].items()
    assert monitor in objects.build_all(enabled)


def test_statefulset_runs_one_restricted_agent_per_replica():
    c = cluster(
        {
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
            "resources": {"limits": {"nvidia.com/gpu": "1"}},
            "imagePullPolicy": "Always",
        }
    )
    sts = objects.build_statefulset(c)
    spec = sts["spec"]
    assert sts["metadata"]["name"] == "demo" and spec["replicas"] == 3
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["serviceName"] == objects.headless_service_name(c)
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "demo-agent" and pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    (container,) = pod["containers"]
    assert container["command"] == ["collm-agent"]
    assert container["args"] == agent_settings.agent_args(c)
    assert container["env"] == agent_settings.agent_env(c)
    assert container["image"] == "ghcr.io/collm/collm:0.1.0" and container["imagePullPolicy"] == "Always"
    assert container["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8080, "grpc": 9090}
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert "livenessProbe" in container and "startupProbe" in container
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/tmp"]] == {"name": mounts["/tmp"], "emptyDir": {}}
    assert "emptyDir" in volumes[mounts[api.CACHE_DIR]]
    assert volumes[mounts["/data"]]["hostPath"] == {"path": "/srv/data"}
    assert "--device" in container["args"] and container["args"][container["args"].index("--device") + 1] == "cuda"


def test_statefulset_without_data_has_no_data_volume_and_no_shared_secret_when_secure():
    plain = objects.build_statefulset(cluster({"training": {}}))
    assert [v["name"] for v in plain["spec"]["template"]["spec"]["volumes"]] == ["tmp", "model-cache", "agent-settings", "tls", "admin-token"]
    # Secure rounds once mounted a shared Secret in every pod, the aggregator's too: it could rebuild every mask.
    secure = objects.build_statefulset(cluster({"federation": {"secureAggregation": True, "secureAggregationSecretRef": "round-secret"}}))
    pod = secure["spec"]["template"]["spec"]
    assert [v["name"] for v in pod["volumes"]] == ["tmp", "model-cache", "agent-settings", "training-data", "tls", "admin-token"]
    assert "round-secret" not in str(secure)


def test_agents_and_router_mount_the_operators_secrets_and_plaintext_drops_the_tls_one():
    c = cluster()
    pod = objects.build_statefulset(c)["spec"]["template"]["spec"]
    volumes = {v["name"]: v.get("secret", {}).get("secretName") for v in pod["volumes"]}
    assert volumes["tls"] == objects.tls_secret_name(c) == "demo-tls" and volumes["admin-token"] == objects.admin_secret_name(c)
    args = pod["containers"][0]["args"]
    assert args[args.index("--tls-dir") + 1] == api.TLS_DIR and args[args.index("--admin-token-file") + 1] == f"{api.ADMIN_DIR}/token"
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert (mounts["tls"], mounts["admin-token"]) == (api.TLS_DIR, api.ADMIN_DIR)

    plain = objects.build_statefulset(cluster({"security": {"mutualTLS": False}}))["spec"]["template"]["spec"]
    assert "tls" not in {v["name"] for v in plain["volumes"]} and "--tls-dir" not in plain["containers"][0]["args"]

    router = objects.build_router_deployment(cluster({"security": {"clientTokenSecretRef": "api-keys"}}))["spec"]["template"]["spec"]
    rargs = router["containers"][0]["args"]
    assert rargs[rargs.index("--admin-token-file") + 1] == f"{api.ADMIN_DIR}/token"
    assert rargs[rargs.index("--client-tokens-dir") + 1] == objects.CLIENT_TOKENS_DIR
    assert {v["name"]: v.get("secret", {}).get("secretName") for v in router["volumes"]}["client-tokens"] == "api-keys"
    assert "--client-tokens-dir" not in objects.router_args(cluster())


def test_each_replica_keeps_its_state_on_a_claim_or_an_empty_dir():
    sts = objects.build_statefulset(cluster({"state": {"size": "5Gi", "storageClassName": "fast", "checkpointIntervalSeconds": 30}}))
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == objects.STATE_VOLUME and claim["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert claim["spec"]["storageClassName"] == "fast" and claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert {"name": objects.STATE_VOLUME, "mountPath": api.STATE_DIR} in container["volumeMounts"]
    args = container["args"]
    assert args[args.index("--state-dir") + 1] == api.STATE_DIR and args[args.index("--checkpoint-interval-s") + 1] == "30"
    assert objects.STATE_VOLUME not in {v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]}  # the claim template provides it

    ephemeral = objects.build_statefulset(cluster({"state": {"volume": "EmptyDir"}}))
    assert "volumeClaimTemplates" not in ephemeral["spec"]
    assert {"name": objects.STATE_VOLUME, "emptyDir": {}} in ephemeral["spec"]["template"]["spec"]["volumes"]


def test_cert_manager_issues_a_certificate_per_replica_and_one_for_the_operator():
    c = cluster({"security": {"certManager": {"issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"}}}})
    certs = objects.build_certificates(c)
    assert [x["metadata"]["name"] for x in certs] == ["demo-0-tls", "demo-1-tls", "demo-2-tls", "demo-operator-tls"]
    replica = certs[1]["spec"]
    assert replica["uris"] == ["spiffe://collm.io/ns/team-a/cluster/demo/replica/demo-1"] and replica["dnsNames"] == ["collm-agent"]
    assert replica["issuerRef"] == {"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"} and "server auth" in replica["usages"]
    assert certs[-1]["spec"]["uris"] == ["spiffe://collm.io/operator"] and "server auth" not in certs[-1]["spec"]["usages"]
    assert [x["kind"] for x in objects.build_all(c)].count("Certificate") == 4
    volume = next(v for v in objects.build_statefulset(c)["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
    paths = [(s["secret"]["name"], i["key"], i["path"]) for s in volume["projected"]["sources"] for i in s["secret"]["items"]]
    assert ("demo-2-tls", "tls.key", "demo-2.key") in paths and ("demo-0-tls", "ca.crt", "ca.crt") in paths and len(paths) == 7
    assert objects.build_certificates(cluster()) == [] and "secret" in next(
        v for v in objects.build_statefulset(cluster())["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"
    )


def test_cloud_edge_opens_the_grpc_port_to_edges_and_sets_the_agents_limits():
    edge = cluster({"cloudEdge": {"enabled": True, "maxSessions": 8, "maxKvMiB": 512, "idleSeconds": 30, "edges": ["kiosk-1"], "serviceType": "LoadBalancer"}})
    svc = objects.build_edge_service(edge)
    assert svc is not None and svc["spec"]["type"] == "LoadBalancer" and svc["spec"]["ports"][0]["port"] == api.GRPC_PORT
    assert svc["spec"]["selector"] == objects.selector(edge, objects.AGENT)
    policy = objects.build_network_policy(edge, "collm-system")
    assert policy is not None and {"ports": [{"protocol": "TCP", "port": "grpc"}]} in policy["spec"]["ingress"]
    args = objects.build_statefulset(edge)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [args[args.index(f) + 1] for f in ("--edge-max-sessions", "--edge-max-kv-mb", "--edge-idle-seconds")] == ["8", "512", "30"]
    off = cluster()
    assert objects.build_edge_service(off) is None
    off_args = objects.build_statefulset(off)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert off_args[off_args.index("--edge-max-sessions") + 1] == "0"  # no edge sessions without spec.cloudEdge
    assert {"ports": [{"protocol": "TCP", "port": "grpc"}]} not in (objects.build_network_policy(off, "x") or {})["spec"]["ingress"]
    with pytest.raises(api.SpecError, match="spec.cloudEdge.edges"):
        cluster({"cloudEdge": {"edges": ["Bad_Name"]}})


def test_settings_change_rolls_the_pods():
    a = objects.build_statefulset(cluster())["spec"]["template"]["metadata"]["annotations"]
    b = objects.build_statefulset(cluster({"serving": {"maxBatch": 8}}))["spec"]["template"]["metadata"]["annotations"]
    assert a != b and a == objects.build_statefulset(cluster())["spec"]["template"]["metadata"]["annotations"]


def test_headless_service_publishes_not_ready_pods():
    svc = objects.build_headless_service(cluster())
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"http": 8080, "grpc": 9090}
    assert svc["spec"]["selector"] == objects.build_statefulset(cluster())["spec"]["selector"]["matchLabels"]


def test_router_gets_every_replica_by_stable_dns_name():
    c = cluster()
    dep = objects.build_router_deployment(c)
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["collm-router"]
    args = container["args"]
    replicas = [args[i + 1] for i, a in enumerate(args) if a == "--replica"]
    assert replicas == [f"demo-{i}=http://demo-{i}.demo-agents.team-a.svc:8080" for i in range(3)]
    assert container["securityContext"] == objects.restricted_security_context()
    svc = objects.build_router_service(c)
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["metadata"]["name"] == "demo-router"


def test_configmap_holds_the_agent_settings_yaml():
    c = cluster()
    cm = objects.build_configmap(c)
    assert yaml.safe_load(cm["data"]["agent.yaml"]) == agent_settings.agent_settings(c)


def test_pdb_allows_one_replica_down():
    pdb = objects.build_pod_disruption_budget(cluster())
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == objects.selector(cluster(), "agent")


def test_service_account_has_no_token():
    sa = objects.build_service_account(cluster())
    assert sa["automountServiceAccountToken"] is False and sa["metadata"]["name"] == "demo-agent"


# --- conditions ----------------------------------------------------------------------------------


def test_catalog_lists_every_condition_once():
    assert [c.type for c in conditions.CLUSTER_CONDITIONS] == ["Ready", "Progressing", "Degraded", "TrainingActive"]
    assert [c.type for c in conditions.ROUND_CONDITIONS] == ["Trained", "Aggregated", "Evaluated", "Published", "Succeeded"]
    for kind, catalog in conditions.CATALOG.items():
        summary = conditions.SUMMARY[kind]
        assert not next(c for c in catalog if c.type == summary).counts_toward_ready
        assert all(c.set_by and c.meaning for c in catalog)
    reasons = [v for k, v in vars(conditions.Reason).items() if not k.startswith("_")]
    assert len(reasons) == len(set(reasons)) and all(r[0].isupper() and r.isalnum() for r in reasons)


def test_set_condition_moves_the_transition_time_only_on_status_change():
    first = set_condition([], "Degraded", FALSE, "AsExpected", "", 1, NOW)
    assert first == [
        {"type": "Degraded", "status": "False", "reason": "AsExpected", "message": "", "observedGeneration": 1, "lastTransitionTime": "2026-01-02T03:04:05Z"}
    ]
    later = NOW + timedelta(minutes=5)
    same = set_condition(first, "Degraded", FALSE, "AsExpected", "still fine", 2, later)
    assert same[0]["lastTransitionTime"] == "2026-01-02T03:04:05Z"
    assert (same[0]["message"], same[0]["observedGeneration"]) == ("still fine", 2)
    changed = set_condition(same, "Degraded", TRUE, "ReplicasUnavailable", "1 of 3 replicas is not ready", 2, later)
    assert changed[0]["lastTransitionTime"] == "2026-01-02T03:09:05Z"
    assert first[0]["message"] == ""  # inputs are never modified


def test_set_condition_keeps_catalog_order_and_rejects_bad_values():
    conds = set_condition([], "TrainingActive", TRUE, "Training", "", 1, NOW)
    conds = set_condition(conds, "Ready", UNKNOWN, "Waiting", "", 1, NOW)
    assert [c["type"] for c in conds] == ["Ready", "TrainingActive"]
    with pytest.raises(ValueError, match="status"):
        set_condition([], "Ready", "Yes", "Ok", "", 1, NOW)
    with pytest.raises(ValueError, match="CamelCase"):
        set_condition([], "Ready", TRUE, "not ready", "", 1, NOW)


def healthy_cluster_conditions(generation=1):
    conds = set_condition([], "Progressing", FALSE, "AsExpected", "", generation, NOW)
    conds = set_condition(conds, "Degraded", FALSE, "AsExpected", "", generation, NOW)
    return conds


def ready(conds):
    return conditions.get_condition(conds, "Ready")


def test_summarize_ready_true_false_unknown():
    conds = summarize_ready(healthy_cluster_conditions(), "CollmCluster", 1, NOW)
    assert (ready(conds)["status"], ready(conds)["reason"]) == (TRUE, "Available")
    # TrainingActive does not count: an inferenceOnly cluster is Ready
    conds = set_condition(conds, "TrainingActive", FALSE, "TrainingDisabled", "", 1, NOW)
    assert ready(summarize_ready(conds, "CollmCluster", 1, NOW))["status"] == TRUE
    degraded = set_condition(conds, "Degraded", TRUE, "ReplicasUnavailable", "demo-2 is not ready", 1, NOW)
    r = ready(summarize_ready(degraded, "CollmCluster", 1, NOW))
    assert (r["status"], r["reason"]) == (FALSE, "ReplicasUnavailable") and "demo-2 is not ready" in r["message"]
    stale = summarize_ready(healthy_cluster_conditions(1), "CollmCluster", 2, NOW)
    assert (ready(stale)["status"], ready(stale)["reason"]) == (UNKNOWN, "Waiting")
    assert "Progressing" in ready(stale)["message"]


def test_invalid_spec_sticks_until_the_generation_changes():
    conds = conditions.invalid_spec(healthy_cluster_conditions(1), "CollmCluster", "spec.replicas (0) must be >= 1", 1, NOW)
    conds = summarize_ready(conds, "CollmCluster", 1, NOW)
    assert (ready(conds)["status"], ready(conds)["reason"]) == (FALSE, "InvalidSpec")
    fixed = summarize_ready(healthy_cluster_conditions(2), "CollmCluster", 2, NOW)
    assert ready(fixed)["status"] == TRUE


def test_round_summary_is_succeeded():
    conds = []
    for type_ in ("Trained", "Aggregated", "Evaluated", "Published"):
        conds = set_condition(conds, type_, TRUE, "AsExpected", "", 1, NOW)
    done = conditions.get_condition(summarize_ready(conds, "AdapterRound", 1, NOW), "Succeeded")
    assert (done["status"], done["reason"]) == (TRUE, "Published")
    gated = set_condition(conds, "Evaluated", FALSE, "EvalGateRejected", "eval loss 2.61 > 2.55", 1, NOW)
    failed = conditions.get_condition(summarize_ready(gated, "AdapterRound", 1, NOW), "Succeeded")
    assert (failed["status"], failed["reason"]) == (FALSE, "EvalGateRejected")


def test_an_slo_change_keeps_the_pod_template_and_reaches_the_configmap():
    """SLO and training cap travel in plans (and the ConfigMap for new pods): no pod restarts."""
    template = lambda c: objects.build_statefulset(c)["spec"]["template"]  # noqa: E731
    before = cluster()
    after = cluster(
        {"serving": {"ttftMilliseconds": 250, "tpotMilliseconds": 30}, "training": {"dataVolume": {"hostPath": {"path": "/srv/data"}}, "trainCapTokens": 32}}
    )
    assert template(before) == template(after)
    settings = yaml.safe_load(objects.build_configmap(after)["data"]["agent.yaml"])
    assert (settings["ttft_ms"], settings["tpot_ms"], settings["train_cap_tokens"]) == (250, 30, 32)
    mounts = {m["mountPath"]: m["name"] for m in template(after)["spec"]["containers"][0]["volumeMounts"]}
    assert mounts[api.CONFIG_DIR] == "agent-settings"
    # A restart-only setting still rolls the pods.
    assert template(before) != template(cluster({"serving": {"maxBatch": 4}}))
