"""Fast-timescale batch mixer: how many training tokens may run after each inference iteration.

Pure code (stdlib only), so tests and simulations drive it with plain numbers.

Policy: AIMD on the training budget, the same control law TCP uses to share a link without
knowing its capacity. Here the "link" is the GPU time left under the latency SLO, whose size
changes with the inference load and is never measured directly.

- Inference goes first: the engine runs its iteration, then reports what it observed.
- Pressure (observed TPOT or TTFT above `headroom` x SLO, or a non-empty queue that grew):
  multiplicative decrease, so a load spike is answered within a few iterations.
- Overload (`overload_iterations` consecutive iterations over the SLO itself, or a queue that
  grew that many times in a row): training goes straight to 0; halving is too slow once
  requests are already late.
- Otherwise additive increase toward the operator's cap, which probes the headroom gently.
- Idle iteration (nothing decoded, prefilled or queued): no SLO to protect, jump to the cap.

The budget starts at 0 (inference first); the first idle tick or a few healthy iterations
raise it. Aiming at `headroom` x SLO rather than the SLO keeps the AIMD saw-tooth under it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    """What the operator's slow timescale allows this replica (the agent's side of a plan)."""

    train_cap_tokens: int
    ttft_ms: int
    tpot_ms: int
    adaptive: bool = True  # False for the `static` policy: a fixed training batch, no fast-timescale mixing


REASONS = ("Idle", "Headroom", "Pressure", "Overload", "Capped", "Disabled", "Fixed")


@dataclass(frozen=True)
class MixerSettings:
    ttft_ms: float
    tpot_ms: float
    cap_tokens_per_iteration: int
    headroom: float = 0.8
    increase_tokens: int | None = None
    decrease_factor: float = 0.5
    overload_iterations: int = 2
    adaptive: bool = True  # False: the `static` policy's fixed training batch, whatever the latency

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of milliseconds, got {value!r}")
        if not _is_int(self.cap_tokens_per_iteration) or self.cap_tokens_per_iteration < 0:
            raise ValueError(f"cap_tokens_per_iteration must be an integer >= 0 (0 disables training), got {self.cap_tokens_per_iteration!r}")
        if not (isinstance(self.headroom, (int, float)) and 0 < self.headroom <= 1):
            raise ValueError(f"headroom must be in (0, 1], the fraction of the SLO to aim at; got {self.headroom!r}")
        if self.increase_tokens is not None and (not _is_int(self.increase_tokens) or self.increase_tokens < 1):
            raise ValueError(f"increase_tokens must be an integer >= 1, or None for cap/8; got {self.increase_tokens!r}")
        if not (isinstance(self.decrease_factor, (int, float)) and 0 <= self.decrease_factor < 1):
            raise ValueError(f"decrease_factor must be in [0, 1), the fraction of the budget kept on pressure; got {self.decrease_factor!r}")
        if not _is_int(self.overload_iterations) or self.overload_iterations < 1:
            raise ValueError(f"overload_iterations must be an integer >= 1, got {self.overload_iterations!r}")

    @property
    def increase(self) -> int:
        """Additive step per healthy iteration."""
        if self.increase_tokens is not None:
            return self.increase_tokens
        return max(1, self.cap_tokens_per_iteration // 8)


@dataclass(frozen=True)
class IterationStats:
    iteration_ms: float
    decode_rows: int
    prefill_tokens: int
    queue_depth: int
    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def __post_init__(self) -> None:
        # Produced by the engine, never by a user: bad values are engine bugs, fail loudly.
        for name in ("decode_rows", "prefill_tokens", "queue_depth"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"IterationStats.{name} must be an integer >= 0, got {value!r}")
        for name in ("iteration_ms", "ttft_ms", "tpot_ms"):
            value = getattr(self, name)
            if value is None and name != "iteration_ms":
                continue
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"IterationStats.{name} must be a finite number >= 0, got {value!r}")

    @property
    def idle(self) -> bool:
        return self.decode_rows == 0 and self.prefill_tokens == 0 and self.queue_depth == 0


@dataclass(frozen=True)
class MixDecision:
    training_tokens: int
    reason: str


class BatchMixer:
    """Per-iteration training budget under the serving SLO (see the module docstring)."""

    def __init__(self, settings: MixerSettings):
        self._settings = settings
        self._budget = 0
        self._violations_in_a_row = 0
        self._queue_growth_in_a_row = 0
        self._last_queue_depth = 0

    @property
    def settings(self) -> MixerSettings:
        return self._settings

    @property
    def training_tokens(self) -> int:
        return self._budget

    @property
    def training_share(self) -> float:
        cap = self._settings.cap_tokens_per_iteration
        return self._budget / cap if cap else 0.0

    def update_settings(self, settings: MixerSettings) -> None:
        """Adopt a new plan or SLO; the budget is clamped to the new cap, the history is kept."""
        self._settings = settings
        self._budget = min(self._budget, settings.cap_tokens_per_iteration)

    def decide(self, stats: IterationStats) -> MixDecision:
        s = self._settings
        cap = s.cap_tokens_per_iteration
        self._observe_queue(stats)
        tpot = stats.tpot_ms
        if tpot is None and stats.decode_rows > 0:
            tpot = stats.iteration_ms  # one output token per running row per iteration
        ttft = stats.ttft_ms
        if _above(tpot, s.tpot_ms) or _above(ttft, s.ttft_ms):
            self._violations_in_a_row += 1
        else:
            self._violations_in_a_row = 0

        if cap == 0:
            self._budget = 0
            return MixDecision(0, "Disabled")
        if not s.adaptive:
            self._budget = cap
            return MixDecision(cap, "Fixed")
        if stats.idle:
            self._violations_in_a_row = 0
            self._budget = cap
            return MixDecision(cap, "Idle")
        if self._violations_in_a_row >= s.overload_iterations or self._queue_growth_in_a_row >= s.overload_iterations:
            self._budget = 0
            return MixDecision(0, "Overload")
        pressure = _above(tpot, s.headroom * s.tpot_ms) or _above(ttft, s.headroom * s.ttft_ms) or self._queue_growth_in_a_row > 0
        if pressure:
            self._budget = int(self._budget * s.decrease_factor)
            return MixDecision(self._budget, "Pressure")
        self._budget = min(cap, self._budget + s.increase)
        return MixDecision(self._budget, "Capped" if self._budget == cap else "Headroom")

    def _observe_queue(self, stats: IterationStats) -> None:
        growing = stats.queue_depth > 0 and stats.queue_depth > self._last_queue_depth
        self._queue_growth_in_a_row = self._queue_growth_in_a_row + 1 if growing else 0
        self._last_queue_depth = stats.queue_depth


def _above(observed: float | None, limit: float) -> bool:
    return observed is not None and observed > limit


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class LinearLatencyModel:
    """Synthetic iteration latency, linear in the work done; for tests, benchmarks, simulations."""

    base_ms: float
    per_row_ms: float
    per_prefill_token_ms: float
    per_training_token_ms: float

    def iteration_ms(self, decode_rows: int, prefill_tokens: int, training_tokens: int) -> float:
        return self.base_ms + self.per_row_ms * decode_rows + self.per_prefill_token_ms * prefill_tokens + self.per_training_token_ms * training_tokens


def simulate(
    mixer: BatchMixer,
    model: LinearLatencyModel,
    rows_per_iteration: Sequence[int],
    *,
    prefill_tokens_per_iteration: Sequence[int] | None = None,
    queue_depths: Sequence[int] | None = None,
) -> list[MixDecision]:
    """Feed the mixer one iteration per entry; returns its decision after each.

    Each iteration's latency includes the training tokens the previous decision allowed
    (training interferes with the next inference iteration). TPOT is that iteration's latency
    when rows > 0; TTFT is reported as the iteration's latency when it prefilled anything.
    """
    n = len(rows_per_iteration)
    prefills = list(prefill_tokens_per_iteration or [0] * n)
    queues = list(queue_depths or [0] * n)
    if len(prefills) != n or len(queues) != n:
        raise ValueError("prefill_tokens_per_iteration and queue_depths must match rows_per_iteration")
    decisions: list[MixDecision] = []
    for rows, prefill, queue in zip(rows_per_iteration, prefills, queues):
        ms = model.iteration_ms(rows, prefill, mixer.training_tokens)
        stats = IterationStats(
            iteration_ms=ms,
            decode_rows=rows,
            prefill_tokens=prefill,
            queue_depth=queue,
            ttft_ms=ms if prefill > 0 else None,
            tpot_ms=ms if rows > 0 else None,
        )
        decisions.append(mixer.decide(stats))
    return decisions
