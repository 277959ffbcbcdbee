"""`collm demo` (what `make demo` runs): a local CoLLM cluster serves a real trace while it fine-tunes.

N replica agents (default 3) share one base model; each fine-tunes on a different standard-library
package (its private, non-IID data) and serves HTTP on its own loopback port. The router
dispatches by the controller's weights; the controller (the operator's allocation and round code,
over gRPC) plans every few seconds and runs federated rounds. A slice of the Azure trace is
replayed through the router over HTTP, each request carrying text from the held-out part of one
replica's domain. Every replica trains continuously and serves what it learns at once as local
revisions (`0.3` is the third revision on top of global version 0); a round's global adapter
(`1.0`) goes live everywhere without a restart. A live view shows each replica, and at the end a
report folder holds `report.json` (every figure) and PNG plots. Every figure is measured:
client-side TTFT/TPOT against the SLO, and each request's quality re-scored after the run under the
adapter version that served it.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .engine.model_host import load_base_model
from .local.cluster import replica_configs
from .local.controller import ControllerSettings
from .local.plots import write_plots
from .local.run import run_policy
from .local.traffic import trace_slice
from .local.workload import workload_for
from .report import machine, print_table, write_json

DEFAULT_RATE = 8.0  # req/s for the tiny model on 3 replicas (docs/benchmarks.md: about half of what 2 cores serve)


def run_demo(
    model: str = "tiny",
    *,
    duration_s: float = 90.0,
    replicas: int = 3,
    trace: str = "conv",
    policy: str = "coexec",
    rate: float | None = None,
    ttft_ms: int = 1000,
    tpot_ms: int = 100,
    slow_interval_s: float = 5.0,
    round_interval_s: float = 15.0,
    local_steps: int = 10,
    out_dir: str | None = None,
    json_path: str | None = None,
    live: bool = True,
) -> dict:
    console = Console()
    rate = rate if rate is not None else DEFAULT_RATE * replicas / 3 * (1.0 if model == "tiny" else 0.1)
    out = Path(out_dir or f"reports/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    console.print(
        f"[bold]CoLLM demo[/]: {replicas} replicas of {model!r} serve the Azure {trace} trace at {rate:g} req/s "
        f"for {duration_s:.0f} s while they fine-tune (policy {policy})"
    )
    settings = ControllerSettings(
        policy=policy, slow_interval_s=slow_interval_s, round_interval_s=round_interval_s, local_steps=local_steps, ttft_ms=ttft_ms, tpot_ms=tpot_ms
    )
    configs = replica_configs(replicas, model=model, ttft_ms=ttft_ms, tpot_ms=tpot_ms)
    base = load_base_model(model)
    arrivals = trace_slice(trace, rate=rate, duration_s=duration_s)
    workload = workload_for(configs, arrivals, base.tokenizer)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn())
    task = progress.add_task("replaying the trace", total=duration_s)
    view = Live(console=console, refresh_per_second=2, transient=False) if live else None

    def on_sample(sample, traffic, deployment) -> None:
        progress.update(task, completed=min(duration_s, sample.t), description=f"sent {traffic.sent}/{len(arrivals)} answered {len(traffic.records)}")
        if view is not None:
            view.update(Group(_replica_table(sample, traffic, deployment, ttft_ms, tpot_ms), progress))

    if view is not None:
        view.start()
    try:
        result = run_policy(configs, settings, workload, base=base, on_sample=on_sample)
    finally:
        if view is not None:
            view.stop()
            console.line()
    result.update(model=model, replicas=replicas, trace=trace, offered_rate=rate, machine=machine())
    result["plots"] = write_plots([result], out)
    write_json(result, str(out / "report.json"))
    write_json(result, json_path)
    _summary(result, out, console)
    return result


def _replica_table(sample, traffic, deployment, ttft_ms: int, tpot_ms: int) -> Table:
    recent = [r for r in list(traffic.records) if r.sent_s >= sample.t - 10]
    table = Table(title=f"CoLLM local cluster at {sample.t:5.1f} s  (SLO: TTFT <= {ttft_ms} ms, TPOT <= {tpot_ms} ms)")
    table.add_column("replica", no_wrap=True)
    for column in ("weight", "queue + running", "training share", "cap", "serves", "revisions", "held-out loss", "SLO (10 s)"):
        table.add_column(column, justify="right")
    for name, r in sample.replicas.items():
        if not r.get("up"):
            table.add_row(name, *["-"] * 8)
            continue
        mine = [x for x in recent if x.replica == name]
        attained = f"{sum(x.met for x in mine) / len(mine):.0%}" if mine else "-"
        table.add_row(
            name,
            f"{r['weight']:.2f}",
            str(r["queue"] + r["running"]),
            f"{r['training_share']:.2f}",
            str(r["train_cap_tokens"]),
            r["version"],
            str(r["revisions"]),
            f"{r['eval_loss']:.3f}" if r["eval_loss"] else "-",
            attained,
        )
    met = [x for x in recent if x.met]
    window = min(10.0, max(sample.t, 1e-9))
    rounds = deployment.controller.history.rounds
    table.caption = (
        f"cluster: {len(met) / window:.1f} SLO-met req/s   rounds {sum(1 for x in rounds if x.state)} done"
        f"{' + 1 running' if deployment.controller.round_running else ''}   "
        "serves <cluster version>.<local revision>: local revisions go live between rounds"
    )
    return table


def _summary(result: dict, out: Path, console: Console) -> None:
    rounds = result["rounds"]
    fresh = [r["freshness_s"] for r in rounds if r["result"] == "Succeeded"]
    print_table(
        f"CoLLM demo: {result['replicas']} replicas, policy {result['policy']}, {result['duration_s']:.0f} s",
        ["figure", "value"],
        [
            ["requests sent / answered (failed)", f"{result['requests_sent']} / {result['requests_answered']} ({result['requests_failed']})"],
            [f"SLO attainment (TTFT <= {result['slo']['ttft_ms']} ms, TPOT <= {result['slo']['tpot_ms']} ms)", f"{result['slo_attainment']:.1%}"],
            ["F: SLO-met requests/s", result["slo_met_rps"]],
            ["TTFT p50 / p99, TPOT p50 (ms)", f"{result['ttft_ms_p50']:.1f} / {result['ttft_ms_p99']:.1f}, {result['tpot_ms_p50']:.1f}"],
            ["training tokens (all replicas)", f"{result['training_tokens']:,}"],
            ["rounds started / succeeded", f"{result['rounds_started']} / {result['rounds_succeeded']}"],
            ["local revisions served (per replica)", ", ".join(f"{n}: {v}" for n, v in result["revisions_per_replica"].items())],
            ["adapters that served requests", result["adapters_serving"]],
            [
                "Q per request: initial adapter -> as served (gain)",
                f"{result['mean_quality_initial_adapter']:.3f} -> {result['mean_quality_served']:.3f} (x{result['quality_gain']:.2f})",
            ],
            ["goodput (sum of Q over SLO-met requests; per s)", f"{result['goodput']:.1f} ({result['goodput_per_s']:.3f}/s)"],
            ["adapter freshness p50 / max (s)", f"{_median(fresh):.2f} / {max(fresh, default=0.0):.2f}"],
            ["report", str(out / "report.json")],
        ],
        console=console,
    )


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2] if values else 0.0
