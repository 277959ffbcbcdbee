"""The local trainer: continuous LoRA training of the shadow adapter on the replica's own data.

The shadow adapter is a set of plain tensors in PEFT naming that only this trainer writes. It runs
in its own thread over the same runtime (one copy of the base weights) as the engine; each step
first takes its tokens from the training budget that the batch mixer fills, so training only uses
what inference leaves (a cap of 0 means no training at all, in rounds too).

Three things happen to the shadow besides training (CoLLM's "shadow adapter with real-time
parameter reuse"):
- Local revisions (revisions.py): every N steps or T seconds the shadow is evaluated on the
  held-out split and, if it passes the eval gate against what is served, published at once as the
  next local revision on top of the current global adapter (`7.1`, `7.2`, ...).
- Round snapshots: a federated round takes a snapshot of the shadow; the participant uploads
  `snapshot - global` (everything learnt since the global adapter it rests on). Training goes on.
- Rebase on a new global G': the shadow becomes `G' + (shadow - anchor)`, where the anchor is the
  snapshot uploaded to the round that produced G' if that upload is in G', else the old global. So
  progress made after the upload carries over, progress already in G' is not added twice, and
  progress that never made it into a global is uploaded with the next round (docs/federated.md).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .adapter_store import AdapterStore, AdapterVersion, adapter_sha256
from .budget import TrainingBudget
from .data import LocalDataset
from .llama import LlamaRuntime, TensorLora
from .lora import LoraSpec
from .revisions import RevisionSettings, passes_gate, revision_due

log = logging.getLogger(__name__)


@torch.no_grad()
def held_out_loss(
    runtime: LlamaRuntime, dataset: LocalDataset, spec: LoraSpec, tensors: Mapping[str, torch.Tensor], *, micro_batch: int, max_batches: int = 0
) -> tuple[float, int]:
    """(mean next-token cross-entropy, labelled tokens) of an adapter on the held-out split; the
    first `max_batches` batches (0: all of it), always the same ones, so losses compare."""
    lora = TensorLora(dict(tensors), spec, runtime.dims)
    total, count = 0.0, 0
    for i, batch in enumerate(dataset.eval_batches(micro_batch)):
        if max_batches and i >= max_batches:
            break
        labelled = int((batch.labels[:, 1:] != -100).sum())
        total += float(runtime.loss(batch.input_ids, batch.labels, lora)) * labelled
        count += labelled
    return (total / count if count else math.nan), count


@dataclass
class TrainerSettings:
    learning_rate: float = 2e-3
    micro_batch: int = 4
    eval_batches: int = 8  # eval batches (of micro_batch chunks) per evaluation, 0 = the whole eval split
    seed: int = 0
    torch_threads: int | None = None
    max_grad_norm: float = 1.0
    freeze_a: bool = False  # FFA-LoRA: lora_A stays at its shared init, only B trains
    revisions: RevisionSettings = RevisionSettings()
    nice: int = 0  # OS scheduling niceness of the trainer thread (19: it runs only when the engine thread leaves the core)


@dataclass(frozen=True)
class StepResult:
    step: int
    loss: float
    tokens: int
    seconds: float


@dataclass(frozen=True)
class ShadowState:
    """The shadow at one moment between two steps, as a restart needs it (state.py saves it)."""

    shadow: Mapping[str, torch.Tensor]
    optimizer: dict  # AdamW's state_dict (moments and step per tensor, in the shadow's key order)
    global_sha256: str  # the global adapter the shadow rests on
    step: int
    tokens: int
    anchor_step: int  # steps before it are in a global adapter or an accepted upload


@dataclass(frozen=True)
class RoundSnapshot:
    """What a round took from the shadow: the shadow at that moment and the global it rested on."""

    round_id: str
    shadow: Mapping[str, torch.Tensor]
    base: Mapping[str, torch.Tensor]
    base_sha256: str
    step: int  # the trainer's step count when the snapshot was taken
    steps: int  # training steps in it that no global adapter holds yet


class Trainer:
    def __init__(
        self,
        runtime: LlamaRuntime,
        dataset: LocalDataset,
        store: AdapterStore,
        spec: LoraSpec,
        *,
        settings: TrainerSettings | None = None,
        budget: TrainingBudget | None = None,
        initial: AdapterVersion | None = None,
    ) -> None:
        self.runtime, self.dataset, self.store, self.spec = runtime, dataset, store, spec
        self.settings = s = settings or TrainerSettings()
        self.budget = budget or TrainingBudget(0, unlimited=True)
        start = initial or store.global_version
        if start is None:
            raise ValueError("the trainer starts from a global adapter: publish one in the store first")
        self.shadow = {k: v.detach().clone().to(runtime.device).requires_grad_(True) for k, v in start.tensors.items()}
        self.global_version: AdapterVersion = start  # the global adapter the shadow rests on
        self.optimizer = self._new_optimizer(self.shadow)
        self._batches = dataset.train_batches(s.micro_batch, seed=s.seed)
        self._lock = threading.Lock()  # guards the shadow and the global between a step, a snapshot and a rebase
        self._publish_lock = threading.Lock()  # one revision decision at a time
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._paused = threading.Event()
        self.step = 0
        self.tokens = 0
        self.last_loss: float | None = None
        self.last_eval_loss: float | None = None
        self.busy_seconds = 0.0
        self.error: str | None = None
        self.eval_tokens = 0  # labelled tokens in the last evaluation (weights a federated eval)
        self._anchor_step = 0  # training steps before this one are in a global adapter or an upload that made it
        self._snapshots: dict[str, RoundSnapshot] = {}
        self._losses: dict[str, float] = {}  # sha256 -> held-out loss measured here
        if start.eval_loss is not None:
            self._losses[start.sha256] = start.eval_loss
        self.revisions_published = 0
        self.revisions_rejected = 0
        self.last_revision_at: float | None = None

    def _new_optimizer(self, shadow: Mapping[str, torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(shadow.values(), lr=self.settings.learning_rate, weight_decay=0.0)

    # -- steps --------------------------------------------------------------------------------
    def train_step(self) -> StepResult:
        batch = next(self._batches)
        started = time.perf_counter()
        with self._lock:
            loss = self.runtime.loss(batch.input_ids, batch.labels, TensorLora(self.shadow, self.spec, self.runtime.dims))
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"training loss became {loss.item()} at step {self.step}; lower the learning rate")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.settings.freeze_a:
                for key, tensor in self.shadow.items():
                    if key.endswith("lora_A.weight"):
                        tensor.grad = None  # FFA-LoRA: A stays frozen at the shared init
            torch.nn.utils.clip_grad_norm_(self.shadow.values(), self.settings.max_grad_norm)
            self.optimizer.step()
            self.step += 1
        seconds = time.perf_counter() - started
        self.busy_seconds += seconds
        self.tokens += batch.tokens
        self.last_loss = loss.item()
        return StepResult(self.step, self.last_loss, batch.tokens, seconds)

    def evaluate(self, tensors: Mapping[str, torch.Tensor] | None = None) -> float:
        """Mean next-token cross-entropy on the held-out split (of `tensors`, default the shadow)."""
        loss, self.eval_tokens = held_out_loss(
            self.runtime,
            self.dataset,
            self.spec,
            self.snapshot() if tensors is None else tensors,
            micro_batch=self.settings.micro_batch,
            max_batches=self.settings.eval_batches,
        )
        return loss

    def local_loss(self, version: AdapterVersion) -> float:
        """The held-out loss of a version on this replica's data (measured once per content hash)."""
        loss = self._losses.get(version.sha256)
        if loss is None:
            loss = self._losses[version.sha256] = self.evaluate(version.tensors)
        return loss

    def snapshot(self) -> dict[str, torch.Tensor]:
        with self._lock:
            return {k: v.detach().clone() for k, v in self.shadow.items()}

    @property
    def steps_uploaded(self) -> int:
        """Training steps that a global adapter or an accepted upload holds."""
        return self._anchor_step

    @property
    def unuploaded_steps(self) -> int:
        """Training steps no global adapter and no accepted upload holds yet."""
        return self.step - self._anchor_step

    # -- local revisions ----------------------------------------------------------------------
    def publish_revision(self, *, force: bool = False) -> AdapterVersion | None:
        """Evaluate the shadow and publish it as the next local revision if it passes the gate
        (or always, with `force`); None when it did not pass or the global changed meanwhile."""
        with self._publish_lock:
            with self._lock:
                tensors = {k: v.detach().clone() for k, v in self.shadow.items()}
                base = self.global_version
            served = self.store.current
            loss = self.evaluate(tensors)
            self.last_eval_loss = loss
            if not force and served is not None:
                if served.sha256 == adapter_sha256(tensors):
                    return None
                if not passes_gate(loss, self.local_loss(served), self.settings.revisions.tolerance):
                    self.revisions_rejected += 1
                    return None
            version = self.store.publish(tensors, step=self.step, eval_loss=loss, on_global=base.sha256)
            if version is None:
                return None
            self._losses[version.sha256] = loss
            self.revisions_published += 1
            self.last_revision_at = version.created_at
            log.info("local revision %s at step %d (held-out loss %.4f)", version.label, self.step, loss)
            return version

    # -- federated rounds ---------------------------------------------------------------------
    def round_snapshot(self, round_id: str) -> RoundSnapshot:
        """Take the shadow for a round's upload (`shadow - base`); the same snapshot on a retry."""
        with self._lock:
            existing = self._snapshots.get(round_id)
            if existing is not None:
                return existing
            snap = RoundSnapshot(
                round_id,
                {k: v.detach().clone() for k, v in self.shadow.items()},
                self.global_version.tensors,
                self.global_version.sha256,
                self.step,
                self.step - self._anchor_step,
            )
            self._snapshots[round_id] = snap
            return snap

    def rebase(self, new_global: AdapterVersion, *, round_id: str | None = None, included: bool = False) -> None:
        """Continue from `new_global` plus the progress it does not hold (see the module docstring)."""
        with self._lock:
            snap = self._snapshots.get(round_id) if round_id else None
            if included and snap is not None and snap.base_sha256 == self.global_version.sha256:
                anchor, self._anchor_step = snap.shadow, snap.step
            else:
                anchor = self.global_version.tensors
            with torch.no_grad():
                for key, value in self.shadow.items():
                    value.copy_(new_global.tensors[key].to(value.dtype) + (value - anchor[key].to(value.dtype)))
            self.global_version = new_global
            self._snapshots.clear()

    # -- restarts -----------------------------------------------------------------------------
    def checkpoint(self) -> ShadowState:
        """The shadow, AdamW's state and the counters, taken between two steps (copies: training goes on)."""
        with self._lock:
            return ShadowState(
                {k: v.detach().clone() for k, v in self.shadow.items()},
                copy.deepcopy(self.optimizer.state_dict()),
                self.global_version.sha256,
                self.step,
                self.tokens,
                self._anchor_step,
            )

    def restore(self, state: ShadowState, rests_on: AdapterVersion) -> None:
        """Continue from a checkpoint whose global is `rests_on` (before start). The learning rate
        stays this trainer's setting, not the checkpoint's. Raises ValueError, leaving the trainer as
        it was, when the checkpoint does not fit this trainer's adapter."""
        if rests_on.sha256 != state.global_sha256:
            raise ValueError(f"the checkpoint rests on adapter {state.global_sha256[:12]}, not on {rests_on.label} ({rests_on.sha256[:12]})")
        if set(state.shadow) != set(self.shadow):
            raise ValueError("the checkpoint's shadow has other tensors than this trainer's adapter")
        for key, value in state.shadow.items():
            if value.shape != self.shadow[key].shape:
                raise ValueError(f"the checkpoint's {key} has shape {tuple(value.shape)}, expected {tuple(self.shadow[key].shape)}")
        # The checkpoint's key order is the order of AdamW's parameter indices in its state.
        shadow = {k: v.detach().to(self.runtime.device, self.shadow[k].dtype).clone().requires_grad_(True) for k, v in state.shadow.items()}
        optimizer = self._new_optimizer(shadow)
        optimizer.load_state_dict(state.optimizer)
        for group in optimizer.param_groups:
            group["lr"] = self.settings.learning_rate
        with self._lock:
            self.shadow, self.optimizer, self.global_version = shadow, optimizer, rests_on
            self.step, self.tokens, self._anchor_step = state.step, state.tokens, state.anchor_step

    # -- background thread --------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="collm-trainer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.budget.close()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def pause(self, paused: bool = True) -> None:
        (self._paused.set if paused else self._paused.clear)()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    def _run(self) -> None:
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        if self.settings.nice:
            try:  # Linux: a thread is a task with its own niceness; lowering one's own priority needs no privilege
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.settings.nice)
            except (OSError, AttributeError) as exc:
                log.warning("cannot lower the trainer thread's priority (%s); training competes with serving as an equal", exc)
        step_tokens = self.settings.micro_batch * self.dataset.seq_len
        checked_step, checked_at = self.step, time.monotonic()
        while not self._stop.is_set():
            if self._paused.is_set():
                self._stop.wait(0.05)
                continue
            try:
                due = revision_due(self.settings.revisions, self.step - checked_step, time.monotonic() - checked_at)
                if due:
                    # An evaluation is work on the replica's device too: it waits for budget like a step.
                    if not self.budget.acquire(step_tokens, timeout=0.1):
                        continue
                    self.publish_revision()
                    checked_step, checked_at = self.step, time.monotonic()
                    continue
                if not self.budget.acquire(step_tokens, timeout=0.1):
                    continue
                self.train_step()
            except Exception as exc:  # keep serving; report through stats and the log
                self.error = f"{type(exc).__name__}: {exc}"
                log.exception("training failed; the trainer stops, serving goes on")
                return
