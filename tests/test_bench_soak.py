"""`collm bench soak`: the verdict on synthetic samples, a short run end to end, and (slow) a 10-minute soak.

The short run checks that every figure is real: samples of every agent process and of the router,
requests answered through the router, a federated round run, KV-cache rows read from each agent.
Its verdicts are not asserted: 18 seconds are all warm-up for a leak. The slow run asserts them.
"""

from __future__ import annotations

import json
import math

import pytest

from collm_bench import soak
from collm_bench.soak_verdict import MB, NotEnoughSamples, ProcessSample, Targets, count_growth, memory_slope_mb_per_hour, overall, process_figures
from replica_agent import memory
from replica_agent.cli import collm_main

from .helpers import numbers_in

PROCESSES = {"replica-0", "replica-1", "router"}
VERDICTS = {"memory", "threads", "fds", "files"}


def _series(minutes: float, *, every_s: float = 10.0, mb_per_hour: float = 0.0, threads=lambda i: 20, fds=lambda i: 30, jitter_mb: float = 0.0):
    """Samples of one process every `every_s` for `minutes`: RSS from 600 MB rising at `mb_per_hour`
    (plus an alternating `jitter_mb`), threads and fds from functions of the sample index."""
    samples = []
    for i in range(int(minutes * 60 / every_s) + 1):
        t = i * every_s
        rss = (600 + mb_per_hour * t / 3600 + (jitter_mb if i % 2 else -jitter_mb)) * MB
        samples.append(ProcessSample(t, int(rss), threads(i), fds(i), 3))
    return samples


# -- the verdict, on synthetic samples ----------------------------------------------------------
def test_the_slope_of_a_straight_line_is_its_rate_in_mb_per_hour():
    samples = _series(30, mb_per_hour=12.0)
    assert memory_slope_mb_per_hour([s.t for s in samples], [s.rss_bytes for s in samples]) == pytest.approx(12.0, rel=1e-6)


