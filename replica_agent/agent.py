"""One replica: the model host, adapter store, engine, trainer and batch mixer, wired together.

The servers (HTTP, later gRPC) sit on top of an `Agent`; benchmarks and tests use it directly.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from collm_control.stats import AgentStats, CapacityPoint

from . import memory
from .config import AgentConfig
from .edge.cloud_service import EdgeLimits, EdgeSessions
from .engine.adapter_store import AdapterStore, AdapterVersion
from .engine.archive import AdapterArchive
from .engine.budget import TrainingBudget
from .engine.capacity import CapacityProfiler
from .engine.data import EmptyDataError, LocalDataset
from .engine.engine import Engine, EngineSettings
from .engine.llama import LlamaRuntime
from .engine.lora import LoraSpec, init_adapter
from .engine.mixer import BatchMixer, MixerSettings, Plan
from .engine.model_host import BaseModel, load_base_model
from .engine.revisions import RevisionSettings
from .engine.state import DurableState, state_identity
from .engine.trainer import Trainer, TrainerSettings, held_out_loss

log = logging.getLogger(__name__)


class Agent:
    def __init__(self, config: AgentConfig, *, base: BaseModel | None = None) -> None:
        self.config = c = config
        self.started_at = time.time()
        self.base = base or load_base_model(c.model, dtype=c.dtype, device=c.device, cache_dir=Path(c.cache_dir) if c.cache_dir else None)
        self.runtime = LlamaRuntime(self.base.config, self.base.state_dict)
        self.tokenizer = self.base.tokenizer
        self.spec = LoraSpec(rank=c.lora_rank, alpha=c.lora_alpha, target_modules=tuple(c.lora_targets))
        self.store = AdapterStore(retain=c.adapter_retain)
        if c.adapter_archive:
            self.store.on_change(AdapterArchive(c.adapter_archive, c.replica_id).write)
        self.dataset, self.data_error = self._load_data(c)
        self.state = (
            DurableState(c.state_dir, state_identity(self.base.name, self.runtime.dims, self.runtime.dtype, self.spec), replica=c.replica_id)
            if c.state_dir
            else None
        )
        restored = self.state.load_adapters(self.spec, self.runtime.dims) if self.state is not None else None
        if restored is not None:
            self.store.restore(restored)  # what it served before the restart, under the same labels and sha256
        else:
            # The initial adapter is global version 0 ("0.0") on every replica: the same seed, the same tensors.
            initial = init_adapter(self.spec, self.runtime.dims, seed=c.seed, dtype=self.runtime.dtype)
            initial_loss = (
                held_out_loss(self.runtime, self.dataset, self.spec, initial, micro_batch=c.micro_batch, max_batches=c.eval_batches)[0]
                if self.dataset
                else None
            )
            self.store.publish(initial, cluster_version=0, eval_loss=initial_loss)
        # With data the replica trains whenever the plan's cap and the batch mixer allow (cap 0: never).
        self.training = training = c.train and self.dataset is not None
        self.mixer = BatchMixer(MixerSettings(ttft_ms=c.ttft_ms, tpot_ms=c.tpot_ms, cap_tokens_per_iteration=c.train_cap_tokens if training else 0))
        step_tokens = c.micro_batch * c.seq_len
        self.budget = TrainingBudget(max_balance=step_tokens) if training else None
        # Two busy threads on a small CPU: one intra-op thread each (measured best, see docs/benchmarks.md).
        engine_threads = c.engine_threads or 1
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
                ttft_slo_ms=float(c.ttft_ms),
                shed_ttft_fraction=c.shed_ttft_fraction,
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
                    eval_batches=c.eval_batches,
                    seed=c.seed,
                    torch_threads=c.trainer_threads or 1,
                    freeze_a=c.train_only_b,
                    nice=19 if c.trainer_priority == "low" else 0,
                    revisions=RevisionSettings(every_steps=c.revision_every_steps, every_s=c.revision_every_seconds, tolerance=c.revision_tolerance),
                ),
                # Without training (train: false) the trainer only evaluates: a budget that never fills.
                budget=self.budget or TrainingBudget(max_balance=step_tokens),
            )
            if self.state is not None and restored is not None:
                self.state.restore_shadow(self.trainer, self.store)
            # The held-out loss of what is served at the start: the planner reads "has data" from it.
            self.trainer.last_eval_loss = self.trainer.local_loss(self.store.current)  # measured above: no second evaluation
        if self.state is not None:
            state = self.state
            state.save_adapters(self.store)  # the initial adapter of a fresh state_dir; drops what did not come back
            self.store.on_change(lambda _version: state.save_adapters(self.store))

        # Edge devices' sessions run the deep layers on this runtime (no second copy of the weights).
        limits = EdgeLimits(c.edge_max_sessions, int(c.edge_max_kv_mb * (1 << 20)), c.edge_idle_seconds)
        self.edge = EdgeSessions(self.runtime, self.store, self.spec, model=self.base.name, replica=c.replica_id, limits=limits)
        self.profiler = CapacityProfiler(tpot_ms=c.tpot_ms, max_batch=c.max_batch)
        self.trimmer: memory.Trimmer | None = None
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
            self.profiler.observe_iteration(
                cap=self.mixer.settings.cap_tokens_per_iteration,
                budget=self.mixer.training_tokens,
                rows=payload.decode_rows,
                iteration_ms=payload.iteration_ms,
                training_tokens=ran,
            )
        elif kind == "finished" and payload.ok:
            self.profiler.observe_request(payload.generated_tokens)
            self.requests_finished += 1
            self.requests_met_slo += payload.meets_slo(self.mixer.settings.ttft_ms, self.mixer.settings.tpot_ms)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> AdapterVersion:
        """Start serving the initial adapter (global version 0, or what state_dir restored) and, with data, training."""
        first = self.store.current
        self.engine.start()
        if self.config.heap_trim_interval_s > 0 and memory.allocator() == "glibc":  # jemalloc decays on its own
            self.trimmer = memory.Trimmer(self.config.heap_trim_interval_s).start()
        if self.trainer is not None and self.training:
            self.trainer.start()
            if self.state is not None and self.config.checkpoint_interval_s > 0:
                self.state.keep_checkpointing(self.trainer, self.config.checkpoint_interval_s)
        log.info("agent %s serving %s with adapter %s", self.config.replica_id, self.base.name, first.label)
        return first

    def stop(self) -> None:
        if self.trainer is not None:
            self.trainer.stop()
        if self.state is not None:
            self.state.close(self.trainer)  # the last checkpoint of the shadow, after its last step
        self.engine.stop()
        if self.trimmer is not None:
            self.trimmer.stop()

    # -- control ------------------------------------------------------------------------------
    def apply_plan(self, plan: Plan) -> None:
        """Take a new training cap and SLO from the operator; the mixer clamps at once."""
        cap = plan.train_cap_tokens if self.training else 0
        self.mixer.update_settings(MixerSettings(ttft_ms=plan.ttft_ms, tpot_ms=plan.tpot_ms, cap_tokens_per_iteration=cap, adaptive=plan.adaptive))
        self.profiler.tpot_ms = plan.tpot_ms
        self.engine.settings.ttft_slo_ms = float(plan.ttft_ms)  # admission sheds against the SLO in force

    def publish(self) -> AdapterVersion:
        """Publish the shadow as a local revision now, without the eval gate (an admin's explicit act)."""
        if self.trainer is None:
            raise RuntimeError("this agent has no training data, so it has no shadow adapter to publish; start it with --data")
        version = self.trainer.publish_revision(force=True)
        if version is None:  # a global was published while the shadow was evaluated: it is rebased now
            version = self.trainer.publish_revision(force=True)
        return version or self.store.current

    def adopt_global(self, tensors, cluster_version: int, *, round_id: str = "", included: bool = False, eval_loss: float | None = None) -> AdapterVersion:
        """Serve a new global adapter G' at once and rebase the shadow on it (trainer.py says how).
        `included`: this replica's upload to `round_id` is part of G'.

        With local revisions on, G' plus the progress the shadow keeps is evaluated against G' on the
        local held-out split right away and served instead when it is better: the replica then
        serves `<G'>.1` a moment after `<G'>.0`, never its older revision (docs/federated.md)."""
        version = self.store.publish(tensors, cluster_version=cluster_version, eval_loss=eval_loss)
        if self.trainer is not None:
            self.trainer.rebase(version, round_id=round_id or None, included=included)
            self._serve_progress()
        memory.trim()  # the round's transient tensors are freed by now
        return version

    def _serve_progress(self) -> None:
        if self.trainer is not None and self.trainer.settings.revisions.enabled and self.trainer.unuploaded_steps > 0:
            self.trainer.publish_revision()

    def rollback(self, number: int) -> AdapterVersion:
        """Serve a retained version again; rolling back the global rebases the shadow on it."""
        version = self.store.rollback(number)
        if version.is_global and self.trainer is not None and version.sha256 != self.trainer.global_version.sha256:
            self.trainer.rebase(version)
        return version

    def _labels(self, numbers) -> dict[int, str]:
        out = {}
        for number in numbers:
            try:
                out[number] = self.store.get(number).label
            except KeyError:  # released and pruned since it was listed
                pass
        return out

    def stats(self) -> AgentStats:
        """What the slow timescale reads (GetStats); /stats shows it with `extra` (pins, threads)."""
        trainer = self.trainer
        return AgentStats(
            replica_id=self.config.replica_id,
            model=self.base.name,
            adapter=self.store.current.ref() if self.store.current else None,
            global_adapter=self.store.global_version.ref() if self.store.global_version else None,
            live_versions=tuple(sorted(self._labels(self.store.live_versions()).values())),
            uptime_s=time.time() - self.started_at,
            queue_depth=self.engine.queue_depth,
            running=self.engine.running,
            iterations=self.engine.iterations,
            inference_tokens=self.engine.inference_tokens,
            requests_finished=self.requests_finished,
            requests_met_slo=self.requests_met_slo,
            ttft_ms=int(self.mixer.settings.ttft_ms),
            tpot_ms=int(self.mixer.settings.tpot_ms),
            capacity_profile=tuple(CapacityPoint(p.cap, p.requests_per_s, p.training_tokens_per_s) for p in self.profiler.profile()),
            training_tokens=trainer.tokens if trainer else 0,
            training_steps=trainer.step if trainer else 0,
            training_share=self.mixer.training_share,
            train_cap_tokens=self.mixer.settings.cap_tokens_per_iteration,
            train_loss=trainer.last_loss if trainer else None,
            eval_loss=trainer.last_eval_loss if trainer else None,
            trainer_error=(trainer.error if trainer else None) or "",
            data_error=self.data_error or "",
            state_error=self.state.error if self.state is not None else "",
            data_tokens=self.dataset.train_tokens if self.dataset is not None else 0,
            unuploaded_steps=trainer.unuploaded_steps if trainer else 0,
            revisions_published=trainer.revisions_published if trainer else 0,
            revisions_rejected=trainer.revisions_rejected if trainer else 0,
            last_revision_at=trainer.last_revision_at if trainer else None,
            lora_rank=self.spec.rank,
            lora_alpha=self.spec.alpha,
            lora_target_modules=tuple(self.spec.target_modules),
            edge_sessions=self.edge.open_count,
            extra={
                "pins": {self._labels([n]).get(n, str(n)): count for n, count in self.store.pins().items()},
                "threads": {"engine": self.engine.settings.torch_threads, "trainer": trainer.settings.torch_threads if trainer else None},
                "edge": self.edge.summary(),
            },
        )
