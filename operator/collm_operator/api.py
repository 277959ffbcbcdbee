"""Typed, frozen views of the two custom resources (collm.io/v1alpha1), parsed from kopf's dicts.

Defaults are applied here too, so the operator is right where the API server did not default
(an old CRD, a dry run, local mode). Every rule of the CRDs' CEL validations is repeated here:
a spec that slipped past the API server gets `Ready=False` with a message that says what to fix,
never a crash loop. agent_settings.py maps a cluster onto the agent's settings.
"""

from __future__ import annotations

import builtins
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from collm_control.allocation import POLICIES

GROUP = "collm.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CLUSTER_KIND, CLUSTER_PLURAL = "CollmCluster", "collmclusters"
ROUND_KIND, ROUND_PLURAL = "AdapterRound", "adapterrounds"

DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: bfloat16 on a GPU, float32 on a CPU
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AGGREGATIONS = {"fedavg": "fedavg", "ffa": "ffa", "median": "median", "trimmedMean": "trimmed_mean"}
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
STATE_VOLUMES = ("PersistentVolumeClaim", "EmptyDir")
_EDGE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # the CRD's pattern for spec.cloudEdge.edges
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$")  # the CRD's pattern for spec.state.size
DEFAULT_IMAGE = "ghcr.io/collm/collm:0.1.0"
_NUMBER = re.compile(r"^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]{1,2})?$")  # the CRD's pattern (maxLength 32)

# Where the agent container finds things (objects.py mounts them there).
HTTP_PORT, GRPC_PORT = 8080, 9090
CACHE_DIR = "/var/cache/collm"
STATE_DIR = "/var/lib/collm/state"  # the replica's claim (or emptyDir): adapter versions, shadow, optimizer state
TLS_DIR = "/etc/collm/tls"  # the cluster's TLS Secret: ca.crt and <replica>.crt/.key
ADMIN_DIR = "/etc/collm/admin"  # the cluster's admin-token Secret
ADMIN_TOKEN_KEY = "token"
CONFIG_DIR = "/etc/collm/agent"
CONFIG_FILE = f"{CONFIG_DIR}/agent.yaml"
# Settings the operator also sends in every plan (ApplyPlan): a new pod reads them from the
# ConfigMap file, a running one gets them within slowIntervalSeconds. They are not flags and not
# in the pod template, so changing the SLO or the training cap restarts no pod.
RUNTIME_SETTINGS = ("ttft_ms", "tpot_ms", "train_cap_tokens")


class SpecError(ValueError):
    """A user-fixable problem in a resource's spec; `message` says what to change."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Model:
    source: str
    dtype: str = "float32"


@dataclass(frozen=True)
class Adapter:
    rank: int = 16
    alpha: int = 32
    target_modules: tuple[str, ...] = TARGET_MODULES


@dataclass(frozen=True)
class Serving:
    ttft_milliseconds: int = 1000
    tpot_milliseconds: int = 100
    max_batch: int = 16
    max_total_tokens: int = 1024
    shed_at_ttft_percent: int = 90  # SLO-aware admission (agent: shed_ttft_fraction); 0 queues every request


@dataclass(frozen=True)
class Training:
    data_volume: Mapping[str, Any] | None = None
    data_path: str = "/data"
    micro_batch: int = 4
    learning_rate: str = "2e-3"
    train_cap_tokens: int = 128
    revision_every_steps: int = 0
    revision_every_seconds: int = 10


@dataclass(frozen=True)
class Federation:
    enabled: bool = True
    round_interval_seconds: int = 300
    local_steps: int = 20
    min_participants: int = 2
    participation_percent: int = 100
    deadline_seconds: int = 120
    aggregation: str = "fedavg"
    clip_norm: str = ""
    noise_multiplier: str = ""
    privacy_delta: str = "1e-5"
    epsilon_budget: str = ""  # "" = no budget
    secure_aggregation: bool = False
    secure_aggregation_secret_ref: str | None = None  # deprecated, ignored: pair seeds come from per-round X25519 keys
    eval_gate_tolerance_milli_nats: int = 0
    round_history_limit: int = 5

    @property
    def strategy(self) -> str:
        """The aggregation's name in replica_agent.federated (trimmedMean -> trimmed_mean)."""
        return AGGREGATIONS[self.aggregation]


