"""The local trainer: LoRA training of the shadow adapter on the replica's own data.

The shadow adapter is a set of plain tensors in PEFT naming that only this trainer writes. It runs
in its own thread over the same runtime (one copy of the base weights) as the engine; each step
first takes its tokens from the training budget that the batch mixer fills, so training only uses
what inference leaves. Publishing copies the shadow into a new immutable version in the store.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

import torch

from .adapter_store import AdapterStore, AdapterVersion
from .budget import TrainingBudget
from .data import LocalDataset
from .llama import LlamaRuntime, TensorLora
from .lora import LoraSpec, init_adapter

log = logging.getLogger(__name__)


@dataclass
class TrainerSettings:
    learning_rate: float = 1e-3
    micro_batch: int = 4
    publish_every: int = 0  # steps between automatic publishes; 0 = only on demand
    eval_batches: int = 8  # eval batches (of micro_batch chunks) per evaluation, 0 = the whole eval split
    seed: int = 0
    torch_threads: int | None = None
    max_grad_norm: float = 1.0


@dataclass(frozen=True)
class StepResult:
    step: int
    loss: float
    tokens: int
    seconds: float


@dataclass
class _RoundGoal:
    round_id: str
    target_step: int
    on_done: object  # callable(snapshot) run on the trainer thread when the goal is reached
    only_b: bool


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
        initial: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.runtime, self.dataset, self.store, self.spec = runtime, dataset, store, spec
        self.settings = s = settings or TrainerSettings()
        self.budget = budget or TrainingBudget(0, unlimited=True)
        start = initial if initial is not None else init_adapter(spec, runtime.dims, seed=s.seed, dtype=runtime.dtype)
        self.shadow = {k: v.detach().clone().to(runtime.device).requires_grad_(True) for k, v in start.items()}
        self.optimizer = torch.optim.AdamW(self.shadow.values(), lr=s.learning_rate, weight_decay=0.0)
        self._batches = dataset.train_batches(s.micro_batch, seed=s.seed)
        self._lock = threading.Lock()  # guards the shadow between a step and a snapshot
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._paused = threading.Event()
        self.step = 0
        self.tokens = 0
        self.last_loss: float | None = None
        self.last_eval_loss: float | None = None
        self.busy_seconds = 0.0
        self.round = 0
        self.error: str | None = None
        self.eval_tokens = 0  # labelled tokens in the last evaluation (weights a federated eval)
        self._goal: _RoundGoal | None = None

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
            if self._goal is not None and self._goal.only_b:
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

    @torch.no_grad()
    def evaluate(self, tensors: dict[str, torch.Tensor] | None = None) -> float:
        """Mean next-token cross-entropy on the held-out split (of `tensors`, default the shadow)."""
        if tensors is None:
            tensors = self.snapshot()
        lora = TensorLora(tensors, self.spec, self.runtime.dims)
        total, count = 0.0, 0
        for i, batch in enumerate(self.dataset.eval_batches(self.settings.micro_batch)):
            if self.settings.eval_batches and i >= self.settings.eval_batches:
                break
            labelled = int((batch.labels[:, 1:] != -100).sum())
            total += float(self.runtime.loss(batch.input_ids, batch.labels, lora)) * labelled
            count += labelled
        self.eval_tokens = count
        return total / count if count else math.nan

    def snapshot(self) -> dict[str, torch.Tensor]:
        with self._lock:
            return {k: v.detach().clone() for k, v in self.shadow.items()}

    def publish(self, *, round: int | None = None) -> AdapterVersion:
        """Evaluate the shadow and publish it as a new current version."""
        tensors = self.snapshot()
        eval_loss = self.evaluate(tensors)
        self.last_eval_loss = eval_loss
        return self.store.publish(tensors, round=self.round if round is None else round, step=self.step, eval_loss=eval_loss)

    def begin_round(self, round_id: str, base: dict[str, torch.Tensor], local_steps: int, on_done, *, only_b: bool = False) -> None:
        """Train `local_steps` from `base` for a federated round, then call `on_done(snapshot)` and wait.

        The trainer thread runs the steps under the usual budget; after the goal it pauses until
        the next round begins, so a finished participant leaves the CPU to inference.
        """
        self.reset_shadow(base)
        with self._lock:
            self._goal = _RoundGoal(round_id, self.step + local_steps, on_done, only_b)
        self.pause(False)

    def reset_shadow(self, tensors: dict[str, torch.Tensor]) -> None:
        """Start the shadow over from `tensors` (e.g. a new global adapter after a federated round)."""
        with self._lock:
            with torch.no_grad():
                for k, v in tensors.items():
                    self.shadow[k].copy_(v)
            self.optimizer.state.clear()

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
        step_tokens = self.settings.micro_batch * self.dataset.seq_len
        while not self._stop.is_set():
            if self._paused.is_set():
                self._stop.wait(0.05)
                continue
            if not self.budget.acquire(step_tokens, timeout=0.1):
                continue
            try:
                self.train_step()
                goal = self._goal
                if goal is not None and self.step >= goal.target_step:
                    self._goal = None
                    self.pause(True)
                    goal.on_done(self.snapshot())
                    continue
                if goal is None and self.settings.publish_every and self.step % self.settings.publish_every == 0:
                    version = self.publish()
                    log.info("published adapter version %d at step %d (eval loss %.4f)", version.number, self.step, version.eval_loss)
            except Exception as exc:  # keep serving; report through stats and the log
                self.error = f"{type(exc).__name__}: {exc}"
                log.exception("training step failed; the trainer stops, serving goes on")
                return
