"""One measured run of a local cluster under one policy: the demo's and the goodput benchmark's core.

Starts the deployment (agents, router, controller), replays the trace slice through the router,
samples every replica once a second (load, training share, adapter version, eval loss), and at
the end turns the measured requests and adapters into DESIGN.md's figures:

- SLO attainment: requests answered within TTFT and mean TPOT (measured at the client) / sent.
- F: SLO-met requests per second of the run.
- Q: 1 / held-out eval loss of the adapter that served the request. Every adapter that served
  is evaluated after the run on the union of all replicas' held-out splits (token-weighted), so
  every policy's adapters are scored on the same data.
- goodput: the sum of Q over SLO-met requests (F x Q integrated over the run); per second too.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

from ..config import AgentConfig
from ..engine.model_host import BaseModel
from .cluster import LocalDeployment
from .controller import ControllerSettings
from .traffic import Arrival, RequestRecord, TrafficReplay


@dataclass(frozen=True)
class Sample:
    t: float  # seconds from the start of the traffic
    replicas: dict[str, dict]  # per replica: queue, running, training_share, cap, weight, version, sha256, training_tokens


def run_policy(configs: list[AgentConfig], settings: ControllerSettings, arrivals: list[Arrival], *, base: BaseModel | None = None, window_s: float = 5.0, on_sample: Callable[[Sample, TrafficReplay, LocalDeployment], None] | None = None, drain_s: float = 120.0) -> dict:
    deployment = LocalDeployment.start(configs, settings, base=base)
    adapters: dict[str, dict] = {}  # sha256 -> tensors of every adapter seen serving
    versions: dict[tuple[str, int], str] = {}  # (replica, local version number) -> sha256
    samples: list[Sample] = []
    try:
        start_tokens = {n: a.trainer.tokens if a.trainer else 0 for n, a in deployment.agents.items()}
        _track(deployment, adapters, versions)
        traffic = TrafficReplay(deployment.router.url, arrivals, settings.ttft_ms, settings.tpot_ms).start()
        duration = arrivals[-1].at_s if arrivals else 0.0
        deployment.controller.plan_run(traffic.started_at, duration)  # rounds get deadlines that end within the run
        deadline = time.time() + duration + drain_s
        while not traffic.wait(1.0) and time.time() < deadline:
            sample = _sample(deployment, traffic.started_at, adapters, versions)
            samples.append(sample)
            if on_sample:
                on_sample(sample, traffic, deployment)
        elapsed = time.time() - traffic.started_at
        deployment.controller.stop()  # lets a round in progress finish
        _track(deployment, adapters, versions)
        trained = {n: (a.trainer.tokens if a.trainer else 0) - start_tokens[n] for n, a in deployment.agents.items()}
        losses = _evaluate(deployment, adapters)
        history = deployment.controller.history
    finally:
        deployment.stop()
    records = list(traffic.records)
    return _figures(settings, records, traffic.sent, max(elapsed, duration), samples, versions, losses, trained, history, window_s)


def _track(deployment: LocalDeployment, adapters: dict, versions: dict) -> None:
    for name, agent in deployment.agents.items():
        for number in agent.store.retained():
            version = agent.store.get(number)
            versions[(name, number)] = version.sha256
            adapters.setdefault(version.sha256, dict(version.tensors))


def _sample(deployment: LocalDeployment, started_at: float, adapters: dict, versions: dict) -> Sample:
    _track(deployment, adapters, versions)
    allocation = deployment.controller.allocation
    replicas = {}
    for name, agent in deployment.agents.items():
        current = agent.store.current
        replicas[name] = {
            "queue": agent.engine.queue_depth,
            "running": agent.engine.running,
            "training_share": float(agent.mixer.training_share),
            "train_cap_tokens": agent.mixer.settings.cap_tokens_per_iteration,
            "weight": allocation.weights.get(name, 0.0) if allocation else 0.0,
            "version": current.number,
            "sha256": current.sha256,
            "eval_loss": float(current.eval_loss or 0.0),  # as measured when it was published (0: not measured)
            "training_tokens": agent.trainer.tokens if agent.trainer else 0,
        }
    return Sample(time.time() - started_at, replicas)


def _evaluate(deployment: LocalDeployment, adapters: dict) -> dict[str, float]:
    """Held-out loss of every adapter, token-weighted over every replica's held-out split."""
    trainers = [a.trainer for a in deployment.agents.values() if a.trainer is not None]
    out = {}
    for sha, tensors in adapters.items():
        parts = [(t.evaluate(tensors), t.eval_tokens) for t in trainers]
        out[sha] = sum(loss * n for loss, n in parts) / max(1, sum(n for _, n in parts))
    return out


