"""`collm bench allocation`: how long one slow-timescale `allocate()` takes for a large cluster.

Random but seeded replicas (profiles of five measured-looking points, 5% unhealthy, mixed loss
slopes and data sizes); the load is set to a share of the cluster's inference-only capacity so
that the water-filling really lowers caps (the expensive path). Median of several runs.
"""

from __future__ import annotations

import random
import statistics
import time

from collm_control.allocation import POLICIES, CapacityProfile, ReplicaState, allocate

TARGET_MS = 100.0
CAPS = (0, 64, 128, 256, 512)


def random_replicas(count: int, *, seed: int = 0, unhealthy_share: float = 0.05) -> list[ReplicaState]:
    rng = random.Random(seed)
    replicas = []
    for i in range(count):
        alone_rps, alone_tokens = rng.uniform(2.0, 12.0), rng.uniform(2000.0, 8000.0)
        capacity = sorted([1.0] + [rng.uniform(0.4, 1.0) for _ in CAPS[1:]], reverse=True)
        training = sorted([0.0] + [rng.uniform(0.1, 1.0) for _ in CAPS[1:]])
        profile = CapacityProfile(tuple((cap, alone_rps * a, alone_tokens * b) for cap, a, b in zip(CAPS, capacity, training)))
        replicas.append(ReplicaState(f"replica-{i:05d}", rng.random() >= unhealthy_share, profile, rng.uniform(0.0, 1e-7), rng.randint(0, 10_000_000)))
    return replicas


def time_allocate(replicas, load: float, *, policy: str = "coexec", repeats: int = 7) -> list[float]:
    """Wall-clock milliseconds of each of `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        allocate(load, replicas, policy=policy, participation_fraction=0.5)
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def run(*, replicas: int = 1000, repeats: int = 7, load_share: float = 0.75, seed: int = 0, json_path: str | None = None) -> dict:
    """Time allocate() for every policy on `replicas` random replicas; print a table, write JSON."""
    from replica_agent.report import machine, print_table, write_json  # imports torch: only for the report

    cluster = random_replicas(replicas, seed=seed)
    capacity = sum(r.profile.capacity_at(r.profile.min_cap) for r in cluster if r.healthy)
    load = load_share * 0.9 * capacity
    per_policy = {}
    for policy in POLICIES:
        times = time_allocate(cluster, load, policy=policy, repeats=repeats)
        plan = allocate(load, cluster, policy=policy, participation_fraction=0.5)
        per_policy[policy] = {
            "median_ms": statistics.median(times),
            "max_ms": max(times),
            "runs_ms": times,
            "overloaded": plan.overloaded,
            "replicas_training": sum(1 for cap in plan.caps.values() if cap > 0),
            "participants": len(plan.participants),
        }
    result = {
        "benchmark": "allocation",
        "replicas": replicas,
        "repeats": repeats,
        "seed": seed,
        "predicted_load_rps": load,
        "load_share": load_share,
        "inference_only_capacity_rps": capacity,
        "target_ms": TARGET_MS,
        "median_ms": per_policy["coexec"]["median_ms"],
        "meets_target": per_policy["coexec"]["median_ms"] < TARGET_MS,
        "policies": per_policy,
        "machine": machine(),
    }
    print_table(
        f"allocate(), {replicas:,} replicas, load {load_share:.0%} of the servable (median of {repeats})",
        ["policy", "median ms", "max ms", "replicas training", "participants"],
        [[p, v["median_ms"], v["max_ms"], v["replicas_training"], v["participants"]] for p, v in per_policy.items()],
    )
    write_json(result, json_path)
    return result
