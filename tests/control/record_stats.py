"""Re-record tests/control/recorded/{local,operator}.json (`python -m tests.control.record_stats`).

Starts two replica processes of the tiny model (the local mode), replays a slice of the Azure code
trace through the router, and every `interval` seconds reads every agent's GetStats twice (kept as AgentStats.as_dict()): as the
local controller reads them (collm_rpc.client.read_stats) and as the operator's
AgentPool does (collm_operator.agents). Each recording is a list of ticks (time, arrivals since the
last tick, stats per replica) that tests/control/test_decide.py replays through decide().
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from collm_control.stats import AgentStats
from collm_operator.agents import AgentPool
from collm_rpc.client import AgentClient, read_stats
from replica_agent.engine.model_host import load_base_model
from replica_agent.local.cluster import LocalDeployment, replica_configs
from replica_agent.local.controller import ControllerSettings
from replica_agent.local.traffic import TrafficReplay, trace_slice
from replica_agent.local.workload import workload_for

OUT = Path(__file__).parent / "recorded"


def as_json(stats: dict[str, AgentStats | None]) -> dict[str, dict | None]:
    return {name: st.as_dict() if st is not None else None for name, st in stats.items()}


def record(duration_s: float = 40.0, interval_s: float = 2.0, rate: float = 4.0) -> None:
    configs = replica_configs(2, ttft_ms=1000, tpot_ms=100, seq_len=128, eval_batches=2)
    base = load_base_model("tiny")
    workload = workload_for(configs, trace_slice("code", rate=rate, duration_s=duration_s), base.tokenizer)
    settings = ControllerSettings(policy="coexec", slow_interval_s=interval_s, round_interval_s=1e9)  # the recording runs no round
    deployment = LocalDeployment.start(configs, settings, processes=True)
    pool = AgentPool()
    clients = {name: AgentClient(r.grpc_address, timeout=10) for name, r in deployment.replicas.items()}
    addresses = {name: r.grpc_address for name, r in deployment.replicas.items()}
    recordings: dict[str, list] = {"local": [], "operator": []}
    try:
        traffic = TrafficReplay(deployment.router_url, workload, 1000, 100)
        deployment.arrivals = lambda: traffic.sent
        traffic.start()
        seen = 0
        end = time.time() + duration_s
        while time.time() < end:
            time.sleep(interval_s)
            arrivals, seen = traffic.sent - seen, traffic.sent
            now = time.time()
            recordings["local"].append({"now": now, "arrivals": arrivals, "stats": as_json(read_stats(clients))})
            recordings["operator"].append({"now": now, "arrivals": arrivals, "stats": as_json(pool.stats(addresses))})
        traffic.wait(60)
    finally:
        pool.close()
        for client in clients.values():
            client.close()
        deployment.stop()
        deployment.cleanup()
    OUT.mkdir(exist_ok=True)
    for source, ticks in recordings.items():
        data = {"source": source, "policy": "coexec", "slow_interval_s": interval_s, "round_interval_s": 10.0, "ticks": ticks}
        (OUT / f"{source}.json").write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        print(f"wrote {OUT / f'{source}.json'}: {len(ticks)} ticks")


if __name__ == "__main__":
    record()
