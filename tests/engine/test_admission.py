"""SLO-aware admission: the queue model's predictions and the shedding decision (pure), and the engine refusing a late request."""

from __future__ import annotations

import time

import pytest

from replica_agent.engine.admission import QueueView, admit_in_s, predicted_ttft_ms
from replica_agent.engine.engine import QueueFull
from replica_agent.engine.requests import FinalEvent, SamplingParams

from ..helpers import eventually
from .test_engine import make_engine


def view(**fields) -> QueueView:
    base = dict(
        running=0, waiting=0, waiting_prompt_tokens=0, max_batch=4, max_prefill_tokens=100, step_ms=10.0, prefill_ms_per_token=0.5, mean_output_tokens=20
    )
    return QueueView(**{**base, **fields})


def test_nothing_measured_yet_admits():
    assert predicted_ttft_ms(view(step_ms=None), 10) is None
    assert admit_in_s(None, 1000, 0.9) is None


def test_an_idle_engine_admits_whatever_it_measured_before():
    # after a stall (SIGSTOP, a long pause) the recent step time is huge; alone, the request waits for nothing
    assert predicted_ttft_ms(view(running=0, waiting=0, step_ms=40_000), 10) is None
    assert predicted_ttft_ms(view(running=1, waiting=0, step_ms=40_000), 10) > 40_000


def test_a_free_slot_costs_the_prefills_ahead_and_an_iteration_each_max_prefill_tokens():
    assert predicted_ttft_ms(view(running=2), 10) == pytest.approx(10 + 10 * 0.5)
    assert predicted_ttft_ms(view(running=2, waiting=1, waiting_prompt_tokens=30), 10) == pytest.approx(10 + 40 * 0.5)
    # 250 prompt tokens at 100 an iteration: three iterations admit them
    assert predicted_ttft_ms(view(waiting=1, waiting_prompt_tokens=200), 50) == pytest.approx(3 * 10 + 250 * 0.5)


def test_a_full_batch_waits_for_rows_to_finish_and_their_successors_prefills():
    # 4 rows of 20 tokens at 10 ms an iteration: one row finishes every 50 ms, and the prompt that
    # takes its place (10 tokens at 0.5 ms) costs 5 ms more
    assert predicted_ttft_ms(view(running=4), 10) == pytest.approx(55 + 10 + 5)
    assert predicted_ttft_ms(view(running=4, waiting=3, waiting_prompt_tokens=30), 10) == pytest.approx(4 * 55 + 10 + 5)
    # an idle engine with a long queue (prompts not counted): the batch fills from the queue first
    assert predicted_ttft_ms(view(running=0, waiting=6), 10) == pytest.approx(3 * 50 + 10 + 5)
    # long prompts ahead: the slower of the two bounds
    assert predicted_ttft_ms(view(running=4, waiting=4, waiting_prompt_tokens=2000), 10) == pytest.approx(5 * (50 + 250) + 10 + 5)
    assert predicted_ttft_ms(view(running=1, waiting=2, waiting_prompt_tokens=1000), 10) == pytest.approx(11 * 10 + 1010 * 0.5)


def test_the_prediction_grows_with_the_queue_and_the_iteration_time():
    waits = [predicted_ttft_ms(view(running=4, waiting=w), 10) for w in range(10)]
    assert waits == sorted(waits) and waits[-1] > waits[0]
    assert predicted_ttft_ms(view(running=4, step_ms=20), 10) > predicted_ttft_ms(view(running=4), 10)


def test_shed_past_the_budget_with_the_wait_until_admission():
    assert admit_in_s(850, 1000, 0.9) is None
    assert admit_in_s(1400, 1000, 0.9) == pytest.approx(0.5)
    assert admit_in_s(5000, 1000, 0) is None  # fraction 0: never shed


def test_the_engine_sheds_a_request_that_would_miss_its_ttft(random_runtime, byte_tokenizer):
    engine, _ = make_engine(random_runtime, byte_tokenizer, max_batch=1, ttft_slo_ms=1.0, shed_ttft_fraction=1.0)
    finals: list = []
    try:
        params = SamplingParams(max_new_tokens=200, ignore_eos=True)
        engine.submit(engine.encode("a long one"), params, finals.append)  # nothing measured yet: admitted
        assert eventually(lambda: engine._step_ms is not None, timeout=30)
        started = time.perf_counter()
        with pytest.raises(QueueFull, match="past its TTFT SLO of 1 ms") as refused:
            engine.submit(engine.encode("q"), params, finals.append)
        assert refused.value.retry_after_s > 0 and time.perf_counter() - started < 0.1
        engine.settings.shed_ttft_fraction = 0  # shedding off: queued behind the running row
        engine.submit(engine.encode("q"), SamplingParams(max_new_tokens=2), finals.append)
        assert eventually(lambda: sum(isinstance(f, FinalEvent) for f in finals) == 2, timeout=60)
        assert all(f.ok for f in finals if isinstance(f, FinalEvent))
        # a stall left a huge step time behind: an idle engine admits anyway, and measures again
        engine.settings.shed_ttft_fraction, engine._step_ms = 1.0, 40_000.0
        engine.submit(engine.encode("q"), SamplingParams(max_new_tokens=20, ignore_eos=True), finals.append)
        assert eventually(lambda: sum(isinstance(f, FinalEvent) for f in finals) == 3, timeout=60)
        assert engine._step_ms < 40_000 * 0.8**10
    finally:
        engine.stop()
