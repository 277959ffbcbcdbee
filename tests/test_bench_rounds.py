"""`collm bench round` and `collm bench federated` end to end on the smallest settings.

Every figure must be present and finite, the JSON file must hold what the function returned, and
the figures must come from what was really run: one case per (rank, strategy) asked for, one
history entry per round asked for, and held-out losses that chain from round to round.
"""

from __future__ import annotations

import json
import math

import pytest

from collm_bench import rounds

from .helpers import numbers_in

ROUND_RANKS = (2, 4)  # the smallest adapters; two ranks so the adapter size can be checked to scale
FED_ROUNDS, FED_LOCAL_STEPS = 2, 2
FED_REPLICAS = 3  # fixed by run_federated_bench


def _is_figure(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_round_benchmark_writes_complete_json(tmp_path, tiny_model_dir):
    out = tmp_path / "round.json"
    result = rounds.run_round_bench(json_path=str(out), ranks=ROUND_RANKS, big=False)
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert all(math.isfinite(v) for v in numbers_in(saved))
    assert saved["benchmark"] == "round"
    assert saved["targets"] == {"aggregation_and_publish_s": 2.0, "freshness_s": 1.0, "failed_requests": 0}
    assert saved["machine"]["cpu_count"] >= 1

    cases = saved["cases"]
    assert [(c["rank"], c["strategy"]) for c in cases] == [(r, s) for r in ROUND_RANKS for s in ("fedavg", "ffa")], (
        "one case per rank and strategy asked for, no big case"
    )
    for c in cases:
        for key in (
            "adapter_bytes",
            "bytes_per_participant",
            "round_wall_s",
            "aggregation_s",
            "freshness_s",
            "aggregation_and_publish_s",
            "requests_during_round",
            "failed_requests",
        ):
            assert _is_figure(c[key]), (c["strategy"], c["rank"], key)
        assert c["participants"] == 3 and c["targets"] == ["q_proj", "v_proj"]
        assert c["succeeded"] is True, c
        assert c["aggregation_s"] > 0, c
        assert c["freshness_s"] > 0, "publishing to every replica over gRPC takes time"
        assert c["aggregation_and_publish_s"] == pytest.approx(c["aggregation_s"] + c["freshness_s"])
        assert c["round_wall_s"] > c["aggregation_and_publish_s"], "the round also trains and evaluates"
        assert c["failed_requests"] == 0
        assert c["requests_during_round"] > 0, "the load thread really served requests during the round"

    by = {(c["rank"], c["strategy"]): c for c in cases}
    small, large = ROUND_RANKS
    for strategy in ("fedavg", "ffa"):
        assert by[(large, strategy)]["adapter_bytes"] == by[(small, strategy)]["adapter_bytes"] * large // small, "LoRA size is linear in the rank"
    for r in ROUND_RANKS:
        fedavg, ffa = by[(r, "fedavg")], by[(r, "ffa")]
        assert fedavg["adapter_bytes"] == ffa["adapter_bytes"]
        assert fedavg["bytes_per_participant"] >= fedavg["adapter_bytes"], "FedAvg uploads the whole adapter"
        assert ffa["bytes_per_participant"] < fedavg["bytes_per_participant"], "FFA-LoRA uploads only B"
        assert 0.3 * fedavg["adapter_bytes"] < ffa["bytes_per_participant"] < 0.5 * fedavg["adapter_bytes"]


def test_federated_benchmark_writes_complete_json(tmp_path, tiny_model_dir):
    out = tmp_path / "federated.json"
    result = rounds.run_federated_bench(rounds=FED_ROUNDS, local_steps=FED_LOCAL_STEPS, json_path=str(out))
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert all(math.isfinite(v) for v in numbers_in(saved))
    assert saved["benchmark"] == "federated"
    for key in ("initial_loss", "federated_loss", "centralized_loss", "ratio", "target_ratio"):
        assert _is_figure(saved[key]) and saved[key] > 0, key
    assert saved["target_ratio"] == 1.1

    # What was asked for is what ran.
    assert saved["rounds"] == FED_ROUNDS and saved["local_steps"] == FED_LOCAL_STEPS
    assert saved["total_steps"] >= FED_ROUNDS * FED_LOCAL_STEPS * FED_REPLICAS  # they train on between rounds
    assert saved["packages"] == ["json", "http", "email"]
    history = saved["history"]
    assert [h["round"] for h in history] == list(range(1, FED_ROUNDS + 1))
    for h in history:
        assert h["succeeded"] is True and h["result"] == "Published", h
        assert _is_figure(h["eval_loss_before"]) and _is_figure(h["eval_loss_after"]), h
        assert h["eval_loss_after"] <= h["eval_loss_before"] + 0.02, "the eval gate (tolerance 0.02) let it through"

    # The held-out losses chain: round 1 starts from the initial adapter, each round from the one
    # the previous round published, and the final federated figure is the last round's candidate.
    assert history[0]["eval_loss_before"] == pytest.approx(saved["initial_loss"], rel=1e-6)
    for prev, nxt in zip(history, history[1:]):
        assert nxt["eval_loss_before"] == pytest.approx(prev["eval_loss_after"], rel=1e-6)
    assert history[-1]["eval_loss_after"] == pytest.approx(saved["federated_loss"], rel=1e-6)

    assert saved["ratio"] == pytest.approx(saved["federated_loss"] / saved["centralized_loss"], rel=1e-12)
    assert saved["federated_loss"] < saved["initial_loss"], "the federated rounds trained"
    assert saved["centralized_loss"] < saved["initial_loss"], "centralized training trained"
    assert 0.5 < saved["ratio"] < 1.5
