"""The slow-timescale simulation and the allocation benchmark run and print complete, finite figures."""

from __future__ import annotations

import json
import math

import pytest

from collm_bench import allocation_bench, simulate
from collm_operator.allocation import POLICIES

needs_trace = pytest.mark.skipif(not simulate.CODE_TRACE.exists(), reason=f"the Azure code trace is not at {simulate.CODE_TRACE}")
FIGURES = ("requests", "slo_met", "slo_attainment", "training_tokens", "published_tokens", "final_loss", "mean_quality", "goodput", "goodput_ratio")


@needs_trace
def test_a_short_simulation_gives_finite_figures_and_coexec_ahead(tmp_path):
    out = tmp_path / "simulate.json"
    result = simulate.run(duration_s=900, ablations=False, json_path=str(out))
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert set(saved["policies"]) == set(POLICIES) and saved["ablations"] == {}
    for policy, row in saved["policies"].items():
        for key in FIGURES:
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (policy, key)
        assert 0 <= row["slo_attainment"] <= 1 and row["requests"] > 0
        assert 1 / simulate.SimConfig().loss_initial <= row["mean_quality"] <= 1 / simulate.SimConfig().loss_floor
    rows = saved["policies"]
    assert rows["inferenceOnly"]["training_tokens"] == 0 and rows["coexec"]["training_tokens"] > 0
    assert rows["coexec"]["goodput_ratio"] == 1.0
    assert saved["coexec_ahead"], {p: r["goodput"] for p, r in rows.items()}
    for name in ("burst (LoadPredictor)", "EMA 60 s"):
        assert 0 <= saved["predictor"][name]["burst_under_prediction_rate"] <= 1


@needs_trace
def test_the_simulation_is_deterministic():
    arrivals = simulate.load_arrivals()
    config = simulate.SimConfig(duration_s=300)
    assert simulate.simulate(arrivals, config, "coexec") == simulate.simulate(arrivals, config, "coexec")


def test_a_fluid_queue_misses_the_slo_only_beyond_its_capacity():
    """Steady arrivals below capacity all meet the SLO; at twice the capacity the queue grows."""
    config = simulate.SimConfig(replicas=1, duration_s=60, round_interval_s=30, inference_alone_rps=4.0)
    steady = [i * 0.5 for i in range(120)]  # 2 req/s
    calm = simulate.simulate(steady, config, "inferenceOnly")
    assert calm["slo_attainment"] == 1.0 and calm["goodput"] == pytest.approx(120 / config.loss_initial)
    # 10 req/s into 4 req/s over the last 30 s: the backlog grows by 6 requests a second, and
    # the wait passes the 1 s slack (4 requests ahead) after 2/3 s, about 7 arrivals in.
    crowded = sorted(steady + [30 + i * 0.125 for i in range(240)])
    busy = simulate.simulate(crowded, config, "inferenceOnly")
    assert busy["slo_met"] == pytest.approx(60 + 10 * 4 / 6, abs=2)


def test_the_allocation_benchmark_times_1000_replicas_under_target(tmp_path):
    out = tmp_path / "allocation.json"
    result = allocation_bench.run(replicas=1000, repeats=3, json_path=str(out))
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert set(saved["policies"]) == set(POLICIES)
    for row in saved["policies"].values():
        assert len(row["runs_ms"]) == 3 and all(math.isfinite(t) and t > 0 for t in row["runs_ms"])
    assert saved["replicas"] == 1000 and saved["median_ms"] < saved["target_ms"] == 100.0 and saved["meets_target"]
