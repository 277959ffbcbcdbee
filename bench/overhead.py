"""`collm bench overhead`: what serving an unmerged adapter with two live versions costs in decode speed.

The same engine, model and requests run twice: with no adapter at all, and with two adapter
versions published mid-run so that half the batch is pinned to each (one mixed-version batch).
Decode throughput is counted over pure decode iterations (no prefill in them), alternating the
two settings several times in one run so machine noise hits both alike.
"""

from __future__ import annotations

import statistics
import threading
import time

import torch

from replica_agent.engine.adapter_store import AdapterStore
from replica_agent.engine.engine import Engine, EngineSettings
from replica_agent.engine.llama import LlamaRuntime
from replica_agent.engine.lora import LoraSpec, ModelDims, init_adapter
from replica_agent.engine.model_host import load_base_model
from replica_agent.engine.requests import FinalEvent, SamplingParams
from replica_agent.report import machine, print_table, write_json


def random_adapter(spec: LoraSpec, dims: ModelDims, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """An adapter with a non-zero B (small), so that it changes what the model computes."""
    tensors = init_adapter(spec, dims, seed=seed, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    return {k: (torch.randn(v.shape, generator=gen).to(v.dtype) * 0.02 if "lora_B" in k else v) for k, v in tensors.items()}


def prompt_ids(length: int) -> list[int]:
    """A fixed prompt of token ids below 201: valid in every model's vocabulary, the same for every stack."""
    return [(7 * i) % 200 + 1 for i in range(length)]


def decode_rate(engine: Engine, batch: int, prompt_len: int, new_tokens: int, store: AdapterStore | None, spec: LoraSpec | None) -> dict:
    """Run `batch` requests together; returns decode tokens/s over iterations without prefill."""
    busy = {"rows": 0, "ms": 0.0}
    live_seen: set[int] = set()

    def observe(kind, stats):
        if kind == "iteration" and stats.decode_rows and not stats.prefill_tokens:
            busy["rows"] += stats.decode_rows
            busy["ms"] += stats.iteration_ms
            if store is not None:
                live_seen.update(store.pins())

    engine.observers.append(observe)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    prompt = prompt_ids(prompt_len)
    done = threading.Semaphore(0)
    finals = []

    def callback(ev):
        if isinstance(ev, FinalEvent):
            finals.append(ev)
            done.release()

    half = batch // 2
    for _ in range(half):
        engine.submit(prompt, params, callback)
    if store is not None:  # the second half pins a newer version: two live versions in one batch
        while engine.running < half:
            time.sleep(0.001)
        store.publish(random_adapter(spec, engine.runtime.dims, len(store.retained()) + 100, engine.runtime.dtype))
    for _ in range(batch - half):
        engine.submit(prompt, params, callback)
    for _ in range(batch):
        done.acquire()
    engine.observers.remove(observe)
    return {
        "tokens_per_s": busy["rows"] / (busy["ms"] / 1000),
        "live_versions": len(live_seen),
        "failed": sum(1 for f in finals if not f.ok),
    }


def run(
    model: str = "tiny",
    *,
    batch: int = 16,
    prompt_len: int = 32,
    new_tokens: int = 128,
    repeats: int = 3,
    threads: int = 1,
    rank: int = 8,
    json_path: str | None = None,
) -> dict:
    base = load_base_model(model)
    runtime = LlamaRuntime(base.config, base.state_dict)
    spec = LoraSpec(rank=rank, alpha=2 * rank)
    settings = EngineSettings(max_batch=batch, max_total_tokens=prompt_len + new_tokens + 1, torch_threads=threads)
    plain = Engine(runtime, base.tokenizer, eos_token_ids=base.eos_token_ids, settings=settings)
    store = AdapterStore()
    store.publish(random_adapter(spec, runtime.dims, 1, runtime.dtype))
    adapted = Engine(runtime, base.tokenizer, eos_token_ids=base.eos_token_ids, store=store, lora_spec=spec, settings=settings)
    plain.start()
    adapted.start()
    try:
        decode_rate(plain, batch, prompt_len, 8, None, None)  # warm-up both
        decode_rate(adapted, batch, prompt_len, 8, store, spec)
        runs = {"no_adapter": [], "two_versions": []}
        for _ in range(repeats):
            runs["no_adapter"].append(decode_rate(plain, batch, prompt_len, new_tokens, None, None))
            runs["two_versions"].append(decode_rate(adapted, batch, prompt_len, new_tokens, store, spec))
    finally:
        plain.stop()
        adapted.stop()
    plain_rate = statistics.median(r["tokens_per_s"] for r in runs["no_adapter"])
    lora_rate = statistics.median(r["tokens_per_s"] for r in runs["two_versions"])
    result = {
        "benchmark": "overhead",
        "model": base.name,
        "settings": {
            "batch": batch,
            "prompt_len": prompt_len,
            "new_tokens": new_tokens,
            "repeats": repeats,
            "threads": threads,
            "lora_rank": rank,
            "targets": list(spec.target_modules),
        },
        "no_adapter_tokens_per_s": plain_rate,
        "two_versions_tokens_per_s": lora_rate,
        "slowdown": 1 - lora_rate / plain_rate,
        "target_slowdown": 0.15,
        "min_live_versions": min(r["live_versions"] for r in runs["two_versions"]),
        "failed_requests": sum(r["failed"] for rs in runs.values() for r in rs),
        "runs": runs,
        "machine": machine(),
    }
    print_table(
        f"Decode overhead of an unmerged adapter ({base.name}, batch {batch}, {threads} thread(s))",
        ["engine", "decode tokens/s (median)", "runs"],
        [
            ["no adapter", plain_rate, ", ".join(f"{r['tokens_per_s']:.0f}" for r in runs["no_adapter"])],
            ["adapter, 2 live versions", lora_rate, ", ".join(f"{r['tokens_per_s']:.0f}" for r in runs["two_versions"])],
            ["slowdown (target <= 15%)", f"{result['slowdown']:.1%}", ""],
        ],
    )
    write_json(result, json_path)
    return result
