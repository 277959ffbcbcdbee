"""SLO-aware admission: refuse a request at the door when it would miss its TTFT anyway (pure; no torch).

A request that waits in the queue past its TTFT SLO is lost twice: its client gets a late answer,
and the time the replica spends on it is time the requests behind it wait. Shedding it at once
with 429 and `Retry-After` lets the client (or the router) try elsewhere or later while the
requests the replica keeps still meet their SLO (vLLM and TGI queue without a bound on the wait;
SLO-aware schedulers such as those of DistServe and AIBrix's gateway shed instead).

The prediction is a queue model of the continuous-batching engine (engine.py), fed with what the
engine measured: the recent time of an iteration without its prefills (the decode step and the
bookkeeping around it), the prefill time per prompt token and the mean output length of finished
requests. A request waits for whichever is slower:

- the prefills ahead of it: the prompts queued before it and its own, at most
  `max_prefill_tokens` an iteration, each iteration also running its decode step;
- a free row, when every row is taken or promised to requests ahead: `needed` rows must finish.
  `rows` rows of mean length `L` tokens finish one every `L x step / rows` ms in steady state
  (one token per row per step), and each freed row costs the prefill of the prompt that takes it.

The request is shed when the prediction exceeds `fraction x TTFT SLO`; the fraction leaves room
for the model's error (bursts of long prompts, an iteration time that drifts). The answer says in
how many seconds a request like it would be admitted within that budget: the router stops
sending to the replica for that long (router/dispatch.py), and clients read it as Retry-After.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class QueueView:
    """The engine's queue at the moment of a submit, with what it measured so far."""

    running: int  # rows decoding now
    waiting: int  # requests queued ahead of this one
    waiting_prompt_tokens: int  # their prompt tokens, still to prefill
    max_batch: int
    max_prefill_tokens: int
    step_ms: float | None  # recent time of an iteration without its prefills (None: nothing measured yet)
    prefill_ms_per_token: float | None
    mean_output_tokens: float


def predicted_ttft_ms(view: QueueView, prompt_tokens: int) -> float | None:
    """The time from now until this request's first token; None (admit) while the engine has measured
    nothing, and when it is idle: a request alone waits only for its own prefill, and admitting it is
    also how an engine whose last iterations were slow (a pause, a stall) measures again."""
    if view.step_ms is None or (view.running == 0 and view.waiting == 0):
        return None  # nothing measured yet, or an idle engine: nothing to wait for that shedding could spare
    step, per_token = view.step_ms, view.prefill_ms_per_token or 0.0
    tokens = view.waiting_prompt_tokens + prompt_tokens
    prefills = max(1, math.ceil(tokens / max(1, view.max_prefill_tokens))) * step + tokens * per_token
    free = view.max_batch - view.running
    if view.waiting < free:
        return prefills
    needed = view.waiting - free + 1  # rows that must finish before one is free for this request
    rows = max(view.running, min(view.max_batch, view.waiting))  # an idle batch fills from the queue first
    mean_prompt = view.waiting_prompt_tokens / view.waiting if view.waiting else prompt_tokens
    per_row = max(1.0, view.mean_output_tokens) * step / max(1, rows) + mean_prompt * per_token
    return max(prefills, needed * per_row + step + prompt_tokens * per_token)


def admit_in_s(predicted_ms: float | None, ttft_slo_ms: float, fraction: float) -> float | None:
    """None to admit; otherwise the seconds until a request like this one would be admitted within
    `fraction x ttft_slo_ms` (fraction 0 turns shedding off)."""
    if predicted_ms is None or fraction <= 0:
        return None
    budget = fraction * ttft_slo_ms
    return None if predicted_ms <= budget else (predicted_ms - budget) / 1000
