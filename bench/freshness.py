"""`collm bench freshness`: how fast a new adapter goes live on every replica, under streaming load.

A local cluster (agents, router, controller with policy inferenceOnly so that no round interferes)
serves a slice of the Azure trace through the router while a new adapter is published again and
again: the first replica plays the aggregator (the new version appears in its store: the end of
aggregation, t0), then every other replica is sent `Publish` over gRPC at once, as the round
driver does, fetching the adapter from the first one. Freshness = the last replica's switch time
(`switched_unix` in its reply) - t0; each switch is then checked in the replica's own store (the
replica rests on the new global version). The replicas train nothing and publish no local
revision here: this measures the switch alone. Failed requests are counted at the client.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from collm_rpc.proto import collm_pb2 as pb
from replica_agent.engine.model_host import load_base_model
from replica_agent.local.cluster import LocalDeployment, replica_configs
from replica_agent.local.controller import ControllerSettings
from replica_agent.local.traffic import TrafficReplay, trace_slice
from replica_agent.local.workload import workload_for
from replica_agent.report import machine, print_table, write_json


def run(
    *,
    replicas: int = 3,
    publishes: int = 20,
    interval_s: float = 1.0,
    rate: float = 10.0,
    trace: str = "conv",
    lora_rank: int = 8,
    json_path: str | None = None,
) -> dict:
    base = load_base_model("tiny")
    duration = publishes * interval_s + 4.0
    configs = replica_configs(replicas, lora_rank=lora_rank, lora_alpha=2 * lora_rank, train_cap_tokens=0, revision_every_seconds=0)
    deployment = LocalDeployment.start(configs, ControllerSettings(policy="inferenceOnly", slow_interval_s=2.0), base=base)
    cases = []
    try:
        names = list(deployment.replicas)
        source_name, source = names[0], deployment.replicas[names[0]].agent
        clients = {n: deployment.client(n) for n in names[1:]}
        traffic = TrafficReplay(
            deployment.router_url, workload_for(configs, trace_slice(trace, rate=rate, duration_s=duration), base.tokenizer), 1000, 100
        ).start()
        time.sleep(2.0)  # traffic flowing before the first publish
        generator = torch.Generator().manual_seed(0)
        with ThreadPoolExecutor(max_workers=max(1, len(clients))) as pool:
            for i in range(publishes):
                tensors = {k: v + 1e-3 * torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in source.store.current.tensors.items()}
                t0 = time.time()
                version = source.store.publish(tensors, cluster_version=i + 1)
                publish = pb.PublishRequest(
                    round_id=f"fresh-{i}", sha256=version.sha256, source=deployment.replicas[source_name].grpc_address, cluster_version=i + 1
                )
                replies = list(pool.map(lambda n, request=publish: clients[n].publish(request), clients))
                switched = [r.switched_unix for r in replies]
                live = [deployment.replicas[n].agent.store.global_version.sha256 == version.sha256 for n in names]
                cases.append(
                    {"publish": i + 1, "freshness_s": max(switched, default=t0) - t0, "per_replica_s": [s - t0 for s in switched], "all_serving": all(live)}
                )
                time.sleep(max(0.0, interval_s - (time.time() - t0)))
        traffic.wait(120)
        for c in clients.values():
            c.close()
    finally:
        deployment.stop()
    records = list(traffic.records)
    values = [c["freshness_s"] for c in cases]
    result = {
        "benchmark": "freshness",
        "replicas": replicas,
        "lora_rank": lora_rank,
        "adapter_bytes": sum(t.numel() * t.element_size() for t in source.store.current.tensors.values()),
        "publishes": publishes,
        "freshness_s_p50": statistics.median(values),
        "freshness_s_max": max(values),
        "all_replicas_switched": all(c["all_serving"] for c in cases),
        "requests_sent": traffic.sent,
        "requests_answered": sum(1 for r in records if r.ok),
        "failed_requests": sum(1 for r in records if not r.ok) + traffic.sent - len(records),
        "offered_rate": rate,
        "targets": {"freshness_s": 1.0, "failed_requests": 0},
        "cases": cases,
        "machine": machine(),
    }
    print_table(
        f"Adapter freshness under load ({replicas} replicas, {publishes} publishes, {rate:g} req/s through the router)",
        ["figure", "value", "target"],
        [
            ["freshness p50 (s)", result["freshness_s_p50"], "<= 1"],
            ["freshness max (s)", result["freshness_s_max"], "<= 1"],
            ["every replica switched", str(result["all_replicas_switched"]), "True"],
            ["requests sent / answered", f"{result['requests_sent']} / {result['requests_answered']}", ""],
            ["failed requests", result["failed_requests"], "0"],
        ],
    )
    write_json(result, json_path)
    return result
