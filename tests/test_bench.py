"""The benchmarks and the demo run end to end on short settings and print complete, finite figures."""

from __future__ import annotations

import hashlib
import json

import pytest

from collm_bench import coexec, overhead
from collm_bench.load import find_max_rate
from replica_agent.demo import run_demo
from replica_agent.traces import CODE_TRACE, CONV_TRACE, RequestShape, load_arrivals, trace_shapes


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
    assert len(shapes) == 100  # the trace ships in the repository: no stand-in mix
    assert all(8 <= s.prompt_tokens <= 192 and 4 <= s.output_tokens <= 64 for s in shapes)
    assert shapes[0] == RequestShape(374 // 8, 44 // 4)  # the conv trace's first row: 374 prompt, 44 generated tokens


def test_a_missing_trace_is_a_clear_error_not_a_stand_in(tmp_path):
    with pytest.raises(FileNotFoundError, match="traces ship in"):
        trace_shapes(tmp_path / "nope.csv")
    with pytest.raises(FileNotFoundError, match="traces ship in"):
        load_arrivals(tmp_path / "nope.csv")


def test_the_shipped_traces_are_the_upstream_bytes():
    digests = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in (CODE_TRACE, CONV_TRACE)}
    assert digests == {
        "azure_llm_code_2023.csv": "54e9a6d2a4bd06ba1e060304b900abbc74cbea53de96506e60fe5bb4f2277fb6",
        "azure_llm_conv_2023.csv": "2f1e5b666d4e3055fdbba98598ce2ec307767b9064e03e2fa46676dbcc7d0bf8",
    }


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
    result = run_demo(
        duration_s=5,
        replicas=2,
        rate=4,
        slow_interval_s=1.0,
        round_interval_s=2.0,
        local_steps=2,
        out_dir=str(tmp_path / "report"),
        json_path=str(out),
        live=False,
    )
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["requests_answered"] > 0 and saved["requests_failed"] == 0
    assert saved["training_tokens"] > 0 and saved["rounds_succeeded"] >= 1
    assert saved["mean_quality_initial_adapter"] > 0 and saved["mean_quality_served"] > 0 and saved["revisions_per_replica"]
