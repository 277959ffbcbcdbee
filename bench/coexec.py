"""`collm bench coexec`: co-execution efficiency (CEE) of one replica, as docs/design.md defines it.

In one run, on one replica and one model:
1. inference alone: the highest Poisson request rate served with >= 99% SLO attainment
   (stepping the offered load), training off, the engine at its best thread count (probed);
2. training alone: training tokens/s with no requests, the trainer at its best thread count;
3. co-execution: the same search with the trainer on and the batch mixer steering it, and the
   training tokens/s measured during the trial at the rate found.
CEE = rate_co / rate_alone + train_co / train_alone (time-slicing scores 1.0; the ceiling is 2).
"""

from __future__ import annotations

import os
import time

from replica_agent.agent import Agent
from replica_agent.config import AgentConfig
from replica_agent.engine.data import stdlib_package_dir
from replica_agent.engine.model_host import load_base_model
from replica_agent.engine.trainer import Trainer, TrainerSettings
from replica_agent.report import machine, print_table, write_json

from .load import find_max_rate, run_trial, trace_shapes


def _training_alone(agent: Agent, threads: int, seconds: float) -> float:
    """Training tokens/s of the trainer thread with no requests and no budget limit."""
    trainer = Trainer(
        agent.runtime, agent.dataset, agent.store, agent.spec, settings=TrainerSettings(micro_batch=agent.config.micro_batch, torch_threads=threads)
    )
    trainer.start()
    time.sleep(1.0)  # warm-up
    tokens0, t0 = trainer.tokens, time.perf_counter()
    time.sleep(seconds)
    rate = (trainer.tokens - tokens0) / (time.perf_counter() - t0)
    trainer.stop()
    return rate


def _best_engine_threads(base, common: dict, shapes, *, ttft_ms, tpot_ms) -> tuple[int, dict]:
    """Inference alone gets its best setting: probe 1 thread and every core at a saturating load."""
    probes = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        agent = Agent(AgentConfig(**common, train=False, engine_threads=threads), base=base)
        agent.start()
        try:
            result = run_trial(agent.engine, shapes, 200.0, 3.0, ttft_ms=ttft_ms, tpot_ms=tpot_ms)
            probes[threads] = result.served_tokens_per_s
        finally:
            agent.stop()
    return max(probes, key=probes.get), probes


def _search(agent: Agent, shapes, *, ttft_ms, tpot_ms, trial_s, start_rate, refinements, max_doublings):
    trainer = agent.trainer
    per_trial: dict[float, float] = {}

    def trial(rate):
        tokens0, t0 = (trainer.tokens if trainer else 0), time.perf_counter()
        result = run_trial(agent.engine, shapes, rate, trial_s, ttft_ms=ttft_ms, tpot_ms=tpot_ms, seed=int(rate * 1000))
        elapsed = time.perf_counter() - t0
        per_trial[rate] = ((trainer.tokens - tokens0) / elapsed) if trainer else 0.0
        return result

    rate, best, history = find_max_rate(trial, start_rate=start_rate, refinements=refinements, max_doublings=max_doublings)
    return rate, best, history, per_trial


def run(
    model: str = "tiny",
    *,
    data: str | None = None,
    ttft_ms: int = 500,
    tpot_ms: int = 50,
    trial_s: float = 6.0,
    start_rate: float = 4.0,
    refinements: int = 3,
    max_doublings: int = 8,
    max_batch: int = 16,
    train_cap_tokens: int = 128,
    json_path: str | None = None,
) -> dict:
    base = load_base_model(model)
    data = data or str(stdlib_package_dir("json"))
    shapes = trace_shapes()
    common = dict(model=model, data=data, ttft_ms=ttft_ms, tpot_ms=tpot_ms, max_batch=max_batch, max_total_tokens=320, eval_batches=1, port=0)

    engine_threads, thread_probes = _best_engine_threads(base, common, shapes, ttft_ms=ttft_ms, tpot_ms=tpot_ms)
    alone = Agent(AgentConfig(**common, train=False, engine_threads=engine_threads), base=base)
    alone.start()
    try:
        run_trial(alone.engine, shapes, start_rate, 2.0, ttft_ms=ttft_ms, tpot_ms=tpot_ms)  # warm-up
        rate_alone, best_alone, hist_alone, _ = _search(
            alone, shapes, ttft_ms=ttft_ms, tpot_ms=tpot_ms, trial_s=trial_s, start_rate=start_rate, refinements=refinements, max_doublings=max_doublings
        )
    finally:
        alone.stop()

    co = Agent(AgentConfig(**common, train=True, train_cap_tokens=train_cap_tokens), base=base)
    train_probes = {threads: _training_alone(co, threads, trial_s / 2) for threads in sorted({1, os.cpu_count() or 1})}
    train_alone = max(train_probes.values())
    co.start()
    try:
        rate_co, best_co, hist_co, train_rates = _search(
            co, shapes, ttft_ms=ttft_ms, tpot_ms=tpot_ms, trial_s=trial_s, start_rate=start_rate, refinements=refinements, max_doublings=max_doublings
        )
        train_co = train_rates.get(rate_co, 0.0)
        eval_after = co.trainer.evaluate()
    finally:
        co.stop()

    inference_ratio = rate_co / rate_alone if rate_alone else 0.0
    training_ratio = train_co / train_alone if train_alone else 0.0
    result = {
        "benchmark": "coexec",
        "model": base.name,
        "alone_probes": {"engine_tokens_per_s_by_threads": thread_probes, "training_tokens_per_s_by_threads": train_probes, "engine_threads": engine_threads},
        "settings": {
            "ttft_ms": ttft_ms,
            "tpot_ms": tpot_ms,
            "trial_s": trial_s,
            "max_batch": max_batch,
            "train_cap_tokens": train_cap_tokens,
            "data": data,
            "request_shapes": len(shapes),
        },
        "inference_alone_rps": rate_alone,
        "inference_alone_attainment": best_alone.attainment if best_alone else 0.0,
        "training_alone_tokens_per_s": train_alone,
        "coexec_rps": rate_co,
        "coexec_attainment": best_co.attainment if best_co else 0.0,
        "coexec_training_tokens_per_s": train_co,
        "inference_ratio": inference_ratio,
        "training_ratio": training_ratio,
        "cee": inference_ratio + training_ratio,
        "target_cee": 1.3,
        "coexec_eval_loss_after": eval_after,
        "trials": {
            "inference_alone": [h.as_dict() for h in hist_alone],
            "coexec": [dict(h.as_dict(), training_tokens_per_s=train_rates.get(h.rate, 0.0)) for h in hist_co],
        },
        "machine": machine(),
    }
    print_table(
        f"Co-execution efficiency ({base.name}; SLO TTFT {ttft_ms} ms, TPOT {tpot_ms} ms; >= 99% attainment)",
        ["mode", "requests/s within SLO", "SLO attainment", "training tokens/s"],
        [
            ["inference alone", rate_alone, result["inference_alone_attainment"], 0.0],
            ["training alone", 0.0, "-", train_alone],
            ["co-execution", rate_co, result["coexec_attainment"], train_co],
            ["ratio to alone", inference_ratio, "", training_ratio],
            ["CEE (target >= 1.3)", result["cee"], "", ""],
        ],
    )
    write_json(result, json_path)
    return result
