"""Local mode end to end on short settings: the demo, `bench goodput` and `bench freshness`.

Every figure must be present and finite, the plots non-empty, and the request figures must come
from the requests the load generator really sent and got answers for.
"""

from __future__ import annotations

import json
import math

import pytest

from collm_bench import freshness, goodput
from collm_operator.allocation import CapacityProfile
from collm_operator.planning import within_spread as _within_spread
from replica_agent.demo import run_demo
from replica_agent.local.traffic import trace_slice

from ..helpers import numbers_in

FIGURES = ("requests_sent", "requests_answered", "slo_attainment", "slo_met_rps", "ttft_ms_p50", "tpot_ms_p50", "goodput", "goodput_per_s", "mean_quality_served", "held_out_loss_initial", "held_out_loss_final_served", "training_tokens")
QUICK = dict(slow_interval_s=1.0, round_interval_s=2.0, local_steps=2)


def _check_run(run: dict, sent: int) -> None:
    for key in FIGURES:
        assert isinstance(run[key], (int, float)) and math.isfinite(run[key]), key
    assert all(math.isfinite(v) for v in numbers_in(run))
    assert run["requests_sent"] == sent, "every request of the trace slice is sent"
    assert run["requests_recorded"] == sent, "every request sent is recorded with its outcome"
    assert run["requests_answered"] + run["requests_failed"] == sent
    assert run["slo_met"] == round(run["slo_attainment"] * sent)
    assert sum(w["requests"] for w in run["windows"]) <= sent


def test_trace_slice_keeps_the_rate_and_duration():
    arrivals = trace_slice("conv", rate=5, duration_s=20)
    assert len(arrivals) == 100
    assert arrivals[0].at_s == 0 and arrivals[-1].at_s <= 20
    assert all(a.at_s <= b.at_s for a, b in zip(arrivals, arrivals[1:]))


def test_noisy_profiles_are_bounded_around_the_median():
    flat = lambda c: CapacityProfile(((0, c, 0.0), (128, c, 100.0)))
    bounded = _within_spread({"a": flat(1.0), "b": flat(10.0), "c": flat(12.0)}, 2.0)
    assert bounded["a"].capacity_at(128) == pytest.approx(5.0)
    assert bounded["b"].capacity_at(128) == pytest.approx(10.0)
    assert bounded["c"].capacity_at(128) == pytest.approx(12.0)


def test_demo_writes_a_complete_report_with_plots(tmp_path, tiny_model_dir):
    out = tmp_path / "demo"
    result = run_demo(duration_s=6, replicas=2, rate=4, out_dir=str(out), live=False, **QUICK)
    saved = json.loads((out / "report.json").read_text())
    assert saved == json.loads(json.dumps(result))
    _check_run(saved, len(trace_slice("conv", rate=4, duration_s=6)))
    assert saved["requests_failed"] == 0 and saved["requests_answered"] > 0
    assert saved["rounds_succeeded"] >= 1 and saved["training_tokens"] > 0
    for name in ("goodput", "slo_attainment", "eval_loss", "freshness"):
        path = out / f"{name}.png"
        assert path.exists() and path.stat().st_size > 1000, name


def test_goodput_benchmark_compares_policies_on_the_same_requests(tmp_path, tiny_model_dir):
    out = tmp_path / "goodput.json"
    goodput.run(("coexec", "separated"), replicas=2, rate=4, duration_s=4, json_path=str(out), **QUICK)
    saved = json.loads(out.read_text())
    assert [r["policy"] for r in saved["policies"]] == ["coexec", "separated"]
    for run in saved["policies"]:
        _check_run(run, saved["requests"])
        assert run["coexec_ratio"] > 0
    separated = saved["policies"][1]
    trainer = separated["rounds"][0]["participants"] if separated["rounds"] else []
    for tick in separated["allocations"][1:]:
        assert all(tick["weights"][name] == 0 for name in tick["participants"]), "separated: training replicas get no traffic"
    assert trainer == [] or separated["training_tokens"] > 0
    assert saved["policies"][0]["coexec_ratio"] == pytest.approx(1.0)
    for name in ("goodput", "slo_attainment", "eval_loss", "freshness"):
        assert (tmp_path / "goodput" / f"{name}.png").stat().st_size > 1000


def test_freshness_benchmark_switches_every_replica_without_failures(tmp_path, tiny_model_dir):
    out = tmp_path / "freshness.json"
    freshness.run(replicas=2, publishes=3, interval_s=0.5, rate=4, json_path=str(out))
    saved = json.loads(out.read_text())
    assert saved["all_replicas_switched"] and len(saved["cases"]) == 3
    assert 0 <= saved["freshness_s_p50"] <= saved["freshness_s_max"]
    assert saved["failed_requests"] == 0 and saved["requests_answered"] == saved["requests_sent"] > 0
