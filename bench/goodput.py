"""`collm bench goodput`: docs/design.md's cluster goodput (F x Q integrated), every policy in one run.

Hardware: each replica is its own OS process on CPU core(s) of its own (replica_agent/local/
processes.py), as a GPU replica owns its GPU; its engine and trainer share that core. The router,
the controller, the load generator and the scorer run beside them (the harness); the JSON records
the CPU seconds each process took.

Steps, in one invocation:
1. Capacity: the cluster's serving capacity within the SLO, measured with training off
   (inferenceOnly): the highest rate served with SLO attainment >= 90% (DistServe's goodput
   definition; see measure_capacity for why not 99%).
2. For each load (a fraction of that capacity; default 0.7) and each policy, one after another:
   fresh replica processes from the same base model and seeds, the same non-IID data (one
   domain per replica: Python code, English prose), the same requests (arrivals from the Azure trace slice,
   text from each replica's held-out data), the same controller settings.
3. Figures per run (replica_agent/local/run.py): SLO attainment and F from client-side TTFT/TPOT;
   Q of each request = 1 / cross-entropy of its reference under the adapter version that served
   it; goodput = the sum of Q over SLO-met requests. Ratios are coexec's goodput over each policy's.

`peft` is the CoLLM paper's baseline: separate deployments on Hugging Face transformers + peft
(bench/peft_baseline.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

from collm_bench.load import find_max_rate
from replica_agent.config import AgentConfig
from replica_agent.engine.model_host import load_base_model
from replica_agent.local.cluster import LocalDeployment, replica_configs
from replica_agent.local.controller import ControllerSettings
from replica_agent.local.plots import write_load_plot, write_plots
from replica_agent.local.run import run_policy
from replica_agent.local.traffic import TrafficReplay, trace_file, trace_segment, trace_slice
from replica_agent.local.workload import Workload, workload_for
from replica_agent.report import machine, print_table, write_json

POLICIES = ("coexec", "static", "separated", "inferenceOnly", "peft")
# Full coexec less one part (docs/scheduling.md): the slow timescale's plan, the agents' per-iteration
# batch mix, serving local revisions between rounds, the eval gate on what is served.
ABLATIONS = ("fast-only", "slow-only", "no-reuse", "no-gate")
TARGETS = {"peft": 3.0, "static": 2.0, "separated": 2.0, "inferenceOnly": 1.3}  # coexec / policy, from the issue
HETERO_TARGETS = {"fast-only": 1.2, "slow-only": 1.2}  # on the heterogeneous cluster (the two-timescales issue)
NO_GATE_TOLERANCE = 1e9  # nats: every revision and every round's candidate passes


@dataclass(frozen=True)
class ClusterKind:
    """How the replicas differ: `throttle` makes a replica a slower device (that share of its core,
    replica_agent/local/throttle.py); `home_skew` is each replica's share of the home users."""

    name: str
    description: str
    throttle: dict[str, float] = field(default_factory=dict)
    home_skew: dict[str, float] | None = None


CLUSTERS = {
    "identical": ClusterKind("identical", "replicas alike: a full core each, home users split evenly"),
    "hetero": ClusterKind(
        "hetero",
        "replica-1 a device half as fast (50% of its core), with 60% of the home users (prose) against replica-0's 40% (code); "
        "their private data differ in domain and size",
        throttle={"replica-1": 0.5},
        home_skew={"replica-0": 0.4, "replica-1": 0.6},
    ),
}


def controller_policy(policy: str) -> str:
    """The controller's policy for a benchmark row: peft's trainers and servers are separated's
    split, and every ablation is coexec with one part taken away."""
    return "separated" if policy == "peft" else "coexec" if policy in ABLATIONS else policy


def ablation_settings(policy: str, configs: list[AgentConfig], settings: ControllerSettings) -> tuple[list[AgentConfig], ControllerSettings]:
    """The replicas' and the controller's settings of one ablation of coexec."""
    if policy == "fast-only":
        return configs, replace(settings, slow_timescale=False)
    if policy == "slow-only":
        return configs, replace(settings, fast_timescale=False)
    if policy == "no-reuse":
        return [c.model_copy(update={"revision_every_seconds": 0.0, "revision_every_steps": 0}) for c in configs], settings
    if policy == "no-gate":
        return [c.model_copy(update={"revision_tolerance": NO_GATE_TOLERANCE}) for c in configs], replace(settings, eval_tolerance=NO_GATE_TOLERANCE)
    raise ValueError(f"unknown ablation {policy!r}; use one of {', '.join(ABLATIONS)}")


