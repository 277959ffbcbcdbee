"""Command-line entry points: `collm-agent` (a container's entrypoint) and `collm` (demo, bench)."""

from __future__ import annotations

import argparse
import logging
import sys


def agent_main(argv: list[str] | None = None) -> int:
    from .config import deprecated_settings, load_config

    config, args = load_config(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for warning in deprecated_settings(config):
        logging.getLogger("replica_agent.config").warning(warning)
    from collm_rpc import tls

    from . import memory
    from .agent import Agent
    from .serving.grpc_service import serve_grpc
    from .serving.http_api import run_server
    from .serving.pipeline import read_token

    credentials = None
    try:  # a missing or weak token file and a wrong certificate fail here, before the model loads
        read_token(config.admin_token_file)
        if config.tls_dir:
            credentials = tls.Credentials.read(config.tls_dir, config.replica_id)
            if credentials.identity.role != tls.REPLICA or credentials.identity.name != config.replica_id:
                raise ValueError(f"the certificate in {config.tls_dir} is {credentials.identity}'s, not replica {config.replica_id}'s")
    except ValueError as exc:
        print(f"collm-agent: {exc}", file=sys.stderr)
        return 2
    memory.limit_arenas()  # before the model loads and the threads start (memory.py says why)
    try:
        agent = Agent(config)
    except ValueError as exc:  # bad model source, data, LoRA targets...: say what to fix, no traceback
        print(f"collm-agent: {exc}", file=sys.stderr)
        return 2
    grpc_server, _, _ = serve_grpc(agent, config.host, config.grpc_port, credentials=credentials)
    try:
        run_server(agent)  # starts the agent, serves HTTP until SIGTERM
    finally:
        grpc_server.stop(grace=5)
    return 0


def collm_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="collm", description="CoLLM: serve and fine-tune one LLM on the same replicas.")
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="a local cluster (agents, router, controller) serves an Azure trace while it fine-tunes; live view and a report folder")
    demo.add_argument("--duration", type=float, default=90.0, help="seconds of trace to replay (default 90)")
    demo.add_argument("--model", default="tiny", help="base model (tiny, smollm2, a HF directory or a .gguf file)")
    demo.add_argument("--replicas", type=int, default=3, help="replica agents, each with its own data domain (code, prose, code, ...; default 3)")
    demo.add_argument("--trace", default="conv", choices=["conv", "code"], help="Azure LLM trace to replay (default conv)")
    demo.add_argument("--policy", default="coexec", choices=["coexec", "static", "separated", "inferenceOnly"], help="scheduling policy (default coexec)")
    demo.add_argument("--rate", type=float, help="offered requests/s (default: 8 for 3 tiny replicas, scaled by replicas; a tenth for other models)")
    demo.add_argument("--out", help="report folder (default reports/demo-<timestamp>)")
    demo.add_argument("--json", help="also write every figure to this JSON file")
    demo.add_argument("--no-live", action="store_true", help="no live view (logs and CI)")

    adapter = sub.add_parser("adapter", help="adapter tools")
    adapter_cmds = adapter.add_subparsers(dest="adapter", required=True)
    export = adapter_cmds.add_parser("export", help="fetch an agent's adapter over gRPC and write it in PEFT format")
    export.add_argument("--from", dest="source", required=True, help="the agent's gRPC address, host:port")
    export.add_argument("--sha256", help="the adapter to export (default: the agent's current one)")
    export.add_argument("--out", required=True, help="output folder (adapter_config.json + adapter_model.safetensors)")

    bench = sub.add_parser("bench", help="benchmarks that print figures (JSON and a table)")
    kinds = bench.add_subparsers(dest="bench", required=True)
    coexec = kinds.add_parser("coexec", help="co-execution efficiency of one replica (docs/design.md's CEE)")
    coexec.add_argument("--model", default="tiny")
    coexec.add_argument("--json", help="write the figures to this file")
    coexec.add_argument("--ttft-ms", type=int, default=500)
    coexec.add_argument("--tpot-ms", type=int, default=50)
    coexec.add_argument("--trial-seconds", type=float, default=6.0, help="length of each offered-load step")
    coexec.add_argument("--start-rate", type=float, default=4.0, help="first offered load in requests/s")
    coexec.add_argument("--refinements", type=int, default=3, help="bisection steps after the first failing load")
    coexec.add_argument("--train-cap-tokens", type=int, default=128)
    coexec.add_argument("--data", help="training data (default: the standard library's json package)")
    overhead = kinds.add_parser("overhead", help="decode speed with no adapter vs an unmerged adapter with two live versions")
    overhead.add_argument("--model", default="tiny")
    overhead.add_argument("--json", help="write the figures to this file")
    overhead.add_argument("--batch", type=int, default=16)
    overhead.add_argument("--new-tokens", type=int, default=128)
    overhead.add_argument("--repeats", type=int, default=3)
    overhead.add_argument("--threads", type=int, default=1, help="intra-op threads of the engine")
    overhead.add_argument("--rank", type=int, default=8)

    eng = kinds.add_parser(
        "engine", help="this engine beside transformers (no adapter, peft with one and two adapters) and llama.cpp: decode tokens/s, TTFT, memory"
    )
    eng.add_argument("--json", help="write the figures to this file")
    eng.add_argument("--models", default="tiny,smollm2", help="comma-separated model sources (llama.cpp runs on smollm2 only)")
    eng.add_argument("--stacks", default="collm,hf,hf-peft,hf-peft-2,llama.cpp")
    eng.add_argument("--batches", default="1,8,16")
    eng.add_argument("--device", default="auto", help="auto: a GPU when torch sees one (bfloat16), else the CPU (float32)")
    eng.add_argument("--dtype", default="auto")
    eng.add_argument("--threads", type=int, default=1, help="intra-op threads of every stack")
    eng.add_argument("--new-tokens", type=int, default=64)
    eng.add_argument("--repeats", type=int, default=3)
    eng.add_argument("--rank", type=int, default=16)

    rnd = kinds.add_parser("round", help="federated round on loopback: wall time, bytes, freshness for LoRA ranks 8/16/64, FedAvg and FFA")
    rnd.add_argument("--json", help="write the figures to this file")
    rnd.add_argument("--no-big", action="store_true", help="skip the 8-participant ~10 MB case")
    fed = kinds.add_parser("federated", help="federated rounds on non-IID replicas against centralized training on the union")
    fed.add_argument("--json", help="write the figures to this file")
    fed.add_argument("--rounds", type=int, default=4)
    fed.add_argument("--local-steps", type=int, default=10)
    chaos = kinds.add_parser("chaos", help="faults injected into the dev cluster under traffic and rounds (from a clone; python -m e2e.chaos has more options)")
    chaos.add_argument("--json", help="write the figures to this file")
    chaos.add_argument("--scenario", action="append", help="run this scenario (repeatable; default: all six, see docs/reliability.md)")
    scale = kinds.add_parser("operator-scale", help="one operator, many CollmClusters on the emulated API server with stand-in agents (from a clone)")
    scale.add_argument("--json", help="write the figures to this file")
    scale.add_argument("--clusters", type=int, default=100)
    scale.add_argument("--steady-seconds", type=float, default=60.0, help="length of the measured phase once every cluster is ready")
    sim = kinds.add_parser("simulate", help="replay the Azure code trace through allocation + a latency model, per policy (pure, fast)")
    sim.add_argument("--json", help="write the figures to this file")
    sim.add_argument("--replicas", type=int, default=4)
    sim.add_argument("--slow-interval", type=float, default=10.0)
    sim.add_argument("--calibrate", metavar="GOODPUT_JSON", help="take the cost and quality models from a measured `collm bench goodput` JSON")
    sim.add_argument("--load", type=float, help="with --calibrate: offered load as a fraction of the calibrated capacity (default: the run's)")
    sim.add_argument("--duration", type=float, help="simulate this many seconds of the (time-scaled) trace (default: all of it)")
    sim.add_argument("--cluster", default="identical", choices=["identical", "hetero"], help="hetero: every other replica a device half as fast")
    goodput = kinds.add_parser(
        "goodput", help="cluster goodput (F x Q) of each scheduling policy: replica processes on cores of their own, the same requests, per-request quality"
    )
    goodput.add_argument(
        "--policies",
        default="coexec,static,separated,inferenceOnly,peft",
        help="comma-separated policies, run one after another (also the ablations fast-only, slow-only, no-reuse, no-gate)",
    )
    goodput.add_argument("--ablations", action="store_true", help="also run coexec's ablations: fast-only, slow-only, no-reuse, no-gate")
    goodput.add_argument(
        "--cluster",
        default="identical",
        choices=["identical", "hetero"],
        help="identical replicas, or hetero: replica-1 half as fast (a CPU quota) with 60%% of the home users",
    )
    goodput.add_argument("--trace", default="code", choices=["conv", "code"])
    goodput.add_argument("--replicas", type=int, default=2, help="replica processes, each pinned to a core of its own (default 2: this machine's cores)")
    goodput.add_argument("--loads", default="0.7", help="offered loads as fractions of the measured capacity, e.g. 0.3,0.6,0.9 (default 0.7)")
    goodput.add_argument("--duration", type=float, default=240.0, help="seconds a run lasts at the highest load (default 240: long enough for quality to move)")
    goodput.add_argument("--capacity", type=float, help="skip the capacity search: the cluster's capacity in req/s")
    goodput.add_argument("--attainment", type=float, default=0.9, help="SLO attainment that defines the capacity (default 0.9, DistServe's goodput)")
    goodput.add_argument("--round-interval", type=float, default=60.0, help="seconds between federated rounds (default 60)")
    goodput.add_argument("--ttft-ms", type=int, default=500)
    goodput.add_argument("--tpot-ms", type=int, default=50)
    goodput.add_argument("--json", help="write the figures to this file (plots go to a folder of the same name)")
    fresh = kinds.add_parser("freshness", help="time until every replica serves a newly published adapter, under streaming load")
    fresh.add_argument("--json", help="write the figures to this file")
    fresh.add_argument("--replicas", type=int, default=3)
    fresh.add_argument("--publishes", type=int, default=20)
    fresh.add_argument("--rate", type=float, default=10.0, help="offered requests/s during the publishes")
    fresh.add_argument("--rank", type=int, default=8, help="LoRA rank of the adapters published")
    edge = kinds.add_parser("cloud-edge", help="cloud-only, naive split, standalone edge and collaborative decoding over emulated links (docs/cloud-edge.md)")
    edge.add_argument("--json", help="write the figures to this file")
    edge.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2")
    edge.add_argument("--links", default="10ms-100Mbit,50ms-10Mbit", help="comma-separated emulated links (one-way latency, bandwidth per direction)")
    edge.add_argument("--clients", default="1,8", help="comma-separated counts of concurrent edge clients sharing the replica")
    edge.add_argument("--thresholds", default="0.5,0.8,0.9", help="routing thresholds of the collaborative runs")
    edge.add_argument("--quick", action="store_true", help="a few tokens and head steps: checks the benchmark, measures nothing")
    soak = kinds.add_parser("soak", help="a local cluster under steady trace load with a round every minute, watched for memory, thread and file leaks")
    soak.add_argument("--minutes", type=float, default=30.0, help="length of the run (default 30)")
    soak.add_argument("--json", help="write the figures to this file")
    soak.add_argument("--round-every", type=float, default=60.0, help="seconds between federated rounds (default 60)")
    soak.add_argument("--sample-every", type=float, default=10.0, help="seconds between samples of each process (default 10)")
    soak.add_argument("--warmup-minutes", type=float, help="minutes left out of the trends (default: the first 20%% of the run)")
    soak.add_argument("--replicas", type=int, default=2, help="replica agent processes, each on a core of its own (default 2)")
    soak.add_argument("--rate", type=float, default=2.0, help="offered requests/s through the router (default 2)")
    soak.add_argument("--trace", default="conv", choices=["conv", "code"])
    soak.add_argument(
        "--preload", metavar="LIB", help="a malloc to preload into the agents, as the image does: /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 (default: glibc's)"
    )
    over = kinds.add_parser("overload", help="1x, 2x and 3x the measured capacity through the router: SLO-aware shedding keeps admitted requests in the SLO")
    over.add_argument("--json", help="write the figures to this file")
    over.add_argument("--replicas", type=int, default=1, help="replica processes, one core each (default 1: the router and the client take the other core)")
    over.add_argument("--loads", default="1,2,3", help="comma-separated multiples of the measured capacity (default 1,2,3)")
    over.add_argument("--seconds", type=float, default=60.0, help="seconds of traffic per load (default 60)")
    over.add_argument("--capacity", type=float, help="skip the capacity search: the cluster's capacity in req/s")
    over.add_argument("--trace", default="code", choices=["conv", "code"])
    over.add_argument("--ttft-ms", type=int, default=500)
    over.add_argument("--tpot-ms", type=int, default=50)
    over.add_argument("--no-baseline", action="store_true", help="skip the run at the highest load with shedding off")
    alloc = kinds.add_parser("allocation", help="time the slow-timescale allocation for many replicas")
    alloc.add_argument("--json", help="write the figures to this file")
    alloc.add_argument("--replicas", type=int, default=1000)

    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "adapter":
        return _export_adapter(args.source, args.sha256, args.out)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(
            model=args.model,
            duration_s=args.duration,
            replicas=args.replicas,
            trace=args.trace,
            policy=args.policy,
            rate=args.rate,
            out_dir=args.out,
            json_path=args.json,
            live=not args.no_live,
        )
    elif args.bench == "coexec":
        from collm_bench import coexec as bench_coexec

        bench_coexec.run(
            args.model,
            data=args.data,
            ttft_ms=args.ttft_ms,
            tpot_ms=args.tpot_ms,
            trial_s=args.trial_seconds,
            start_rate=args.start_rate,
            refinements=args.refinements,
            train_cap_tokens=args.train_cap_tokens,
            json_path=args.json,
        )
    elif args.bench == "round":
        from collm_bench import rounds as bench_rounds

        bench_rounds.run_round_bench(json_path=args.json, big=not args.no_big)
    elif args.bench == "federated":
        from collm_bench import rounds as bench_rounds

        bench_rounds.run_federated_bench(rounds=args.rounds, local_steps=args.local_steps, json_path=args.json)
    elif args.bench == "overload":
        from collm_bench import overload

        loads = tuple(float(x) for x in args.loads.split(",") if x.strip())
        overload.run(
            replicas=args.replicas,
            trace=args.trace,
            loads=loads,
            seconds=args.seconds,
            ttft_ms=args.ttft_ms,
            tpot_ms=args.tpot_ms,
            capacity_rps=args.capacity,
            baseline=not args.no_baseline,
            json_path=args.json,
        )
    elif args.bench == "chaos":
        import importlib

        sys.path.insert(0, ".")  # the dev cluster and the runner live in the clone's e2e/, which is not installed
        chaos_main = importlib.import_module("e2e.chaos.runner").main
        return chaos_main([*(["--json", args.json] if args.json else []), *(f"--scenario={s}" for s in args.scenario or [])])
    elif args.bench == "operator-scale":
        from collm_bench import operator_scale

        operator_scale.run(clusters=args.clusters, steady_s=args.steady_seconds, json_path=args.json)
    elif args.bench == "simulate":
        from collm_bench import simulate

        simulate.run(
            replicas=args.replicas,
            slow_interval_s=args.slow_interval,
            calibrate_from=args.calibrate,
            load=args.load,
            duration_s=args.duration,
            json_path=args.json,
            cluster=args.cluster,
        )
    elif args.bench == "goodput":
        from collm_bench import goodput as bench_goodput

        loads = tuple(float(x) for x in args.loads.split(",") if x.strip())
        policies = [p.strip() for p in args.policies.split(",") if p.strip()]
        if args.ablations:
            policies += [a for a in bench_goodput.ABLATIONS if a not in policies]
        bench_goodput.run(
            policies,
            cluster=args.cluster,
            trace=args.trace,
            replicas=args.replicas,
            loads=loads,
            duration_s=args.duration,
            capacity_rps=args.capacity,
            attainment=args.attainment,
            round_interval_s=args.round_interval,
            ttft_ms=args.ttft_ms,
            tpot_ms=args.tpot_ms,
            json_path=args.json,
        )
    elif args.bench == "freshness":
        from collm_bench import freshness as bench_freshness

        bench_freshness.run(replicas=args.replicas, publishes=args.publishes, rate=args.rate, lora_rank=args.rank, json_path=args.json)
    elif args.bench == "soak":
        from collm_bench import soak as bench_soak

        bench_soak.run(
            minutes=args.minutes,
            round_every_s=args.round_every,
            sample_every_s=args.sample_every,
            warmup_minutes=args.warmup_minutes,
            replicas=args.replicas,
            rate=args.rate,
            trace=args.trace,
            preload=args.preload,
            json_path=args.json,
        )
    elif args.bench == "allocation":
        from collm_bench import allocation_bench

        allocation_bench.run(replicas=args.replicas, json_path=args.json)
    elif args.bench == "cloud-edge":
        from collm_bench import cloud_edge

        cloud_edge.run(
            tuple(m for m in args.models.split(",") if m),
            links=tuple(k for k in args.links.split(",") if k),
            clients=tuple(int(c) for c in args.clients.split(",") if c),
            thresholds=tuple(float(t) for t in args.thresholds.split(",") if t),
            quick=args.quick,
            json_path=args.json,
        )
    elif args.bench == "engine":
        from collm_bench import engine as bench_engine

        bench_engine.run(
            tuple(m for m in args.models.split(",") if m),
            stacks=tuple(s for s in args.stacks.split(",") if s),
            batches=tuple(int(b) for b in args.batches.split(",") if b),
            device=args.device,
            dtype=args.dtype,
            threads=args.threads,
            new_tokens=args.new_tokens,
            repeats=args.repeats,
            rank=args.rank,
            json_path=args.json,
        )
    elif args.bench == "overhead":
        from collm_bench import overhead as bench_overhead

        bench_overhead.run(
            args.model, batch=args.batch, new_tokens=args.new_tokens, repeats=args.repeats, threads=args.threads, rank=args.rank, json_path=args.json
        )
    return 0


def _export_adapter(source: str, sha256: str | None, out: str) -> int:

    from collm_rpc.client import AgentClient

    from .engine.lora import LoraSpec
    from .federated.export import export_peft
    from .federated.update import fetch_adapter

    with AgentClient(source) as peer:
        stats = peer.stats()
        sha = sha256 or (stats.adapter.sha256 if stats.adapter else "")
        tensors = fetch_adapter(peer, sha)
    spec = LoraSpec(rank=stats.lora_rank, alpha=stats.lora_alpha, target_modules=stats.lora_target_modules)
    path = export_peft(tensors, spec, out, base_model=stats.model, metadata={"sha256": sha})
    print(f"wrote adapter {sha[:12]} of {stats.replica_id} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(collm_main())
