"""`collm bench engine`: every stack in a process of its own, figures and ratios in the JSON."""

from __future__ import annotations

import json

import pytest

from collm_bench import engine

SHORT = dict(batches=(1, 2), new_tokens=6, ttft_prompt=32, repeats=1)


def test_engine_beside_transformers_and_peft_with_two_adapters(tmp_path):
    out = tmp_path / "engine.json"
    engine.run(("tiny",), stacks=("collm", "hf-peft-2", "llama.cpp"), json_path=str(out), **SHORT)
    saved = json.loads(out.read_text())
    (entry,) = saved["models"]
    assert set(entry["stacks"]) == {"collm", "hf-peft-2"}
    assert "GGUF" in entry["skipped"]["llama.cpp"]  # the tiny model has no GGUF file
    for figures in entry["stacks"].values():
        assert set(figures["decode_tokens_per_s"]) == {"1", "2"} and all(r > 0 for r in figures["decode_tokens_per_s"].values())
        assert figures["ttft_s"] > 0 and figures["peak_rss_mib"] > 100 and figures["device"] == "cpu"
    assert entry["stacks"]["hf-peft-2"]["adapters"] == 2
    ratio = entry["ratios_to_collm"]["hf-peft-2"]
    ours, theirs = entry["stacks"]["collm"], entry["stacks"]["hf-peft-2"]
    assert ratio["decode"]["2"] == pytest.approx(theirs["decode_tokens_per_s"]["2"] / ours["decode_tokens_per_s"]["2"])
    assert saved["machine"]["cpu_count"] >= 1 and saved["settings"]["threads"] == 1


def test_llama_cpp_runs_the_smollm2_gguf():
    result = engine.run(("smollm2",), stacks=("llama.cpp",), batches=(1,), new_tokens=8, ttft_prompt=64, repeats=1)
    figures = result["models"][0]["stacks"]["llama.cpp"]
    assert figures["decode_tokens_per_s"]["1"] > 0 and figures["ttft_s"] > 0 and figures["gguf"].endswith(".gguf")


def test_unknown_stacks_are_named():
    with pytest.raises(ValueError, match="unknown stacks \\['vllm'\\]"):
        engine.run(("tiny",), stacks=("collm", "vllm"))
