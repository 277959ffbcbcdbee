"""Re-record tests/control/recorded/*.json (`python -m tests.control.record_stats [local|operator|hetero]`).

Both recordings come from the decision logs the two adapters write when COLLM_DECISION_LOG names a
file (collm_control.decide.log_decision): every slow-timescale step appends what `decide()` was
given, the agents' typed stats included.

- local: the goodput benchmark's path: `run_policy` with two replica processes of the tiny model
  (the local mode's controller), a slice of the Azure code trace replayed through the router.
- hetero: the same on the heterogeneous cluster of `collm bench goodput --cluster hetero`
  (replica-1 throttled to a share of its core, a larger data set on replica-0, skewed home load).
- operator: the operator's e2e scenarios on the emulated cluster (`e2e/`): the real operator
  (kopf) against the Kubernetes API emulator and real agent processes, while rounds publish.

Each recording keeps `KEEP` steps (the operator's first, the local runs' last, once the agents'
capacity profiles have settled), which test_decide.py replays through decide().
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).parent / "recorded"
ROOT = Path(__file__).resolve().parents[2]
KEEP = 24


def read_log(path: Path, source_prefix: str, *, last: bool = False) -> list[dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [r for r in lines if r["source"].startswith(source_prefix)]
    return steps[-KEEP:] if last else steps[:KEEP]


def record_local(log: Path, cluster: str = "identical", duration_s: float = 90.0, rate: float = 5.0) -> None:
    from collm_bench.goodput import CLUSTERS, benchmark_configs
    from replica_agent.engine.model_host import load_base_model
    from replica_agent.local.controller import ControllerSettings
    from replica_agent.local.run import run_policy
    from replica_agent.local.traffic import trace_slice
    from replica_agent.local.workload import workload_for

    os.environ["COLLM_DECISION_LOG"] = str(log)
    base = load_base_model("tiny")
    kind = CLUSTERS[cluster]
    configs = benchmark_configs(2, model="tiny", ttft_ms=500, tpot_ms=50)
    arrivals = trace_slice("code", rate=rate, duration_s=duration_s)
    workload = workload_for(configs, arrivals, base.tokenizer, home_skew=kind.home_skew)
    settings = ControllerSettings(policy="coexec", slow_interval_s=2.5, round_interval_s=15.0, local_steps=4, ttft_ms=500, tpot_ms=50)
    run_policy(configs, settings, workload, base=base, processes=True, drain_s=30.0, throttle=kind.throttle)


def record_operator(log: Path) -> None:
    env = dict(os.environ, COLLM_DECISION_LOG=str(log))
    tests = [f"e2e/test_operator_e2e.py::{t}" for t in ("test_apply_the_example_reaches_ready_with_an_adapter", "test_rounds_publish_and_history_is_pruned")]
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", *tests], cwd=ROOT, env=env, check=True, timeout=900)


def main(which: list[str]) -> None:
    OUT.mkdir(exist_ok=True)
    for name in which:
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "decisions.jsonl"
            if name == "operator":
                record_operator(log)
                steps = read_log(log, "operator:")
            else:
                record_local(log, "hetero" if name == "hetero" else "identical")
                steps = read_log(log, "local:", last=True)  # the agents' capacity profiles have settled by then
        if len(steps) < 3:
            raise SystemExit(f"{name}: only {len(steps)} decisions were logged")
        (OUT / f"{name}.json").write_text(json.dumps({"recorded_from": name, "steps": steps}, indent=1, sort_keys=True) + "\n")
        print(f"wrote {OUT / f'{name}.json'}: {len(steps)} steps")


if __name__ == "__main__":
    main(sys.argv[1:] or ["local", "hetero", "operator"])