def _quality(record: RequestRecord, versions: dict, losses: dict, fallback: float) -> float:
    sha = versions.get((record.replica, record.adapter_version))
    return 1.0 / losses[sha] if sha in losses else fallback


def _figures(settings, records, sent, duration, samples, versions, losses, trained, history, window_s) -> dict:
    first_sha = versions.get(min(versions)) if versions else None
    initial_q = 1.0 / losses[first_sha] if first_sha in losses else 0.0
    answered = [r for r in records if r.ok]
    met = [r for r in records if r.met]
    q = {id(r): _quality(r, versions, losses, initial_q) for r in answered}
    goodput = sum(q[id(r)] for r in met)
    windows = []
    for i in range(max(1, int(duration // window_s))):
        lo, hi = i * window_s, (i + 1) * window_s
        inside = [r for r in records if lo <= r.sent_s < hi]
        inside_met = [r for r in inside if r.met]
        windows.append({"t": hi, "requests": len(inside), "slo_attainment": len(inside_met) / len(inside) if inside else 1.0, "slo_met_rps": len(inside_met) / window_s, "goodput_per_s": sum(q[id(r)] for r in inside_met) / window_s})
    cluster_q = [statistics.mean(1.0 / losses[r["sha256"]] for r in s.replicas.values() if r["sha256"] in losses) for s in samples if any(r["sha256"] in losses for r in s.replicas.values())]
    rounds = [r.summary() for r in history.rounds]
    for r in rounds:
        r["held_out_loss"] = losses.get(r["version_sha256"], 0.0)
        for key in ("eval_loss_before", "eval_loss_after", "freshness_s", "finished_at"):
            r[key] = float(r[key]) if r[key] is not None else 0.0
    served_losses = [losses[versions[(r.replica, r.adapter_version)]] for r in answered if (r.replica, r.adapter_version) in versions]
    return {
        "policy": settings.policy,
        "duration_s": duration,
        "slo": {"ttft_ms": settings.ttft_ms, "tpot_ms": settings.tpot_ms},
        "requests_sent": sent,
        "requests_recorded": len(records),
        "requests_answered": len(answered),
        "requests_failed": len(records) - len(answered),
        "failures": [r.error for r in records if not r.ok][:5],
        "requests_adapter_identified": sum(1 for r in answered if (r.replica, r.adapter_version) in versions),
        "slo_met": len(met),
        "slo_attainment": len(met) / sent if sent else 0.0,
        "slo_met_rps": len(met) / duration if duration else 0.0,
        "ttft_ms_p50": _pct(answered, "ttft_ms", 0.5),
        "ttft_ms_p99": _pct(answered, "ttft_ms", 0.99),
        "tpot_ms_p50": _pct(answered, "tpot_ms", 0.5),
        "generated_tokens": sum(r.tokens for r in answered),
        "mean_quality_served": goodput / len(met) if met else 0.0,
        "mean_quality_over_time": statistics.mean(cluster_q) if cluster_q else initial_q,
        "goodput": goodput,
        "goodput_per_s": goodput / duration if duration else 0.0,
        "training_tokens": sum(trained.values()),
        "training_tokens_per_replica": trained,
        "held_out_loss_initial": 1.0 / initial_q if initial_q else 0.0,
        "held_out_loss_final_served": served_losses[-1] if served_losses else 0.0,
        "held_out_loss_best": min(losses.values()) if losses else 0.0,
        "adapters_evaluated": len(losses),
        "rounds_started": len(rounds),
        "rounds_succeeded": sum(1 for r in rounds if r["result"] == "Succeeded"),
        "rounds": rounds,
        "allocations": [t.as_dict() for t in history.ticks],
        "controller_errors": history.errors[:10],
        "windows": windows,
        "samples": [{"t": s.t, "replicas": s.replicas} for s in samples],
    }


def _pct(records: list[RequestRecord], key: str, q: float) -> float:
    values = sorted(getattr(r, key) for r in records)
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0
