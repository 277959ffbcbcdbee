"""One model and adapter version split at layer S: the edge's half and the cloud's half.

Both halves run the engine's own layer code (`LlamaRuntime.run_layers`, with its norms, rotary and
LoRA) at the same absolute positions, so together they compute what the whole model computes: the
edge's boundary state (the residual stream after layer S-1, before any norm) is the cloud's input.
Each half keeps a KV cache of its own layers only; the cloud's deep cache is filled from boundary
states alone, so no token ids or embeddings cross the link.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from replica_agent.engine.adapter_store import AdapterVersion, adapter_sha256
from replica_agent.engine.llama import KVCache, LlamaRuntime, TensorLora
from replica_agent.engine.lora import PEFT_PREFIX, LoraSpec, check_adapter
from replica_agent.engine.model_host import BaseModel

if TYPE_CHECKING:
    from .exit_head import ExitHead


@dataclass(frozen=True)
class PinnedAdapter:
    """The one adapter version both halves run, named by its sha256 as the adapter store names it.

    The base model alone is the empty adapter (its sha256 is that of no tensors), so a session
    always pins some version and a mismatch is always detectable."""

    tensors: Mapping[str, torch.Tensor] = field(repr=False)
    spec: LoraSpec | None
    sha256: str

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor], spec: LoraSpec) -> PinnedAdapter:
        return cls(MappingProxyType(dict(tensors)), spec, adapter_sha256(tensors))

    @classmethod
    def from_version(cls, version: AdapterVersion, spec: LoraSpec) -> PinnedAdapter:
        return cls(version.tensors, spec, version.sha256)

    @classmethod
    def base(cls) -> PinnedAdapter:
        return cls(MappingProxyType({}), None, adapter_sha256({}))

    def lora(self, runtime: LlamaRuntime) -> TensorLora | None:
        """The adapter as the runtime applies it (on its device and dtype), None for the base model."""
        if not self.tensors or self.spec is None:
            return None
        tensors = {k: v.to(runtime.device, runtime.dtype) for k, v in self.tensors.items()}
        return TensorLora(tensors, self.spec, runtime.dims)


def edge_runtime(base: BaseModel, split: int) -> LlamaRuntime:
    """A runtime over only what an edge device needs (embeddings, layers [0, S), the final norm that
    initialises exit heads, the LM head): the deep layers are never copied or fused there."""
    layers = base.config.num_hidden_layers
    if not 1 <= split < layers:
        raise ValueError(f"split {split} must be in [1, {layers - 1}] for a model of {layers} layers")
    config = copy.deepcopy(base.config)
    config.num_hidden_layers = split
    kept = {k: v for k, v in base.state_dict.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < split}
    return LlamaRuntime(config, kept)


def run_range(runtime: LlamaRuntime, x: torch.Tensor, start: int, cache: KVCache, layers: range, lora: TensorLora | None) -> torch.Tensor:
    """Positions start..start+T-1 of one sequence ([T, hidden]) through `layers`; their keys and
    values go into row 0 of `cache` (whose layer 0 is `layers.start`) and they attend to all that
    the cache holds before them. One call with T > 1 is how deferred tokens get their KV in a batch."""
    t = x.shape[0]
    end = start + t
    if end > cache.max_len:
        raise ValueError(f"position {end - 1} is past the cache's {cache.max_len} positions")
    positions = torch.arange(start, end, device=runtime.device)
    mask = torch.arange(end, device=runtime.device)[None, :] <= positions[:, None]  # [T, end]: causal over cache + chunk

    def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        j = i - layers.start
        cache.k[j, 0, :, start:end] = k[0]
        cache.v[j, 0, :, start:end] = v[0]
        keys, values = cache.k[j, :1, :, :end], cache.v[j, :1, :, :end]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)

    return runtime.run_layers(x.unsqueeze(0), positions.unsqueeze(0), attend, lora, layers)[0]


def _adapter_layer(key: str) -> int:
    """The layer of a PEFT adapter key (`...model.layers.<i>.<group>.<module>.lora_A.weight`)."""
    return int(key.removeprefix(PEFT_PREFIX + ".").split(".")[0])


def _new_cache(runtime: LlamaRuntime, layers: range, max_len: int) -> KVCache:
    if not 1 <= max_len <= runtime.max_context:
        raise ValueError(f"max_len {max_len} must be in [1, {runtime.max_context}] (the model's context)")
    return KVCache(replace(runtime.dims, layers=len(layers)), 1, max_len, dtype=runtime.dtype, device=runtime.device)


class EdgePartition:
    """Embeddings, layers [0, S) and one exit head: what an edge device runs."""

    def __init__(self, runtime: LlamaRuntime, split: int, adapter: PinnedAdapter, head: ExitHead) -> None:
        if not 1 <= split <= runtime.dims.layers:
            raise ValueError(f"split {split} must be in [1, {runtime.dims.layers}]")
        if head.split != split:
            raise ValueError(f"the exit head reads layer {head.split - 1}'s output, not layer {split - 1}'s")
        if head.adapter_sha256 != adapter.sha256:
            raise ValueError(f"the exit head was trained for adapter {head.adapter_sha256[:12]}, not {adapter.sha256[:12]}")
        if adapter.spec is not None:  # the edge checks (and needs) only the adapter's shallow layers
            shallow = {k: v for k, v in adapter.tensors.items() if _adapter_layer(k) < split}
            check_adapter(shallow, adapter.spec, replace(runtime.dims, layers=split))
        self.runtime, self.split, self.adapter, self.head = runtime, split, adapter, head
        self.layers = range(0, split)
        self._lora = adapter.lora(runtime)

    def new_cache(self, max_len: int) -> KVCache:
        return _new_cache(self.runtime, self.layers, max_len)

    @torch.no_grad()
    def forward(self, ids: Sequence[int], start: int, cache: KVCache) -> torch.Tensor:
        """Boundary states [T, hidden] of tokens `ids` at positions start.. (their shallow KV is cached)."""
        x = self.runtime.embed[torch.tensor(list(ids), device=self.runtime.device)]
        return run_range(self.runtime, x, start, cache, self.layers, self._lora)

    @torch.no_grad()
    def exit_logits(self, boundary: torch.Tensor) -> torch.Tensor:
        """The exit head's next-token logits ([..., vocab], float32) from boundary states."""
        return self.head.logits(self.runtime, boundary)


