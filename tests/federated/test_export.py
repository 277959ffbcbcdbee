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
    engine = Engine(
        runtime,
        tiny_base.tokenizer,
        eos_token_ids=tiny_base.eos_token_ids,
        store=store,
        lora_spec=spec,
        settings=EngineSettings(max_batch=2, max_total_tokens=128),
    )
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
        ref = peft_model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert [t.token.id for t in tokens] == ref[0, len(prompt) :].tolist()
    with torch.no_grad():  # and the adapter really matters: without it the output differs
        with peft_model.disable_adapter():
            plain = peft_model.generate(
                input_ids=torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=24,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
    assert plain[0].tolist() != ref[0].tolist()


def test_a_closed_round_refuses_late_uploads_with_a_reason():
    from replica_agent.engine.lora import ModelDims
    from replica_agent.federated.aggregator import Aggregator
    from replica_agent.federated.update import encode_update, make_update

    dims = ModelDims(layers=1, hidden=16, heads=2, kv_heads=1, head_dim=8, intermediate=32)
    spec = LoraSpec(rank=2, alpha=4)
    base = init_adapter(spec, dims, seed=1)
    store = AdapterStore()
    version = store.publish(base)
    shadow = {k: v + 0.01 for k, v in base.items()}
    aggregator = Aggregator(store)
    on_time = make_update("a", "r1", shadow, base, 10)
    assert aggregator.receive("r1", "a", encode_update(on_time), on_time.sha256).accepted
    corrupt = aggregator.receive("r1", "b", b"not safetensors", "0" * 64)
    assert not corrupt.accepted and corrupt.reason == "Corrupt"
    aggregator.aggregate("r1", ["a"], strategy="fedavg", base_sha256=version.sha256)
    late = make_update("b", "r1", shadow, base, 10)
    outcome = aggregator.receive("r1", "b", encode_update(late), late.sha256)
    assert not outcome.accepted and outcome.reason == "RoundClosed" and "too late" in outcome.message


def test_cli_exports_an_agents_current_adapter(tiny_base, tmp_path):
    import json

    from replica_agent.agent import Agent
    from replica_agent.cli import collm_main
    from replica_agent.config import AgentConfig
    from replica_agent.serving.grpc_service import serve_grpc

    agent = Agent(AgentConfig(model="tiny", lora_rank=4, lora_alpha=8), base=tiny_base)
    agent.start()
    server, _, port = serve_grpc(agent)
    try:
        assert collm_main(["adapter", "export", "--from", f"127.0.0.1:{port}", "--out", str(tmp_path / "out")]) == 0
    finally:
        server.stop(grace=0)
        agent.stop()
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and (tmp_path / "out" / "adapter_model.safetensors").exists()
