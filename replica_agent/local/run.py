"""One measured run of a local cluster under one policy: the demo's and the goodput benchmark's core.

Starts the deployment (agents, router, controller), replays the workload through the router, samples
every replica once a second over gRPC (load, training share, served adapter, revisions), and at the
end turns the measured requests and archived adapters into docs/design.md's figures:

- SLO attainment: requests answered within TTFT and mean TPOT (measured at the client) / sent.
- F: SLO-met requests per second of the run.
- Q of a request: 1 / cross-entropy of its reference continuation under exactly the adapter
  version that served it (quality.py, scored after the run). Each request is also scored under the
  initial adapter ("0.0"), so the run states its own quality gain on the same requests.
- goodput: the sum of Q over SLO-met requests (F x Q integrated over the run); per second too.
- the quality CDF (share of answered requests at or above each level) and Q over time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from collm_control.stats import AgentStats
from collm_rpc.client import AgentClient, read_stats

from ..config import AgentConfig
from ..engine.lora import LoraSpec
from ..engine.model_host import BaseModel, load_base_model
from .cluster import LocalDeployment
from .controller import ControllerSettings
from .quality import RequestScorer, ScoreItem, quality, quality_cdf
from .traffic import RequestRecord, TrafficReplay
from .workload import Workload

QUALITY_LEVELS = [round(0.30 + 0.02 * i, 2) for i in range(26)]  # 0.30 .. 0.80 (CE 3.3 .. 1.25 nats)


@dataclass(frozen=True)
class Sample:
    t: float  # seconds from the start of the traffic
    replicas: dict[str, dict]  # per replica: queue, running, training_share, cap, weight, version, sha256, eval_loss, training_tokens, revisions


def run_policy(
    configs: list[AgentConfig],
    settings: ControllerSettings,
    workload: Workload,
    *,
    base: BaseModel | None = None,
    processes: bool = False,
    cores_per_replica: int = 1,
    window_s: float = 5.0,
    on_sample: Callable[[Sample, TrafficReplay, LocalDeployment], None] | None = None,
    drain_s: float = 120.0,
    workdir: str | None = None,
    throttle: Mapping[str, float] | None = None,
) -> dict:
    base = base or (None if processes else load_base_model(configs[0].model))
    deployment = LocalDeployment.start(
        configs, settings, base=base, processes=processes, cores_per_replica=cores_per_replica, workdir=workdir, throttle=throttle
    )
    clients = {n: deployment.client(n, timeout=10) for n in deployment.replicas}
    samples: list[Sample] = []
    try:
        start_stats = read_stats(clients)
        cpu_start, harness_start = deployment.cpu_seconds(), time.process_time()
        traffic = TrafficReplay(deployment.router_url, workload, settings.ttft_ms, settings.tpot_ms)
        deployment.arrivals = lambda: traffic.sent
        traffic.start()
        duration = workload.arrivals[-1].at_s if workload.arrivals else 0.0
        deployment.controller.plan_run(traffic.started_at, duration)  # rounds get deadlines that end within the run
        deadline = time.time() + duration + drain_s
        while not traffic.wait(1.0) and time.time() < deadline:
            sample = _sample(deployment, clients, traffic.started_at)
            samples.append(sample)
            if on_sample:
                on_sample(sample, traffic, deployment)
        elapsed = time.time() - traffic.started_at
        deployment.controller.stop()  # lets a round in progress finish
        end_stats = read_stats(clients)
        cpu = {k: v - cpu_start.get(k, 0.0) for k, v in deployment.cpu_seconds().items()}
        harness_cpu = time.process_time() - harness_start
        history = deployment.controller.history
    finally:
        for client in clients.values():
            client.close()
        deployment.stop()
    records = list(traffic.records)
    spec = LoraSpec(rank=configs[0].lora_rank, alpha=configs[0].lora_alpha, target_modules=tuple(configs[0].lora_targets))
    scorer = RequestScorer(base or load_base_model(configs[0].model), spec, deployment.archives())
    initial_sha = next((st.adapter.sha256 for st in start_stats.values() if st and st.adapter), "")
    try:
        result = figures(
            settings.policy, settings.ttft_ms, settings.tpot_ms, workload, records, traffic.sent, max(elapsed, duration), scorer, initial_sha, window_s
        )
    finally:
        deployment.cleanup()
    trained = {n: _tokens(end_stats.get(n)) - _tokens(start_stats.get(n)) for n in deployment.replicas}
    start_total = sum(_tokens(st) for st in start_stats.values())
    for window in result["windows"]:  # the cluster's training tokens so far at each window's end (simulate.py calibrates on it)
        before = [s for s in samples if s.t <= window["t"]]
        window["training_tokens"] = sum(r.get("training_tokens", 0) for r in before[-1].replicas.values()) - start_total if before else 0
    rounds = [r.summary() for r in history.rounds]
    for r in rounds:
        for key in ("eval_loss_before", "eval_loss_after", "freshness_s", "finished_at"):
            r[key] = float(r[key]) if r[key] is not None else 0.0
    result.update(
        {
            "training_tokens": sum(trained.values()),
            "training_tokens_per_replica": trained,
            "revisions_per_replica": {n: st.revisions_published if st else 0 for n, st in end_stats.items()},
            "served_at_end": {n: st.adapter.version if st and st.adapter else "" for n, st in end_stats.items()},
            "throttled": {n: t.as_dict() for n, t in deployment.throttles.items()},
            "data_tokens_per_replica": {n: st.data_tokens if st else 0 for n, st in start_stats.items()},
            "rounds_started": len(rounds),
            "rounds_succeeded": sum(1 for r in rounds if r["result"] == "Succeeded"),
            "rounds": rounds,
            "allocations": [t.as_dict() for t in history.ticks],
            "controller_errors": history.errors[:10],
            "cpu_seconds": {**cpu, "harness": harness_cpu},
            "samples": [{"t": s.t, "replicas": s.replicas} for s in samples],
        }
    )
    return result


def _tokens(stats: AgentStats | None) -> int:
    return stats.training_tokens if stats else 0


def _sample(deployment: LocalDeployment, clients: dict[str, AgentClient], started_at: float) -> Sample:
    allocation = deployment.controller.allocation if deployment.controller else None
    replicas: dict[str, dict[str, Any]] = {}
    for name, st in read_stats(clients).items():
        if st is None:
            replicas[name] = {"up": False}
            continue
        adapter = st.adapter
        replicas[name] = {
            "up": True,
            "queue": st.queue_depth,
            "running": st.running,
            "training_share": st.training_share,
            "train_cap_tokens": st.train_cap_tokens,
            "weight": allocation.weights.get(name, 0.0) if allocation else 0.0,
            "version": adapter.version if adapter else "",
            "sha256": adapter.sha256 if adapter else "",
            "eval_loss": (adapter.eval_loss if adapter else None) or 0.0,  # held-out loss recorded with the served version (0: not measured)
            "training_tokens": st.training_tokens,
            "revisions": st.revisions_published,
        }
    return Sample(time.time() - started_at, replicas)


def figures(
    policy: str,
    ttft_ms: int,
    tpot_ms: int,
    workload: Workload,
    records: list[RequestRecord],
    sent: int,
    duration: float,
    scorer: RequestScorer,
    initial_sha: str,
    window_s: float = 5.0,
) -> dict:
    """The run's figures from its request records; each answered request is scored (quality.py)."""
    answered = [r for r in records if r.ok]
    scorable = [r for r in answered if r.adapter_sha256]
    items = [ScoreItem(r.index, r.adapter_sha256, workload.requests[r.index].prompt, workload.requests[r.index].reference) for r in scorable]
    served_ce = scorer.cross_entropy(items)
    initial_ce = scorer.cross_entropy([ScoreItem(i.key, initial_sha, i.prompt, i.reference) for i in items]) if initial_sha else {}
    q = {r.index: quality(served_ce[r.index]) for r in scorable}
    q0 = {k: quality(v) for k, v in initial_ce.items()}
    met = [r for r in records if r.met]
    goodput = sum(q.get(r.index, 0.0) for r in met)
    windows = []
    for i in range(max(1, int(duration // window_s))):
        lo, hi = i * window_s, (i + 1) * window_s
        inside = [r for r in records if lo <= r.sent_s < hi]
        inside_met = [r for r in inside if r.met]
        scored = [q[r.index] for r in inside if r.index in q]
        windows.append(
            {
                "t": hi,
                "requests": len(inside),
                "slo_attainment": len(inside_met) / len(inside) if inside else 1.0,
                "slo_met_rps": len(inside_met) / window_s,
                "goodput_per_s": sum(q.get(r.index, 0.0) for r in inside_met) / window_s,
                "mean_quality": statistics.mean(scored) if scored else None,  # None: no request was answered in this window
                "mean_quality_initial": statistics.mean(q0[r.index] for r in inside if r.index in q0) if any(r.index in q0 for r in inside) else None,
            }
        )
    values = list(q.values())
    home = sum(1 for r in answered if r.replica == workload.requests[r.index].domain)
    by_domain: dict[str, list[tuple[float, float]]] = {}
    for r in scorable:
        by_domain.setdefault(workload.requests[r.index].domain, []).append((q[r.index], q0.get(r.index, 0.0)))
    met_q = [q[r.index] for r in met if r.index in q]
    return {
        "policy": policy,
        "duration_s": duration,
        "slo": {"ttft_ms": ttft_ms, "tpot_ms": tpot_ms},
        "requests_sent": sent,
        "requests_recorded": len(records),
        "requests_answered": len(answered),
        "requests_failed": len(records) - len(answered),
        "failures": [r.error for r in records if not r.ok][:5],
        "requests_scored": len(q),
        "requests_served_at_home": home,
        "slo_met": len(met),
        "slo_attainment": len(met) / sent if sent else 0.0,
        "slo_met_rps": len(met) / duration if duration else 0.0,
        "ttft_ms_p50": _pct(answered, "ttft_ms", 0.5),
        "ttft_ms_p99": _pct(answered, "ttft_ms", 0.99),
        "tpot_ms_p50": _pct(answered, "tpot_ms", 0.5),
        "generated_tokens": sum(r.tokens for r in answered),
        "mean_quality_served": statistics.mean(values) if values else 0.0,
        "mean_quality_slo_met": statistics.mean(met_q) if met_q else 0.0,
        "mean_quality_initial_adapter": statistics.mean(q0.values()) if q0 else 0.0,
        "quality_gain": (statistics.mean(values) / statistics.mean(q0.values())) if values and q0 else 0.0,
        "quality_cdf": {"levels": QUALITY_LEVELS, "share_at_or_above": quality_cdf(values, QUALITY_LEVELS)},
        "quality_by_domain": {
            d: {"requests": len(v), "mean_quality_served": statistics.mean(x for x, _ in v), "mean_quality_initial_adapter": statistics.mean(y for _, y in v)}
            for d, v in sorted(by_domain.items())
        },
        "goodput": goodput,
        "goodput_per_s": goodput / duration if duration else 0.0,
        "adapters_serving": len({r.adapter_sha256 for r in scorable}),
        "windows": windows,
    }


def _pct(records: list[RequestRecord], key: str, q: float) -> float:
    values = sorted(getattr(r, key) for r in records)
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0
