"""`collm bench goodput`: DESIGN.md's cluster goodput (F x Q integrated), every policy on the same run.

For each policy, one after another in one invocation: fresh agents on the same base model (same
seeds, so the same initial adapter), the same non-IID data (one standard-library package per
replica), the same trace slice replayed through the router over HTTP, the same controller
settings. Figures per policy come from `replica_agent.local.run.run_policy`: SLO attainment and
F (SLO-met requests/s) from client-side TTFT/TPOT, Q = 1 / held-out loss of the adapter that
served each request (every adapter evaluated on all replicas' held-out splits), goodput = the sum
of Q over SLO-met requests. Ratios are coexec's goodput over each policy's.
"""

from __future__ import annotations

from pathlib import Path

from collm_operator.allocation import POLICIES
from replica_agent.engine.model_host import load_base_model
from replica_agent.local.cluster import replica_configs
from replica_agent.local.controller import ControllerSettings
from replica_agent.local.plots import write_plots
from replica_agent.local.run import run_policy
from replica_agent.local.traffic import trace_slice

from replica_agent.report import machine, print_table, write_json

TARGETS = {"separated": 3.0, "static": 2.0, "inferenceOnly": 1.5}  # coexec / policy, from the issue


def run(policies=POLICIES, *, trace: str = "conv", model: str = "tiny", replicas: int = 3, rate: float = 26.0, duration_s: float = 60.0, ttft_ms: int = 500, tpot_ms: int = 50, slow_interval_s: float = 5.0, round_interval_s: float = 15.0, local_steps: int = 10, json_path: str | None = None, plots_dir: str | None = None) -> dict:
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; use some of {', '.join(POLICIES)}")
    base = load_base_model(model)
    arrivals = trace_slice(trace, rate=rate, duration_s=duration_s)
    runs = []
    for policy in policies:
        settings = ControllerSettings(policy=policy, slow_interval_s=slow_interval_s, round_interval_s=round_interval_s, local_steps=local_steps, ttft_ms=ttft_ms, tpot_ms=tpot_ms)
        result = run_policy(replica_configs(replicas, model=model, ttft_ms=ttft_ms, tpot_ms=tpot_ms), settings, arrivals, base=base)
        result.pop("samples")  # per-second replica samples: the demo's view, too long for this JSON
        runs.append(result)
    reference = next((r for r in runs if r["policy"] == "coexec"), None)
    for r in runs:
        r["coexec_ratio"] = reference["goodput"] / r["goodput"] if reference and r["goodput"] > 0 else 0.0
    result = {
        "benchmark": "goodput",
        "trace": trace,
        "model": model,
        "replicas": replicas,
        "offered_rate": rate,
        "requests": len(arrivals),
        "duration_s": duration_s,
        "slo": {"ttft_ms": ttft_ms, "tpot_ms": tpot_ms},
        "controller": {"slow_interval_s": slow_interval_s, "round_interval_s": round_interval_s, "local_steps": local_steps},
        "targets_coexec_over": TARGETS,
        "policies": runs,
        "machine": machine(),
    }
    out = Path(plots_dir) if plots_dir else (Path(json_path).with_suffix("") if json_path else None)
    if out is not None:
        result["plots"] = write_plots(runs, out)
    print_table(
        f"Goodput on the Azure {trace} trace: {replicas} replicas, {rate:g} req/s offered for {duration_s:.0f} s (SLO TTFT <= {ttft_ms} ms, TPOT <= {tpot_ms} ms)",
        ["policy", "SLO attainment", "F req/s", "training tokens", "rounds ok", "final loss", "mean Q", "goodput", "goodput/s", "coexec / policy", "target"],
        [[r["policy"], r["slo_attainment"], r["slo_met_rps"], r["training_tokens"], f"{r['rounds_succeeded']}/{r['rounds_started']}", r["held_out_loss_final_served"], r["mean_quality_served"], r["goodput"], r["goodput_per_s"], r["coexec_ratio"], f">= {TARGETS[r['policy']]}" if r["policy"] in TARGETS else "-"] for r in runs],
    )
    write_json(result, json_path)
    return result
