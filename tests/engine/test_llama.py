"""Our forward pass against transformers' and peft's, to float tolerance."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

from replica_agent.engine.llama import KVCache, SlabLora, TensorLora
from replica_agent.engine.lora import LoraSlab, LoraSpec, check_adapter, init_adapter

from .conftest import random_adapter

TOL = 1e-4


def test_forward_matches_transformers(random_hf_model, random_runtime):
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = random_hf_model(ids).logits
        ours = random_runtime.forward_train(ids, None)
    assert (ref - ours).abs().max() < TOL


def test_prefill_and_decode_with_rows_of_different_lengths_match_full_forward(random_hf_model, random_runtime):
    rt = random_runtime
    ids = torch.randint(0, 256, (3, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = random_hf_model(ids).logits
    cache = KVCache(rt.dims, 4, 64, dtype=torch.float32, device="cpu")
    lengths = [12, 5, 20]
    for row, n in enumerate(lengths):
        last = rt.prefill(ids[row, :n].tolist(), cache, row, None)
        assert (last - ref[row, n - 1]).abs().max() < TOL
    positions = torch.tensor(lengths)
    for _ in range(4):  # four decode steps, every row at its own position
        logits = rt.decode(ids[torch.arange(3), positions], positions, cache, None)
        for row in range(3):
            assert (logits[row] - ref[row, positions[row]]).abs().max() < TOL
        positions = positions + 1


def test_lora_training_path_matches_peft(random_hf_model, random_runtime):
    spec = LoraSpec(rank=4, alpha=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    adapter = random_adapter(spec, random_runtime, seed=3)
    check_adapter(adapter, spec, random_runtime.dims)
    peft_model = get_peft_model(
        random_hf_model, LoraConfig(**{k: v for k, v in spec.peft_config("tiny").items() if k in ("r", "lora_alpha", "target_modules", "lora_dropout")})
    )
    try:
        result = set_peft_model_state_dict(peft_model, adapter)
        assert not result.unexpected_keys
        ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            ref = peft_model(ids).logits
            ours = random_runtime.forward_train(ids, TensorLora(adapter, spec, random_runtime.dims))
        assert (ref - ours).abs().max() < TOL
    finally:
        peft_model.unload()  # give the shared fixture its plain modules back


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("o_proj", "down_proj", "up_proj")])
def test_mixed_version_batch_equals_each_version_alone(random_runtime, targets):
    rt = random_runtime
    spec = LoraSpec(rank=8, alpha=16, target_modules=targets)
    versions = {10: random_adapter(spec, rt, 10), 11: random_adapter(spec, rt, 11), 12: random_adapter(spec, rt, 12)}
    slab = LoraSlab(spec, rt.dims, 4, dtype=torch.float32, device="cpu")
    for number, tensors in versions.items():
        assert slab.load(number, tensors) is not None
    ids = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        refs = {n: rt.forward_train(ids, TensorLora(t, spec, rt.dims)) for n, t in versions.items()}
    cache = KVCache(rt.dims, 3, 32, dtype=torch.float32, device="cpu")
    order = [12, 10, 11]  # row r uses version order[r]
    slots = [slab.slot_of(n) for n in order]
    for row in range(len(order)):
        rt.prefill(ids[row, :9].tolist(), cache, row, SlabLora(slab, torch.tensor([slots[row]])))
    logits = rt.decode(ids[:, 9], torch.full((3,), 9), cache, SlabLora(slab, torch.tensor(slots)))
    for row, number in enumerate(order):
        assert (logits[row] - refs[number][row, 9]).abs().max() < TOL
    # and the versions really differ, so the check above could fail
    assert (refs[10] - refs[11]).abs().max() > 1e-3


def test_slab_is_full_then_frees_a_slot(random_runtime):
    spec = LoraSpec()
    slab = LoraSlab(spec, random_runtime.dims, 2, dtype=torch.float32, device="cpu")
    a = init_adapter(spec, random_runtime.dims)
    assert slab.load(1, a) == 0 and slab.load(2, a) == 1
    assert slab.load(3, a) is None
    slab.evict(1)
    assert slab.load(3, a) == 0 and slab.loaded_versions() == {2, 3}


def test_lora_spec_rejects_what_it_cannot_serve():
    with pytest.raises(ValueError, match="not supported"):
        LoraSpec(target_modules=("lm_head",))
    with pytest.raises(ValueError, match="dropout must be 0"):
        LoraSpec(dropout=0.1)
    with pytest.raises(ValueError, match="rank"):
        LoraSpec(rank=0)


def test_check_adapter_names_the_bad_tensor(random_runtime):
    spec = LoraSpec()
    tensors = init_adapter(spec, random_runtime.dims)
    key = next(iter(tensors))
    bad = dict(tensors, **{key: torch.full_like(tensors[key], float("nan"))})
    with pytest.raises(ValueError, match="NaN"):
        check_adapter(bad, spec, random_runtime.dims)
    with pytest.raises(ValueError, match="shape"):
        check_adapter(dict(tensors, **{key: tensors[key][:, :3]}), spec, random_runtime.dims)


def test_rows_without_an_adapter_beside_rows_with_one_and_a_single_slot_batch(random_runtime):
    rt = random_runtime
    spec = LoraSpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))
    slab = LoraSlab(spec, rt.dims, 4, dtype=torch.float32, device="cpu")
    adapter = random_adapter(spec, rt, 21)
    assert slab.load(7, adapter) == 0 and slab.load(8, random_adapter(spec, rt, 22)) == 1
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        adapted = rt.forward_train(ids, TensorLora(adapter, spec, rt.dims))
        plain = rt.forward_train(ids, None)
    for slots in ([0, -1], [0, 0]):  # a row with no version beside one with; one slot for all rows (no mask)
        cache = KVCache(rt.dims, 2, 16, dtype=torch.float32, device="cpu")
        for row in range(2):
            rt.prefill(ids[row, :7].tolist(), cache, row, SlabLora(slab, [slots[row]]) if slots[row] >= 0 else None)
        lora = SlabLora(slab, slots)
        assert (lora.masks is None) == (slots == [0, 0])
        logits = rt.decode(ids[:, 7], torch.full((2,), 7), cache, lora)
        assert (logits[0] - adapted[0, 7]).abs().max() < TOL
        expected = plain[1, 7] if slots[1] < 0 else adapted[1, 7]
        assert (logits[1] - expected).abs().max() < TOL
