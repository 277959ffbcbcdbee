"""Offered load for benchmarks: request sizes from a real trace, Poisson arrivals, in-process submission.

Requests go straight to the engine (no HTTP), so the load generator takes as little of the
machine as possible and the figures measure the replica, not the client.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

from replica_agent.engine.engine import Engine, QueueFull
from replica_agent.engine.requests import FinalEvent, SamplingParams
from replica_agent.traces import DEFAULT_TRACE, RequestShape, trace_shapes

__all__ = ["DEFAULT_TRACE", "RequestShape", "trace_shapes", "TrialResult", "run_trial", "find_max_rate"]  # trace helpers re-exported


@dataclass
class TrialResult:
    rate: float
    duration_s: float
    requests: int
    finished: int
    slo_met: int
    failed: int
    rejected: int
    generated_tokens: int
    elapsed_s: float  # from the first arrival until the last request finished

    @property
    def served_tokens_per_s(self) -> float:
        return self.generated_tokens / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def attainment(self) -> float:
        return self.slo_met / self.requests if self.requests else 0.0

    @property
    def goodput_rps(self) -> float:
        return self.slo_met / self.duration_s

    def as_dict(self) -> dict:
        return {**self.__dict__, "attainment": self.attainment, "slo_met_rps": self.goodput_rps}


def run_trial(
    engine: Engine, shapes: list[RequestShape], rate: float, duration_s: float, *, ttft_ms: float, tpot_ms: float, seed: int = 0, drain_timeout_s: float = 60.0
) -> TrialResult:
    """Offer Poisson arrivals at `rate` req/s for `duration_s`; wait for all to finish."""
    rng = random.Random(seed)
    finals: list[FinalEvent] = []
    lock = threading.Lock()
    all_done = threading.Event()
    expected = [0]
    rejected = 0

    def callback(ev):
        if isinstance(ev, FinalEvent):
            with lock:
                finals.append(ev)
                if len(finals) == expected[0] and submitting_done.is_set():
                    all_done.set()

    submitting_done = threading.Event()
    start = time.perf_counter()
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t > duration_s:
            break
        delay = start + t - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        shape = rng.choice(shapes)
        prompt = [rng.randrange(32, 127) for _ in range(shape.prompt_tokens)]
        try:
            with lock:
                expected[0] += 1
            engine.submit(prompt, SamplingParams(max_new_tokens=shape.output_tokens, ignore_eos=True), callback)
        except QueueFull:
            rejected += 1
            with lock:
                expected[0] -= 1
    with lock:
        submitting_done.set()
        if len(finals) == expected[0]:
            all_done.set()
    all_done.wait(drain_timeout_s)
    elapsed = time.perf_counter() - start
    with lock:
        done = list(finals)
    met = sum(1 for f in done if f.ok and f.meets_slo(ttft_ms, tpot_ms))
    return TrialResult(
        rate=rate,
        duration_s=duration_s,
        requests=expected[0] + rejected,
        finished=sum(1 for f in done if f.ok),
        slo_met=met,
        failed=sum(1 for f in done if not f.ok) + (expected[0] - len(done)),
        rejected=rejected,
        generated_tokens=sum(f.generated_tokens for f in done),
        elapsed_s=elapsed,
    )


def find_max_rate(
    trial, *, start_rate: float, target: float = 0.99, refinements: int = 3, max_doublings: int = 8
) -> tuple[float, TrialResult | None, list[TrialResult]]:
    """Step the offered load: double until the SLO attainment drops under `target`, then bisect.

    `trial(rate) -> TrialResult`. Returns the highest passing rate, its trial, and every trial run.
    """
    history: list[TrialResult] = []
    best: TrialResult | None = None
    low, high = 0.0, None
    rate = start_rate
    for _ in range(max_doublings):
        result = trial(rate)
        history.append(result)
        if result.attainment >= target:
            best, low = result, rate
            rate *= 2
        else:
            high = rate
            break
    if high is None:
        return low, best, history
    for _ in range(refinements):
        rate = (low + high) / 2 if low > 0 else high / 2
        result = trial(rate)
        history.append(result)
        if result.attainment >= target:
            best, low = result, rate
        else:
            high = rate
    return low, best, history
