"""The agent's settings: one typed model, filled from defaults < YAML file < environment < flags.

Every field is a flag (`--max-batch`), an environment variable (`COLLM_MAX_BATCH`) and a YAML key
(`max_batch`); `collm-agent --help` lists them with their descriptions.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ENV_PREFIX = "COLLM_"


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # model host
    model: str = Field(
        "tiny",
        description="base model: 'tiny', 'smollm2', a Hugging Face model directory or a .gguf file (Llama, Mistral, Qwen2, Qwen3), or random:<family>[-<size>]",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the base weights and adapters (auto: bfloat16 on a GPU, float32 on a CPU)"
    )
    device: str = Field("auto", description="'auto' (a GPU when torch sees one, else the CPU), 'cpu', 'cuda' or 'cuda:N'")
    replica_id: str = Field("agent-0", description="name of this replica in stats, metrics and federated rounds")
    admin_token_file: str | None = Field(
        None, description="file holding the bearer token that POST /publish and /feedback require; unset: no token (development only)"
    )
    tls_dir: str | None = Field(
        None,
        description="mutual TLS on the gRPC port: a directory with ca.crt and <replica_id>.crt/.key (or tls.crt/tls.key), "
        "as the operator's TLS Secret mounts it; unset: plaintext gRPC, for development only",
    )
    # adapter
    # Defaults measured on the tiny model, one core, 60 s of training on the `json` package: r=16 on
    # all seven projections at lr 2e-3 took the held-out loss from 2.51 to 1.46; r=8 on q/v at 1e-3
    # only to 2.18 (docs/benchmarks.md). Decode pays ~30% more for the five extra projections.
    lora_rank: int = Field(16, ge=1, le=256, description="LoRA rank r")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha (scaling = alpha / r)")
    lora_targets: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="projections that carry LoRA (comma-separated on the command line)",
    )
    lora_slots: int = Field(4, ge=1, le=64, description="adapter versions servable at once (pinned + current)")
    adapter_retain: int = Field(8, ge=1, description="published versions kept for rollback and fetching")
    # engine
    max_batch: int = Field(16, ge=1, le=1024, description="running requests per iteration")
    max_total_tokens: int = Field(1024, ge=16, description="prompt + generated tokens of one request")
    max_prefill_tokens: int = Field(2048, ge=1, description="prompt tokens prefilled per iteration")
    max_queue: int = Field(1024, ge=1, description="waiting requests before new ones get HTTP 429")
    engine_threads: int | None = Field(None, ge=1, description="intra-op threads of the serving thread (default 1: see docs/engine.md, 'Threads')")
    # SLO and fast timescale
    ttft_ms: int = Field(1000, ge=1, description="SLO: time to first token in milliseconds")
    tpot_ms: int = Field(100, ge=1, description="SLO: mean time per output token in milliseconds")
    shed_ttft_fraction: float = Field(
        0.9,
        ge=0,
        le=10,
        description="answer 429 with Retry-After to a request predicted to wait longer than this share of the TTFT SLO for its first token "
        "(SLO-aware admission, docs/reliability.md); 0 queues every request up to max_queue",
    )
    train_cap_tokens: int = Field(128, ge=0, description="most training tokens per inference iteration (the operator's plan may lower it); 0 disables training")
    # trainer
    train: bool = Field(True, description="train the shadow adapter when data is given")
    data: str | None = Field(None, description="local training data: a .jsonl file, a text file or a folder (e.g. a standard-library package folder)")
    seq_len: int = Field(128, ge=8, description="training sequence length in tokens")
    micro_batch: int = Field(4, ge=1, description="training sequences per step")
    learning_rate: float = Field(2e-3, gt=0, description="AdamW learning rate of the shadow adapter")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="share of the data held out for eval loss")
    eval_batches: int = Field(8, ge=0, description="eval batches per evaluation (0 = whole eval split)")
    revision_every_steps: int = Field(
        0, ge=0, description="evaluate the shadow every N training steps and serve it as a local revision if it passes the eval gate (0: not by steps)"
    )
    revision_every_seconds: float = Field(
        10.0, ge=0, description="the same every T seconds of training, whichever comes first (0: not by time; both 0: no local revisions)"
    )
    revision_tolerance: float = Field(
        0.0, ge=0, description="nats a local revision's held-out loss may exceed the served version's (the round's eval-gate rule; 0: never worse)"
    )
    train_only_b: bool = Field(False, description="keep lora_A at its shared init and train only B (FFA-LoRA rounds need it)")
    adapter_archive: str | None = Field(
        None, description="folder that receives every published adapter version as <sha256>.safetensors (offline scoring, audits)"
    )
    state_dir: str | None = Field(
        None,
        description="folder (a volume that outlives the pod) that keeps the served adapter versions and the shadow with its optimizer state "
        "across restarts, restored at start; unset: memory only",
    )
    checkpoint_interval_s: float = Field(
        60.0, ge=0, description="seconds between checkpoints of the shadow and its optimizer state to state_dir (0: only at shutdown)"
    )
    heap_trim_interval_s: float = Field(
        10.0, ge=0, description="seconds between handing the heap's free pages back to the system (glibc only; 0: never, see replica_agent/memory.py)"
    )
    # Deprecated (accepted and ignored for one release, so that an old ConfigMap still starts the agent):
    # secure rounds agree on pair seeds with per-round X25519 keys now; no shared secret is read.
    secure_aggregation_secret_file: str | None = Field(
        None, description="deprecated and ignored: secure aggregation agrees per-round keys and needs no shared secret; remove this setting"
    )
    trainer_threads: int | None = Field(None, ge=1, description="intra-op threads of the training thread (default 1)")
    trainer_priority: Literal["low", "normal"] = Field(
        "low",
        description="OS priority of the training thread: low (niceness 19: inference first, training in the gaps it leaves) "
        "or normal (an equal share, the `static` baseline)",
    )
    seed: int = Field(0, description="seed of the adapter init and the data order")
    feedback: bool = Field(False, description="enable POST /feedback, which appends served interactions to the local data")
    feedback_path: str | None = Field(None, description="JSONL file that /feedback appends to (default: <data>/feedback.jsonl or ./feedback.jsonl)")
    # edge sessions (cloud-edge collaborative inference, docs/cloud-edge.md)
    edge_max_sessions: int = Field(4, ge=0, le=256, description="edge devices' sessions open at once (each holds a gRPC worker and a deep KV cache); 0: none")
    edge_max_kv_mb: float = Field(256.0, ge=0, description="MiB of deep KV cache all open edge sessions may hold together; more sessions are refused")
    edge_idle_seconds: float = Field(60.0, gt=0, description="an edge session without a message for this long is closed and its memory freed")
    # servers
    host: str = Field("127.0.0.1", description="HTTP listen address")
    port: int = Field(8080, ge=0, le=65535, description="HTTP port (0 picks a free one)")
    grpc_port: int = Field(9090, ge=0, le=65535, description="gRPC port for rounds, plans and adapter transfer (0 picks a free one)")
    cache_dir: str | None = Field(None, description="where the built-in tiny model is cached (default $COLLM_CACHE_DIR or ~/.cache/collm)")

    @model_validator(mode="after")
    def _check(self) -> AgentConfig:
        if self.feedback and not (self.feedback_path or self.data):
            raise ValueError("feedback needs a place to write: set feedback_path or data")
        return self


def deprecated_settings(config: AgentConfig) -> list[str]:
    """Warnings for settings that are set but no longer do anything (the agent logs them once at start)."""
    if config.secure_aggregation_secret_file is None:
        return []
    return [
        "secure_aggregation_secret_file is deprecated and ignored: secure aggregation now agrees per-round X25519 keys "
        "through the operator, so no shared secret is read; remove the setting (and the Secret mount)"
    ]


_BOOL = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _coerce(field_name: str, raw: str) -> Any:
    annotation = str(AgentConfig.model_fields[field_name].annotation)
    if "list" in annotation:
        return [s.strip() for s in raw.split(",") if s.strip()]
    if "bool" in annotation:
        if raw.lower() not in _BOOL:
            raise ValueError(f"{field_name} must be true or false, got {raw!r}")
        return _BOOL[raw.lower()]
    return raw


def build_parser(prog: str = "collm-agent") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="CoLLM replica agent: serves a LoRA-adapted model over a TGI-compatible HTTP API and fine-tunes "
        "the adapter on local data at the same time. Settings come from defaults < --config YAML < COLLM_* "
        "environment variables < flags.",
    )
    parser.add_argument("--config", help="YAML file with any of the settings below (keys in snake_case)")
    parser.add_argument("--log-level", default=os.environ.get("COLLM_LOG_LEVEL", "INFO"), help="logging level (env COLLM_LOG_LEVEL)")
    for name, info in AgentConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = info.default
        help_text = f"{info.description} (env {ENV_PREFIX}{name.upper()}; default {default})"
        if info.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=help_text)
    return parser


def load_config(
    argv: list[str] | None = None, *, environ: Mapping[str, str] | None = None, prog: str = "collm-agent"
) -> tuple[AgentConfig, argparse.Namespace]:
    """Parse flags, read the YAML file and the environment; raise SystemExit(2) with a clear message on bad input."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            parser.error(f"cannot read config file {path}: {exc}")
        if not isinstance(loaded, dict):
            parser.error(f"config file {path} must hold a mapping of settings, got {type(loaded).__name__}")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    try:
        for name in AgentConfig.model_fields:
            env_value = environ.get(ENV_PREFIX + name.upper())
            if env_value is not None:
                values[name] = _coerce(name, env_value)
            flag_value = getattr(args, name)
            if flag_value is not None:
                values[name] = flag_value if isinstance(flag_value, bool) else _coerce(name, flag_value)
        return AgentConfig(**values), args
    except (ValidationError, ValueError) as exc:
        parser.error(_explain(exc))
        raise  # unreachable: parser.error exits


def _explain(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "config"
            parts.append(f"{where}: {err['msg']}")
        return "invalid settings: " + "; ".join(parts)
    return f"invalid settings: {exc}"
