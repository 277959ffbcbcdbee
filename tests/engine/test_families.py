"""Every supported family against transformers' own model and peft, on small random configurations.

Tolerance: 1e-4 absolute on logits in float32 (the runtime fuses q/k/v and gate/up into one matmul
each, so sums run in another order than transformers'; observed differences are about 1e-6).
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

from replica_agent.engine.families import FAMILIES, attention_window, build_random_model, family_of, max_context
from replica_agent.engine.llama import KVCache, LlamaRuntime, SlabLora, TensorLora
from replica_agent.engine.lora import ALL_MODULES, LoraSlab, LoraSpec
from replica_agent.engine.model_host import load_base_model

from .conftest import random_adapter

TOL = 1e-4
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
CASES = {**{t: (t, {}) for t in FAMILIES}, "llama3-rope": ("llama", {"rope_scaling": LLAMA3_ROPE})}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request):
    """(transformers model, our runtime over the same tensors) of one family."""
    model_type, overrides = CASES[request.param]
    model = build_random_model(FAMILIES[model_type], seed=7, **overrides)
    return model, LlamaRuntime(model.config, {k: v.detach().clone() for k, v in model.state_dict().items()})


def _ids(seed: int, rows: int, length: int) -> torch.Tensor:
    return torch.randint(0, 256, (rows, length), generator=torch.Generator().manual_seed(seed))


def test_logits_match_transformers(pair):
    model, runtime = pair
    ids = _ids(0, 2, 160)  # past the llama3 case's original 64 positions, where its scaling acts
    with torch.no_grad():
        reference = model(ids).logits
    assert (reference - runtime.forward_train(ids, None)).abs().max() < TOL


def test_prefill_and_decode_match_transformers(pair):
    model, runtime = pair
    ids = _ids(1, 2, 24)
    with torch.no_grad():
        reference = model(ids).logits
    cache = KVCache(runtime.dims, 2, 32, dtype=torch.float32, device="cpu")
    lengths = [10, 17]
    for row, n in enumerate(lengths):
        assert (runtime.prefill(ids[row, :n].tolist(), cache, row, None) - reference[row, n - 1]).abs().max() < TOL
    positions = torch.tensor(lengths)
    for _ in range(3):
        logits = runtime.decode(ids[torch.arange(2), positions], positions, cache, None)
        assert (logits - reference[torch.arange(2), positions]).abs().max() < TOL
        positions = positions + 1


def test_greedy_generation_equals_transformers_generate(pair):
    model, runtime = pair
    prompt = _ids(2, 1, 12)
    expected = model.generate(prompt, max_new_tokens=24, do_sample=False, min_new_tokens=24)[0, 12:].tolist()
    cache = KVCache(runtime.dims, 1, 64, dtype=torch.float32, device="cpu")
    token = int(runtime.prefill(prompt[0].tolist(), cache, 0, None).argmax())
    ours = [token]
    for position in range(12, 12 + 23):
        token = int(runtime.decode(torch.tensor([token]), torch.tensor([position]), cache, None)[0].argmax())
        ours.append(token)
    assert ours == expected


def test_lora_matches_peft_in_training_and_in_a_mixed_version_batch(pair):
    model, runtime = pair
    spec = LoraSpec(rank=4, alpha=8, target_modules=ALL_MODULES)
    adapters = {1: random_adapter(spec, runtime, seed=3), 2: random_adapter(spec, runtime, seed=4)}
    peft_model = get_peft_model(model, LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.target_modules)))
    ids = _ids(5, 2, 16)
    try:
        references = {}
        for version, tensors in adapters.items():
            assert not set_peft_model_state_dict(peft_model, tensors).unexpected_keys
            with torch.no_grad():
                references[version] = peft_model(ids).logits
    finally:
        peft_model.unload()  # give the shared fixture its plain modules back
    assert (references[1] - references[2]).abs().max() > 1e-3  # the adapters really differ
    assert (references[1] - runtime.forward_train(ids, TensorLora(adapters[1], spec, runtime.dims))).abs().max() < TOL
    slab = LoraSlab(spec, runtime.dims, 2, dtype=torch.float32, device="cpu")
    slots = torch.tensor([slab.load(2, adapters[2]), slab.load(1, adapters[1])])  # row 0 on version 2, row 1 on 1
    cache = KVCache(runtime.dims, 2, 32, dtype=torch.float32, device="cpu")
    for row in range(2):
        runtime.prefill(ids[row, :15].tolist(), cache, row, SlabLora(slab, slots[row : row + 1]))
    logits = runtime.decode(ids[:, 15], torch.full((2,), 15), cache, SlabLora(slab, slots))
    assert (logits[0] - references[2][0, 15]).abs().max() < TOL
    assert (logits[1] - references[1][1, 15]).abs().max() < TOL


def test_qwen3_parity_depends_on_its_qk_norm():
    """The parity above could fail: without the per-head q/k norm the logits leave the tolerance."""
    model = build_random_model(FAMILIES["qwen3"], seed=7)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    runtime = LlamaRuntime(model.config, state)
    for layer in runtime.layers:
        layer.q_norm = torch.ones_like(layer.q_norm)
    ids = _ids(0, 1, 32)
    with torch.no_grad():
        assert (model(ids).logits - runtime.forward_train(ids, None)).abs().max() > 10 * TOL


def test_sliding_window_caps_the_served_context():
    mistral = build_random_model(FAMILIES["mistral"]).config
    assert attention_window(mistral) == 512 and max_context(mistral) == 512
    qwen = FAMILIES["qwen2"].config_class(use_sliding_window=False, sliding_window=128, max_position_embeddings=32768)
    assert attention_window(qwen) is None and max_context(qwen) == 8192


def test_random_sources_load_through_the_model_host():
    base = load_base_model("random:qwen3")
    assert family_of(base.config).name == "Qwen3" and base.name == "random-qwen3"
    assert base.config.head_dim == 128 and "model.layers.0.self_attn.q_norm.weight" in base.state_dict
    assert base.tokenizer.decode(base.tokenizer("def f():", add_special_tokens=False)["input_ids"]) == "def f():"
    with pytest.raises(ValueError, match="size one of small, 1b"):
        load_base_model("random:qwen3-70b")
