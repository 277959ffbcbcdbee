"""`collm bench overload`: how the client's records become figures, and one short run end to end."""

from __future__ import annotations

import json

import pytest

from collm_bench.overload import LOST, figures
from replica_agent.cli import collm_main
from replica_agent.local.traffic import RequestRecord


def record(status: int, ttft_ms: float, *, tokens: int = 4, error: str = "", met: bool = True) -> RequestRecord:
    ok = status == 200 and not error and tokens > 0
    return RequestRecord(0, 0.0, ttft_ms, 10.0, tokens if status == 200 else 0, ok, met and ok, "r", "0.0", "", error, status)


def test_records_are_classified_admitted_shed_hung_and_lost():
    records = [
        record(200, 100),
        record(200, 300),
        record(200, 450, error=LOST),  # tokens came, then the stream ended without its final event
        record(429, 8, error="HTTP 429: would miss its TTFT SLO"),
        record(429, 12, error="HTTP 429: would miss its TTFT SLO"),
        record(0, 120_000, tokens=0, error="TimeoutError: "),
        record(503, 5, error="HTTP 503: no replica"),
    ]
    out = figures(records, 10.0, ttft_ms=500, tpot_ms=50)
    assert (out["offered"], out["admitted"], out["completed"], out["shed"], out["hung"], out["lost"], out["errors"]) == (7, 3, 2, 2, 1, 1, 1)
    assert out["admitted_ttft_p99_ms"] == pytest.approx(450 - 0.01 * (450 - 300) * 2, rel=0.01)
    assert out["shed_answer_p99_ms"] < 12.1 and out["slo_met_rps"] == pytest.approx(0.2)
    assert out["passed"] == {"admitted_p99_ttft_within_slo": True, "no_hung_request": False, "no_lost_request": False, "shed_answered_fast": True}
    late = figures([record(200, 900), record(429, 80)], 1.0, ttft_ms=500, tpot_ms=50)["passed"]
    assert not late["admitted_p99_ttft_within_slo"] and not late["shed_answered_fast"]


@pytest.mark.timeout(300)
def test_a_short_overload_run_through_the_router(tmp_path):
    out = tmp_path / "overload.json"
    assert collm_main(["bench", "overload", "--capacity", "3", "--loads", "3", "--seconds", "4", "--no-baseline", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    assert run["shedding"] and run["offered"] == 36 and run["admitted"] + run["shed"] + run["hung"] + run["errors"] == 36
    assert run["admitted"] > 0 and run["hung"] == 0 and run["lost"] == 0, run
    assert result["machine"]["cpu_model"] and result["slo"] == {"ttft_ms": 500, "tpot_ms": 50}
