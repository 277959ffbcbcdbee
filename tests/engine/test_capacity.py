"""The online capacity profile recovers a known latency model."""

from __future__ import annotations

import random

import pytest

from replica_agent.engine.capacity import CapacityProfiler


def drive(profiler, *, cap, budget, fixed_ms, per_row_ms, train_tokens_per_s, iterations=3000, seed=0):
    rng = random.Random(seed)
    for _ in range(iterations):
        rows = rng.randint(1, 16)
        ms = fixed_ms + per_row_ms * rows + rng.uniform(-0.1, 0.1)
        profiler.observe_iteration(cap=cap, budget=budget, rows=rows, iteration_ms=ms, training_tokens=int(train_tokens_per_s * ms / 1000))


def test_profile_recovers_capacity_and_training_rate_per_level():
    profiler = CapacityProfiler(tpot_ms=20, max_batch=32, buckets=2, headroom=1.0)
    for _ in range(200):
        profiler.observe_request(40)
    drive(profiler, cap=128, budget=0, fixed_ms=2.0, per_row_ms=0.5, train_tokens_per_s=0)
    drive(profiler, cap=128, budget=128, fixed_ms=6.0, per_row_ms=0.5, train_tokens_per_s=5000)
    points = {p.cap: p for p in profiler.profile(128)}
    assert set(points) == {0, 128}
    mean_output = 40 * (1 - 0.98**200) + 32 * 0.98**200
    # no training: rows limited by max_batch (2 + 0.5*32 = 18 ms < 20): 32 rows / 18 ms
    assert points[0].requests_per_s == pytest.approx(32 / 0.018 / mean_output, rel=0.03)
    # full training: (20 - 6) / 0.5 = 28 rows in 20 ms
    assert points[128].requests_per_s == pytest.approx(28 / 0.020 / mean_output, rel=0.05)
    assert points[128].training_tokens_per_s == pytest.approx(5000, rel=0.05)
    assert points[0].training_tokens_per_s == 0
    assert points[128].requests_per_s < points[0].requests_per_s


def test_levels_without_enough_samples_are_left_out():
    profiler = CapacityProfiler(tpot_ms=50, max_batch=8, buckets=4)
    drive(profiler, cap=64, budget=0, fixed_ms=1, per_row_ms=1, train_tokens_per_s=0, iterations=10)
    assert profiler.profile(64) == []
    with pytest.raises(ValueError):
        CapacityProfiler(tpot_ms=0, max_batch=8)