def policy_configs(configs: list[AgentConfig], policy: str) -> list[AgentConfig]:
    """What a policy changes in the replicas' own settings (the rest comes with its plans):
    inferenceOnly starts with no training at all (as the operator renders it), and static's trainer
    runs at the engine's OS priority (a fixed batch that competes as an equal; coexec's trainer
    only takes what inference leaves, replica_agent/engine/trainer.py)."""
    if policy == "inferenceOnly":
        return [c.model_copy(update={"train_cap_tokens": 0}) for c in configs]
    if policy == "static":
        return [c.model_copy(update={"trainer_priority": "normal"}) for c in configs]
    return list(configs)


def benchmark_configs(replicas: int, *, model: str, ttft_ms: int, tpot_ms: int) -> list[AgentConfig]:
    """The replicas' settings: 256-token held-out windows (the code trace's prompts are ~175 tokens
    after scaling, plus a 32-token reference), the same tokens per training step as the defaults
    (2 x 256), the gate on the first 4 held-out windows, a local revision check every 5 s."""
    return replica_configs(
        replicas, model=model, ttft_ms=ttft_ms, tpot_ms=tpot_ms, seq_len=256, micro_batch=2, eval_batches=2, revision_every_seconds=5.0, max_prefill_tokens=256
    )


def measure_capacity(
    configs: list[AgentConfig],
    tokenizer,
    *,
    trace: str,
    ttft_ms: int,
    tpot_ms: int,
    duration_s: float,
    load: float,
    pilot_s: float = 15.0,
    start_rate: float = 4.0,
    threshold: float = 0.9,
    workdir: str | None = None,
    cluster: ClusterKind = CLUSTERS["identical"],
) -> tuple[dict, Workload]:
    """The cluster's serving capacity within the SLO, training off (inferenceOnly), on the requests the runs replay.

    A trace like the Azure code trace is bursty (up to 67 requests in one second), so how much a
    slice asks of the cluster depends on which requests it holds. The runs therefore replay one
    fixed segment of the trace (the same requests at every load, time-compressed to the load's
    rate), and the capacity is measured on that segment: the highest rate at which it is served
    with SLO attainment >= `threshold`. A pilot on short slices (doubling, one bisection) sizes the
    segment so that a run at `load` lasts about `duration_s`; then the whole segment is replayed at
    the pilot's rate and stepped by 1.25x up or 0.8x down until the verdict flips, with one bisection.

    The threshold is 90% by default, as in DistServe's goodput (the highest rate at which 90% of
    requests meet the SLO). At 99% a bursty trace's capacity is set by its few worst seconds: at
    0.7 of such a capacity the replicas idled (6% of a core busy), so "load" measured the bursts,
    not the work the cluster does.
    Returns the figures and the segment (as a Workload)."""
    settings = ControllerSettings(policy="inferenceOnly", ttft_ms=ttft_ms, tpot_ms=tpot_ms)
    deployment = LocalDeployment.start(policy_configs(configs, "inferenceOnly"), settings, processes=True, workdir=workdir, throttle=cluster.throttle)
    trials: list[dict] = []

    def trial(workload: Workload, stage: str) -> SimpleNamespace:
        traffic = TrafficReplay(deployment.router_url, workload, ttft_ms, tpot_ms)
        deployment.arrivals = lambda: traffic.sent
        traffic.start()
        traffic.wait(workload.duration_s + 180)
        attainment = sum(r.met for r in traffic.records) / max(1, traffic.sent)
        count = len(workload.arrivals)
        rate = count / (workload.duration_s * count / (count - 1)) if count > 1 and workload.duration_s > 0 else 0.0
        trials.append({"stage": stage, "rate": rate, "requests": traffic.sent, "slo_attainment": attainment})
        time.sleep(2.0)  # let queues drain before the next step
        return SimpleNamespace(rate=rate, attainment=attainment)

    try:
        # 1. the pilot: short slices, doubling then one bisection (bench/load.py)
        pilot, _, _ = find_max_rate(
            lambda r: trial(
                workload_for(configs, trace_slice(trace, rate=r, duration_s=pilot_s), tokenizer, seed=len(trials), home_skew=cluster.home_skew), "pilot"
            ),
            start_rate=start_rate * len(configs),
            target=threshold,
            refinements=1,
        )
        if pilot == 0.0:
            raise RuntimeError(
                f"the cluster misses the SLO (TTFT <= {ttft_ms} ms, TPOT <= {tpot_ms} ms) even at {start_rate * len(configs):g} req/s: relax the SLO"
            )
        # 2. the segment the runs replay, and the capacity on it: steps of 1.25x from the pilot's rate
        # (each trial replays the whole segment, so the steps are few and start where the answer is near)
        segment = workload_for(configs, trace_segment(trace, count=max(1, round(duration_s * load * pilot))), tokenizer, home_skew=cluster.home_skew)
        capacity = refine_rate(lambda r: trial(segment.at_rate(r), "segment").attainment >= threshold, pilot)
    finally:
        deployment.stop()
    return {"rate": capacity, "pilot_rate": pilot, "threshold": threshold, "segment_requests": len(segment.arrivals), "trials": trials}, segment


