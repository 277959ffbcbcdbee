"""The benchmarks and the demo run end to end on short settings and print complete, finite figures."""

from __future__ import annotations

import json

from collm_bench import coexec, overhead
from collm_bench.load import find_max_rate
from replica_agent.traces import RequestShape, trace_shapes
from replica_agent.demo import run_demo


def test_find_max_rate_doubles_then_bisects():
    capacity = 10.0

    class Trial:
        def __init__(self, rate):
            self.rate, self.attainment = rate, 1.0 if rate <= capacity else 0.5

    rate, best, history = find_max_rate(Trial, start_rate=2.0, refinements=3)
    assert [t.rate for t in history] == [2.0, 4.0, 8.0, 16.0, 12.0, 10.0, 11.0]
    assert rate == 10.0 and best.rate == 10.0


def test_trace_shapes_are_scaled_from_the_azure_trace():
    shapes = trace_shapes(limit=100)
    assert len(shapes) in (3, 100)  # 3 when ../shared/traces is absent
    assert all(8 <= s.prompt_tokens <= 192 and 4 <= s.output_tokens <= 64 for s in shapes)
    assert trace_shapes(None) == [RequestShape(64, 32), RequestShape(128, 16), RequestShape(32, 48)]


def test_overhead_benchmark_writes_complete_json(tmp_path):
    out = tmp_path / "overhead.json"
    result = overhead.run("tiny", batch=4, new_tokens=12, repeats=1, json_path=str(out))
    saved = json.loads(out.read_text())
    assert saved["no_adapter_tokens_per_s"] > 0 and saved["two_versions_tokens_per_s"] > 0
    assert saved["min_live_versions"] == 2, "the adapter run must really serve two versions at once"
    assert saved["failed_requests"] == 0
    assert result["slowdown"] == saved["slowdown"]


def test_coexec_benchmark_writes_complete_json(tmp_path):
    out = tmp_path / "coexec.json"
    coexec.run("tiny", trial_s=0.6, start_rate=2.0, refinements=0, max_doublings=2, json_path=str(out))
    saved = json.loads(out.read_text())
    for key in ("inference_alone_rps", "training_alone_tokens_per_s", "coexec_rps", "coexec_training_tokens_per_s", "cee"):
        assert saved[key] >= 0, key
    assert saved["training_alone_tokens_per_s"] > 0
    assert saved["trials"]["inference_alone"] and saved["trials"]["coexec"]
    measured = saved["inference_ratio"] + saved["training_ratio"]
    assert abs(saved["cee"] - measured) < 1e-9


def test_demo_serves_trains_and_reports(tmp_path):
    out = tmp_path / "demo.json"
    result = run_demo(duration_s=5, replicas=2, rate=4, slow_interval_s=1.0, round_interval_s=2.0, local_steps=2, out_dir=str(tmp_path / "report"), json_path=str(out), live=False)
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["requests_answered"] > 0 and saved["requests_failed"] == 0
    assert saved["training_tokens"] > 0 and saved["rounds_succeeded"] >= 1
    assert saved["mean_quality_initial_adapter"] > 0 and saved["mean_quality_served"] > 0 and saved["revisions_per_replica"]
