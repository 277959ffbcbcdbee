"""Continuous batching, version pinning under publishes, sampling and stop conditions."""

from __future__ import annotations

import threading
import time

import pytest

from replica_agent.engine.adapter_store import AdapterStore
from replica_agent.engine.engine import Engine, EngineSettings, QueueFull, RequestRejected
from replica_agent.engine.lora import LoraSpec
from replica_agent.engine.requests import FinalEvent, FinishReason, SamplingParams, TokenEvent

from ..helpers import eventually
from .conftest import random_adapter

SPEC = LoraSpec(rank=8, alpha=16)


def make_engine(runtime, tokenizer, adapters=(), **settings):
    store = AdapterStore()
    for tensors in adapters:
        store.publish(tensors)
    engine = Engine(
        runtime,
        tokenizer,
        eos_token_ids=(tokenizer.eos_token_id,),
        bos_token_id=tokenizer.bos_token_id,
        store=store,
        lora_spec=SPEC,
        settings=EngineSettings(**{"max_batch": 8, "max_total_tokens": 256, **settings}),
    )
    engine.start()
    return engine, store


@pytest.fixture(scope="module")
def adapters(random_runtime):
    return [random_adapter(SPEC, random_runtime, seed) for seed in (21, 22, 23)]


def ids_of(tokens):
    return [t.token.id for t in tokens]


def logprobs_of(tokens):
    return [round(t.token.logprob, 4) for t in tokens]


def test_greedy_request_in_flight_during_publish_keeps_its_pinned_version(random_runtime, byte_tokenizer, adapters):
    prompt_params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    ref_engine, _ = make_engine(random_runtime, byte_tokenizer, [adapters[0]])
    new_engine, _ = make_engine(random_runtime, byte_tokenizer, [adapters[1]])
    engine, store = make_engine(random_runtime, byte_tokenizer, [adapters[0]])
    try:
        prompt = engine.encode("def pinned(version):")
        ref_tokens, ref_final = ref_engine.generate(prompt, prompt_params)
        new_tokens, _ = new_engine.generate(prompt, prompt_params)
        assert ids_of(ref_tokens) != ids_of(new_tokens), "the two adapters must give different outputs for this test to mean anything"

        done, events = threading.Event(), []

        def on_event(ev):
            events.append(ev)
            if isinstance(ev, TokenEvent) and ev.index == 5:
                store.publish(adapters[1])  # mid-flight, from the engine thread: deterministic timing
            if isinstance(ev, FinalEvent):
                done.set()

        engine.submit(prompt, prompt_params, on_event)
        assert done.wait(60)
        final = events[-1]
        assert final.adapter_version == "0.0" and store.current.number == 2 and store.current.label == "0.1"
        assert final.adapter_sha256 == store.get(1).sha256
        served = [e for e in events if isinstance(e, TokenEvent)]
        assert ids_of(served) == ids_of(ref_tokens) and logprobs_of(served) == logprobs_of(ref_tokens)
        after_tokens, after_final = engine.generate(prompt, prompt_params)
        assert after_final.adapter_version == "0.1" and ids_of(after_tokens) == ids_of(new_tokens)
        assert eventually(lambda: store.pins() == {} and engine.slab.loaded_versions() == {2})
    finally:
        for e in (ref_engine, new_engine, engine):
            e.stop()


def test_batched_rows_of_different_lengths_and_versions_equal_each_alone(random_runtime, byte_tokenizer, adapters):
    engine, store = make_engine(random_runtime, byte_tokenizer, [adapters[0]])
    try:
        prompts = [engine.encode(p) for p in ("a", "import os\nimport sys\n", "class Foo:\n    def bar(self):", "x = [i * i for i in range(10)]")]
        lengths = [12, 40, 7, 25]
        alone = [engine.generate(p, SamplingParams(max_new_tokens=n, ignore_eos=True))[0] for p, n in zip(prompts, lengths)]
        results: list = [None] * 4
        barrier = threading.Barrier(4)

        def worker(i):
            barrier.wait()
            results[i] = engine.generate(prompts[i], SamplingParams(max_new_tokens=lengths[i], ignore_eos=True))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for i in range(4):
            tokens, final = results[i]
            assert ids_of(tokens) == ids_of(alone[i])
            assert final.finish_reason is FinishReason.LENGTH and final.generated_tokens == lengths[i]
    finally:
        engine.stop()


def test_twenty_publishes_under_concurrent_streaming_load_fail_no_request(random_runtime, byte_tokenizer, adapters):
    engine, store = make_engine(random_runtime, byte_tokenizer, [adapters[0]], max_batch=6, lora_slots=4)
    finals: list[FinalEvent] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(seed):
        i = 0
        while not stop.is_set():
            i += 1
            tokens, final = engine.generate(engine.encode(f"request {seed}-{i}"), SamplingParams(max_new_tokens=6 + (seed + i) % 20, ignore_eos=True))
            assert len(tokens) == final.generated_tokens
            with lock:
                finals.append(final)

    threads = [threading.Thread(target=client, args=(s,)) for s in range(8)]
    try:
        for t in threads:
            t.start()
        for k in range(20):
            store.publish(adapters[k % 3], step=k)
            time.sleep(0.03)
        stop.set()
        for t in threads:
            t.join(60)
        assert store.current.number == 21
        assert len(finals) >= 20
        assert all(f.finish_reason is FinishReason.LENGTH for f in finals), {f.finish_reason for f in finals}
        assert len({f.adapter_version for f in finals}) >= 3, "requests should have been served by several versions"
        assert eventually(lambda: store.pins() == {})
    finally:
        stop.set()
        engine.stop()