@dataclass(frozen=True)
class Scheduling:
    policy: str = "coexec"
    slow_interval_seconds: int = 10


@dataclass(frozen=True)
class CloudEdge:
    """Edge devices run the first layers and hand hard tokens to the replicas (docs/cloud-edge.md)."""

    enabled: bool = False
    max_sessions: int = 4  # per replica
    max_kv_mib: int = 256  # per replica, all sessions together
    idle_seconds: int = 60
    edges: tuple[str, ...] = ()  # edge devices the operator issues a certificate for (<cluster>-edge-<name>)
    service_type: str = "ClusterIP"


EDGE_SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")


@dataclass(frozen=True)
class State:
    volume: str = "PersistentVolumeClaim"  # or "EmptyDir"
    size: str = "1Gi"
    storage_class_name: str | None = None
    checkpoint_interval_seconds: int = 60


STATE_DEFAULTS = {"volume": State.volume, "size": State.size, "checkpointIntervalSeconds": State.checkpoint_interval_seconds}  # as the CRD defaults them


@dataclass(frozen=True)
class Security:
    mutual_tls: bool = True  # False: plaintext gRPC, development only (a Warning Event says so)
    client_token_secret_ref: str | None = None  # a Secret whose values are the bearer tokens clients must send
    network_policy: bool = True
    cert_manager_issuer: Mapping[str, str] | None = None  # issuerRef: cert-manager issues the certificates instead of the operator's CA

    @property
    def own_ca(self) -> bool:
        """Mutual TLS with certificates the operator issues from its own CA (not cert-manager's)."""
        return self.mutual_tls and self.cert_manager_issuer is None


@dataclass(frozen=True)
class ClusterSpec:
    model: Model
    adapter: Adapter = Adapter()
    replicas: int = 2
    image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    resources: Mapping[str, Any] | None = None
    node_selector: Mapping[str, str] | None = None
    tolerations: tuple[Mapping[str, Any], ...] = ()
    serving: Serving = Serving()
    training: Training = Training()
    federation: Federation = Federation()
    scheduling: Scheduling = Scheduling()
    security: Security = Security()
    state: State = State()
    cloud_edge: CloudEdge = CloudEdge()
    service_monitor: bool = False

    @property
    def uses_gpu(self) -> bool:
        resources = self.resources or {}
        return any("gpu" in key for part in ("limits", "requests") for key in (resources.get(part) or {}))


@dataclass(frozen=True)
class Cluster:
    name: str
    namespace: str
    uid: str
    generation: int
    spec: ClusterSpec


@dataclass(frozen=True)
class RoundSpec:
    cluster_name: str
    local_steps: int | None = None
    deadline_seconds: int | None = None
    min_participants: int | None = None
    participants: tuple[str, ...] | None = None
    aggregator: str | None = None

    def resolved(self, federation: Federation) -> RoundSpec:
        """The round with the cluster's federation settings filled in where the round is silent."""
        return replace(
            self, **{name: getattr(federation, name) for name in ("local_steps", "deadline_seconds", "min_participants") if getattr(self, name) is None}
        )


@dataclass(frozen=True)
class Round:
    name: str
    namespace: str
    uid: str
    generation: int
    spec: RoundSpec


# --- field readers: each raises SpecError naming the field and the fix -------------------------