def test_a_leaking_process_fails_and_a_flat_one_passes():
    flat = process_figures(_series(30, jitter_mb=3.0), warmup_s=360)
    assert flat["passed"] == {"memory": True, "threads": True, "fds": True, "files": True}
    assert abs(flat["memory_slope_mb_per_hour"]) < 1.0, "alternating noise has no trend"
    assert flat["post_warmup_samples"] == 145 and flat["note"] == ""

    leaking = process_figures(_series(30, mb_per_hour=40.0, jitter_mb=3.0), warmup_s=360)
    assert leaking["passed"]["memory"] is False and leaking["memory_slope_mb_per_hour"] == pytest.approx(40.0, abs=2.0)

    threads = process_figures(_series(30, threads=lambda i: 20 + i // 6), warmup_s=360)  # one more thread a minute
    assert threads["passed"] == {"memory": True, "threads": False, "fds": True, "files": True}
    assert threads["threads"]["growth"] > 10

    fds = process_figures(_series(30, fds=lambda i: 30 + i // 6), warmup_s=360)  # one more descriptor a minute
    assert fds["passed"]["fds"] is False and fds["passed"]["threads"] is True


def test_warm_up_growth_and_momentary_counts_are_not_leaks():
    # Memory climbs 200 MB in the first 6 minutes (allocator pools, caches), then stays: only the trend after warm-up counts.
    warming = [ProcessSample(s.t, int(s.rss_bytes + min(s.t, 360) / 360 * 200 * MB), s.threads, s.fds, s.files) for s in _series(30)]
    assert process_figures(warming, warmup_s=360)["passed"]["memory"] is True
    assert process_figures(warming, warmup_s=0)["passed"]["memory"] is False, "without the warm-up it would look like a leak"
    # A socket or worker thread that comes and goes with the requests in flight at a sample.
    busy = process_figures(_series(30, threads=lambda i: 20 + (i % 3 == 0), fds=lambda i: 30 + 4 * (i % 2)), warmup_s=360)
    assert busy["passed"] == {"memory": True, "threads": True, "fds": True, "files": True}
    assert count_growth([20, 21, 20, 20, 22, 20, 20, 21, 20, 20, 21, 20]) == 0
    assert count_growth([20, 20, 20, 21, 22, 23, 24, 25]) == 4.5


def test_too_few_samples_give_no_verdict_and_say_what_to_do():
    few = process_figures(_series(1, every_s=20), warmup_s=30)  # samples at 0, 20, 40, 60 s: two after the warm-up
    assert few["post_warmup_samples"] == 2
    assert few["passed"] == {"memory": None, "threads": None, "fds": None, "files": None}
    assert few["memory_slope_mb_per_hour"] is None and "not enough samples" in few["note"] and "run longer" in few["note"]
    verdict = overall({"replica-0": few}, failed_requests=0, kv_freed=True)
    assert verdict["memory"] is None and verdict["all"] is False, "no verdict never passes"
    with pytest.raises(NotEnoughSamples, match="at least two samples"):
        memory_slope_mb_per_hour([5.0], [1e9])
    with pytest.raises(NotEnoughSamples):
        memory_slope_mb_per_hour([5.0, 5.0], [1e9, 2e9])
    with pytest.raises(NotEnoughSamples, match="no samples"):
        process_figures([], warmup_s=0)


def test_the_run_passes_only_when_every_target_does():
    good = process_figures(_series(30), warmup_s=360)
    bad = process_figures(_series(30, mb_per_hour=25.0), warmup_s=360)
    assert overall({"a": good, "b": good}, failed_requests=0, kv_freed=True)["all"] is True
    assert overall({"a": good, "b": bad}, failed_requests=0, kv_freed=True) == {
        "memory": False,
        "threads": True,
        "fds": True,
        "files": True,
        "requests": True,
        "kv_freed": True,
        "all": False,
    }
    assert overall({"a": good}, failed_requests=1, kv_freed=True)["all"] is False
    assert overall({"a": good}, failed_requests=0, kv_freed=False)["all"] is False
    assert overall({"a": good}, failed_requests=2, kv_freed=True, targets=Targets(failed_requests=2))["all"] is True


def test_settings_that_cannot_give_a_verdict_are_refused_before_anything_starts():
    with pytest.raises(ValueError, match="warm-up"):
        soak.run(minutes=1, warmup_minutes=1)
    with pytest.raises(ValueError, match="positive"):
        soak.run(minutes=1, sample_every_s=0)
    with pytest.raises(ValueError, match="lower --rate"):
        soak.run(minutes=600, rate=2.0)  # 72,000 requests: more than the conv trace holds
    with pytest.raises(ValueError, match="--preload /nowhere/libjemalloc.so.2: no such file"):
        soak.run(minutes=1, preload="/nowhere/libjemalloc.so.2")


# -- end to end ---------------------------------------------------------------------------------
def _check_report(saved: dict, allocator: str | None = None) -> None:
    assert saved["benchmark"] == "soak"
    assert all(math.isfinite(v) for v in numbers_in(saved))
    assert set(saved["processes"]) == PROCESSES and set(saved["samples"]) == PROCESSES
    every = saved["settings"]["sample_every_s"]
    for name, series in saved["samples"].items():
        assert len(series) >= saved["duration_s"] / every - 1, f"{name}: a sample every {every} s"
        assert all(len(row) == len(saved["sample_fields"]) for row in series)
        assert [row[0] for row in series] == sorted(row[0] for row in series)
        assert all(row[1] > 10 * MB and row[2] >= 1 and row[3] >= 3 for row in series), f"{name}: real RSS, threads and descriptors"
        figures = saved["processes"][name]
        assert figures["samples"] == len(series) and figures["post_warmup_samples"] >= 3
        assert set(figures["passed"]) == VERDICTS and all(isinstance(v, bool) for v in figures["passed"].values())
        assert isinstance(figures["memory_slope_mb_per_hour"], float)
        assert figures["rss_mb"]["max"] >= figures["rss_mb"]["last"] > 0
    assert saved["processes"]["replica-0"]["rss_mb"]["last"] > 5 * saved["processes"]["router"]["rss_mb"]["last"], "the agents hold the model"
    requests = saved["requests"]
    assert requests["sent"] == requests["planned"] > 0 and requests["answered"] > 0
    assert requests["answered"] + requests["failed"] == requests["sent"]
    assert saved["rounds"]["started"] >= 1 and len(saved["rounds"]["results"]) == saved["rounds"]["started"]
    for name in ("replica-0", "replica-1"):
        engine = saved["engines"][name]
        assert engine["kv_rows_total"] == 16 and engine["kv_rows_in_use_idle"] == 0
        assert engine["kv_rows_in_use_end"] + engine["kv_rows_free_end"] == 16
        assert engine["adapter_slots_in_use_end"] >= 1, "the served adapter holds a slot"
        assert len(saved["engine_samples"][name]) == len(saved["samples"][name])
        assert engine["allocator"] == (allocator or memory.allocator()), "the agents run on the malloc preloaded, else on this process's"
        if memory.heap() is not None:  # glibc: the agent exports its malloc heap, in use above the model's weights
            assert all(x["heap_in_use_bytes"] > 10 * MB and x["heap_free_bytes"] >= 0 for x in saved["engine_samples"][name])
            assert isinstance(engine["heap_in_use_mb_per_hour"], float) and isinstance(engine["heap_free_mb_per_hour"], float)
            assert 0 <= engine["heap_trim_longest_ms"] < 10_000, "the agent trims its heap on a timer (memory.Trimmer)"
    assert set(saved["passed"]) == VERDICTS | {"requests", "kv_freed", "all"}
    assert saved["machine"]["cpu_count"] >= 1 and saved["machine"]["cpu_model"] and saved["machine"]["torch"]


def test_a_short_soak_through_the_cli_writes_real_figures(tmp_path, tiny_model_dir):
    out = tmp_path / "soak.json"
    argv = ["bench", "soak", "--minutes", "0.3", "--round-every", "10", "--sample-every", "2", "--json", str(out)]
    assert collm_main(argv) == 0
    saved = json.loads(out.read_text())
    _check_report(saved)
    assert saved["settings"]["warmup_s"] == pytest.approx(0.2 * 18)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_thirty_minute_soak_meets_the_targets(tmp_path, tiny_model_dir):
    jemalloc = memory.find_jemalloc()
    if jemalloc is None:  # on glibc's malloc the target was not met (docs/reliability.md, Soak)
        pytest.skip("needs jemalloc, as the agent image preloads it (Debian's and Ubuntu's libjemalloc2)")
    out = tmp_path / "soak.json"
    # 30 minutes, as the documented run: the first ten climb even on jemalloc (docs/reliability.md, Soak)
    result = soak.run(minutes=30, round_every_s=60, sample_every_s=10, preload=jemalloc, json_path=str(out))
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    _check_report(result, allocator="jemalloc")
    assert result["rounds"]["succeeded"] >= 5, result["rounds"]
    for name, figures in result["processes"].items():
        assert figures["passed"] == dict.fromkeys(VERDICTS, True), (name, figures)
    assert result["requests"]["failed"] == 0, result["requests"]["failures"]
    assert result["passed"]["all"] is True, result["passed"]
