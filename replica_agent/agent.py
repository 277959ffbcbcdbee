"""One replica: the model host, adapter store, engine, trainer and batch mixer, wired together.

The servers (HTTP, later gRPC) sit on top of an `Agent`; benchmarks and tests use it directly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path


from .config import AgentConfig
from .engine.adapter_store import AdapterStore, AdapterVersion
from .engine.budget import TrainingBudget
from .engine.capacity import CapacityProfiler
from .engine.data import EmptyDataError, LocalDataset
from .engine.engine import Engine, EngineSettings
from .engine.llama import LlamaRuntime
from .engine.lora import LoraSpec, init_adapter
from .engine.mixer import BatchMixer, MixerSettings
from .engine.model_host import BaseModel, load_base_model
from .engine.trainer import Trainer, TrainerSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """What the operator's slow timescale allows this replica (the agent's side of a plan)."""

    train_cap_tokens: int
    ttft_ms: int
    tpot_ms: int
    adaptive: bool = True  # False for the `static` policy: a fixed training batch, no fast-timescale mixing


class Agent:
    def __init__(self, config: AgentConfig, *, base: BaseModel | None = None) -> None:
        self.config = c = config
        self.started_at = time.time()
        self.base = base or load_base_model(c.model, dtype=c.dtype, device=c.device, cache_dir=Path(c.cache_dir) if c.cache_dir else None)
        self.runtime = LlamaRuntime(self.base.config, self.base.state_dict)
        self.tokenizer = self.base.tokenizer
        self.spec = LoraSpec(rank=c.lora_rank, alpha=c.lora_alpha, target_modules=tuple(c.lora_targets))
        self.store = AdapterStore(retain=c.adapter_retain)
        self.dataset, self.data_error = self._load_data(c)
        self.training = training = c.training_enabled and self.dataset is not None
        self.mixer = BatchMixer(MixerSettings(ttft_ms=c.ttft_ms, tpot_ms=c.tpot_ms, cap_tokens_per_iteration=c.train_cap_tokens if training else 0))
        step_tokens = c.micro_batch * c.seq_len
        self.budget = TrainingBudget(max_balance=step_tokens) if training else None
        # Two busy threads on a small CPU: one intra-op thread each (measured best, see docs/benchmarks.md).
        engine_threads = c.engine_threads or (1 if training else None)
        self.engine = Engine(
            self.runtime,
            self.tokenizer,
            eos_token_ids=self.base.eos_token_ids,
            bos_token_id=self.base.bos_token_id,
            store=self.store,
            lora_spec=self.spec,
            settings=EngineSettings(
                max_batch=c.max_batch,
                max_total_tokens=min(c.max_total_tokens, self.base.max_context),
                max_prefill_tokens=c.max_prefill_tokens,
                max_queue=c.max_queue,
                lora_slots=c.lora_slots,
                torch_threads=engine_threads,
            ),
            mixer=self.mixer,
            budget=self.budget,
        )
        self.trainer: Trainer | None = None
        if self.dataset is not None:
            self.trainer = Trainer(
                self.runtime,
                self.dataset,
                self.store,
                self.spec,
                settings=TrainerSettings(
                    learning_rate=c.learning_rate,
                    micro_batch=c.micro_batch,
                    publish_every=0 if c.federated else c.publish_every,
                    eval_batches=c.eval_batches,
                    seed=c.seed,
                    torch_threads=c.trainer_threads or 1,
                ),
                budget=self.budget,
            )

        self.profiler = CapacityProfiler(tpot_ms=c.tpot_ms, max_batch=c.max_batch)
        self._training_tokens_seen = 0
        # Finished requests and those within the SLO: the operator's goodput and SLO attainment.
        self.requests_finished = 0
        self.requests_met_slo = 0
        self.engine.observers.append(self._observe)

    def _load_data(self, c: AgentConfig) -> tuple[LocalDataset | None, str | None]:
        """The local dataset. An existing but empty data folder (a fresh volume) is not fatal: the
        replica serves without training and says why in its stats; a restart picks the data up."""
        if not c.data:
            return None, None
        try:
            return LocalDataset.from_path(c.data, self.tokenizer, seq_len=c.seq_len, eval_fraction=c.eval_fraction, seed=c.seed), None
        except EmptyDataError as exc:
            if not Path(c.data).is_dir():
                raise
            log.warning("%s: serving without training until the replica restarts with data", exc)
            return None, str(exc)

    def _observe(self, kind: str, payload) -> None:
        """Feed the capacity profile from the engine (runs on the engine thread)."""
        if kind == "iteration":
            tokens = self.trainer.tokens if self.trainer is not None else 0
            ran, self._training_tokens_seen = tokens - self._training_tokens_seen, tokens
            self.profiler.observe_iteration(cap=self.mixer.settings.cap_tokens_per_iteration, budget=self.mixer.training_tokens, rows=payload.decode_rows, iteration_ms=payload.iteration_ms, training_tokens=ran)
        elif kind == "finished" and payload.ok:
            self.profiler.observe_request(payload.generated_tokens)
            self.requests_finished += 1
            self.requests_met_slo += payload.meets_slo(self.mixer.settings.ttft_ms, self.mixer.settings.tpot_ms)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> AdapterVersion:
        """Publish the initial adapter (version 1), then start serving and, with data, training."""
        if self.trainer is not None:
            first = self.trainer.publish(round=0)
        else:
            first = self.store.publish(init_adapter(self.spec, self.runtime.dims, seed=self.config.seed, dtype=self.runtime.dtype))
        self.engine.start()
        if self.trainer is not None and self.training and not self.config.federated:
            self.trainer.start()  # federated replicas train when a round begins
        log.info("agent %s serving %s with adapter version %d", self.config.replica_id, self.base.name, first.number)
        return first

    def stop(self) -> None:
        if self.trainer is not None:
            self.trainer.stop()
        self.engine.stop()

    # -- control ------------------------------------------------------------------------------
    def apply_plan(self, plan: Plan) -> None:
        """Take a new training cap and SLO from the operator; the mixer clamps at once."""
        cap = plan.train_cap_tokens if self.training else 0
        self.mixer.update_settings(MixerSettings(ttft_ms=plan.ttft_ms, tpot_ms=plan.tpot_ms, cap_tokens_per_iteration=cap, adaptive=plan.adaptive))
        self.profiler.tpot_ms = plan.tpot_ms

    def publish(self) -> AdapterVersion:
        if self.trainer is None:
            raise RuntimeError("this agent has no training data, so it has no shadow adapter to publish; start it with --data")
        return self.trainer.publish()

    def stats(self) -> dict:
        current = self.store.current
        trainer = self.trainer
        return {
            "replica_id": self.config.replica_id,
            "model": self.base.name,
            "uptime_s": time.time() - self.started_at,
            "queue_depth": self.engine.queue_depth,
            "running": self.engine.running,
            "iterations": self.engine.iterations,
            "inference_tokens": self.engine.inference_tokens,
            "training_tokens": trainer.tokens if trainer else 0,
            "training_steps": trainer.step if trainer else 0,
            "train_loss": trainer.last_loss if trainer else None,
            "eval_loss": trainer.last_eval_loss if trainer else None,
            "training_share": self.mixer.training_share,
            "train_cap_tokens": self.mixer.settings.cap_tokens_per_iteration,
            "trainer_error": trainer.error if trainer else None,
            "data_error": self.data_error,
            "adapter": current.summary() if current else None,
            "live_versions": sorted(self.store.live_versions()),
            "pins": self.store.pins(),
            "slo": {"ttft_ms": self.mixer.settings.ttft_ms, "tpot_ms": self.mixer.settings.tpot_ms},
            "requests_finished": self.requests_finished,
            "requests_met_slo": self.requests_met_slo,
            "capacity_profile": [[p.cap, p.requests_per_s, p.training_tokens_per_s] for p in self.profiler.profile()],
            "lora": {"rank": self.spec.rank, "alpha": self.spec.alpha, "target_modules": list(self.spec.target_modules)},
            "threads": {"engine": self.engine.settings.torch_threads, "trainer": trainer.settings.torch_threads if trainer else None},
        }
