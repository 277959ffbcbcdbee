"""Continuous batching: requests join and leave at iteration boundaries, on one engine thread.

One iteration = sync the LoRA slab with the live versions, admit waiting requests (pin the current
adapter version, prefill, first token), one decode step for every running row, finish rows, then
report the iteration to the batch mixer, whose decision feeds the trainer's token bucket.
Requests pinned to different adapter versions share the decode step (see lora.LoraSlab).

Threads: callers submit from anywhere (the HTTP server's event loop); events are delivered through
the callback given at submit time, on the engine thread. `stream()` adapts that to asyncio.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch

from .adapter_store import AdapterStore, AdapterVersion
from .admission import QueueView, admit_in_s, predicted_ttft_ms
from .budget import TrainingBudget
from .detokenize import IncrementalDetokenizer
from .llama import KVCache, LlamaRuntime, SlabLora
from .lora import LoraSlab, LoraSpec
from .mixer import BatchMixer, IterationStats, MixDecision
from .requests import FinalEvent, FinishReason, GenerationRequest, SamplingParams, TokenEvent, TokenInfo, finish_reason, length_error
from .sampling import RowSampler, greedy_rows

log = logging.getLogger(__name__)

Event = TokenEvent | FinalEvent
Callback = Callable[[Event], object]  # its return value is ignored


class RequestRejected(ValueError):
    """The request cannot be served as asked (too long, engine stopped); the message says why."""


@dataclass
class EngineSettings:
    max_batch: int = 16
    max_total_tokens: int = 1024  # prompt + generated tokens of one request (the KV-cache row length)
    max_prefill_tokens: int = 2048  # prompt tokens prefilled per iteration, bounds the TPOT hit of admissions
    max_queue: int = 1024
    lora_slots: int = 4  # adapter versions servable at once
    idle_tick_s: float = 0.01  # how often an idle engine reports to the mixer
    ttft_slo_ms: float | None = None  # shed a request predicted to miss this TTFT (admission.py); None: queue everything
    shed_ttft_fraction: float = 0.9  # ... predicted past this share of the SLO (0: never shed)
    torch_threads: int | None = None  # intra-op threads of the engine thread (None: leave torch's default)


@dataclass
class RequestHandle:
    request: GenerationRequest
    callback: Callback
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Row:
    handle: RequestHandle
    sampler: RowSampler
    detok: IncrementalDetokenizer
    version: AdapterVersion | None
    slab_slot: int
    n_ctx: int  # tokens in this row's KV cache
    last_token: int = 0
    generated: list[TokenInfo] = field(default_factory=list)
    prefill: tuple[TokenInfo, ...] = ()
    admitted_at: float = 0.0
    first_token_at: float = 0.0

    @property
    def params(self) -> SamplingParams:
        return self.handle.request.params


class Engine:
    def __init__(
        self,
        runtime: LlamaRuntime,
        tokenizer,
        *,
        eos_token_ids: tuple[int, ...] = (),
        bos_token_id: int | None = None,
        store: AdapterStore | None = None,
        lora_spec: LoraSpec | None = None,
        settings: EngineSettings | None = None,
        mixer: BatchMixer | None = None,
        budget: TrainingBudget | None = None,
    ) -> None:
        self.runtime, self.tokenizer = runtime, tokenizer
        self.settings = s = settings or EngineSettings()
        self.eos_token_ids = set(eos_token_ids)
        # A property that rebuilds its list on every call in transformers: read it once.
        self.special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()) or ())
        self.bos_token_id = bos_token_id
        self.store = store
        self.mixer, self.budget = mixer, budget
        if s.max_total_tokens > runtime.max_context:
            raise ValueError(f"max_total_tokens {s.max_total_tokens} exceeds the model's context of {runtime.max_context} tokens")
        self.cache = KVCache(runtime.dims, s.max_batch, s.max_total_tokens, dtype=runtime.dtype, device=runtime.device)
        self.slab = (
            LoraSlab(lora_spec, runtime.dims, s.lora_slots, dtype=runtime.dtype, device=runtime.device) if store is not None and lora_spec is not None else None
        )
        self._rows: list[_Row] = []
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._cv = threading.Condition()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._tpot_ema_ms: float | None = None
        self._prefill_ms_per_token: float | None = None
        self._step_ms: float | None = None
        self._prefill_ms = 0.0  # time spent prefilling in the current iteration
        self._mean_output_tokens = 32.0
        self.iterations = 0
        self.inference_tokens = 0
        self.last_decision: MixDecision | None = None
        self.observers: list[Callable[[str, object], None]] = []  # ("iteration", stats) and ("finished", FinalEvent)

    # -- public API ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="collm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for row in self._rows:
            self._finish(row, FinishReason.ERROR, error="the engine stopped")
        self._rows.clear()
        while self._waiting:
            handle = self._waiting.popleft()
            handle.callback(_error_event(handle.request, "the engine stopped"))

    def encode(self, text: str) -> list[int]:
        """Model-ready ids: the tokenizer adds what its model expects (BOS for Llama and tiny, none for SmolLM2)."""
        return self.tokenizer.encode(text)

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        error = length_error(len(prompt_ids), params.max_new_tokens, self.settings.max_total_tokens)
        if error is not None:
            raise RequestRejected(error)

    def submit(self, prompt_ids: list[int], params: SamplingParams, callback: Callback, *, decoder_input_details: bool = False) -> RequestHandle:
        self.check(prompt_ids, params)
        request = GenerationRequest(next(self._ids), list(prompt_ids), params, decoder_input_details, time.perf_counter())
        handle = RequestHandle(request, callback)
        with self._cv:
            if self._stopping or self._thread is None:
                raise RequestRejected("the engine is not running")
            if len(self._waiting) >= self.settings.max_queue:
                raise QueueFull(f"the queue is full ({self.settings.max_queue} requests waiting); retry later")
            self._shed_if_late(len(prompt_ids))
            self._waiting.append(handle)
            self._cv.notify_all()
        return handle

    def _shed_if_late(self, prompt_tokens: int) -> None:
        """QueueFull when the request would miss its TTFT SLO (admission.py); called under the lock."""
        s = self.settings
        if s.ttft_slo_ms is None or s.shed_ttft_fraction <= 0:
            return
        view = QueueView(
            running=len(self._rows),
            waiting=len(self._waiting),
            waiting_prompt_tokens=sum(len(h.request.prompt_ids) for h in self._waiting),
            max_batch=s.max_batch,
            max_prefill_tokens=s.max_prefill_tokens,
            step_ms=self._step_ms,
            prefill_ms_per_token=self._prefill_ms_per_token,
            mean_output_tokens=self._mean_output_tokens,
        )
        predicted = predicted_ttft_ms(view, prompt_tokens)
        wait = admit_in_s(predicted, s.ttft_slo_ms, s.shed_ttft_fraction)
        if wait is not None:
            raise QueueFull(
                f"this replica would answer the first token in about {predicted:.0f} ms ({view.waiting} requests waiting, "
                f"{view.running} running), past its TTFT SLO of {s.ttft_slo_ms:.0f} ms; retry in {wait:.1f} s or on another replica",
                retry_after_s=wait,
            )

    async def stream(self, prompt_ids: list[int], params: SamplingParams, *, decoder_input_details: bool = False) -> AsyncIterator[Event]:
        """Submit and yield events as they come; cancels the request if the consumer goes away."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        handle = self.submit(prompt_ids, params, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev), decoder_input_details=decoder_input_details)
        try:
            while True:
                event = await queue.get()
                yield event
                if isinstance(event, FinalEvent):
                    return
        finally:
            handle.cancel()

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, *, timeout: float = 120.0, decoder_input_details: bool = False
    ) -> tuple[list[TokenEvent], FinalEvent]:
        """Blocking helper (benchmarks, tests): all token events and the final event."""
        done = threading.Event()
        events: list[Event] = []

        def collect(ev: Event) -> None:
            events.append(ev)
            if isinstance(ev, FinalEvent):
                done.set()

        handle = self.submit(prompt_ids, params, collect, decoder_input_details=decoder_input_details)
        if not done.wait(timeout):
            handle.cancel()
            raise TimeoutError(f"request {handle.request.id} did not finish within {timeout} s")
        final = events[-1]
        assert isinstance(final, FinalEvent)  # done is set by the final event
        return [e for e in events if isinstance(e, TokenEvent)], final

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._rows)

    # -- the loop -----------------------------------------------------------------------------
    def _run(self) -> None:
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        while True:
            with self._cv:
                if self._stopping:
                    return
                if not self._rows and not self._waiting:
                    self._cv.wait(self.settings.idle_tick_s)
                    if self._stopping:
                        return
            started = time.perf_counter()
            try:
                self._sync_slab()
                prefill_tokens, ttft_ms = self._admit()
                rows = len(self._rows)
                if self._rows:
                    self._decode_step()
            except Exception as exc:  # a bug or a device error: fail what is running, keep serving
                log.exception("engine iteration failed")
                for row in self._rows:
                    self._finish(row, FinishReason.ERROR, error=f"engine error: {exc}")
                self._rows.clear()
                continue
            iteration_ms = (time.perf_counter() - started) * 1000
            if rows:  # the iteration's time without its prefills: the decode step and the bookkeeping around it
                step_ms = max(0.0, iteration_ms - self._prefill_ms)
                if self._step_ms is not None:  # one stalled iteration (a pause, SIGSTOP) moves the average at most 4x
                    step_ms = 0.8 * self._step_ms + 0.2 * min(step_ms, 4 * self._step_ms)
                self._step_ms = step_ms
            self._after_iteration(iteration_ms, rows, prefill_tokens, ttft_ms)

    def _after_iteration(self, iteration_ms: float, rows: int, prefill_tokens: int, ttft_ms: float | None) -> None:
        self.iterations += 1
        if rows:
            self._tpot_ema_ms = iteration_ms if self._tpot_ema_ms is None else 0.8 * self._tpot_ema_ms + 0.2 * iteration_ms
        with self._cv:
            waiting = len(self._waiting)
            oldest = self._waiting[0].request.arrival if waiting else None
        if oldest is not None:
            # The oldest waiting request's age is a lower bound of its TTFT: pressure shows while it waits,
            # not only once it is admitted.
            waited_ms = (time.perf_counter() - oldest) * 1000
            ttft_ms = waited_ms if ttft_ms is None else max(ttft_ms, waited_ms)
        stats = IterationStats(
            iteration_ms=iteration_ms,
            decode_rows=rows,
            prefill_tokens=prefill_tokens,
            queue_depth=waiting,
            ttft_ms=ttft_ms,
            tpot_ms=self._tpot_ema_ms if rows else None,
        )
        if self.mixer is not None:
            decision = self.last_decision = self.mixer.decide(stats)
            if self.budget is not None:
                self.budget.credit(decision.training_tokens)
        for observer in self.observers:
            observer("iteration", stats)

    def _sync_slab(self) -> None:
        """Free slab slots of versions that are neither current nor pinned by a running row."""
        if self.slab is None:
            return
        in_use = {row.version.number for row in self._rows if row.version is not None}
        current = self.store.current
        if current is not None:
            in_use.add(current.number)
        for number in self.slab.loaded_versions() - in_use:
            self.slab.evict(number)

    def _admit(self) -> tuple[int, float | None]:
        prefilled, worst_ttft = 0, None
        self._prefill_ms = 0.0
        while len(self._rows) < self.settings.max_batch:
            with self._cv:
                if not self._waiting:
                    break
                handle = self._waiting[0]
                if handle.cancelled:
                    self._waiting.popleft()
                    handle.callback(_cancel_event(handle.request))
                    continue
                if prefilled and prefilled + len(handle.request.prompt_ids) > self.settings.max_prefill_tokens:
                    break
                version, slot = self._pin()
                if slot is None:  # every slab slot holds a live version: wait for one to drain
                    break
                self._waiting.popleft()
            try:
                row = self._prefill(handle, version, slot)
            except Exception as exc:
                log.exception("prefill failed for request %d", handle.request.id)
                if version is not None:
                    self.store.release(version.number)
                handle.callback(_error_event(handle.request, f"prefill failed: {exc}"))
                continue
            prefilled += len(handle.request.prompt_ids)
            ttft = (row.first_token_at - handle.request.arrival) * 1000
            worst_ttft = ttft if worst_ttft is None else max(worst_ttft, ttft)
        return prefilled, worst_ttft

    def _pin(self) -> tuple[AdapterVersion | None, int | None]:
        if self.slab is None:
            return None, -1
        version = self.store.pin_current()
        if version is None:
            return None, -1
        slot = self.slab.load(version.number, version.tensors)
        if slot is None:
            self.store.release(version.number)
        return version, slot

    def _lora(self, slots: list[int]) -> SlabLora | None:
        if self.slab is None or all(s < 0 for s in slots):
            return None
        return SlabLora(self.slab, slots, self.runtime.device)

    def _prefill(self, handle: RequestHandle, version: AdapterVersion | None, slot: int) -> _Row:
        req = handle.request
        row_index = len(self._rows)
        now = time.perf_counter()
        logits = self.runtime.prefill(req.prompt_ids, self.cache, row_index, self._lora([slot]), all_logits=req.decoder_input_details)
        prefill_ms = (time.perf_counter() - now) * 1000
        self._prefill_ms += prefill_ms
        per_token = prefill_ms / max(1, len(req.prompt_ids))
        self._prefill_ms_per_token = per_token if self._prefill_ms_per_token is None else 0.9 * self._prefill_ms_per_token + 0.1 * per_token
        row = _Row(
            handle,
            RowSampler(req.params, req.prompt_ids),
            IncrementalDetokenizer(self.tokenizer, req.prompt_ids),
            version,
            slot,
            len(req.prompt_ids),
            admitted_at=now,
        )
        if req.decoder_input_details:
            row.prefill = _prefill_details(self.tokenizer, req.prompt_ids, logits)
            logits = logits[-1]
        token, logprob = row.sampler.choose(logits)
        row.first_token_at = time.perf_counter()
        self._rows.append(row)
        if self._advance(row, token, logprob):
            self._remove([row_index])
        return row

    def _decode_step(self) -> None:
        rows = self._rows
        ids = torch.tensor([r.last_token for r in rows], device=self.runtime.device)
        positions = torch.tensor([r.n_ctx for r in rows], device=self.runtime.device)
        logits = self.runtime.decode(ids, positions, self.cache, self._lora([r.slab_slot for r in rows]))
        for r in rows:
            r.n_ctx += 1
        plain = [i for i, r in enumerate(rows) if not r.sampler.sampling and r.sampler.seen is None]
        chosen: dict[int, tuple[int, float]] = {}
        if plain:
            tokens, logprobs = greedy_rows(logits[plain])
            chosen.update(zip(plain, zip(tokens, logprobs)))
        for i, r in enumerate(rows):
            if i not in chosen:
                chosen[i] = r.sampler.choose(logits[i])
        self._remove([i for i, r in enumerate(rows) if self._advance(r, *chosen[i])])

    def _advance(self, row: _Row, token: int, logprob: float) -> bool:
        """Record one generated token, stream it, and finish the row if it is done; True when finished."""
        row.last_token = token
        special = token in self.eos_token_ids or token in self.special_ids
        text = "" if special else row.detok.add(token)
        self.inference_tokens += 1
        reason = self._finish_reason(row, token, text)
        if reason is not None:
            text += row.detok.flush()  # text held back mid UTF-8 sequence goes out with the last token
        info = TokenInfo(token, text, logprob, special)
        row.generated.append(info)
        row.handle.callback(TokenEvent(info, len(row.generated) - 1, reason))
        if reason is not None:
            self._finish(row, reason)
        return reason is not None

    def _finish_reason(self, row: _Row, token: int, text: str) -> FinishReason | None:
        if row.handle.cancelled:
            return FinishReason.CANCELLED
        return finish_reason(
            row.params,
            token,
            text,
            row.detok.text,
            eos_token_ids=self.eos_token_ids,
            generated=len(row.generated),
            context=row.n_ctx,
            max_total_tokens=self.settings.max_total_tokens,
        )

    def _finish(self, row: _Row, reason: FinishReason, error: str | None = None) -> None:
        if row.version is not None:
            self.store.release(row.version.number)
        now = time.perf_counter()
        req = row.handle.request
        n = len(row.generated)
        final = FinalEvent(
            finish_reason=reason,
            generated_text=row.detok.text,
            generated_tokens=n,
            seed=row.sampler.seed,
            adapter_version=row.version.label if row.version is not None else None,
            prompt_tokens=len(req.prompt_ids),
            prefill=row.prefill,
            tokens=tuple(row.generated),
            ttft_s=row.first_token_at - req.arrival if row.first_token_at else None,
            tpot_s=(now - row.first_token_at) / (n - 1) if n > 1 else None,
            queue_s=row.admitted_at - req.arrival,
            error=error,
            adapter_sha256=row.version.sha256 if row.version is not None else None,
        )
        if reason is not FinishReason.CANCELLED and reason is not FinishReason.ERROR:
            self._mean_output_tokens = 0.95 * self._mean_output_tokens + 0.05 * max(1, n)
        row.handle.callback(final)
        for observer in self.observers:
            observer("finished", final)

    def _remove(self, indices: list[int]) -> None:
        """Drop finished rows, moving the last rows into the holes so rows stay contiguous."""
        for i in sorted(indices, reverse=True):
            last = len(self._rows) - 1
            if i != last:
                moved = self._rows[last]
                self.cache.move_row(last, i, moved.n_ctx)
                self._rows[i] = moved
            self._rows.pop()


class QueueFull(RuntimeError):
    """The replica takes no more requests now: its queue is full, or the request would miss its TTFT
    SLO (HTTP 429); `retry_after_s` says when one like it would be admitted."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def _prefill_details(tokenizer, ids: list[int], logits: torch.Tensor) -> tuple[TokenInfo, ...]:
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    out = [TokenInfo(ids[0], tokenizer.decode([ids[0]]), None)]
    for pos in range(1, len(ids)):
        out.append(TokenInfo(ids[pos], tokenizer.decode([ids[pos]]), float(logprobs[pos - 1, ids[pos]])))
    return tuple(out)


def _cancel_event(req: GenerationRequest) -> FinalEvent:
    return FinalEvent(FinishReason.CANCELLED, "", 0, None, None, len(req.prompt_ids))


def _error_event(req: GenerationRequest, message: str) -> FinalEvent:
    return FinalEvent(FinishReason.ERROR, "", 0, None, None, len(req.prompt_ids), error=message)
