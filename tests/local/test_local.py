"""Local mode end to end on short settings: the demo, `bench goodput` and `bench freshness`.

Every figure must be present and finite, the plots non-empty, and the request figures must come
from the requests the load generator really sent and got answers for.
"""

from __future__ import annotations

import json
import math

import pytest

from collm_bench import freshness, goodput
from collm_control.allocation import CapacityProfile
from collm_control.planning import within_spread as _within_spread
from replica_agent.demo import run_demo
from replica_agent.local.traffic import at_rate, trace_segment, trace_slice

from ..helpers import numbers_in

FIGURES = (
    "requests_sent",
    "requests_answered",
    "slo_attainment",
    "slo_met_rps",
    "ttft_ms_p50",
    "tpot_ms_p50",
    "goodput",
    "goodput_per_s",
    "mean_quality_served",
    "mean_quality_initial_adapter",
    "quality_gain",
    "training_tokens",
)
QUICK = dict(slow_interval_s=1.0, round_interval_s=2.0, local_steps=2)
PLOTS = ("goodput", "slo_attainment", "quality_over_time", "quality_cdf", "freshness")


def _check_run(run: dict, sent: int) -> None:
    for key in FIGURES:
        assert isinstance(run[key], (int, float)) and math.isfinite(run[key]), key
    assert all(math.isfinite(v) for v in numbers_in(run))
    assert run["requests_sent"] == sent, "every request of the trace slice is sent"
    assert run["requests_recorded"] == sent, "every request sent is recorded with its outcome"
    assert run["requests_answered"] + run["requests_failed"] == sent
    assert run["requests_scored"] == run["requests_answered"], "every answered request is scored under the adapter that served it"
    assert run["slo_met"] == round(run["slo_attainment"] * sent)
    assert sum(w["requests"] for w in run["windows"]) <= sent
    cdf = run["quality_cdf"]["share_at_or_above"]
    assert all(1.0 >= a >= b >= 0.0 for a, b in zip(cdf, cdf[1:])), "a CDF of shares at or above rising levels never rises"


def test_trace_slice_keeps_the_rate_and_duration():
    arrivals = trace_slice("conv", rate=5, duration_s=20)
    assert len(arrivals) == 100
    assert arrivals[0].at_s == 0 and arrivals[-1].at_s <= 20
    assert all(a.at_s <= b.at_s for a, b in zip(arrivals, arrivals[1:]))


def test_a_segment_replayed_at_another_rate_keeps_its_requests_and_its_shape():
    segment = trace_segment("code", count=50)
    fast, slow = at_rate(segment, 10.0), at_rate(segment, 5.0)
    assert [a.shape for a in fast] == [a.shape for a in slow] == [a.shape for a in segment]
    assert slow[-1].at_s == pytest.approx(2 * fast[-1].at_s) and fast[-1].at_s == pytest.approx(50 / 10 * (1 - 1 / 50))
    gaps = lambda xs: [b.at_s - a.at_s for a, b in zip(xs, xs[1:])]  # noqa: E731
    assert gaps(slow) == pytest.approx([2 * g for g in gaps(fast)])


def test_capacity_refinement_steps_from_a_guess_then_bisects():
    capacity, seen = 10.0, []

    def passes(rate):
        seen.append(round(rate, 4))
        return rate <= capacity

    assert goodput.refine_rate(passes, 6.0) == pytest.approx(9.375)  # 6, 7.5, 9.375 pass; 11.72 misses; the mid 10.55 misses
    assert seen == [6.0, 7.5, 9.375, 11.7188, 10.5469]
    assert goodput.refine_rate(passes, 16.0) == pytest.approx(9.216)  # 16, 12.8, 10.24 miss; 8.19 passes; the mid 9.22 passes
    with pytest.raises(RuntimeError, match="relax the SLO"):
        goodput.refine_rate(lambda r: False, 1.0)


def test_noisy_profiles_are_bounded_around_the_median():
    flat = lambda c: CapacityProfile(((0, c, 0.0), (128, c, 100.0)))  # noqa: E731
    bounded = _within_spread({"a": flat(1.0), "b": flat(10.0), "c": flat(12.0)}, 2.0)
    assert bounded["a"].capacity_at(128) == pytest.approx(5.0)
    assert bounded["b"].capacity_at(128) == pytest.approx(10.0)
    assert bounded["c"].capacity_at(128) == pytest.approx(12.0)


