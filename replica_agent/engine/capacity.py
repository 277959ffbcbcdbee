"""An agent's capacity profile, measured online: what it sustains within the SLO at each training level.

Pure code (no torch): the agent feeds every engine iteration and every finished request; the
operator's allocation reads `profile()` as (training cap tokens/iteration, requests/s within the
SLO, training tokens/s) points (collm_control.allocation.CapacityProfile).

Model: at a given training level the iteration time grows linearly with the running batch,
`t(rows) = a + b * rows` (a: fixed cost plus training interference, b: per-row cost). The largest
batch that keeps t within `headroom x TPOT SLO` (and within max_batch) gives the token rate,
`rows / t(rows)`, and dividing by the mean output length gives requests/s. a and b are fitted per
training-level bucket by exponentially weighted least squares, so the profile follows drift
(other tenants, thermal limits, a new adapter rank) without a calibration phase.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Fit:
    """Exponentially weighted least squares of y = a + b x."""

    n: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0
    count: int = 0

    def add(self, x: float, y: float, decay: float) -> None:
        self.n, self.sx, self.sy = self.n * decay + 1, self.sx * decay + x, self.sy * decay + y
        self.sxx, self.sxy = self.sxx * decay + x * x, self.sxy * decay + x * y
        self.count += 1

    def line(self) -> tuple[float, float]:
        mean_x, mean_y = self.sx / self.n, self.sy / self.n
        var = self.sxx / self.n - mean_x * mean_x
        if var <= 1e-9:  # one batch size seen so far: treat the time as fixed per iteration
            return mean_y, 0.0
        slope = max(0.0, (self.sxy / self.n - mean_x * mean_y) / var)
        return max(0.0, mean_y - slope * mean_x), slope


@dataclass
class _Bucket:
    fit: _Fit = field(default_factory=_Fit)
    train_tokens: float = 0.0
    seconds: float = 0.0


@dataclass(frozen=True)
class CapacityPoint:
    cap: int
    requests_per_s: float
    training_tokens_per_s: float
    samples: int


class CapacityProfiler:
    def __init__(
        self, *, tpot_ms: float, max_batch: int, buckets: int = 4, headroom: float = 0.9, half_life_iterations: int = 2000, min_samples: int = 50
    ) -> None:
        if buckets < 1 or max_batch < 1 or tpot_ms <= 0:
            raise ValueError("capacity profiler needs buckets >= 1, max_batch >= 1 and a positive TPOT SLO")
        self.tpot_ms, self.max_batch, self.headroom = tpot_ms, max_batch, headroom
        self.decay = 0.5 ** (1 / half_life_iterations)
        self.min_samples = min_samples
        self._buckets = [_Bucket() for _ in range(buckets + 1)]  # level 0 (no training) .. buckets (full cap)
        self._output_tokens = 32.0
        self._last_cap = 0

    def level(self, budget: int, cap: int) -> int:
        if cap <= 0 or budget <= 0:
            return 0
        n = len(self._buckets) - 1
        return max(1, min(n, round(n * budget / cap)))

    def observe_iteration(self, *, cap: int, budget: int, rows: int, iteration_ms: float, training_tokens: int) -> None:
        """One engine iteration: its batch, its time, the training tokens run meanwhile, the mixer's budget."""
        self._last_cap = cap
        bucket = self._buckets[self.level(budget, cap)]
        if rows > 0:
            bucket.fit.add(rows, iteration_ms, self.decay)
        bucket.train_tokens = bucket.train_tokens * self.decay + training_tokens
        bucket.seconds = bucket.seconds * self.decay + iteration_ms / 1000

    def observe_request(self, output_tokens: int) -> None:
        self._output_tokens = 0.98 * self._output_tokens + 0.02 * max(1, output_tokens)

    def requests_per_s(self, level: int) -> float | None:
        fit = self._buckets[level].fit
        if fit.count < self.min_samples:
            return None
        a, b = fit.line()
        budget_ms = self.headroom * self.tpot_ms
        rows = self.max_batch if b == 0 else int(min(self.max_batch, (budget_ms - a) / b))
        if rows < 1 or a + b * rows <= 0:
            return 0.0
        tokens_per_s = rows / (a + b * rows) * 1000
        return tokens_per_s / self._output_tokens

    def profile(self, cap: int | None = None) -> list[CapacityPoint]:
        """Measured points, lowest training level first; levels not seen often enough are left out."""
        cap = self._last_cap if cap is None else cap
        n = len(self._buckets) - 1
        points = []
        for level, bucket in enumerate(self._buckets):
            rps = self.requests_per_s(level)
            if rps is None:
                continue
            train = bucket.train_tokens / bucket.seconds if bucket.seconds > 0 else 0.0
            points.append(CapacityPoint(round(cap * level / n), rps, train, bucket.fit.count))
        return points
