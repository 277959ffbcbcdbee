import math

import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from replica_agent.engine.mixer import (
    REASONS,
    BatchMixer,
    IterationStats,
    LinearLatencyModel,
    MixDecision,
    MixerSettings,
    simulate,
)

CAP = 256
SLO = MixerSettings(ttft_ms=500.0, tpot_ms=50.0, cap_tokens_per_iteration=CAP)  # increase 32, aim 40 ms
# 10 ms per iteration + 1 ms per row + 0.05 ms per training token (cap adds 12.8 ms).
MODEL = LinearLatencyModel(base_ms=10.0, per_row_ms=1.0, per_prefill_token_ms=0.01, per_training_token_ms=0.05)


def at_cap() -> BatchMixer:
    mixer = BatchMixer(SLO)
    assert simulate(mixer, MODEL, [0]) == [MixDecision(CAP, "Idle")]
    return mixer


def stats(**kw) -> IterationStats:
    base = dict(iteration_ms=15.0, decode_rows=4, prefill_tokens=0, queue_depth=0)
    base.update(kw)
    return IterationStats(**base)


def test_starts_at_zero_and_ramps_additively_to_cap():
    mixer = BatchMixer(SLO)
    assert mixer.training_tokens == 0
    decisions = simulate(mixer, MODEL, [4] * 9)
    assert [d.training_tokens for d in decisions] == [32, 64, 96, 128, 160, 192, 224, 256, 256]
    assert [d.reason for d in decisions] == ["Headroom"] * 7 + ["Capped"] * 2


def test_light_load_at_cap_stays_at_cap():
    mixer = at_cap()
    decisions = simulate(mixer, MODEL, [4] * 20)  # 26.8 ms with full training, under 40 ms
    assert decisions == [MixDecision(CAP, "Capped")] * 20
    assert mixer.training_share == 1.0


def test_overload_cuts_training_to_zero_then_recovers_within_bound():
    mixer = at_cap()
    # 60 rows: 70 ms even without training, over the 50 ms TPOT SLO.
    overload = simulate(mixer, MODEL, [60] * 6)
    assert overload[0] == MixDecision(128, "Pressure")
    first_zero = next(i for i, d in enumerate(overload) if d.training_tokens == 0)
    assert first_zero + 1 <= SLO.overload_iterations + 2
    assert overload[1:] == [MixDecision(0, "Overload")] * 5

    bound = math.ceil(CAP / SLO.increase)
    assert bound == 8
    recovery = simulate(mixer, MODEL, [4] * (bound + 2))
    tokens = [d.training_tokens for d in recovery]
    assert tokens[bound - 1] == CAP
    assert all(t < CAP for t in tokens[: bound - 1])
    assert tokens == [32, 64, 96, 128, 160, 192, 224, 256, 256, 256]


def test_training_pushing_over_headroom_saw_tooths_below_slo():
    mixer = at_cap()
    # 20 rows: 30 ms alone; training above ~200 tokens crosses the 40 ms aim, never the 50 ms SLO.
    decisions = simulate(mixer, MODEL, [20] * 9)
    assert [d.training_tokens for d in decisions] == [128, 160, 192, 224, 112, 144, 176, 208, 104]
    assert [d.reason for d in decisions] == ["Pressure"] + ["Headroom"] * 3 + ["Pressure"] + ["Headroom"] * 3 + ["Pressure"]


def test_idle_jumps_to_cap_even_after_overload():
    mixer = at_cap()
    simulate(mixer, MODEL, [60] * 3)
    assert mixer.training_tokens == 0
    assert mixer.decide(IterationStats(iteration_ms=1.0, decode_rows=0, prefill_tokens=0, queue_depth=0)) == MixDecision(CAP, "Idle")
    # The violation streak was reset: one more bad iteration halves, it does not zero.
    assert simulate(mixer, MODEL, [60]) == [MixDecision(128, "Pressure")]


def test_tpot_falls_back_to_iteration_time_when_engine_gives_none():
    mixer = at_cap()
    assert mixer.decide(stats(iteration_ms=45.0, tpot_ms=None)) == MixDecision(128, "Pressure")
    assert mixer.decide(stats(iteration_ms=45.0, tpot_ms=20.0)) == MixDecision(160, "Headroom")


def test_ttft_pressure_then_overload():
    mixer = at_cap()
    assert mixer.decide(stats(ttft_ms=450.0, tpot_ms=20.0)) == MixDecision(128, "Pressure")  # > 400 aim
    assert mixer.decide(stats(ttft_ms=600.0, tpot_ms=20.0)) == MixDecision(64, "Pressure")  # first violation
    assert mixer.decide(stats(ttft_ms=600.0, tpot_ms=20.0)) == MixDecision(0, "Overload")


def test_growing_queue_is_pressure_then_overload_steady_queue_is_not():
    mixer = at_cap()
    assert mixer.decide(stats(queue_depth=3)) == MixDecision(128, "Pressure")
    assert mixer.decide(stats(queue_depth=3)) == MixDecision(160, "Headroom")
    assert mixer.decide(stats(queue_depth=5)) == MixDecision(80, "Pressure")
    assert mixer.decide(stats(queue_depth=9)) == MixDecision(0, "Overload")
    assert mixer.decide(stats(queue_depth=2)) == MixDecision(32, "Headroom")


