"""Load prediction for the slow timescale: how many requests per second to provision for next.

Pure code (stdlib only). The operator calls `observe` once per slow interval with the arrivals
counted since the previous call, then `predict` before it allocates.

Why not a plain EMA: the Azure code trace (replica_agent/traces/) is bursts of a few tens of seconds
separated by idle gaps of up to minutes; inside a burst the rate is about 3x the mean. An EMA
averages bursts with gaps, so it under-predicts almost every burst interval (it provisions the
mean) and still predicts load deep inside long gaps (when training could take every replica).
What this predictor does instead, each term reacting to one feature of such a trace:

- envelope: jumps to any higher observed rate at once, then decays with `envelope_tau_s`
  (fast attack, slow decay), so a rise is answered by the next allocation and a long idle gap
  decays to almost nothing;
- burst level: the intensity of recent bursts. It rises at once to a higher rate and falls
  slowly toward lower ones (`burst_tau_s`), updated only by intervals that had arrivals, so an
  idle gap neither lowers it nor lets it block training: it applies only while traffic is
  active (arrivals seen within `hold_s`). One burst's intensity then carries over to the next
  interval of the same burst, and a burst that resumes after a short pause is met at once.

The prediction is the larger of the two while traffic is active, the envelope while idle.
Over-predicting costs training tokens; under-predicting costs SLO misses, which the fast
timescale (batch mixer) must then absorb, so the predictor leans toward over-prediction on
purpose. docs/scheduling.md gives its figures on the trace, and the simulation's verdict on
that trade.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class PredictorSettings:
    envelope_tau_s: float = 30.0
    burst_tau_s: float = 200.0
    hold_s: float = 20.0

    def __post_init__(self) -> None:
        for name in ("envelope_tau_s", "burst_tau_s", "hold_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"PredictorSettings.{name} must be a positive number of seconds, got {value!r}")


class LoadPredictor:
    """Envelope + burst-level predictor of the request rate (see the module docstring)."""

    def __init__(self, settings: PredictorSettings | None = None, *, start_s: float = 0.0) -> None:
        self.settings = settings or PredictorSettings()
        self._t = float(start_s)
        self._last_arrival_s: float | None = None
        self._envelope = 0.0
        self._burst_level = 0.0
        self._pending = 0  # arrivals reported with no time elapsed yet

    @property
    def time_s(self) -> float:
        return self._t

    def observe(self, t: float, arrivals: int) -> None:
        """Count `arrivals` requests that arrived in (previous observe time, t]."""
        if not (isinstance(arrivals, int) and not isinstance(arrivals, bool)) or arrivals < 0:
            raise ValueError(f"arrivals must be an integer >= 0, got {arrivals!r}")
        if not math.isfinite(t) or t < self._t:
            raise ValueError(f"observation time {t!r} is before the previous one ({self._t}); times must not go back")
        dt = t - self._t
        if dt == 0:
            self._pending += arrivals
            return
        arrivals += self._pending
        self._pending = 0
        s = self.settings
        rate = arrivals / dt
        self._envelope = max(rate, self._envelope * math.exp(-dt / s.envelope_tau_s))
        if arrivals > 0:
            if rate >= self._burst_level:
                self._burst_level = rate
            else:
                self._burst_level += (1.0 - math.exp(-dt / s.burst_tau_s)) * (rate - self._burst_level)
            self._last_arrival_s = t
        self._t = t

    def predict(self, horizon_s: float) -> float:
        """The rate (req/s) to provision for over the next `horizon_s` seconds.

        That is the forecast's highest value over the horizon; every term only decays between
        observations, so it is the current value whatever the horizon.
        """
        if not (isinstance(horizon_s, (int, float)) and math.isfinite(horizon_s) and horizon_s > 0):
            raise ValueError(f"horizon_s must be a positive number of seconds, got {horizon_s!r}")
        if self._active_at(self._t):
            return max(self._envelope, self._burst_level)
        return self._envelope

    def _active_at(self, t: float) -> bool:
        return self._last_arrival_s is not None and t - self._last_arrival_s < self.settings.hold_s


class EmaPredictor:
    """A plain time-aware EMA of the rate: the baseline `LoadPredictor` is measured against."""

    def __init__(self, tau_s: float = 60.0, *, start_s: float = 0.0) -> None:
        if not (math.isfinite(tau_s) and tau_s > 0):
            raise ValueError(f"tau_s must be a positive number of seconds, got {tau_s!r}")
        self.tau_s = tau_s
        self._t = float(start_s)
        self._level = 0.0
        self._pending = 0

    def observe(self, t: float, arrivals: int) -> None:
        if t < self._t or arrivals < 0:
            raise ValueError(f"times must not go back and arrivals must be >= 0 (t={t!r}, arrivals={arrivals!r})")
        dt = t - self._t
        self._pending += arrivals
        if dt > 0:
            self._level += (1.0 - math.exp(-dt / self.tau_s)) * (self._pending / dt - self._level)
            self._t, self._pending = t, 0

    def predict(self, horizon_s: float) -> float:
        return self._level


@dataclass(frozen=True)
class PredictionScore:
    """How a predictor did when replayed over a trace, one prediction per interval."""

    intervals: int
    burst_intervals: int  # intervals whose rate was >= 2x the trace's mean rate
    burst_under_prediction_rate: float  # share of those where rate > prediction / headroom
    under_predicted_share: float  # requests above the prediction / all requests
    long_idle_prediction: float  # mean prediction 60 s or more into an idle gap (req/s)
    reserved_over_actual: float  # sum of predictions / sum of actual rates

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def replay(predictor, arrival_times, interval_s: float = 10.0, *, headroom: float = 0.9) -> PredictionScore:
    """Feed sorted arrival times (seconds from the start) to `predictor` one interval at a time,
    predicting each next interval before it is seen, and score the predictions. The predictor's
    clock must start at 0, the first arrival's time."""
    count = int(arrival_times[-1] // interval_s) + 1 if len(arrival_times) else 0
    counts = [0] * count
    for t in arrival_times:
        counts[int(t // interval_s)] += 1
    rates = [n / interval_s for n in counts]
    mean = sum(rates) / count if count else 0.0
    bursts = under = 0
    under_requests = reserved = idle_sum = 0.0
    idle_n = idle_run = 0
    for i, rate in enumerate(rates):
        predicted = predictor.predict(interval_s)
        idle_run = idle_run + 1 if rate == 0 else 0
        if rate >= 2 * mean and rate > 0:
            bursts += 1
            under += rate > predicted / headroom
        if idle_run * interval_s >= 60:
            idle_sum += predicted
            idle_n += 1
        under_requests += max(0.0, rate - predicted) * interval_s
        reserved += predicted
        predictor.observe((i + 1) * interval_s, counts[i])
    total = sum(rates)
    return PredictionScore(
        intervals=count,
        burst_intervals=bursts,
        burst_under_prediction_rate=under / bursts if bursts else 0.0,
        under_predicted_share=under_requests / (total * interval_s) if total else 0.0,
        long_idle_prediction=idle_sum / idle_n if idle_n else 0.0,
        reserved_over_actual=reserved / total if total else 0.0,
    )
