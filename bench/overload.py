"""`collm bench overload`: 1x, 2x and 3x the measured capacity through the router, with SLO-aware shedding.

The replicas run as processes (one core each) behind the router process; the client replays a
slice of an Azure trace over HTTP streams (replica_agent/local/traffic.py) and measures each
request where a user would: TTFT and TPOT of the requests the cluster admitted, and how fast a shed
request (429) was answered. The capacity is measured first, as the goodput benchmark does it (the
highest rate at which 90% of requests meet the SLO; bench/goodput.py). Each load then runs for
`seconds`; a request with no final event `request_timeout_s` after it was sent counts as hung, and
an answer stream that ends without its final event as lost. A baseline at the highest load runs the
same replicas with shedding off (`shed_ttft_fraction` 0: every request queues), so the table shows
what shedding buys. Training is off (the `inferenceOnly` policy): the figures are the admission's.
"""

from __future__ import annotations

import time

import numpy as np

from replica_agent.engine.model_host import load_base_model
from replica_agent.local.cluster import LocalDeployment
from replica_agent.local.controller import ControllerSettings
from replica_agent.local.traffic import RequestRecord, TrafficReplay, trace_file, trace_slice
from replica_agent.local.workload import workload_for
from replica_agent.report import machine, print_table, write_json

from .goodput import benchmark_configs, measure_capacity, policy_configs

LOST = "the stream ended without its final event"  # traffic.py's words for an answer cut short without an error event
FAST_SHARE_OF_TTFT = 0.1  # a shed request counts as answered fast within this share of the TTFT SLO


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def figures(records: list[RequestRecord], seconds: float, *, ttft_ms: float, tpot_ms: float) -> dict:
    """What the client saw at one load: admitted, completed, shed, hung and lost requests, and the latencies that matter."""
    admitted = [r for r in records if r.status == 200]
    completed = [r for r in admitted if r.ok]
    shed = [r for r in records if r.status == 429]
    hung = [r for r in records if r.error.startswith("TimeoutError")]
    lost = [r for r in admitted if r.error == LOST]
    errors = [r for r in records if r not in admitted and r not in shed and r not in hung]
    ttft = [r.ttft_ms for r in admitted if r.tokens > 0]
    shed_ms = [r.ttft_ms for r in shed]  # no token came: the time until the answer
    out = {
        "offered": len(records),
        "admitted": len(admitted),
        "completed": len(completed),
        "shed": len(shed),
        "hung": len(hung),
        "lost": len(lost),
        "errors": len(errors),
        "error_examples": sorted({r.error[:160] for r in errors + [r for r in admitted if not r.ok]})[:5],
        "shed_share": len(shed) / len(records) if records else 0.0,
        "admitted_ttft_p50_ms": pct(ttft, 50),
        "admitted_ttft_p99_ms": pct(ttft, 99),
        "admitted_tpot_p99_ms": pct([r.tpot_ms for r in completed if r.tokens > 1], 99),
        "admitted_slo_attainment": sum(r.met for r in admitted) / len(admitted) if admitted else 0.0,
        "slo_met_rps": sum(r.met for r in records) / seconds,
        "shed_answer_p50_ms": pct(shed_ms, 50),
        "shed_answer_p99_ms": pct(shed_ms, 99),
    }
    out["passed"] = {
        "admitted_p99_ttft_within_slo": out["admitted_ttft_p99_ms"] is not None and out["admitted_ttft_p99_ms"] <= ttft_ms,
        "no_hung_request": not hung,
        "no_lost_request": not lost,
        "shed_answered_fast": not shed_ms or out["shed_answer_p99_ms"] <= FAST_SHARE_OF_TTFT * ttft_ms,
    }
    return out


def _replay(deployment: LocalDeployment, workload, *, ttft_ms: float, tpot_ms: float, timeout_s: float) -> list[RequestRecord]:
    traffic = TrafficReplay(deployment.router_url, workload, ttft_ms, tpot_ms, timeout_s=timeout_s)
    deployment.arrivals = lambda: traffic.sent
    traffic.start()
    if not traffic.wait(workload.duration_s + timeout_s + 30):
        raise RuntimeError("the replay did not end: a request outlived its own timeout")
    time.sleep(2.0)  # let the queues drain before the next load
    return list(traffic.records)