def test_cap_zero_is_always_disabled():
    mixer = BatchMixer(MixerSettings(ttft_ms=500.0, tpot_ms=50.0, cap_tokens_per_iteration=0))
    decisions = simulate(mixer, MODEL, [0, 4, 60, 0])
    assert decisions == [MixDecision(0, "Disabled")] * 4
    assert mixer.training_share == 0.0


def test_update_settings_clamps_budget_to_new_cap():
    mixer = at_cap()
    mixer.update_settings(MixerSettings(ttft_ms=500.0, tpot_ms=50.0, cap_tokens_per_iteration=100))
    assert mixer.training_tokens == 100
    assert mixer.training_share == 1.0
    assert mixer.settings.cap_tokens_per_iteration == 100
    mixer.update_settings(SLO)  # raising the cap does not jump; it ramps
    assert mixer.training_tokens == 100
    assert simulate(mixer, MODEL, [4]) == [MixDecision(132, "Headroom")]
    mixer.update_settings(MixerSettings(ttft_ms=500.0, tpot_ms=50.0, cap_tokens_per_iteration=0))
    assert mixer.training_tokens == 0
    assert mixer.decide(stats()) == MixDecision(0, "Disabled")


def test_increase_defaults_to_an_eighth_of_cap_at_least_one():
    assert SLO.increase == 32
    assert MixerSettings(ttft_ms=1, tpot_ms=1, cap_tokens_per_iteration=3).increase == 1
    assert MixerSettings(ttft_ms=1, tpot_ms=1, cap_tokens_per_iteration=3, increase_tokens=2).increase == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"ttft_ms": 0}, "ttft_ms must be a positive"),
        ({"tpot_ms": -5.0}, "tpot_ms must be a positive"),
        ({"tpot_ms": float("nan")}, "tpot_ms must be a positive"),
        ({"cap_tokens_per_iteration": -1}, "cap_tokens_per_iteration must be an integer >= 0"),
        ({"cap_tokens_per_iteration": 1.5}, "cap_tokens_per_iteration must be an integer >= 0"),
        ({"headroom": 0}, r"headroom must be in \(0, 1\]"),
        ({"headroom": 1.2}, r"headroom must be in \(0, 1\]"),
        ({"decrease_factor": 1.0}, r"decrease_factor must be in \[0, 1\)"),
        ({"increase_tokens": 0}, "increase_tokens must be an integer >= 1"),
        ({"overload_iterations": 0}, "overload_iterations must be an integer >= 1"),
    ],
)
def test_invalid_settings_say_what_to_fix(overrides, message):
    kw = dict(ttft_ms=500.0, tpot_ms=50.0, cap_tokens_per_iteration=CAP)
    kw.update(overrides)
    with pytest.raises(ValueError, match=message):
        MixerSettings(**kw)


def test_invalid_stats_fail_loudly():
    with pytest.raises(ValueError, match="decode_rows"):
        IterationStats(iteration_ms=1.0, decode_rows=-1, prefill_tokens=0, queue_depth=0)
    with pytest.raises(ValueError, match="tpot_ms"):
        IterationStats(iteration_ms=1.0, decode_rows=1, prefill_tokens=0, queue_depth=0, tpot_ms=float("inf"))


def test_simulate_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="must match"):
        simulate(BatchMixer(SLO), MODEL, [1, 2], queue_depths=[0])


optional_ms = st.none() | st.floats(min_value=0, max_value=2000, allow_nan=False)
iteration_stats = st.builds(
    IterationStats,
    iteration_ms=st.floats(min_value=0, max_value=2000, allow_nan=False),
    decode_rows=st.integers(0, 64),
    prefill_tokens=st.integers(0, 4096),
    queue_depth=st.integers(0, 32),
    ttft_ms=optional_ms,
    tpot_ms=optional_ms,
)
mixer_settings = st.builds(
    MixerSettings,
    ttft_ms=st.floats(min_value=1, max_value=1000),
    tpot_ms=st.floats(min_value=1, max_value=200),
    cap_tokens_per_iteration=st.integers(0, 4096),
    headroom=st.floats(min_value=0.05, max_value=1.0),
    increase_tokens=st.none() | st.integers(1, 1000),
    decrease_factor=st.floats(min_value=0, max_value=0.99),
    overload_iterations=st.integers(1, 5),
)


@hyp_settings(max_examples=150, deadline=None)
@given(mixer_settings, st.lists(iteration_stats, max_size=30))
def test_decision_always_within_zero_and_cap_and_deterministic(settings, sequence):
    first, second = BatchMixer(settings), BatchMixer(settings)
    cap = settings.cap_tokens_per_iteration
    for item in sequence:
        decision = first.decide(item)
        assert type(decision.training_tokens) is int
        assert 0 <= decision.training_tokens <= cap
        assert decision.training_tokens == first.training_tokens
        assert decision.reason in REASONS
        assert 0.0 <= first.training_share <= 1.0
        assert second.decide(item) == decision


def test_non_adaptive_mixer_keeps_the_fixed_batch_under_overload():
    mixer = BatchMixer(MixerSettings(ttft_ms=100, tpot_ms=10, cap_tokens_per_iteration=64, adaptive=False))
    overloaded = IterationStats(iteration_ms=50, decode_rows=16, prefill_tokens=0, queue_depth=9, ttft_ms=500, tpot_ms=50)
    decisions = [mixer.decide(overloaded) for _ in range(5)]
    assert {(d.training_tokens, d.reason) for d in decisions} == {(64, "Fixed")}