def refine_rate(passes, start: float, *, step: float = 1.25, floor: float = 0.05) -> float:
    """The highest rate that `passes`, searched from `start` (a good guess): steps of `step` up while it
    passes or down until it does, then one bisection between the last pass and the first miss."""
    if passes(start):
        good = start
        while passes(good * step):
            good *= step
        bad = good * step
    else:
        bad = start
        while not passes(bad / step):
            bad /= step
            if bad < floor:
                raise RuntimeError(f"the segment misses the SLO even at {floor:g} req/s: relax the SLO")
        good = bad / step
    mid = (good + bad) / 2
    return mid if passes(mid) else good


def run(
    policies=POLICIES,
    *,
    trace: str = "code",
    model: str = "tiny",
    replicas: int = 2,
    loads=(0.7,),
    duration_s: float = 240.0,
    ttft_ms: int = 500,
    tpot_ms: int = 50,
    slow_interval_s: float = 5.0,
    round_interval_s: float = 60.0,
    local_steps: int = 10,
    capacity_rps: float | None = None,
    attainment: float = 0.9,
    json_path: str | None = None,
    plots_dir: str | None = None,
    cluster: str = "identical",
) -> dict:
    unknown = [p for p in policies if p not in POLICIES + ABLATIONS]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; use some of {', '.join(POLICIES + ABLATIONS)}")
    if cluster not in CLUSTERS:
        raise ValueError(f"unknown cluster {cluster!r}; use one of {', '.join(CLUSTERS)}")
    kind = CLUSTERS[cluster]
    base = load_base_model(model)
    configs = benchmark_configs(replicas, model=model, ttft_ms=ttft_ms, tpot_ms=tpot_ms)
    started = time.time()
    if capacity_rps:
        count = max(1, round(duration_s * max(loads) * capacity_rps))
        segment = workload_for(configs, trace_segment(trace, count=count), base.tokenizer, home_skew=kind.home_skew)
        capacity = {"rate": capacity_rps, "given": True, "segment_requests": len(segment.arrivals)}
    else:
        capacity, segment = measure_capacity(
            configs,
            base.tokenizer,
            trace=trace,
            ttft_ms=ttft_ms,
            tpot_ms=tpot_ms,
            duration_s=duration_s,
            load=max(loads),
            threshold=attainment,
            cluster=kind,
        )
    by_load = []
    for load in loads:
        rate = load * capacity["rate"]
        workload = segment.at_rate(rate)
        runs = []
        for policy in policies:
            settings = ControllerSettings(
                policy=controller_policy(policy),
                slow_interval_s=slow_interval_s,
                round_interval_s=round_interval_s,
                local_steps=local_steps,
                ttft_ms=ttft_ms,
                tpot_ms=tpot_ms,
            )
            if policy == "peft":
                from collm_bench.peft_baseline import run_peft

                result = run_peft(configs, settings, workload, base=base, throttle=kind.throttle)
            elif policy in ABLATIONS:
                ablated, settings = ablation_settings(policy, configs, settings)
                result = run_policy(ablated, settings, workload, base=base, processes=True, throttle=kind.throttle)
                result["policy"] = policy
            else:
                result = run_policy(policy_configs(configs, policy), settings, workload, base=base, processes=True, throttle=kind.throttle)
            result.pop("samples")  # per-second replica samples: the demo's view, too long for this JSON
            result["cpu_share_harness"] = _harness_share(result)
            runs.append(result)
        reference = next((r for r in runs if r["policy"] == "coexec"), None)
        for r in runs:
            r["coexec_ratio"] = reference["goodput"] / r["goodput"] if reference and r["goodput"] > 0 else 0.0
        by_load.append({"load": load, "offered_rate": rate, "requests": len(workload.arrivals), "run_s": workload.duration_s, "policies": runs})
    result = {
        "benchmark": "goodput",
        "trace": trace,
        "trace_file": str(trace_file(trace)),
        "model": model,
        "replicas": replicas,
        "cores_per_replica": 1,
        "cluster": {"name": kind.name, "description": kind.description, "throttle_share_of_core": kind.throttle, "home_skew": kind.home_skew},
        "capacity": capacity,
        "duration_s": duration_s,  # the run length at the highest load; lower loads replay the same requests more slowly
        "slo": {"ttft_ms": ttft_ms, "tpot_ms": tpot_ms},
        "controller": {"slow_interval_s": slow_interval_s, "round_interval_s": round_interval_s, "local_steps": local_steps},
        "replica_settings": {k: v for k, v in configs[0].model_dump().items() if k not in ("replica_id", "data", "port", "grpc_port", "adapter_archive")},
        "targets_coexec_over": {**TARGETS, **(HETERO_TARGETS if cluster == "hetero" else {})},
        "loads": by_load,
        "wall_s": time.time() - started,
        "machine": machine(),
    }
    out = Path(plots_dir) if plots_dir else (Path(json_path).with_suffix("") if json_path else None)
    if out is not None:
        plots = {}
        for entry in by_load:
            plots[str(entry["load"])] = write_plots(entry["policies"], out / f"load-{entry['load']:g}")
        if len(by_load) > 1:
            plots["goodput_vs_load"] = write_load_plot([e["load"] for e in by_load], [e["policies"] for e in by_load], out)
        result["plots"] = plots
    for entry in by_load:
        runs = entry["policies"]
        print_table(
            f"Goodput at load {entry['load']:g} of the measured capacity ({capacity['rate']:.1f} req/s): "
            f"{entry['offered_rate']:.1f} req/s of the Azure {trace} trace, {replicas} replica processes x 1 core ({kind.name}: {kind.description}), "
            f"{entry['requests']} requests over {entry['run_s']:.0f} s per policy (SLO TTFT <= {ttft_ms} ms, TPOT <= {tpot_ms} ms)",
            [
                "policy",
                "SLO attainment",
                "F req/s",
                "Q served",
                "Q initial",
                "training tokens",
                "revisions",
                "rounds ok",
                "goodput",
                "coexec / policy",
                "target",
                "harness CPU",
            ],
            [
                [
                    r["policy"],
                    r["slo_attainment"],
                    r["slo_met_rps"],
                    r["mean_quality_served"],
                    r["mean_quality_initial_adapter"],
                    r["training_tokens"],
                    sum(r["revisions_per_replica"].values()),
                    f"{r['rounds_succeeded']}/{r['rounds_started']}",
                    r["goodput"],
                    r["coexec_ratio"],
                    f">= {result['targets_coexec_over'][r['policy']]}" if r["policy"] in result["targets_coexec_over"] else "-",
                    f"{r['cpu_share_harness']:.0%}",
                ]
                for r in runs
            ],
        )
    write_json(result, json_path)
    return result


def _harness_share(result: dict) -> float:
    """The harness's CPU time (router process + this process: load generator, controller, sampling)
    as a share of all the CPU time the run used (`cpu_seconds` has every process's figure)."""
    cpu = result["cpu_seconds"]
    harness = cpu.get("harness", 0.0) + cpu.get("router", 0.0)
    total = sum(cpu.values())
    return harness / total if total else 0.0