def test_demo_writes_a_complete_report_with_plots(tmp_path, tiny_model_dir):
    out = tmp_path / "demo"
    result = run_demo(duration_s=8, replicas=2, rate=4, out_dir=str(out), live=False, **QUICK)
    saved = json.loads((out / "report.json").read_text())
    assert saved == json.loads(json.dumps(result))
    _check_run(saved, len(trace_slice("conv", rate=4, duration_s=8)))
    assert saved["requests_failed"] == 0 and saved["requests_answered"] > 0
    assert saved["rounds_succeeded"] >= 1 and saved["training_tokens"] > 0
    assert saved["requests_served_at_home"] > 0
    for name in PLOTS:
        path = out / f"{name}.png"
        assert path.exists() and path.stat().st_size > 1000, name


def test_local_mode_serves_trains_and_federates_a_qwen3_model(tmp_path):
    """Another family in the local mode: random Qwen3 weights (q/k norms, explicit head_dim)."""
    result = run_demo(model="random:qwen3", duration_s=6, replicas=2, rate=4, out_dir=str(tmp_path / "qwen"), live=False, **QUICK)
    assert result["model"] == "random:qwen3" and result["requests_failed"] == 0 and result["requests_answered"] > 0
    assert result["training_tokens"] > 0 and result["rounds_succeeded"] >= 1


def test_goodput_benchmark_compares_policies_on_the_same_requests(tmp_path, tiny_model_dir):
    """Replica processes on cores of their own, the paper's peft baseline beside coexec and separated."""
    out = tmp_path / "goodput.json"
    goodput.run(("coexec", "separated", "peft"), replicas=2, loads=(0.7,), duration_s=6, capacity_rps=6.0, json_path=str(out), **QUICK)
    saved = json.loads(out.read_text())
    assert saved["capacity"] == {"rate": 6.0, "given": True, "segment_requests": 25} and len(saved["loads"]) == 1
    entry = saved["loads"][0]
    assert [r["policy"] for r in entry["policies"]] == ["coexec", "separated", "peft"]
    for run in entry["policies"]:
        _check_run(run, entry["requests"])
        assert run["coexec_ratio"] > 0 and set(run["cpu_seconds"]) >= {"harness", "router"}
        assert 0 < run["cpu_share_harness"] < 1
    separated = entry["policies"][1]
    for tick in separated["allocations"][1:]:
        assert all(tick["weights"][name] == 0 for name in tick["participants"]), "separated: training replicas get no traffic"
    peft = entry["policies"][2]
    assert peft["roles"] == {"train": ["replica-0"], "serve": ["replica-1"]} and peft["training_tokens"] > 0
    assert entry["policies"][0]["coexec_ratio"] == pytest.approx(1.0)
    for name in PLOTS:
        assert (tmp_path / "goodput" / "load-0.7" / f"{name}.png").stat().st_size > 1000


def test_freshness_benchmark_switches_every_replica_without_failures(tmp_path, tiny_model_dir):
    out = tmp_path / "freshness.json"
    freshness.run(replicas=2, publishes=3, interval_s=0.5, rate=4, json_path=str(out))
    saved = json.loads(out.read_text())
    assert saved["all_replicas_switched"] and len(saved["cases"]) == 3
    assert 0 <= saved["freshness_s_p50"] <= saved["freshness_s_max"]
    assert saved["failed_requests"] == 0 and saved["requests_answered"] == saved["requests_sent"] > 0


def test_the_local_mode_runs_its_replicas_with_mutual_tls_and_an_admin_token(tiny_base):
    import urllib.error

    import grpc

    from collm_rpc.client import AgentClient
    from replica_agent.local.cluster import LocalDeployment, put_weights, replica_configs

    deployment = LocalDeployment.start(replica_configs(1), None, base=tiny_base)
    try:
        name = next(iter(deployment.replicas))
        assert deployment.client(name).stats().replica_id == name  # the harness presents the operator's certificate
        with AgentClient(deployment.replicas[name].grpc_address, timeout=5) as plain:
            with pytest.raises(grpc.RpcError) as refused:
                plain.stats()
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(urllib.error.HTTPError) as unauthorized:
            put_weights(deployment.router_url, {name: 0.0})
        assert unauthorized.value.code == 401
        deployment.set_weights({name: 2.0})  # with the token
    finally:
        deployment.stop()
        deployment.cleanup()