def run(
    *,
    replicas: int = 1,
    model: str = "tiny",
    trace: str = "code",
    loads: tuple[float, ...] = (1.0, 2.0, 3.0),
    seconds: float = 60.0,
    ttft_ms: int = 500,
    tpot_ms: int = 50,
    capacity_rps: float | None = None,
    capacity_s: float = 30.0,
    baseline: bool = True,
    request_timeout_s: float = 120.0,
    json_path: str | None = None,
) -> dict:
    if not loads or any(load <= 0 for load in loads):
        raise ValueError(f"loads must be positive multiples of the capacity, got {loads}")
    started = time.time()
    base = load_base_model(model)
    configs = benchmark_configs(replicas, model=model, ttft_ms=ttft_ms, tpot_ms=tpot_ms)
    if capacity_rps:
        capacity = {"rate": capacity_rps, "given": True}
    else:
        capacity, _ = measure_capacity(configs, base.tokenizer, trace=trace, ttft_ms=ttft_ms, tpot_ms=tpot_ms, duration_s=capacity_s, load=1.0, pilot_s=10.0)
    settings = ControllerSettings(policy="inferenceOnly", ttft_ms=ttft_ms, tpot_ms=tpot_ms)
    workloads = {}
    for i, load in enumerate(loads):
        workloads[load] = workload_for(configs, trace_slice(trace, rate=load * capacity["rate"], duration_s=seconds), base.tokenizer, seed=i)

    def measure(shedding: bool, which: list[float]) -> list[dict]:
        fraction = configs[0].shed_ttft_fraction if shedding else 0.0
        runs_configs = [c.model_copy(update={"shed_ttft_fraction": fraction}) for c in policy_configs(configs, "inferenceOnly")]
        deployment = LocalDeployment.start(runs_configs, settings, processes=True)
        try:
            return [
                {
                    "load": load,
                    "shedding": shedding,
                    "offered_rps": load * capacity["rate"],
                    **figures(
                        _replay(deployment, workloads[load], ttft_ms=ttft_ms, tpot_ms=tpot_ms, timeout_s=request_timeout_s),
                        seconds,
                        ttft_ms=ttft_ms,
                        tpot_ms=tpot_ms,
                    ),
                }
                for load in which
            ]
        finally:
            deployment.stop()

    runs = measure(True, list(loads))
    if baseline:
        runs += measure(False, [max(loads)])
    result = {
        "benchmark": "overload",
        "trace": trace,
        "trace_file": str(trace_file(trace)),
        "model": model,
        "replicas": replicas,
        "cores_per_replica": 1,
        "slo": {"ttft_ms": ttft_ms, "tpot_ms": tpot_ms},
        "shed_ttft_fraction": configs[0].shed_ttft_fraction,
        "capacity": capacity,
        "seconds_per_load": seconds,
        "request_timeout_s": request_timeout_s,
        "runs": runs,
        "passed": all(all(r["passed"].values()) for r in runs if r["shedding"]),
        "wall_s": time.time() - started,
        "machine": machine(),
    }
    print_table(
        f"Overload through the router: {replicas} replica process(es) x 1 core, the Azure {trace} trace at multiples of the measured capacity "
        f"({capacity['rate']:.1f} req/s), {seconds:g} s per load, SLO TTFT <= {ttft_ms} ms, TPOT <= {tpot_ms} ms",
        ["load", "shedding", "offered", "admitted", "shed", "hung", "lost", "errors", "TTFT p50", "TTFT p99", "TPOT p99", "SLO met/s", "shed p99", "passed"],
        [
            [
                f"{r['load']:g}x",
                "on" if r["shedding"] else "off",
                r["offered"],
                r["admitted"],
                r["shed"],
                r["hung"],
                r["lost"],
                r["errors"],
                _ms(r["admitted_ttft_p50_ms"]),
                _ms(r["admitted_ttft_p99_ms"]),
                _ms(r["admitted_tpot_p99_ms"]),
                r["slo_met_rps"],
                _ms(r["shed_answer_p99_ms"]),
                "yes" if all(r["passed"].values()) else "no: " + ", ".join(k for k, ok in r["passed"].items() if not ok),
            ]
            for r in runs
        ],
    )
    write_json(result, json_path)
    return result


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms"
