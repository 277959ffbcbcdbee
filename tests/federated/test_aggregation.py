"""Aggregation strategies: exact FedAvg and FFA-LoRA, robustness to bad updates, DP noise."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from replica_agent.engine.lora import LoraSpec, lora_keys
from replica_agent.federated.aggregation import (
    AggregationError,
    CoordinateMedian,
    FedAvg,
    FFALoRA,
    Robust,
    TrimmedMean,
    build_strategy,
    clip_update,
    update_norm,
)
from replica_agent.federated.update import apply_delta, make_update

from .test_update import DIMS, global_adapter, trained, updates_for


def weighted_mean(updates, weights=None):
    weights = weights or [u.num_samples for u in updates]
    total = sum(weights)
    return {k: sum(w * u.delta[k].double() for w, u in zip(weights, updates)) / total for k in updates[0].delta}


def distance(a, b):
    return update_norm({k: a[k].double() - b[k].double() for k in a})


def poison(update, factor):
    return replace(update, participant="evil", delta={k: v * factor for k, v in update.delta.items()})


def test_fedavg_is_weighted_by_num_samples():
    updates = updates_for(global_adapter(), [1, 3, 6])
    result = FedAvg().aggregate(updates)
    assert result.weights == pytest.approx({"p0": 0.1, "p1": 0.3, "p2": 0.6})
    assert result.accepted == ("p0", "p1", "p2") and result.rejected == () and result.clipped == ()
    expected = weighted_mean(updates)
    for key in expected:
        torch.testing.assert_close(result.delta[key].double(), expected[key], rtol=0, atol=1e-6)


def test_ffa_aggregate_of_b_times_shared_a_is_exact():
    base = global_adapter()
    updates = updates_for(base, [2, 5, 9], only_b=True)
    result = FFALoRA().aggregate(updates)
    assert set(result.delta) == {k for k in base if k.endswith(".lora_B.weight")}
    merged = apply_delta(base, result.delta)
    weights = [u.num_samples / 16 for u in updates]
    for layer in range(DIMS.layers):
        for module in LoraSpec().target_modules:
            a_key, b_key = lora_keys(layer, module)
            a = base[a_key].double()
            exact = sum(w * (base[b_key].double() + u.delta[b_key].double()) @ a for w, u in zip(weights, updates))
            torch.testing.assert_close(merged[b_key].double() @ a, exact, rtol=0, atol=1e-6)


def test_ffa_rejects_an_update_that_trained_a():
    base = global_adapter()
    good = updates_for(base, [2, 5], train_a=False)  # full updates whose A deltas are zero: accepted
    bad = make_update("p9", "r1", trained(base, seed=9), base, 4)
    result = FFALoRA().aggregate(good + [bad])
    assert result.accepted == ("p0", "p1")
    assert [(r.participant, r.reason) for r in result.rejected] == [("p9", "TrainedA")]
    assert "freeze A" in result.rejected[0].detail


def honest_round(n=9, **kwargs):
    """Honest participants agree on a direction (shared component) and differ a little."""
    return updates_for(global_adapter(), [10] * n, common_seed=77, spread=0.02, **kwargs)


def test_poisoned_update_is_clipped_and_bounded():
    honest = honest_round()
    evil = poison(honest[0], -100.0)
    clip = 1.2 * max(update_norm(u.delta) for u in honest)
    result = build_strategy("fedavg", clip_norm=clip).aggregate(honest + [evil])
    assert result.clipped == ("evil",) and "evil" in result.accepted
    assert result.record()["clipped"] == ["evil"] and result.record()["clipNorm"] == clip
    honest_mean = weighted_mean(honest)
    # One participant in ten moves the mean by at most a tenth of (clip norm + honest mean norm).
    bound = 0.1 * (clip + update_norm(honest_mean))
    assert distance(result.delta, honest_mean) <= bound + 1e-6
    assert distance(FedAvg().aggregate(honest + [evil]).delta, honest_mean) > 20 * bound


def test_poisoned_update_is_rejected_as_outlier_and_nan_update_is_rejected():
    honest = honest_round()
    evil = poison(honest[0], 100.0)
    nan = replace(honest[1], participant="broken", delta={k: v.clone() for k, v in honest[1].delta.items()})
    next(iter(nan.delta.values()))[0, 0] = float("nan")
    result = build_strategy("fedavg", clip_norm=1e6, outlier_factor=3.0).aggregate(honest + [evil, nan])
    reasons = {r.participant: r.reason for r in result.rejected}
    assert reasons == {"broken": "NonFinite", "evil": "NormOutlier"}
    assert result.accepted == tuple(u.participant for u in honest)
    record = json.loads(json.dumps(result.record()))
    assert {r["participant"]: r["reason"] for r in record["rejected"]} == reasons
    assert "NaN" in next(r["detail"] for r in record["rejected"] if r["reason"] == "NonFinite")
    honest_mean = weighted_mean(honest)
    assert distance(result.delta, honest_mean) < 1e-5


def test_nan_update_is_rejected_by_every_rule_even_without_options():
    honest = honest_round(3, train_a=False)  # zero A deltas: valid for FFA-LoRA too
    nan = replace(honest[2], participant="broken", delta={k: v * float("inf") for k, v in honest[2].delta.items()})
    for name in ("fedavg", "ffa", "median", "trimmed_mean"):
        result = build_strategy(name).aggregate(honest + [nan])
        assert [(r.participant, r.reason) for r in result.rejected] == [("broken", "NonFinite")], name
        assert all(torch.isfinite(t).all() for t in result.delta.values())


def test_wrong_base_shape_mismatch_and_duplicates_are_rejected():
    base = global_adapter()
    updates = updates_for(base, [1, 1, 1])
    other_base = make_update("old", "r1", trained(global_adapter(seed=5), seed=3), global_adapter(seed=5), 1)
    short = replace(updates[0], participant="short", delta={k: v for k, v in list(updates[0].delta.items())[1:]})
    result = FedAvg().aggregate(updates + [other_base, short, updates[1]])
    assert [(r.participant, r.reason) for r in result.rejected] == [("old", "WrongBase"), ("short", "ShapeMismatch"), ("p1", "Duplicate")]
    assert result.accepted == ("p0", "p1", "p2")
    # The round's base, when given, wins over the majority.
    only_old = FedAvg().aggregate(updates + [other_base], base_sha256=other_base.base_sha256)
    assert only_old.accepted == ("old",)


def test_every_update_rejected_raises_with_reasons():
    honest = honest_round(2)
    broken = [replace(u, delta={k: v * float("nan") for k, v in u.delta.items()}) for u in honest]
    with pytest.raises(AggregationError, match="every update was rejected: p0: NonFinite"):
        build_strategy("fedavg", clip_norm=1.0).aggregate(broken)
    with pytest.raises(AggregationError, match="no updates"):
        FedAvg().aggregate([])


@pytest.mark.parametrize("rule", [CoordinateMedian(), TrimmedMean(0.1)], ids=["median", "trimmed_mean"])
def test_median_and_trimmed_mean_resist_one_outlier(rule):
    honest = honest_round(5)
    evil = poison(honest[0], 100.0)
    honest_mean = weighted_mean(honest)
    scale = update_norm(honest_mean)
    result = rule.aggregate(honest + [evil])
    assert result.accepted == tuple(u.participant for u in honest) + ("evil",)
    assert result.weights == pytest.approx({p: 1 / 6 for p in result.accepted})
    assert distance(result.delta, honest_mean) < 0.15 * scale
    assert distance(FedAvg().aggregate(honest + [evil]).delta, honest_mean) > 10 * scale


def test_median_of_an_even_count_averages_the_middle_two():
    base = global_adapter()
    updates = updates_for(base, [1, 1, 1, 1])
    result = CoordinateMedian().aggregate(updates)
    key = next(iter(base))
    stacked = torch.stack([u.delta[key] for u in updates]).double().sort(0).values
    torch.testing.assert_close(result.delta[key].double(), (stacked[1] + stacked[2]) / 2, rtol=0, atol=1e-6)


def test_dp_noise_has_the_configured_std_and_is_recorded():
    base = global_adapter()
    zero = [make_update(f"p{i}", "r1", base, base, 5) for i in range(4)]  # all-zero deltas: the result is pure noise
    strategy = build_strategy("fedavg", clip_norm=2.0, noise_multiplier=1.0, seed=123)
    result = strategy.aggregate(zero)
    expected_std = 1.0 * 2.0 / 4
    assert result.noise_std == pytest.approx(expected_std)
    assert result.record()["noiseStd"] == pytest.approx(expected_std) and result.record()["noiseMultiplier"] == 1.0
    noise = torch.cat([t.flatten() for t in result.delta.values()]).double()
    assert noise.numel() > 1500
    assert abs(noise.std().item() / expected_std - 1) < 0.1
    assert abs(noise.mean().item()) < 4 * expected_std / noise.numel() ** 0.5
    again = build_strategy("fedavg", clip_norm=2.0, noise_multiplier=1.0, seed=123).aggregate(zero)
    assert all(torch.equal(again.delta[k], result.delta[k]) for k in result.delta)
    assert not torch.equal(strategy.aggregate(zero).delta[next(iter(base))], result.delta[next(iter(base))])


def test_dp_mean_is_unweighted_over_clipped_updates():
    updates = updates_for(global_adapter(), [1, 100, 1000])
    clip = 0.5 * min(update_norm(u.delta) for u in updates)
    result = build_strategy("fedavg", clip_norm=clip, noise_multiplier=0.0).aggregate(updates)
    assert result.weights == pytest.approx({"p0": 1 / 3, "p1": 1 / 3, "p2": 1 / 3})
    assert result.clipped == ("p0", "p1", "p2")
    expected = weighted_mean([clip_update(u, clip) for u in updates], [1, 1, 1])
    assert distance(result.delta, expected) < 1e-5


def test_clip_update_scales_down_to_the_norm_only_when_above():
    update = updates_for(global_adapter(), [1])[0]
    norm = update_norm(update.delta)
    assert clip_update(update, 2 * norm) is update
    clipped = clip_update(update, norm / 4)
    assert update_norm(clipped.delta) == pytest.approx(norm / 4, rel=1e-5)
    assert clipped.sha256 != update.sha256


def test_build_strategy_names_and_validation():
    assert isinstance(build_strategy("fedavg"), FedAvg) and isinstance(build_strategy("ffa"), FFALoRA)
    assert isinstance(build_strategy("median"), CoordinateMedian)
    assert build_strategy("trimmed_mean", trim_fraction=0.2).trim_fraction == 0.2
    robust = build_strategy("ffa", clip_norm=1.0)
    assert isinstance(robust, Robust) and robust.name == "ffa"
    with pytest.raises(ValueError, match="fedavg, ffa, median, trimmed_mean"):
        build_strategy("krum")
    with pytest.raises(ValueError, match="needs clip_norm"):
        build_strategy("fedavg", noise_multiplier=1.0)
    with pytest.raises(ValueError, match="calibrated for the mean"):
        build_strategy("median", clip_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="trim_fraction"):
        build_strategy("trimmed_mean", trim_fraction=0.5)
