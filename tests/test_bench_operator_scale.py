"""collm bench operator-scale on a few clusters: the real operator, stand-in agents, figures that add up."""

from __future__ import annotations

import json

import pytest

from collm_bench.operator_scale import histogram_quantile, run


def test_histogram_quantile_interpolates_inside_the_bucket():
    buckets = [(0.01, 0.0), (0.05, 50.0), (0.1, 100.0), (float("inf"), 100.0)]
    assert histogram_quantile(buckets, 0.5) == pytest.approx(0.05)
    assert histogram_quantile(buckets, 0.25) == pytest.approx(0.03)
    assert histogram_quantile(buckets, 0.99) == pytest.approx(0.099)
    assert histogram_quantile([(0.1, 0.0), (float("inf"), 0.0)], 0.5) is None


def test_one_operator_drives_several_clusters(tmp_path):
    out = tmp_path / "scale.json"
    result = run(clusters=2, steady_s=6.0, json_path=str(out), workdir=str(tmp_path / "dc"))
    assert json.loads(out.read_text())["clusters"] == 2
    assert result["ready_s"]["max"] > result["first_reconcile_s"]["p50"] > 0
    assert result["control_steps"] >= 2 and result["stand_in"]["stats_calls"] >= 4 and result["stand_in"]["plans"] >= 1
    assert result["api_requests_per_minute"] > 0 and result["operator"]["rss_mib"] > 0 and result["operator"]["threads"] > 0
    assert 0 < result["operator"]["cpu_percent"] < 100 * result["machine"]["cpu_count"] and result["load_average_1min"] >= 0
    assert 0 < result["control_step_ms"]["p50"] <= result["control_step_ms"]["p99"]
