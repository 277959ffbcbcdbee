"""Our own forward pass of a Llama-layout model (Llama, Mistral, Qwen2, Qwen3: see families.py),
over weights loaded by transformers.

Why not call the transformers module: continuous batching needs a KV cache where every row has
its own length and rows join and leave between iterations, and multi-version LoRA needs a grouped
computation that peft does not have. Both are easy in a forward of our own (about a page), and
tests check it against transformers' logits to float tolerance.

Three entry points share the layer code:
- ``prefill``: one new request's prompt, written into its KV-cache row;
- ``decode``: one token for each running row, reading the rows' caches;
- ``forward_train``: whole sequences with a trainable adapter (autograd on the LoRA tensors only).
The runtime holds no mutable state besides what callers pass in, so the serving thread and the
training thread use one instance (one copy of the base weights) at the same time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .families import family_of, max_context
from .lora import SITES, LoraSlab, LoraSpec, ModelDims, lora_keys


def model_dims(config) -> ModelDims:
    heads = config.num_attention_heads
    return ModelDims(
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        intermediate=config.intermediate_size,
    )


class KVCache:
    """Keys and values of every running request, one row per request, rows kept contiguous."""

    def __init__(self, dims: ModelDims, rows: int, max_len: int, *, dtype, device) -> None:
        shape = (dims.layers, rows, dims.kv_heads, max_len, dims.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.rows, self.max_len = rows, max_len

    def move_row(self, src: int, dst: int, length: int) -> None:
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


class SlabLora:
    """Serving-side LoRA: every row uses the slab slot its request is pinned to.

    Only the slots between the lowest and the highest one in use take part in the matmuls; when all
    rows use one slot (one live version, the common case) no mask is needed at all.
    """

    def __init__(self, slab: LoraSlab, slots_per_row: list[int] | torch.Tensor, device: torch.device | str | None = None) -> None:
        """`slots_per_row`: each row's slab slot, -1 for a row without an adapter."""
        if isinstance(slots_per_row, torch.Tensor):
            device, slots_per_row = slots_per_row.device, slots_per_row.tolist()
        self.slab = slab
        used = [s for s in slots_per_row if s >= 0]
        self.first, self.end = min(used), max(used) + 1
        uniform = self.end - self.first == 1 and len(used) == len(slots_per_row)
        self.masks = None if uniform else slab.row_masks(torch.tensor(slots_per_row, device=device), (self.first, self.end))

    def apply(self, site: str, layer: int, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if site not in self.slab.sites:
            return y
        width = self.slab.site_rank[site]
        cols = slice(self.first * width, self.end * width)
        xa = h @ self.slab.a[site][layer][:, cols]
        if self.masks is not None:
            xa.mul_(self.masks[site])
        return torch.addmm(y, xa, self.slab.b[site][layer][cols])


class TensorLora:
    """Training-side LoRA over plain tensors in PEFT naming (autograd flows into them)."""

    def __init__(self, tensors: dict[str, torch.Tensor], spec: LoraSpec, dims: ModelDims) -> None:
        self.tensors, self.spec, self.dims = tensors, spec, dims

    def apply(self, site: str, layer: int, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        modules = SITES[site]
        if not any(m in self.spec.target_modules for m in modules):
            return y
        parts = y.split([self.dims.module_shape(m)[1] for m in modules], dim=-1)
        out = []
        for module, part in zip(modules, parts):
            if module in self.spec.target_modules:
                a_key, b_key = lora_keys(layer, module)
                part = part + (h @ self.tensors[a_key].t()) @ self.tensors[b_key].t() * self.spec.scaling
            out.append(part)
        return torch.cat(out, dim=-1)


@dataclass
class _Layer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    w: dict[str, torch.Tensor]
    bias: dict[str, torch.Tensor | None]
    q_norm: torch.Tensor | None  # per-head RMSNorm weights (Qwen3)
    k_norm: torch.Tensor | None


class LlamaRuntime:
    def __init__(self, config, state_dict: dict[str, torch.Tensor]) -> None:
        """`state_dict` by Hugging Face names; the q/k/v and gate/up entries are replaced by views of
        the fused tensors (same values), so that the unfused copies can be freed."""
        self.family = family_of(config)
        self.config = config
        self.max_context = max_context(config)
        self.dims = dims = model_dims(config)
        sd = state_dict
        self.embed = sd["model.embed_tokens.weight"]
        self.lm_head = sd.get("lm_head.weight", self.embed)
        self.final_norm = sd["model.norm.weight"]
        self.dtype, self.device = self.embed.dtype, self.embed.device
        self.eps = float(config.rms_norm_eps)
        self.layers: list[_Layer] = []
        for i in range(dims.layers):
            p = f"model.layers.{i}."
            w, bias = {}, {}
            for site, modules in SITES.items():
                group = "self_attn" if site in ("qkv", "o") else "mlp"
                keys = [f"{p}{group}.{m}.weight" for m in modules]
                w[site] = torch.cat([sd[k] for k in keys]).contiguous()
                if len(keys) > 1:  # the names now view the fused tensor: one copy of the weights, not two
                    for k, part in zip(keys, w[site].split([sd[k].shape[0] for k in keys])):
                        sd[k] = part
                biases = [sd.get(f"{p}{group}.{m}.bias") for m in modules]
                bias[site] = torch.cat(biases).contiguous() if all(b is not None for b in biases) else None
            q_norm, k_norm = (sd[f"{p}self_attn.{n}.weight"] for n in ("q_norm", "k_norm")) if self.family.qk_norm else (None, None)
            norms = sd[f"{p}input_layernorm.weight"], sd[f"{p}post_attention_layernorm.weight"]
            self.layers.append(_Layer(*norms, w, bias, q_norm, k_norm))
        for t in [self.embed, self.lm_head, self.final_norm, *(t for layer in self.layers for t in layer.w.values())]:
            t.requires_grad_(False)
        self._init_rotary()

    # -- rotary embeddings ------------------------------------------------------------------
    def _init_rotary(self) -> None:
        scaling = getattr(self.config, "rope_scaling", None) or {}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type == "dynamic" or rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"rope scaling {rope_type!r} is not supported")
        inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](self.config, torch.device("cpu"))
        positions = torch.arange(self.max_context, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq.float())
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = (emb.cos() * attention_scaling).to(self.dtype).to(self.device)
        self.sin = (emb.sin() * attention_scaling).to(self.dtype).to(self.device)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    # -- shared layer stack -----------------------------------------------------------------
    def _stack(self, x: torch.Tensor, positions: torch.Tensor, attend, lora) -> torch.Tensor:
        """x: [B, T, hidden]; positions: [B, T]; attend(layer, q, k, v) -> [B, heads, T, head_dim]."""
        return self.norm(self.run_layers(x, positions, attend, lora))

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """The final RMSNorm, applied to the residual stream before the LM head."""
        return F.rms_norm(x, (self.dims.hidden,), self.final_norm, self.eps)

    def run_layers(self, x: torch.Tensor, positions: torch.Tensor, attend, lora, layers: range | None = None) -> torch.Tensor:
        """The residual stream after `layers` (all by default), before the final norm: cloud-edge
        inference (replica_agent/edge) runs the first layers on one machine and the rest on another.
        `attend` gets absolute layer indices, as in `_stack`."""
        d = self.dims
        b, t, _ = x.shape
        cos = self.cos[positions].unsqueeze(1)  # [B, 1, T, D]
        sin = self.sin[positions].unsqueeze(1)
        q_w, kv_w = d.heads * d.head_dim, d.kv_heads * d.head_dim
        indices = range(len(self.layers)) if layers is None else layers
        for i in indices:
            layer = self.layers[i]
            h = F.rms_norm(x, (d.hidden,), layer.input_norm, self.eps).reshape(b * t, d.hidden)
            qkv = self._project(i, "qkv", h, lora)
            q, k, v = qkv.split([q_w, kv_w, kv_w], dim=-1)
            q, k = q.view(b, t, d.heads, d.head_dim), k.view(b, t, d.kv_heads, d.head_dim)
            if layer.q_norm is not None:
                q = F.rms_norm(q, (d.head_dim,), layer.q_norm, self.eps)
                k = F.rms_norm(k, (d.head_dim,), layer.k_norm, self.eps)
            q = self._rotate(q.transpose(1, 2), cos, sin)
            k = self._rotate(k.transpose(1, 2), cos, sin)
            v = v.view(b, t, d.kv_heads, d.head_dim).transpose(1, 2)
            attn = attend(i, q, k, v).transpose(1, 2).reshape(b * t, q_w)
            x = x + self._project(i, "o", attn, lora).view(b, t, d.hidden)
            h = F.rms_norm(x, (d.hidden,), layer.post_norm, self.eps).reshape(b * t, d.hidden)
            gate, up = self._project(i, "gate_up", h, lora).split([d.intermediate, d.intermediate], dim=-1)
            x = x + self._project(i, "down", F.silu(gate) * up, lora).view(b, t, d.hidden)
        return x

    def _project(self, i: int, site: str, h: torch.Tensor, lora) -> torch.Tensor:
        layer = self.layers[i]
        y = F.linear(h, layer.w[site], layer.bias[site])
        return y if lora is None else lora.apply(site, i, h, y)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head).float()

    # -- serving ----------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, ids: list[int], cache: KVCache, row: int, lora: SlabLora | None, *, all_logits: bool = False) -> torch.Tensor:
        """Run a prompt into cache row `row`; returns logits of the last position ([V]) or of all ([T, V])."""
        t = len(ids)
        x = self.embed[torch.tensor(ids, device=self.device)].unsqueeze(0)
        positions = torch.arange(t, device=self.device).unsqueeze(0)

        def attend(i, q, k, v):
            cache.k[i, row, :, :t] = k[0]
            cache.v[i, row, :, :t] = v[0]
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        hidden = self._stack(x, positions, attend, lora)[0]
        return self.logits(hidden if all_logits else hidden[-1])

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, lora: SlabLora | None) -> torch.Tensor:
        """One step for rows 0..B-1 of the cache: ids and positions are [B]; returns logits [B, V]."""
        b = ids.shape[0]
        rows = torch.arange(b, device=self.device)
        span = int(positions.max()) + 1
        mask = (torch.arange(span, device=self.device)[None, :] <= positions[:, None]).view(b, 1, 1, span)

        def attend(i, q, k, v):
            cache.k[i, rows, :, positions] = k[:, :, 0]
            cache.v[i, rows, :, positions] = v[:, :, 0]
            keys, values = cache.k[i, :b, :, :span], cache.v[i, :b, :, :span]
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)

        hidden = self._stack(self.embed[ids].unsqueeze(1), positions.unsqueeze(1), attend, lora)
        return self.logits(hidden[:, 0])

    # -- training ---------------------------------------------------------------------------
    def forward_train(self, input_ids: torch.Tensor, lora: TensorLora | None) -> torch.Tensor:
        """Logits [B, T, V] of whole sequences (causal), differentiable in the LoRA tensors."""
        input_ids = input_ids.to(self.device)  # batches come from the CPU-side dataset
        b, t = input_ids.shape
        positions = torch.arange(t, device=self.device).expand(b, t)

        def attend(i, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        return self.logits(self._stack(self.embed[input_ids], positions, attend, lora))

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor, lora: TensorLora | None) -> torch.Tensor:
        """Mean next-token cross-entropy over labelled positions (HF convention: labels aligned with inputs)."""
        logits = self.forward_train(input_ids, lora)
        labels = labels.to(logits.device)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
