"""A CollmCluster as the agent's settings (replica_agent/config.py): `agent_settings()` is the dict the
ConfigMap renders as YAML; `agent_args()` and `agent_env()` render it for the agent container."""

from __future__ import annotations

from typing import Any

from collm_operator.api import (
    ADMIN_DIR,
    ADMIN_TOKEN_KEY,
    CACHE_DIR,
    CONFIG_FILE,
    GRPC_PORT,
    HTTP_PORT,
    RUNTIME_SETTINGS,
    STATE_DIR,
    TLS_DIR,
    Cluster,
)


def agent_settings(cluster: Cluster, replica_index: int | None = None) -> dict[str, Any]:
    """The cluster as replica_agent.config.AgentConfig settings (snake_case keys, agent defaults omitted
    only where the agent's default is right for a pod). The ConfigMap renders this dict as YAML."""
    spec = cluster.spec
    training_on = spec.scheduling.policy != "inferenceOnly" and spec.training.data_volume is not None
    settings: dict[str, Any] = {
        "model": spec.model.source,
        "dtype": spec.model.dtype,
        "device": "cuda" if spec.uses_gpu else "cpu",
        "lora_rank": spec.adapter.rank,
        "lora_alpha": spec.adapter.alpha,
        "lora_targets": list(spec.adapter.target_modules),
        "max_batch": spec.serving.max_batch,
        "max_total_tokens": spec.serving.max_total_tokens,
        "ttft_ms": spec.serving.ttft_milliseconds,
        "tpot_ms": spec.serving.tpot_milliseconds,
        "shed_ttft_fraction": spec.serving.shed_at_ttft_percent / 100,
        "train": training_on,
        "train_cap_tokens": spec.training.train_cap_tokens if training_on else 0,
        "micro_batch": spec.training.micro_batch,
        "learning_rate": spec.training.learning_rate,
        "revision_every_steps": spec.training.revision_every_steps,
        "revision_every_seconds": spec.training.revision_every_seconds,
        # A local revision passes the same gate as a round's candidate.
        "revision_tolerance": spec.federation.eval_gate_tolerance_milli_nats / 1000,
        "train_only_b": spec.federation.strategy == "ffa",
        "host": "0.0.0.0",
        "port": HTTP_PORT,
        "grpc_port": GRPC_PORT,
        "cache_dir": CACHE_DIR,
        "admin_token_file": f"{ADMIN_DIR}/{ADMIN_TOKEN_KEY}",
        "state_dir": STATE_DIR,
        # edge sessions only with spec.cloudEdge (0 opens none)
        "edge_max_sessions": spec.cloud_edge.max_sessions if spec.cloud_edge.enabled else 0,
        "edge_max_kv_mb": spec.cloud_edge.max_kv_mib,
        "edge_idle_seconds": spec.cloud_edge.idle_seconds,
        "checkpoint_interval_s": spec.state.checkpoint_interval_seconds,
    }
    if spec.security.mutual_tls:
        settings["tls_dir"] = TLS_DIR
    if training_on:
        settings["data"] = spec.training.data_path
    if replica_index is not None:
        settings["replica_id"] = f"{cluster.name}-{replica_index}"
    return settings


def agent_args(cluster: Cluster, replica_index: int | None = None) -> list[str]:
    """collm-agent flags for the cluster: `--config` (the ConfigMap's file, which carries the
    RUNTIME_SETTINGS) and every other setting as a flag. In the StatefulSet (one template for
    every pod) leave replica_index out: the replica id then comes from COLLM_REPLICA_ID."""
    args: list[str] = ["--config", CONFIG_FILE]
    for key, value in agent_settings(cluster, replica_index).items():
        if key in RUNTIME_SETTINGS:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            args += [flag, ",".join(value)]
        else:
            args += [flag, str(value)]
    return args


def agent_env(cluster: Cluster) -> list[dict[str, Any]]:
    """Environment of the agent container: the pod name as replica id; writable places under the
    emptyDirs because the root filesystem is read-only."""
    return [
        {"name": "COLLM_REPLICA_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "COLLM_CACHE_DIR", "value": CACHE_DIR},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "HOME", "value": "/tmp"},
    ]
