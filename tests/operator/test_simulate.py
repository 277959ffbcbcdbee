"""The slow-timescale simulation and the allocation benchmark run and print complete, finite figures."""

from __future__ import annotations

import json
import math

import pytest

from collm_bench import allocation_bench, simulate
from collm_control.allocation import POLICIES

FIGURES = ("requests", "slo_met", "slo_attainment", "training_tokens", "published_tokens", "final_loss", "mean_quality", "goodput", "goodput_ratio")


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


def test_the_loss_curve_fit_recovers_a_known_curve():
    floor, scale, initial = 1.2, 400_000.0, 2.3
    points = [(t, floor + (initial - floor) * math.exp(-t / scale)) for t in range(0, 1_500_000, 50_000)]
    got_floor, got_scale = simulate.fit_loss_curve(points, initial)
    assert got_floor == pytest.approx(floor, rel=0.03) and got_scale == pytest.approx(scale, rel=0.15)


def measured_run(tmp_path, *, capacity=6.0, alone=4000.0, share=0.9, duration=300.0):
    """A goodput JSON shaped like `collm bench goodput`'s, with a loss curve of known shape."""
    windows, tokens = [], 0.0
    for i in range(1, 61):
        step = alone * share * 2 * 5.0  # two replicas, 5-s windows
        tokens += step
        loss = 1.3 + (2.2 - 1.3) * math.exp(-tokens / 2 / 300_000)
        windows.append({"t": i * 5.0, "training_tokens": step, "mean_quality": 1 / loss})
    runs = [
        {
            "policy": "coexec",
            "duration_s": duration,
            "training_tokens": alone * share * 2 * duration,
            "mean_quality_initial_adapter": 1 / 2.2,
            "windows": windows,
        },
        {"policy": "separated", "duration_s": duration, "training_tokens_per_replica": {"replica-0": alone * duration, "replica-1": 0}},
    ]
    data = {
        "replicas": 2,
        "capacity": {"rate": capacity, "segment_requests": 1000},
        "controller": {"round_interval_s": 60.0, "slow_interval_s": 5.0},
        "slo": {"ttft_ms": 500},
        "replica_settings": {"revision_every_seconds": 5.0},
        "loads": [{"load": 0.7, "policies": runs}],
    }
    path = tmp_path / "goodput.json"
    path.write_text(json.dumps(data))
    return path


def test_calibration_takes_capacity_training_rate_share_and_loss_curve_from_a_measured_run(tmp_path):
    config = simulate.calibrate(str(measured_run(tmp_path)), replicas=8)
    assert config.replicas == 8
    # the fluid queue's rate is fitted: the measured 2 replicas, offered the segment at the measured
    # capacity (6 req/s), meet the SLO for 90% of the requests at it
    check = simulate.SimConfig(replicas=2, inference_alone_rps=config.inference_alone_rps, offered_rps=6.0, ttft_slack_s=0.5, round_interval_s=1e9)
    assert simulate.simulate(simulate.load_arrivals()[:1000], check, "inferenceOnly")["slo_attainment"] == pytest.approx(0.9, abs=0.01)
    assert config.training_alone_tokens_per_s == pytest.approx(4000.0) and config.training_share == pytest.approx(0.9)
    assert config.loss_initial == pytest.approx(2.2) and config.loss_floor == pytest.approx(1.3, rel=0.03)
    assert config.loss_time_constant_s == pytest.approx(300_000 / (4000 * 0.9), rel=0.15)
    assert config.offered_rps == pytest.approx(0.7 * 3.0 * 8) and config.revision_interval_s == 5.0
    assert config.trace_requests == 4000  # as many requests per replica as the measured run had
    with pytest.raises(ValueError, match="no separated run"):
        data = json.loads(measured_run(tmp_path).read_text())
        data["loads"][0]["policies"] = data["loads"][0]["policies"][:1]
        (tmp_path / "half.json").write_text(json.dumps(data))
        simulate.calibrate(str(tmp_path / "half.json"), replicas=8)


def test_real_time_reuse_serves_training_before_the_round_publishes_it():
    arrivals = simulate.load_arrivals()
    config = simulate.SimConfig(replicas=2, duration_s=600, revision_interval_s=5.0)
    reused = simulate.simulate(arrivals, config, "coexec")
    rounds_only = simulate.simulate(arrivals, config, "coexec", reuse=False)
    assert reused["slo_met"] == rounds_only["slo_met"]  # the same serving
    assert reused["mean_quality"] > rounds_only["mean_quality"] and reused["goodput"] > rounds_only["goodput"]


def test_on_a_heterogeneous_cluster_the_slow_timescale_earns_its_keep():
    """Every other replica half as fast: equal weights (fast timescale only) overload the slow ones,
    the plan's capacity-proportional weights do not; on identical replicas the two come close."""
    arrivals = simulate.load_arrivals()
    hetero = simulate.SimConfig(duration_s=900, speeds=simulate.HETERO_SPEEDS)
    full = simulate.simulate(arrivals, hetero, "coexec")
    fast_only = simulate.simulate(arrivals, hetero, "coexec", predictor="none", slow=False)
    assert full["goodput"] > fast_only["goodput"] and full["slo_attainment"] > fast_only["slo_attainment"]
    identical = simulate.SimConfig(duration_s=900)
    gap = (
        simulate.simulate(arrivals, identical, "coexec")["goodput"] / simulate.simulate(arrivals, identical, "coexec", predictor="none", slow=False)["goodput"]
    )
    assert full["goodput"] / fast_only["goodput"] > gap