class CloudPartition:
    """Layers [S, L), the final norm and the LM head: what a replica runs for its edge sessions,
    over its own runtime (one copy of the base weights for serving, training and edge sessions)."""

    def __init__(self, runtime: LlamaRuntime, split: int, adapter: PinnedAdapter) -> None:
        if not 1 <= split < runtime.dims.layers:
            raise ValueError(f"split {split} must be in [1, {runtime.dims.layers - 1}] for a model of {runtime.dims.layers} layers")
        if adapter.spec is not None:
            check_adapter(dict(adapter.tensors), adapter.spec, runtime.dims)
        self.runtime, self.split, self.adapter = runtime, split, adapter
        self.layers = range(split, runtime.dims.layers)
        self._lora = adapter.lora(runtime)

    def new_cache(self, max_len: int) -> KVCache:
        return _new_cache(self.runtime, self.layers, max_len)

    @torch.no_grad()
    def forward(self, states: torch.Tensor, start: int, cache: KVCache) -> torch.Tensor:
        """Next-token logits ([vocab], float32) after the last of boundary states [T, hidden] at
        positions start..; the deep KV of all T is cached."""
        x = run_range(self.runtime, states.to(self.runtime.device, self.runtime.dtype), start, cache, self.layers, self._lora)
        return self.runtime.logits(self.runtime.norm(x[-1]))


def split_model(runtime: LlamaRuntime, adapter: PinnedAdapter, split: int, head: ExitHead) -> tuple[EdgePartition, CloudPartition]:
    """Both halves over one runtime (tests, a replica that simulates its edge); an edge device
    builds its half over `edge_runtime(base, split)` instead."""
    return EdgePartition(runtime, split, adapter, head), CloudPartition(runtime, split, adapter)
