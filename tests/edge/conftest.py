"""The tiny model split at layer 2 of 4, with a LoRA adapter that changes its output."""

from __future__ import annotations

import pytest
import torch

from replica_agent.edge.exit_head import init_exit_head
from replica_agent.edge.split import PinnedAdapter, split_model
from replica_agent.engine.llama import KVCache, LlamaRuntime, SlabLora
from replica_agent.engine.lora import ALL_MODULES, LoraSlab, LoraSpec, init_adapter

SPLIT = 2


@pytest.fixture(scope="package", autouse=True)
def one_thread():
    """One intra-op thread: one-token matmuls of the tiny model gain nothing from a second, and on a
    shared machine waiting for it made these tests ten times slower (measured: 3.7 s against 0.46 s
    for 64 split-decoded tokens). It also keeps float reductions the same on any core count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def runtime(tiny_base) -> LlamaRuntime:
    return LlamaRuntime(tiny_base.config, tiny_base.state_dict)


def nonzero_adapter(runtime: LlamaRuntime, seed: int, scale: float = 0.05) -> PinnedAdapter:
    """All seven projections adapted, B small but not zero, so both halves' outputs change."""
    spec = LoraSpec(rank=4, alpha=8, target_modules=ALL_MODULES)
    gen = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(v.shape, generator=gen) * scale if "lora_B" in k else v for k, v in init_adapter(spec, runtime.dims, seed=seed).items()}
    return PinnedAdapter.of(tensors, spec)


@pytest.fixture(scope="session")
def adapter(runtime) -> PinnedAdapter:
    return nonzero_adapter(runtime, seed=7)


@pytest.fixture(scope="session")
def halves(runtime, adapter):
    """(edge, cloud) with an untrained exit head: the logit lens, confident on some tokens only."""
    return split_model(runtime, adapter, SPLIT, init_exit_head(runtime, SPLIT, adapter.sha256))


def serving_lora(runtime: LlamaRuntime, adapter: PinnedAdapter) -> SlabLora | None:
    """The adapter as the engine serves it (a slab slot, B pre-scaled): the whole-model reference."""
    if adapter.spec is None:
        return None
    slab = LoraSlab(adapter.spec, runtime.dims, 1, dtype=runtime.dtype, device=runtime.device)
    slab.load(1, adapter.tensors)
    return SlabLora(slab, [0])


def whole_model_greedy(runtime: LlamaRuntime, adapter: PinnedAdapter, prompt: list[int], new_tokens: int) -> tuple[list[int], KVCache]:
    """What a replica serves: prefill, then greedy decode steps, over all layers."""
    lora = serving_lora(runtime, adapter)
    cache = KVCache(runtime.dims, 1, len(prompt) + new_tokens, dtype=runtime.dtype, device=runtime.device)
    logits = runtime.prefill(prompt, cache, 0, lora)
    tokens = []
    for position in range(len(prompt), len(prompt) + new_tokens):
        tokens.append(int(logits.argmax()))
        if len(tokens) < new_tokens:
            logits = runtime.decode(torch.tensor([tokens[-1]]), torch.tensor([position]), cache, lora)[0]
    return tokens, cache


def whole_model_logits(runtime: LlamaRuntime, adapter: PinnedAdapter, ids: list[int]) -> tuple[torch.Tensor, KVCache]:
    """Next-token logits after every position of `ids` ([T, vocab]) and the whole model's KV."""
    cache = KVCache(runtime.dims, 1, len(ids), dtype=runtime.dtype, device=runtime.device)
    return runtime.prefill(ids, cache, 0, serving_lora(runtime, adapter), all_logits=True), cache
