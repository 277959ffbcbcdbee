"""`collm bench engine`: this engine beside the stacks a user would pick instead, on one model.

The same model, prompt tokens, batch sizes and LoRA adapter on:
- ``collm``: this engine (continuous batching, grouped LoRA); at batch >= 2 half the rows use one
  adapter version and half another, in one batch;
- ``hf``: Hugging Face transformers ``generate`` with no adapter at all (what the base model costs
  there: the bound of any LoRA serving built on it);
- ``hf-peft``: the same on a peft ``PeftModel`` with one adapter (the "PEFT" baseline of the CoLLM
  paper);
- ``hf-peft-2``: the same with two adapters in one batch (peft's ``adapter_names``), half the rows each;
- ``llama.cpp``: llama-cpp-python on the SmolLM2 GGUF file (its own Q4_1 weights, no adapter), the
  CPU stack an edge user picks; batch 1 only (its ``Llama`` object decodes one sequence).

Figures per stack: decode tokens/s at each batch size (decode only, prefill excluded), time to the
first token of a 256-token prompt at batch 1, and peak memory of the process. Every stack runs in
a fresh subprocess of its own, one after the other, so peak memory is its own and nothing else
runs beside it; ratios are to this engine on the same model. Every stack gets the same number of
intra-op threads (one by default: what a co-executing replica gives its engine). On a GPU (device
auto) the engine and transformers run there in bfloat16 and timings synchronise the device.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

from collm_bench.overhead import decode_rate, prompt_ids, random_adapter
from replica_agent.engine.adapter_store import AdapterStore
from replica_agent.engine.engine import Engine, EngineSettings
from replica_agent.engine.llama import LlamaRuntime, model_dims
from replica_agent.engine.lora import ALL_MODULES, LoraSpec
from replica_agent.engine.model_host import dtype_name, load_base_model, load_hf_model, smollm2_gguf_path
from replica_agent.engine.requests import SamplingParams
from replica_agent.report import machine, print_table, write_json

STACKS = ("collm", "hf", "hf-peft", "hf-peft-2", "llama.cpp")
HF_ADAPTERS = {"hf": 0, "hf-peft": 1, "hf-peft-2": 2}
BATCHES = (1, 8, 16)
MODELS = ("tiny", "smollm2")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mib(device: torch.device) -> dict:
    peak = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peak["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


def _spec(rank: int) -> LoraSpec:
    return LoraSpec(rank=rank, alpha=2 * rank, target_modules=ALL_MODULES)


# -- the stacks (each runs in a subprocess of its own) -------------------------------------------
def _collm(model: str, settings: dict) -> dict:
    base = load_base_model(model, dtype=settings["dtype"], device=settings["device"])
    runtime = LlamaRuntime(base.config, base.state_dict)
    spec = _spec(settings["rank"])
    store = AdapterStore()
    store.publish(random_adapter(spec, runtime.dims, 1, runtime.dtype))
    engine_settings = EngineSettings(
        max_batch=max(settings["batches"]),
        max_total_tokens=settings["ttft_prompt"] + settings["new_tokens"] + 8,
        max_prefill_tokens=settings["ttft_prompt"],
        torch_threads=settings["threads"],
    )
    engine = Engine(runtime, base.tokenizer, eos_token_ids=base.eos_token_ids, store=store, lora_spec=spec, settings=engine_settings)
    engine.start()
    try:
        decode_rate(engine, 2, settings["prompt_len"], 4, store, spec)  # warm-up
        decode = {}
        for batch in settings["batches"]:
            runs = [decode_rate(engine, batch, settings["prompt_len"], settings["new_tokens"], store, spec) for _ in range(settings["repeats"])]
            decode[str(batch)] = statistics.median(r["tokens_per_s"] for r in runs)
        ttfts = []
        for _ in range(settings["repeats"]):
            _, final = engine.generate(prompt_ids(settings["ttft_prompt"]), SamplingParams(max_new_tokens=1, ignore_eos=True))
            ttfts.append(final.ttft_s)
    finally:
        engine.stop()
    return {
        "decode_tokens_per_s": decode,
        "ttft_s": statistics.median(ttfts),
        "dtype": dtype_name(runtime.dtype),
        "device": str(runtime.device),
    }


def _hf_peft(model: str, settings: dict, adapters: int) -> dict:
    torch.set_num_threads(settings["threads"])
    hf, _ = load_hf_model(model, dtype=settings["dtype"], device=settings["device"])
    device, dtype = hf.device, hf.dtype
    spec = _spec(settings["rank"])
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.target_modules), lora_dropout=0.0)
    names = [f"v{i}" for i in range(adapters)]
    peft_model = get_peft_model(hf, config, adapter_name=names[0]) if adapters else hf
    for i, name in enumerate(names):
        if i:
            peft_model.add_adapter(name, config)
        tensors = random_adapter(spec, model_dims(hf.config), i + 1, dtype)
        assert not set_peft_model_state_dict(peft_model, tensors, adapter_name=name).unexpected_keys
    peft_model.eval()
    pad = hf.config.pad_token_id if hf.config.pad_token_id is not None else 0

    def generate(prompt: list[int], batch: int, new_tokens: int) -> float:
        ids = torch.tensor([prompt] * batch, device=device)
        kwargs = {"adapter_names": [names[row * adapters // batch] for row in range(batch)]} if adapters > 1 else {}
        _sync(device)
        started = time.perf_counter()
        with torch.no_grad():
            out = peft_model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad,
                **kwargs,
            )
        _sync(device)
        assert out.shape[1] == len(prompt) + new_tokens
        return time.perf_counter() - started

    prompt, n = prompt_ids(settings["prompt_len"]), settings["new_tokens"]
    generate(prompt, 2, 4)  # warm-up
    decode = {}
    for batch in settings["batches"]:
        # decode time = a run of n tokens minus a run of 1 token (the prefill and the first token)
        runs = [batch * (n - 1) / max(generate(prompt, batch, n) - generate(prompt, batch, 1), 1e-9) for _ in range(settings["repeats"])]
        decode[str(batch)] = statistics.median(runs)
    ttft = statistics.median(generate(prompt_ids(settings["ttft_prompt"]), 1, 1) for _ in range(settings["repeats"]))
    return {"decode_tokens_per_s": decode, "ttft_s": ttft, "dtype": dtype_name(dtype), "device": str(device), "adapters": adapters}


def _llama_cpp(model: str, settings: dict) -> dict:
    import llama_cpp  # optional: the only stack that needs it

    path = smollm2_gguf_path()
    threads = settings["threads"]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=settings["ttft_prompt"] + settings["new_tokens"] + 8, n_threads=threads, n_batch=512, verbose=False)

    def rate() -> float:
        llm.reset()  # no prefix reuse from the previous run
        stamps = []
        for _ in llm.generate(prompt_ids(settings["prompt_len"]), top_k=1, temp=0.0):
            stamps.append(time.perf_counter())  # the first comes after the prefill and the first token
            if len(stamps) == settings["new_tokens"]:
                break
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    def ttft() -> float:
        llm.reset()
        started = time.perf_counter()
        next(iter(llm.generate(prompt_ids(settings["ttft_prompt"]), top_k=1, temp=0.0)))
        return time.perf_counter() - started

    rate()  # warm-up
    return {
        "decode_tokens_per_s": {"1": statistics.median(rate() for _ in range(settings["repeats"]))},
        "ttft_s": statistics.median(ttft() for _ in range(settings["repeats"])),
        "dtype": "Q4_1 (GGUF)",
        "device": "cpu",
        "gguf": path.name,
        "llama_cpp_python": llama_cpp.__version__,
        "adapters": 0,
    }


def _worker(stack: str, model: str, settings: dict) -> dict:
    started = time.perf_counter()
    if stack == "collm":
        result = _collm(model, settings)
    elif stack in HF_ADAPTERS:
        result = _hf_peft(model, settings, adapters=HF_ADAPTERS[stack])
    else:
        result = _llama_cpp(model, settings)
    return {**result, **_peak_memory_mib(torch.device(result["device"])), "seconds": time.perf_counter() - started}


# -- the harness ----------------------------------------------------------------------------------
def _unavailable(stack: str, model: str) -> str | None:
    """Why a stack cannot run on a model here, or None."""
    if stack != "llama.cpp":
        return None
    if model != "smollm2":
        return "llama.cpp runs GGUF files; only SmolLM2 ships as one"
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed (pip install -c constraints.txt llama-cpp-python)"
    return None


def _run_stack(stack: str, model: str, settings: dict) -> dict:
    command = [sys.executable, "-m", "collm_bench.engine", "--worker", json.dumps({"stack": stack, "model": model, "settings": settings})]
    done = subprocess.run(command, capture_output=True, text=True, timeout=settings["timeout_s"])
    if done.returncode != 0:
        raise RuntimeError(f"{stack} on {model} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(
    models: tuple[str, ...] = MODELS,
    *,
    stacks: tuple[str, ...] = STACKS,
    batches: tuple[int, ...] = BATCHES,
    dtype: str = "auto",
    device: str = "auto",
    threads: int = 1,
    prompt_len: int = 32,
    new_tokens: int = 64,
    ttft_prompt: int = 256,
    repeats: int = 3,
    rank: int = 16,
    timeout_s: float = 1800,
    json_path: str | None = None,
) -> dict:
    unknown = sorted(set(stacks) - set(STACKS))
    if unknown:
        raise ValueError(f"unknown stacks {unknown}; choose from {', '.join(STACKS)}")
    settings = dict(
        batches=list(batches),
        dtype=dtype,
        device=device,
        threads=threads,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        ttft_prompt=ttft_prompt,
        repeats=repeats,
        rank=rank,
        timeout_s=timeout_s,
    )
    results = []
    for model in models:
        entry: dict = {"model": model, "stacks": {}, "skipped": {}}
        for stack in stacks:
            reason = _unavailable(stack, model)
            if reason:
                entry["skipped"][stack] = reason
                continue
            entry["stacks"][stack] = _run_stack(stack, model, settings)
        entry["ratios_to_collm"] = _ratios(entry["stacks"])
        results.append(entry)
    result = {
        "benchmark": "engine",
        "settings": settings,
        "lora": {"rank": rank, "alpha": 2 * rank, "targets": "all seven projections"},
        "models": results,
        "machine": machine(),
    }
    _print(result)
    write_json(result, json_path)
    return result


def _ratios(stacks: dict) -> dict:
    """Each stack's figure divided by this engine's: decode (higher is better), TTFT and memory (lower);
    empty when this engine did not run."""
    ours = stacks.get("collm")
    ratios: dict = {}
    if ours is None:  # nothing to compare with
        return ratios
    for name, figures in stacks.items():
        if name == "collm":
            continue
        ratios[name] = {
            "decode": {b: rate / ours["decode_tokens_per_s"][b] for b, rate in figures["decode_tokens_per_s"].items()},
            "ttft": figures["ttft_s"] / ours["ttft_s"],
            "peak_rss": figures["peak_rss_mib"] / ours["peak_rss_mib"],
        }
    return ratios


def _print(result: dict) -> None:
    batches = [str(b) for b in result["settings"]["batches"]]
    for entry in result["models"]:
        rows = []
        for name, figures in entry["stacks"].items():
            ratio = entry["ratios_to_collm"].get(name)
            rows.append(
                [
                    name,
                    figures["dtype"],
                    *[figures["decode_tokens_per_s"].get(b, "-") for b in batches],
                    figures["ttft_s"] * 1000,
                    figures["peak_rss_mib"],
                    ", ".join(f"b{b} {ratio['decode'][b]:.2f}x" for b in batches if b in ratio["decode"]) if ratio else "reference" if name == "collm" else "-",
                ]
            )
        for name, reason in entry["skipped"].items():
            rows.append([name, "-", *["-"] * len(batches), "-", "-", f"skipped: {reason}"])
        print_table(
            f"Engine beside the alternatives: {entry['model']} (LoRA r={result['lora']['rank']}, {result['settings']['threads']} thread(s) each)",
            ["stack", "dtype", *[f"decode tok/s b{b}" for b in batches], "TTFT ms (256 tok)", "peak RSS MiB", "decode vs collm"],
            rows,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", required=True, help="internal: run one stack and print its figures as JSON")
    job = json.loads(parser.parse_args(argv).worker)
    print(json.dumps(_worker(job["stack"], job["model"], job["settings"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
