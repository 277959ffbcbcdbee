"""The load predictor: unit behaviour, and its score on the Azure code trace against a plain EMA."""

from __future__ import annotations

import pytest

from collm_control.predictor import EmaPredictor, LoadPredictor, PredictorSettings, replay
from replica_agent.traces import load_arrivals


def feed(predictor, rates, interval_s=10.0, start=0.0):
    t = start
    for rate in rates:
        t += interval_s
        predictor.observe(t, round(rate * interval_s))
    return t


def test_steady_traffic_is_predicted_at_its_rate():
    p = LoadPredictor()
    feed(p, [5.0] * 30)
    assert p.predict(10.0) == pytest.approx(5.0)


def test_a_rise_is_answered_at_once_and_decays_slowly():
    p = LoadPredictor()
    feed(p, [1.0] * 10 + [30.0])
    assert p.predict(10.0) >= 30.0
    feed(p, [0.0], start=110.0)
    assert p.predict(10.0) >= 0.7 * 30.0, "one quiet interval inside a burst must not drop the forecast"


def test_a_long_idle_gap_frees_the_cluster_for_training():
    p = LoadPredictor()
    feed(p, [30.0] * 3 + [0.0] * 18)  # three minutes idle
    assert p.predict(10.0) < 0.05 * 30.0


def test_a_burst_that_resumes_after_a_gap_is_met_at_its_remembered_intensity():
    p = LoadPredictor()
    t = feed(p, [30.0] * 3 + [0.0] * 18)
    feed(p, [2.0], start=t)
    assert p.predict(10.0) >= 0.9 * 30.0


def test_arrivals_reported_at_the_same_time_are_kept():
    p = LoadPredictor()
    p.observe(10.0, 0)
    p.observe(10.0, 100)  # no time elapsed: counted with the next interval
    p.observe(20.0, 0)
    assert p.predict(10.0) == pytest.approx(10.0)


@pytest.mark.parametrize("call", [lambda p: p.observe(5.0, -1), lambda p: p.observe(1.0, True), lambda p: p.predict(0)])
def test_bad_inputs_are_rejected(call):
    p = LoadPredictor()
    p.observe(10.0, 1)
    with pytest.raises(ValueError):
        call(p)
    with pytest.raises(ValueError, match="go back"):
        p.observe(5.0, 1)
    with pytest.raises(ValueError):
        PredictorSettings(hold_s=0)


def test_on_the_code_trace_bursts_are_rarely_under_predicted_and_idle_gaps_free_capacity():
    arrivals = load_arrivals()
    ours = replay(LoadPredictor(), arrivals, 10.0)
    mean_rate = len(arrivals) / arrivals[-1]
    assert ours.burst_intervals > 50
    # Burst interval: rate >= 2x the trace mean; under-predicted: rate > prediction / 0.9 (headroom).
    assert ours.burst_under_prediction_rate <= 0.3
    assert ours.long_idle_prediction < 0.25 * mean_rate
    for tau_s in (10.0, 30.0, 60.0, 120.0):
        ema = replay(EmaPredictor(tau_s), arrivals, 10.0)
        assert ema.burst_under_prediction_rate >= 0.8, tau_s
        assert ours.burst_under_prediction_rate < ema.burst_under_prediction_rate / 3
        assert ours.under_predicted_share < ema.under_predicted_share / 2
    assert ours.long_idle_prediction < replay(EmaPredictor(60.0), arrivals, 10.0).long_idle_prediction