def test_stop_sequence_eos_and_length(random_runtime, byte_tokenizer, adapters):
    engine, _ = make_engine(random_runtime, byte_tokenizer, [adapters[0]])
    try:
        prompt = engine.encode("hello")
        tokens, final = engine.generate(prompt, SamplingParams(max_new_tokens=20, ignore_eos=True))
        text = final.generated_text
        assert final.finish_reason is FinishReason.LENGTH and "".join(t.token.text for t in tokens) == text
        stop = text[1:3]
        _, stopped = engine.generate(prompt, SamplingParams(max_new_tokens=20, ignore_eos=True, stop=(stop,)))
        assert stopped.finish_reason is FinishReason.STOP_SEQUENCE and stopped.generated_text.endswith(stop)
        assert len(stopped.generated_text) <= len(text)
    finally:
        engine.stop()


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(random_runtime, byte_tokenizer, adapters):
    engine, _ = make_engine(random_runtime, byte_tokenizer, [adapters[0]])
    try:
        prompt = engine.encode("seed")
        params = SamplingParams(max_new_tokens=24, do_sample=True, temperature=1.5, top_k=50, top_p=0.95, repetition_penalty=1.3, seed=7, ignore_eos=True)
        first = engine.generate(prompt, params)[1]
        again = engine.generate(prompt, params)[1]
        other = engine.generate(prompt, SamplingParams(**{**params.__dict__, "seed": 8}))[1]
        greedy = engine.generate(prompt, SamplingParams(max_new_tokens=24, ignore_eos=True))[1]
        assert first.seed == 7 and first.generated_text == again.generated_text
        assert first.generated_text != other.generated_text or first.generated_text != greedy.generated_text
        unseeded = engine.generate(prompt, SamplingParams(max_new_tokens=4, do_sample=True, ignore_eos=True))[1]
        assert unseeded.seed is not None  # reported, as TGI does
    finally:
        engine.stop()


def test_top_k_one_is_greedy(random_runtime, byte_tokenizer, adapters):
    engine, _ = make_engine(random_runtime, byte_tokenizer, [adapters[0]])
    try:
        prompt = engine.encode("topk")
        greedy = engine.generate(prompt, SamplingParams(max_new_tokens=16, ignore_eos=True))[1]
        top1 = engine.generate(prompt, SamplingParams(max_new_tokens=16, top_k=1, temperature=0.7, seed=3, ignore_eos=True))[1]
        assert top1.generated_text == greedy.generated_text
    finally:
        engine.stop()


def test_too_long_requests_are_rejected_with_a_message(random_runtime, byte_tokenizer, adapters):
    engine, _ = make_engine(random_runtime, byte_tokenizer, [adapters[0]], max_total_tokens=64)
    try:
        with pytest.raises(RequestRejected, match="must be <= 64"):
            engine.submit(list(range(60)), SamplingParams(max_new_tokens=10), lambda ev: None)
        with pytest.raises(RequestRejected, match="empty"):
            engine.submit([], SamplingParams(), lambda ev: None)
    finally:
        engine.stop()


def test_queue_full_is_reported_not_dropped(random_runtime, byte_tokenizer, adapters):
    engine, _ = make_engine(random_runtime, byte_tokenizer, [adapters[0]], max_batch=1, max_queue=2)
    try:
        finals = []
        accepted = 0
        with pytest.raises(QueueFull):
            for _ in range(10):
                engine.submit(engine.encode("q"), SamplingParams(max_new_tokens=50, ignore_eos=True), finals.append)
                accepted += 1
        assert eventually(lambda: sum(isinstance(f, FinalEvent) for f in finals) == accepted, timeout=30)
        assert all(f.finish_reason is FinishReason.LENGTH for f in finals if isinstance(f, FinalEvent))
    finally:
        engine.stop()


def test_cancelled_request_releases_its_pin(random_runtime, byte_tokenizer, adapters):
    engine, store = make_engine(random_runtime, byte_tokenizer, [adapters[0]])
    try:
        events = []
        handle = engine.submit(engine.encode("cancel me"), SamplingParams(max_new_tokens=200, ignore_eos=True), events.append)
        assert eventually(lambda: len(events) >= 3)
        handle.cancel()
        assert eventually(lambda: isinstance(events[-1], FinalEvent))
        assert events[-1].finish_reason is FinishReason.CANCELLED
        assert eventually(lambda: store.pins() == {})
    finally:
        engine.stop()


def test_engine_without_adapters_serves_the_base_model(random_hf_model, random_runtime, byte_tokenizer):
    import torch

    engine = Engine(random_runtime, byte_tokenizer, eos_token_ids=(byte_tokenizer.eos_token_id,), settings=EngineSettings(max_batch=2, max_total_tokens=128))
    engine.start()
    try:
        prompt = [byte_tokenizer.bos_token_id, *byte_tokenizer.encode("base model", add_special_tokens=False)]
        tokens, final = engine.generate(prompt, SamplingParams(max_new_tokens=12, ignore_eos=True))
        with torch.no_grad():
            ref = random_hf_model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=12,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        assert ids_of(tokens) == ref[0, len(prompt) :].tolist()
        assert final.adapter_version is None
    finally:
        engine.stop()
