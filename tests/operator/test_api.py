"""Typed views of CollmCluster and AdapterRound: defaults, every SpecError, the agent's flags."""

from __future__ import annotations

import copy

import pytest

from collm_operator import api
from collm_operator.agent_settings import agent_args, agent_env, agent_settings
from collm_operator.api import SpecError, parse_cluster, parse_round
from collm_operator.objects import build_configmap
from replica_agent.config import load_config


def body(spec: dict | None = None, name: str = "demo") -> dict:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.CLUSTER_KIND,
        "metadata": {"name": name, "namespace": "ns", "uid": "uid-1", "generation": 3},
        "spec": {"model": {"source": "tiny"}, **(spec or {})},
    }


def test_defaults_match_the_design():
    cluster = parse_cluster(body())
    assert (cluster.name, cluster.namespace, cluster.uid, cluster.generation) == ("demo", "ns", "uid-1", 3)
    s = cluster.spec
    assert s.model == api.Model("tiny", "float32")
    assert s.adapter == api.Adapter(16, 32, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    assert (s.replicas, s.image, s.image_pull_policy) == (2, "ghcr.io/collm/collm:0.1.0", "IfNotPresent")
    assert s.serving == api.Serving(1000, 100, 16, 1024)
    assert s.training == api.Training(None, "/data", 4, "2e-3", 128, 0, 10)
    f = s.federation
    assert (f.enabled, f.round_interval_seconds, f.local_steps, f.min_participants) == (True, 300, 20, 2)
    assert (f.participation_percent, f.deadline_seconds, f.aggregation, f.strategy) == (100, 120, "fedavg", "fedavg")
    assert (f.clip_norm, f.noise_multiplier, f.secure_aggregation, f.secure_aggregation_secret_ref) == ("", "", False, None)
    assert (f.eval_gate_tolerance_milli_nats, f.round_history_limit) == (0, 5)
    assert s.scheduling == api.Scheduling("coexec", 10)
    assert s.service_monitor is False and not s.uses_gpu


def test_views_are_frozen():
    cluster = parse_cluster(body())
    with pytest.raises(AttributeError):
        cluster.spec.replicas = 5  # type: ignore[misc]


def test_trimmed_mean_maps_to_the_agents_strategy_name():
    spec = parse_cluster(body({"federation": {"aggregation": "trimmedMean"}})).spec
    assert spec.federation.strategy == "trimmed_mean"


# (spec patch, field, words the message must carry so the user knows what to fix)
INVALID = [
    ({"model": {}}, "spec.model.source", "is required"),
    ({"model": {"source": "tiny", "dtype": "int8"}}, "spec.model.dtype", "float32, bfloat16, float16"),
    ({"adapter": {"rank": 0}}, "spec.adapter.rank", ">= 1"),
    ({"adapter": {"rank": 257}}, "spec.adapter.rank", "<= 256"),
    ({"adapter": {"alpha": 0}}, "spec.adapter.alpha", ">= 1"),
    ({"adapter": {"targetModules": []}}, "spec.adapter.targetModules", "non-empty"),
    ({"adapter": {"targetModules": ["lm_head"]}}, "spec.adapter.targetModules", "Llama projections"),
    ({"adapter": {"targetModules": ["q_proj", "q_proj"]}}, "spec.adapter.targetModules", "twice"),
    ({"replicas": 0}, "spec.replicas", ">= 1"),
    ({"replicas": 2.5}, "spec.replicas", "no floats"),
    ({"replicas": "3"}, "spec.replicas", "integer"),
    ({"image": ""}, "spec.image", "must not be empty"),
    ({"imagePullPolicy": "Sometimes"}, "spec.imagePullPolicy", "IfNotPresent"),
    ({"resources": "big"}, "spec.resources", "object"),
    ({"nodeSelector": {"gpu": True}}, "spec.nodeSelector", "strings"),
    ({"tolerations": ["x"]}, "spec.tolerations", "Toleration"),
    ({"serving": {"ttftMilliseconds": 0}}, "spec.serving.ttftMilliseconds", ">= 1"),
    ({"serving": {"tpotMilliseconds": -1}}, "spec.serving.tpotMilliseconds", ">= 1"),
    ({"serving": {"maxBatch": 2000}}, "spec.serving.maxBatch", "<= 1024"),
    ({"serving": {"maxTotalTokens": 8}}, "spec.serving.maxTotalTokens", ">= 16"),
    ({"serving": "fast"}, "spec.serving", "object"),
    ({"training": {"dataPath": "data"}}, "spec.training.dataPath", "absolute path"),
    ({"training": {"microBatch": 0}}, "spec.training.microBatch", ">= 1"),
    ({"training": {"learningRate": 0.001}}, "spec.training.learningRate", "no floats"),
    ({"training": {"learningRate": "fast"}}, "spec.training.learningRate", "positive number"),
    ({"training": {"learningRate": "0"}}, "spec.training.learningRate", "positive number"),
    ({"training": {"learningRate": "-1e-3"}}, "spec.training.learningRate", "positive number"),
    ({"training": {"trainCapTokens": -1}}, "spec.training.trainCapTokens", ">= 0"),
    ({"training": {"dataVolume": "pvc"}}, "spec.training.dataVolume", "object"),
    ({"training": {"dataVolume": {}}}, "spec.training.dataVolume", "exactly one volume source"),
    ({"training": {"dataVolume": {"emptyDir": {}, "hostPath": {"path": "/d"}}}}, "spec.training.dataVolume", "exactly one volume source"),
    ({"federation": {"enabled": "yes"}}, "spec.federation.enabled", "true or false"),
    ({"federation": {"roundIntervalSeconds": 0}}, "spec.federation.roundIntervalSeconds", ">= 1"),
    ({"federation": {"localSteps": 0}}, "spec.federation.localSteps", ">= 1"),
    ({"federation": {"minParticipants": 0}}, "spec.federation.minParticipants", ">= 1"),
    ({"federation": {"participationPercent": 101}}, "spec.federation.participationPercent", "<= 100"),
    ({"federation": {"deadlineSeconds": 0}}, "spec.federation.deadlineSeconds", ">= 1"),
    ({"federation": {"aggregation": "krum"}}, "spec.federation.aggregation", "fedavg, ffa, median, trimmedMean"),
    ({"federation": {"clipNorm": "none"}}, "spec.federation.clipNorm", '"1.0"'),
    ({"federation": {"noiseMultiplier": 0.5}}, "spec.federation.noiseMultiplier", "no floats"),
    ({"federation": {"evalGate": {"toleranceMilliNats": -5}}}, "spec.federation.evalGate.toleranceMilliNats", ">= 0"),
    ({"federation": {"roundHistoryLimit": -1}}, "spec.federation.roundHistoryLimit", ">= 0"),
    ({"scheduling": {"policy": "greedy"}}, "spec.scheduling.policy", "coexec, static, separated, inferenceOnly"),
    ({"scheduling": {"slowIntervalSeconds": 0}}, "spec.scheduling.slowIntervalSeconds", ">= 1"),
    ({"monitoring": {"serviceMonitor": "on"}}, "spec.monitoring.serviceMonitor", "true or false"),
    # the CRD's CEL rules, repeated in api.py
    (
        {"replicas": 3, "federation": {"minParticipants": 5}},
        "spec.federation.minParticipants",
        "spec.federation.minParticipants (5) must be <= spec.replicas (3): lower minParticipants or add replicas",
    ),
    (
        {"replicas": 1, "federation": {"enabled": False, "minParticipants": 1}, "scheduling": {"policy": "separated"}},
        "spec.scheduling.policy",
        "needs spec.replicas >= 2",
    ),
    (
        {"federation": {"secureAggregation": True, "secureAggregationSecretRef": "s", "aggregation": "median"}},
        "spec.federation.secureAggregation",
        "needs aggregation fedavg, not median",
    ),
    ({"federation": {"noiseMultiplier": "0.5"}}, "spec.federation.noiseMultiplier", "needs clipNorm"),
    ({"federation": {"noiseMultiplier": "0.5", "clipNorm": "1", "aggregation": "median"}}, "spec.federation.noiseMultiplier", "fedavg or ffa"),
    ({"federation": {"deadlineSeconds": 400}}, "spec.federation.deadlineSeconds", "(400) must be <= roundIntervalSeconds (300)"),
    (  # once accepted, and the unmask path skipped clip and noise: a DP promise that did not hold
        {"federation": {"secureAggregation": True, "secureAggregationSecretRef": "s", "noiseMultiplier": "0.5", "clipNorm": "1"}},
        "spec.federation.noiseMultiplier",
        "cannot be combined with secureAggregation",
    ),
]


@pytest.mark.parametrize("patch, field, words", INVALID, ids=[f"{i}-{case[1]}" for i, case in enumerate(INVALID)])
def test_every_spec_error_names_the_field_and_the_fix(patch, field, words):
    with pytest.raises(SpecError) as info:
        parse_cluster(body(patch))
    assert info.value.field == field
    assert words in info.value.message, info.value.message
    assert info.value.message.startswith(field.split(".")[0])
    assert str(info.value) == info.value.message


VALID = [
    {"replicas": 1, "federation": {"minParticipants": 1}},
    {"replicas": 1, "federation": {"enabled": False}},  # minParticipants only matters when federating
    {"replicas": 2, "scheduling": {"policy": "separated"}},
    {"federation": {"secureAggregation": True, "secureAggregationSecretRef": "round-secret"}},
    {"federation": {"noiseMultiplier": "0.5", "clipNorm": "1.0", "aggregation": "ffa"}},
    {"federation": {"deadlineSeconds": 300}},
    {"adapter": {"rank": 256, "targetModules": list(api.TARGET_MODULES)}},
    {"training": {"learningRate": "2.5E-4"}},
    {"training": {"learningRate": ".01"}},
    {"model": {"source": "/models/llama.gguf", "dtype": "bfloat16"}},
]


@pytest.mark.parametrize("patch", VALID)
def test_valid_edge_cases_parse(patch):
    parse_cluster(body(patch))


def test_model_source_is_immutable():
    api.check_cluster_update({"model": {"source": "tiny"}}, {"model": {"source": "tiny", "dtype": "float16"}})
    api.check_cluster_update(None, {"model": {"source": "smollm2"}})
    with pytest.raises(SpecError, match="immutable.*create a new CollmCluster") as info:
        api.check_cluster_update({"model": {"source": "tiny"}}, {"model": {"source": "smollm2"}})
    assert info.value.field == "spec.model.source"


def round_body(spec: dict) -> dict:
    return {"metadata": {"name": "r1", "namespace": "ns", "uid": "u", "generation": 1}, "spec": spec}


def test_round_defaults_come_from_the_cluster():
    r = parse_round(round_body({"clusterRef": {"name": "demo"}}))
    assert r.spec == api.RoundSpec("demo")
    resolved = r.spec.resolved(parse_cluster(body({"federation": {"localSteps": 7}})).spec.federation)
    assert (resolved.local_steps, resolved.deadline_seconds, resolved.min_participants) == (7, 120, 2)
    explicit = parse_round(
        round_body({"clusterRef": {"name": "demo"}, "localSteps": 3, "participants": ["demo-0", "demo-1"], "minParticipants": 2, "aggregator": "demo-1"})
    ).spec
    assert explicit.resolved(api.Federation()).local_steps == 3
    assert explicit.participants == ("demo-0", "demo-1") and explicit.aggregator == "demo-1"


@pytest.mark.parametrize(
    "spec, field, words",
    [
        ({}, "spec.clusterRef.name", "name the CollmCluster"),
        ({"clusterRef": {"name": ""}}, "spec.clusterRef.name", "is required"),
        ({"clusterRef": {"name": "c"}, "localSteps": 0}, "spec.localSteps", ">= 1"),
        ({"clusterRef": {"name": "c"}, "deadlineSeconds": 1.5}, "spec.deadlineSeconds", "integer"),
        ({"clusterRef": {"name": "c"}, "participants": "c-0"}, "spec.participants", "list of replica"),
        ({"clusterRef": {"name": "c"}, "participants": ["c-0", "c-0"]}, "spec.participants", "twice"),
        (
            {"clusterRef": {"name": "c"}, "participants": ["c-0"], "minParticipants": 2},
            "spec.minParticipants",
            "spec.minParticipants (2) must be <= the number of spec.participants (1)",
        ),
    ],
)
def test_round_spec_errors(spec, field, words):
    with pytest.raises(SpecError) as info:
        parse_round(round_body(spec))
    assert info.value.field == field and words in info.value.message


def test_round_cluster_ref_is_immutable():
    api.check_round_update({"clusterRef": {"name": "a"}}, {"clusterRef": {"name": "a"}, "localSteps": 3})
    with pytest.raises(SpecError, match="immutable"):
        api.check_round_update({"clusterRef": {"name": "a"}}, {"clusterRef": {"name": "b"}})


def test_agent_args_are_accepted_by_the_agent_and_carry_the_spec(tmp_path):
    cluster = parse_cluster(
        body(
            {
                "model": {"source": "smollm2", "dtype": "bfloat16"},
                "adapter": {"rank": 16, "alpha": 32, "targetModules": ["q_proj", "k_proj"]},
                "resources": {"limits": {"nvidia.com/gpu": "1"}},
                "serving": {"ttftMilliseconds": 500, "tpotMilliseconds": 40, "maxBatch": 32, "maxTotalTokens": 2048},
                "training": {
                    "dataVolume": {"emptyDir": {}},
                    "dataPath": "/private",
                    "microBatch": 2,
                    "learningRate": "2e-4",
                    "trainCapTokens": 64,
                    "revisionEverySteps": 25,
                    "revisionEverySeconds": 5,
                },
                "federation": {"secureAggregation": True, "secureAggregationSecretRef": "s", "evalGate": {"toleranceMilliNats": 20}},
            }
        )
    )
    args = agent_args(cluster, 1)
    # The pod reads the runtime settings from the ConfigMap's file: the same YAML here.
    assert args[:2] == ["--config", api.CONFIG_FILE]
    assert not {"--ttft-ms", "--tpot-ms", "--train-cap-tokens"} & set(args)
    config = pod_config(cluster, tmp_path, args)
    assert (config.model, config.dtype, config.device, config.replica_id) == ("smollm2", "bfloat16", "cuda", "demo-1")
    assert (config.lora_rank, config.lora_alpha, config.lora_targets) == (16, 32, ["q_proj", "k_proj"])
    assert (config.ttft_ms, config.tpot_ms, config.max_batch, config.max_total_tokens) == (500, 40, 32, 2048)
    assert (config.data, config.micro_batch, config.learning_rate, config.train_cap_tokens) == ("/private", 2, 2e-4, 64)
    assert config.train and (config.revision_every_steps, config.revision_every_seconds, config.revision_tolerance) == (25, 5.0, 0.02)
    assert not config.train_only_b  # fedavg: A trains too
    assert (config.host, config.port, config.grpc_port) == ("0.0.0.0", 8080, 9090)
    assert config.secure_aggregation_secret_file is None  # no shared secret: X25519 keys per round
    assert config.cache_dir == api.CACHE_DIR


def pod_config(cluster, tmp_path, args=None, environ=None):
    """The agent's config as a pod gets it: the ConfigMap's file at --config, then the flags."""
    args = agent_args(cluster) if args is None else args
    (tmp_path / "agent.yaml").write_text(build_configmap(cluster)["data"]["agent.yaml"])
    config, _ = load_config(["--config", str(tmp_path / "agent.yaml"), *args[2:]], environ=environ or {})
    return config


def test_statefulset_args_take_the_replica_id_from_the_pod_name(tmp_path):
    cluster = parse_cluster(body())
    args = agent_args(cluster)
    assert "--replica-id" not in args
    env = {e["name"]: e for e in agent_env(cluster)}
    assert env["COLLM_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    config = pod_config(cluster, tmp_path, args, {"COLLM_REPLICA_ID": "demo-4"})
    assert config.replica_id == "demo-4"
    # no data volume: the agent serves only
    assert not config.train and config.data is None and config.device == "cpu"


def test_inference_only_policy_turns_training_off(tmp_path):
    cluster = parse_cluster(body({"training": {"dataVolume": {"emptyDir": {}}}, "scheduling": {"policy": "inferenceOnly"}, "federation": {"enabled": False}}))
    config = pod_config(cluster, tmp_path)
    assert not config.train and config.train_cap_tokens == 0


def test_parsing_does_not_modify_the_body():
    original = body({"training": {"dataVolume": {"emptyDir": {}}}})
    snapshot = copy.deepcopy(original)
    agent_settings(parse_cluster(original))
    assert original == snapshot


def _bounded_integers(crd_file: str) -> list[tuple[tuple[str, ...], int, int]]:
    """(path under spec, minimum, maximum) of every integer in a CRD's spec schema."""
    import yaml

    from .cel_rules import CRDS

    schema = yaml.safe_load((CRDS / crd_file).read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    found = []

    def walk(node: dict, path: tuple[str, ...]) -> None:
        if node.get("type") == "integer":
            assert "maximum" in node, f"spec.{'.'.join(path)} has no maximum in {crd_file}"
            found.append((path, node.get("minimum", 0), node["maximum"]))
        for key, child in (node.get("properties") or {}).items():
            walk(child, (*path, key))

    walk(schema, ())
    return found


def _with(spec: dict, path: tuple[str, ...], value: int) -> dict:
    spec = copy.deepcopy(spec)
    node = spec
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return spec


@pytest.mark.parametrize(
    ("crd_file", "parse", "base"),
    [
        ("collm.io_collmclusters.yaml", api.parse_cluster_spec, {"model": {"source": "tiny"}}),
        ("collm.io_adapterrounds.yaml", api.parse_round_spec, {"clusterRef": {"name": "c"}}),
    ],
)
def test_every_integer_in_the_crds_is_bounded_and_the_operator_holds_the_same_bounds(crd_file, parse, base):
    """localSteps of 2**32 once passed and crash-looped the round daemon: the API server's schema and
    the operator's own parsing (which also guards the emulator and old API servers) now agree."""
    bounded = _bounded_integers(crd_file)
    assert any(path[-1] == "localSteps" for path, _, _ in bounded)
    for path, lo, hi in bounded:
        field = "spec." + ".".join(path)
        with pytest.raises(SpecError, match=f"must be <= {hi}") as raised:
            parse(_with(base, path, hi + 1))
        assert raised.value.field == field
        with pytest.raises(SpecError, match=f"must be >= {lo}"):
            parse(_with(base, path, lo - 1))
        try:  # the maximum itself is within the bound (other rules may still relate it to other fields)
            parse(_with(base, path, hi))
        except SpecError as error:
            assert f"must be <= {hi}" not in error.message, error.message
