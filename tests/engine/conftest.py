"""A random-weight model of the tiny shape: enough for correctness tests, no pretraining needed."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from replica_agent.engine.llama import LlamaRuntime
from replica_agent.engine.tiny import TinySpec, build_tokenizer, tiny_config


@pytest.fixture(scope="session")
def random_hf_model():
    torch.manual_seed(1234)
    return LlamaForCausalLM(tiny_config(TinySpec())).eval()


@pytest.fixture(scope="session")
def byte_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def random_runtime(random_hf_model):
    state = {k: v.detach().clone() for k, v in random_hf_model.state_dict().items()}
    return LlamaRuntime(random_hf_model.config, state)


def random_adapter(spec, runtime, seed):
    """An adapter whose B is non-zero, so that it changes the model's output."""
    from replica_agent.engine.lora import init_adapter

    gen = torch.Generator().manual_seed(seed)
    tensors = init_adapter(spec, runtime.dims, seed=seed)
    return {k: torch.randn(v.shape, generator=gen) * 0.5 if "lora_B" in k else v for k, v in tensors.items()}