# The CRDs' maxLength of the strings _Section.str reads (numbers and sizes have their own readers).
MAX_LENGTHS = {
    "spec.model.source": 1024,
    "spec.image": 1024,
    "spec.federation.secureAggregationSecretRef": 253,
    "spec.state.storageClassName": 253,
    "spec.security.clientTokenSecretRef": 253,
    "spec.security.certManager.issuerRef.name": 253,
    "spec.clusterRef.name": 253,
    "spec.aggregator": 253,
}
MAX_PARTICIPANTS, MAX_NODE_SELECTOR, NAME_LENGTH = 1024, 64, 253


class _Section:
    """One object of the spec, read field by field (`path` names it in messages)."""

    def __init__(self, parent: Mapping[str, Any] | None, path: str):
        parent = {} if parent is None else parent  # absent or null; [] or "" is a wrong type, not an empty object
        if not isinstance(parent, Mapping):
            raise SpecError(path, f"{path} must be an object, got {type(parent).__name__}")
        self.d, self.path = parent, path

    def section(self, key: str) -> _Section:
        return _Section(self.d.get(key), f"{self.path}.{key}")

    def int(self, key: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int:
        path, value = f"{self.path}.{key}", self.d.get(key, default)
        if value is None:
            raise SpecError(path, f"{path} is required: set it to an integer")
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(path, f"{path} must be an integer, got {value!r} (no floats in spec: use the unit in the name)")
        if lo is not None and value < lo:
            raise SpecError(path, f"{path} ({value}) must be >= {lo}")
        if hi is not None and value > hi:
            raise SpecError(path, f"{path} ({value}) must be <= {hi}")
        return value

    def optional_int(self, key: str, lo: builtins.int, hi: builtins.int | None = None) -> builtins.int | None:
        return None if self.d.get(key) is None else self.int(key, None, lo, hi)

    def bool(self, key: str, default: bool) -> bool:
        path, value = f"{self.path}.{key}", self.d.get(key, default)
        if not isinstance(value, bool):
            raise SpecError(path, f"{path} must be true or false, got {value!r}")
        return value

    def str(self, key: builtins.str, default: builtins.str | None, choices: tuple[builtins.str, ...] | None = None) -> builtins.str | None:
        path, value = f"{self.path}.{key}", self.d.get(key, default)
        if value is None:
            return None
        if not isinstance(value, str):
            raise SpecError(path, f"{path} must be a string, got {value!r}")
        limit = MAX_LENGTHS.get(path)
        if limit is not None and len(value) > limit:
            raise SpecError(path, f"{path} is {len(value)} characters long; at most {limit}")
        if choices is not None and value not in choices:
            raise SpecError(path, f"{path} {value!r} is not supported: use one of {', '.join(choices)}")
        return value

    def number(self, key: builtins.str, default: builtins.str, example: builtins.str, allow_empty: builtins.bool = False) -> builtins.str:
        """A positive decimal written as a string (no floats in spec)."""
        path, value = f"{self.path}.{key}", self.d.get(key, default)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise SpecError(path, f'{path} must be a string such as "{example}", got the number {value!r} (no floats in spec)')
        if not isinstance(value, str):
            raise SpecError(path, f'{path} must be a string such as "{example}", got {value!r}')
        if value == "" and allow_empty:
            return value
        if len(value) > 32 or not _NUMBER.match(value) or not 0 < float(value) < math.inf:
            raise SpecError(path, f'{path} {value!r} must be a positive number written as a string, e.g. "{example}"')
        return value

    def quantity(self, key: builtins.str, default: builtins.str) -> builtins.str:
        """A storage size such as "1Gi" (the CRD's pattern)."""
        path, value = f"{self.path}.{key}", self.d.get(key, default)
        if not isinstance(value, str) or len(value) > 32 or not _QUANTITY.match(value):
            raise SpecError(path, f'{path} must be a storage size such as "1Gi" or "500Mi", got {value!r}')
        return value

    def fraction(self, key: builtins.str, default: builtins.str, example: builtins.str) -> builtins.str:
        """A number in (0, 1) written as a string (the CRD's rule on the field)."""
        value = self.number(key, default, example)
        if not float(value) < 1:
            raise SpecError(f"{self.path}.{key}", f'{self.path}.{key} must be in (0, 1), e.g. "{example}", got {value!r}')
        return value

    def object(self, key: builtins.str) -> Mapping[builtins.str, Any] | None:
        path, value = f"{self.path}.{key}", self.d.get(key)
        if value is not None and not isinstance(value, Mapping):
            raise SpecError(path, f"{path} must be an object, got {value!r}")
        return value


# --- CollmCluster -------------------------------------------------------------------------------


def parse_cluster_spec(spec: Mapping[str, Any] | None) -> ClusterSpec:
    """Parse and validate a CollmCluster spec; raise the first SpecError found."""
    root = _Section(spec, "spec")
    m = root.section("model")
    source = m.str("source", None)
    if not source:
        raise SpecError("spec.model.source", "spec.model.source is required: 'tiny', 'smollm2' or a model path")
    model = Model(source, m.str("dtype", Model.dtype, DTYPES))

    a = root.section("adapter")
    targets = a.d.get("targetModules", list(Adapter.target_modules))
    if not isinstance(targets, list) or not targets:
        raise SpecError("spec.adapter.targetModules", "spec.adapter.targetModules must be a non-empty list such as [q_proj, v_proj]")
    for t in targets:
        if t not in TARGET_MODULES:
            raise SpecError("spec.adapter.targetModules", f"spec.adapter.targetModules has {t!r}: use Llama projections ({', '.join(TARGET_MODULES)})")
    if len(set(targets)) != len(targets):
        raise SpecError("spec.adapter.targetModules", "spec.adapter.targetModules lists a module twice: list each once")
    adapter = Adapter(a.int("rank", Adapter.rank, 1, 256), a.int("alpha", Adapter.alpha, 1, 4096), tuple(targets))

    s = root.section("serving")
    serving = Serving(
        s.int("ttftMilliseconds", Serving.ttft_milliseconds, 1, 600_000),
        s.int("tpotMilliseconds", Serving.tpot_milliseconds, 1, 60_000),
        s.int("maxBatch", Serving.max_batch, 1, 1024),
        s.int("maxTotalTokens", Serving.max_total_tokens, 16, 131_072),
        s.int("shedAtTtftPercent", Serving.shed_at_ttft_percent, 0, 1000),
    )

    t = root.section("training")
    data_path = t.str("dataPath", Training.data_path)
    if not data_path.startswith("/"):
        raise SpecError("spec.training.dataPath", f"spec.training.dataPath {data_path!r} must be an absolute path such as /data")
    data_volume = t.object("dataVolume")
    if data_volume is not None and len(data_volume) != 1:
        raise SpecError(
            "spec.training.dataVolume",
            f"spec.training.dataVolume must hold exactly one volume source such as {{emptyDir: {{}}}} "
            f"or {{hostPath: {{path: /srv/data}}}}, got {sorted(data_volume) or 'none'}",
        )
    training = Training(
        data_volume,
        data_path,
        t.int("microBatch", Training.micro_batch, 1, 1024),
        t.number("learningRate", Training.learning_rate, "2e-3"),
        t.int("trainCapTokens", Training.train_cap_tokens, 0, 1_048_576),
        t.int("revisionEverySteps", Training.revision_every_steps, 0, 1_000_000),
        t.int("revisionEverySeconds", Training.revision_every_seconds, 0, 86_400),
    )

    f, F = root.section("federation"), Federation  # F: the defaults
    federation = Federation(
        enabled=f.bool("enabled", F.enabled),
        round_interval_seconds=f.int("roundIntervalSeconds", F.round_interval_seconds, 1, 604_800),
        local_steps=f.int("localSteps", F.local_steps, 1, 1_000_000),
        min_participants=f.int("minParticipants", F.min_participants, 1, 10_000),
        participation_percent=f.int("participationPercent", F.participation_percent, 1, 100),
        deadline_seconds=f.int("deadlineSeconds", F.deadline_seconds, 1, 86_400),
        aggregation=f.str("aggregation", F.aggregation, tuple(AGGREGATIONS)),
        clip_norm=f.number("clipNorm", F.clip_norm, "1.0", allow_empty=True),
        noise_multiplier=f.number("noiseMultiplier", F.noise_multiplier, "0.5", allow_empty=True),
        privacy_delta=f.fraction("privacyDelta", F.privacy_delta, "1e-5"),
        epsilon_budget=f.number("epsilonBudget", F.epsilon_budget, "8", allow_empty=True),
        secure_aggregation=f.bool("secureAggregation", F.secure_aggregation),
        secure_aggregation_secret_ref=f.str("secureAggregationSecretRef", None) or None,
        eval_gate_tolerance_milli_nats=f.section("evalGate").int("toleranceMilliNats", F.eval_gate_tolerance_milli_nats, 0, 100_000),
        round_history_limit=f.int("roundHistoryLimit", F.round_history_limit, 0, 1000),
    )

    sc = root.section("scheduling")
    scheduling = Scheduling(sc.str("policy", Scheduling.policy, POLICIES), sc.int("slowIntervalSeconds", Scheduling.slow_interval_seconds, 1, 3600))

    sec, st = root.section("security"), root.section("state")
    tolerations = root.d.get("tolerations")
    tolerations = [] if tolerations is None else tolerations
    if not isinstance(tolerations, list) or not all(isinstance(x, Mapping) for x in tolerations):
        raise SpecError("spec.tolerations", "spec.tolerations must be a list of core/v1 Toleration objects")
    node_selector = root.object("nodeSelector")
    if node_selector and not all(isinstance(v, str) for v in node_selector.values()):
        raise SpecError("spec.nodeSelector", "spec.nodeSelector values must be strings (quote numbers and booleans)")
    if node_selector and (len(node_selector) > MAX_NODE_SELECTOR or any(len(v) > NAME_LENGTH for v in node_selector.values())):
        raise SpecError("spec.nodeSelector", f"spec.nodeSelector takes at most {MAX_NODE_SELECTOR} labels, each value at most {NAME_LENGTH} characters")
    image = root.str("image", ClusterSpec.image)
    if not image:
        raise SpecError("spec.image", "spec.image must not be empty: name the collm image, e.g. " + DEFAULT_IMAGE)

    result = ClusterSpec(
        model=model,
        adapter=adapter,
        replicas=root.int("replicas", ClusterSpec.replicas, 1, 1024),
        image=image,
        image_pull_policy=root.str("imagePullPolicy", ClusterSpec.image_pull_policy, PULL_POLICIES),
        resources=root.object("resources"),
        node_selector=node_selector,
        tolerations=tuple(tolerations),
        serving=serving,
        training=training,
        federation=federation,
        scheduling=scheduling,
        security=Security(
            sec.bool("mutualTLS", Security.mutual_tls),
            sec.str("clientTokenSecretRef", None) or None,
            sec.bool("networkPolicy", Security.network_policy),
            _issuer_ref(sec),
        ),
        state=State(
            st.str("volume", State.volume, STATE_VOLUMES) or State.volume,
            st.quantity("size", State.size),
            st.str("storageClassName", None) or None,
            st.int("checkpointIntervalSeconds", State.checkpoint_interval_seconds, 0, 86_400),
        ),
        cloud_edge=_cloud_edge(root.section("cloudEdge")),
        service_monitor=root.section("monitoring").bool("serviceMonitor", ClusterSpec.service_monitor),
    )
    _check_cross_fields(result)
    return result


def _cloud_edge(ce: _Section) -> CloudEdge:
    edges = ce.d.get("edges")
    edges = [] if edges is None else edges
    if not isinstance(edges, list) or not all(isinstance(e, str) and _EDGE_NAME.match(e) for e in edges) or len(edges) > 1000:
        raise SpecError("spec.cloudEdge.edges", "spec.cloudEdge.edges must list at most 1000 edge device names (lowercase letters, digits, '-')")
    if len(set(edges)) != len(edges):
        raise SpecError("spec.cloudEdge.edges", "spec.cloudEdge.edges lists a device twice: list each once")
    D = CloudEdge
    return CloudEdge(
        ce.bool("enabled", D.enabled),
        ce.int("maxSessions", D.max_sessions, 0, 256),
        ce.int("maxKvMiB", D.max_kv_mib, 0, 65_536),
        ce.int("idleSeconds", D.idle_seconds, 1, 86_400),
        tuple(edges),
        ce.str("serviceType", D.service_type, EDGE_SERVICE_TYPES) or D.service_type,
    )


def _issuer_ref(security: _Section) -> Mapping[str, str] | None:
    cm = security.section("certManager")
    issuer = cm.section("issuerRef")
    name = issuer.str("name", None)
    if not name:
        if security.d.get("certManager") is not None:  # present, even as {}: the CRD requires issuerRef
            raise SpecError("spec.security.certManager.issuerRef.name", "spec.security.certManager needs issuerRef.name: the cert-manager Issuer to use")
        return None
    return {"name": name, "kind": issuer.str("kind", "Issuer", ("Issuer", "ClusterIssuer")) or "Issuer", "group": "cert-manager.io"}


def _check_cross_fields(spec: ClusterSpec) -> None:
    """The CRD's x-kubernetes-validations rules, one for one (same order, same messages' intent)."""
    f = spec.federation
    if f.enabled and f.min_participants > spec.replicas:
        raise SpecError(
            "spec.federation.minParticipants",
            f"spec.federation.minParticipants ({f.min_participants}) must be <= spec.replicas ({spec.replicas}): lower minParticipants or add replicas",
        )
    if spec.scheduling.policy == "separated" and spec.replicas < 2:
        raise SpecError(
            "spec.scheduling.policy", "spec.scheduling.policy separated needs spec.replicas >= 2 (half serve, half train): add replicas or pick coexec"
        )
    if f.secure_aggregation and f.aggregation != "fedavg":
        raise SpecError(
            "spec.federation.secureAggregation",
            f"spec.federation.secureAggregation needs aggregation fedavg, not {f.aggregation} "
            "(the aggregator only sees the sum): set aggregation: fedavg or turn secureAggregation off",
        )
    if f.noise_multiplier and not f.clip_norm:
        raise SpecError(
            "spec.federation.noiseMultiplier",
            'spec.federation.noiseMultiplier needs clipNorm: DP noise is calibrated to the clipping norm, so set clipNorm (e.g. "1.0")',
        )
    if f.noise_multiplier and f.aggregation not in ("fedavg", "ffa"):
        raise SpecError(
            "spec.federation.noiseMultiplier",
            f"spec.federation.noiseMultiplier needs aggregation fedavg or ffa, not {f.aggregation}: DP noise is calibrated for the mean",
        )
    if f.secure_aggregation and f.noise_multiplier:
        raise SpecError(
            "spec.federation.noiseMultiplier",
            "spec.federation.noiseMultiplier cannot be combined with secureAggregation: the aggregator sees only the masked sum, "
            "so DP noise would have to be added in shares by the participants (distributed DP, not built); use one of the two",
        )
    if f.epsilon_budget and not f.noise_multiplier:
        raise SpecError(
            "spec.federation.epsilonBudget",
            "spec.federation.epsilonBudget needs noiseMultiplier: without DP noise a round's epsilon is unbounded; "
            'set noiseMultiplier (e.g. "1.0") and clipNorm',
        )
    if f.deadline_seconds > f.round_interval_seconds:
        raise SpecError(
            "spec.federation.deadlineSeconds",
            f"spec.federation.deadlineSeconds ({f.deadline_seconds}) must be <= roundIntervalSeconds ({f.round_interval_seconds}): "
            "shorten the deadline or lengthen the interval",
        )


def check_cluster_update(old_spec: Mapping[str, Any] | None, new_spec: Mapping[str, Any] | None) -> None:
    """The CRD's transition rules: spec.model.source and spec.state are immutable."""
    old = ((old_spec or {}).get("model") or {}).get("source")
    new = ((new_spec or {}).get("model") or {}).get("source")
    if old is not None and old != new:
        raise SpecError("spec.model.source", f"spec.model.source is immutable ({old!r} -> {new!r}): create a new CollmCluster for another base model")
    old_state, new_state = (old_spec or {}).get("state"), (new_spec or {}).get("state")
    # Defaults on both sides, as the API server applies them (on read too) before the CEL rule runs.
    if old_spec is not None and {**STATE_DEFAULTS, **(old_state or {})} != {**STATE_DEFAULTS, **(new_state or {})}:
        raise SpecError("spec.state", "spec.state is immutable (a StatefulSet's volume claims cannot change): create a new CollmCluster to move the state")


def parse_cluster(body: Mapping[str, Any]) -> Cluster:
    """The typed view of a CollmCluster object (kopf's body); raise SpecError on a bad spec."""
    meta = body.get("metadata") or {}
    return Cluster(
        name=meta.get("name", ""),
        namespace=meta.get("namespace", "default"),
        uid=meta.get("uid", ""),
        generation=int(meta.get("generation") or 0),
        spec=parse_cluster_spec(body.get("spec")),
    )


# --- AdapterRound -------------------------------------------------------------------------------


def parse_round_spec(spec: Mapping[str, Any] | None) -> RoundSpec:
    root = _Section(spec, "spec")
    name = root.section("clusterRef").str("name", None)
    if not name:
        raise SpecError("spec.clusterRef.name", "spec.clusterRef.name is required: name the CollmCluster this round belongs to")
    participants = root.d.get("participants")
    if participants is not None:
        if not isinstance(participants, list) or not all(isinstance(p, str) and 0 < len(p) <= NAME_LENGTH for p in participants):
            raise SpecError("spec.participants", "spec.participants must be a list of replica (pod) names")
        if len(participants) > MAX_PARTICIPANTS:
            raise SpecError("spec.participants", f"spec.participants lists {len(participants)} replicas; at most {MAX_PARTICIPANTS}")
        if len(set(participants)) != len(participants):
            raise SpecError("spec.participants", "spec.participants lists a replica twice: list each once")
        participants = tuple(participants)
    result = RoundSpec(
        name,
        root.optional_int("localSteps", 1, 1_000_000),
        root.optional_int("deadlineSeconds", 1, 86_400),
        root.optional_int("minParticipants", 1, 10_000),
        participants,
        root.str("aggregator", None),
    )
    if participants is not None and result.min_participants is not None and result.min_participants > len(participants):
        raise SpecError(
            "spec.minParticipants",
            f"spec.minParticipants ({result.min_participants}) must be <= the number of spec.participants ({len(participants)}): "
            "lower minParticipants or list more participants",
        )
    return result


def check_round_update(old_spec: Mapping[str, Any] | None, new_spec: Mapping[str, Any] | None) -> None:
    """The CRD's transition rule: spec.clusterRef is immutable."""
    old, new = (old_spec or {}).get("clusterRef"), (new_spec or {}).get("clusterRef")
    if old is not None and old != new:
        raise SpecError("spec.clusterRef", "spec.clusterRef is immutable: create a new AdapterRound for another cluster")


def parse_round(body: Mapping[str, Any]) -> Round:
    meta = body.get("metadata") or {}
    return Round(
        meta.get("name", ""), meta.get("namespace", "default"), meta.get("uid", ""), int(meta.get("generation") or 0), parse_round_spec(body.get("spec"))
    )
