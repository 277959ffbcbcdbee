"""The exported adapter loads in peft and gives the same greedy output as the agent serving it."""

from __future__ import annotations

import torch
from peft import PeftModel

from replica_agent.engine.adapter_store import AdapterStore
from replica_agent.engine.engine import Engine, EngineSettings
from replica_agent.engine.llama import LlamaRuntime
from replica_agent.engine.lora import LoraSpec, init_adapter
from replica_agent.engine.model_host import load_hf_model
from replica_agent.engine.requests import SamplingParams
from replica_agent.federated.export import export_peft


def test_exported_adapter_matches_the_agent_greedy_output(tiny_base, tmp_path):
    spec = LoraSpec(rank=8, alpha=16, target_modules=("q_proj", "v_proj", "o_proj"))
    runtime = LlamaRuntime(tiny_base.config, tiny_base.state_dict)
    gen = torch.Generator().manual_seed(5)
    adapter = {k: torch.randn(v.shape, generator=gen) * 0.3 if "lora_B" in k else v for k, v in init_adapter(spec, runtime.dims, seed=5).items()}
    store = AdapterStore()
    store.publish(adapter)
    engine = Engine(runtime, tiny_base.tokenizer, eos_token_ids=tiny_base.eos_token_ids, store=store, lora_spec=spec, settings=EngineSettings(max_batch=2, max_total_tokens=128))
    engine.start()
    try:
        prompt = engine.encode("The Python language")
        tokens, final = engine.generate(prompt, SamplingParams(max_new_tokens=24, ignore_eos=True))
    finally:
        engine.stop()

    out = export_peft(dict(store.current.tensors), spec, tmp_path / "adapter", base_model="tiny")
    hf_model, _ = load_hf_model("tiny")
    peft_model = PeftModel.from_pretrained(hf_model, str(out))
    with torch.no_grad():
        ref = peft_model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert [t.token.id for t in tokens] == ref[0, len(prompt):].tolist()
    with torch.no_grad():  # and the adapter really matters: without it the output differs
        with peft_model.disable_adapter():
            plain = peft_model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert plain[0].tolist() != ref[0].tolist()
