"""LoRA adapters in PEFT's naming, and the slab that serves several versions in one batch.

An adapter is a flat mapping from PEFT state-dict keys to tensors, e.g.
``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`` ([r, in]) and ``...lora_B.weight``
([out, r]). That is the format the adapter store hashes and versions, that travels between
replicas, and that ``PeftModel.from_pretrained`` loads.

Serving does not go through peft: its generic mixed-adapter path costs about half the decode speed
on a small model. Instead every projection site (fused q/k/v, o, fused gate/up, down) keeps one
slab per layer holding all loaded versions side by side, ``A`` as [in, V*R] and ``B`` as [V*R, out]
(B pre-scaled by alpha/r). A batch whose rows use different versions then costs two matmuls and one
multiply by a per-row version mask: ``y += ((x @ A) * mask) @ B``, the same kernels for one version
or several (the Punica/S-LoRA idea in its simplest dense form).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

PEFT_PREFIX = "base_model.model.model.layers"
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
ALL_MODULES = ATTENTION_MODULES + MLP_MODULES

# Projection sites of a Llama layer: each site is one fused base matmul whose output is split
# into the listed modules, in this order.
SITES: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
MODULE_SITE = {m: site for site, mods in SITES.items() for m in mods}


@dataclass(frozen=True)
class LoraSpec:
    """Shape of the adapters a cluster trains and serves (PEFT's LoraConfig, minus what we never use)."""

    rank: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        unknown = sorted(set(self.target_modules) - set(ALL_MODULES))
        if unknown or not self.target_modules:
            raise ValueError(f"LoRA target modules {unknown or '[]'} are not supported; choose from {list(ALL_MODULES)}")
        if self.dropout != 0.0:
            # Serving and training share one set of modules that stay in eval mode for life.
            raise ValueError("LoRA dropout must be 0 (training and serving share the base weights)")
        object.__setattr__(self, "target_modules", tuple(m for m in ALL_MODULES if m in self.target_modules))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def peft_config(self, base_model_name: str) -> dict:
        """The adapter_config.json that makes a saved adapter loadable by peft."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": list(self.target_modules),
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
        }


def module_path(layer: int, module: str) -> str:
    group = "self_attn" if module in ATTENTION_MODULES else "mlp"
    return f"{PEFT_PREFIX}.{layer}.{group}.{module}"


def lora_keys(layer: int, module: str) -> tuple[str, str]:
    path = module_path(layer, module)
    return f"{path}.lora_A.weight", f"{path}.lora_B.weight"


@dataclass(frozen=True)
class ModelDims:
    """The sizes of a Llama-family model that LoRA shapes depend on."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    def module_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a projection."""
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (self.hidden, q_out),
            "k_proj": (self.hidden, kv_out),
            "v_proj": (self.hidden, kv_out),
            "o_proj": (q_out, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }[module]


def init_adapter(spec: LoraSpec, dims: ModelDims, *, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """PEFT's default init: A kaiming-uniform, B zero, so a fresh adapter leaves the model unchanged."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for layer in range(dims.layers):
        for module in spec.target_modules:
            fan_in, fan_out = dims.module_shape(module)
            bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_ with a=sqrt(5), as nn.Linear and peft
            a_key, b_key = lora_keys(layer, module)
            out[a_key] = (torch.rand(spec.rank, fan_in, generator=gen) * 2 - 1).mul_(bound).to(dtype)
            out[b_key] = torch.zeros(fan_out, spec.rank, dtype=dtype)
    return out


def check_adapter(tensors: dict[str, torch.Tensor], spec: LoraSpec, dims: ModelDims) -> None:
    """Raise ValueError naming the first tensor that does not fit this spec and model."""
    expected = {}
    for layer in range(dims.layers):
        for module in spec.target_modules:
            fan_in, fan_out = dims.module_shape(module)
            a_key, b_key = lora_keys(layer, module)
            expected[a_key] = (spec.rank, fan_in)
            expected[b_key] = (fan_out, spec.rank)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"adapter keys do not match the LoRA spec: missing {missing[:3]}, unexpected {extra[:3]}")
    for key, shape in expected.items():
        t = tensors[key]
        if tuple(t.shape) != shape:
            raise ValueError(f"adapter tensor {key} has shape {tuple(t.shape)}, expected {shape}")
        if not torch.isfinite(t).all():
            raise ValueError(f"adapter tensor {key} has NaN or Inf values")


class LoraSlab:
    """All adapter versions loaded for serving, laid out for one-pass mixed-version batches.

    Slots are filled and freed only by the engine thread, between iterations, so a running decode
    step never sees a half-written slot.
    """

    def __init__(self, spec: LoraSpec, dims: ModelDims, slots: int, *, dtype, device) -> None:
        self.spec, self.dims, self.slots = spec, dims, slots
        self.sites = {s: tuple(m for m in mods if m in spec.target_modules) for s, mods in SITES.items()}
        self.sites = {s: mods for s, mods in self.sites.items() if mods}
        r, v = spec.rank, slots
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        self.site_rank: dict[str, int] = {}
        for site, mods in self.sites.items():
            fan_in = dims.module_shape(mods[0])[0]
            site_out = sum(dims.module_shape(m)[1] for m in SITES[site])
            width = r * len(mods)
            self.site_rank[site] = width
            self.a[site] = torch.zeros(dims.layers, fan_in, v * width, dtype=dtype, device=device)
            self.b[site] = torch.zeros(dims.layers, v * width, site_out, dtype=dtype, device=device)
        self._version_of_slot: list[int | None] = [None] * slots

    def slot_of(self, version: int) -> int | None:
        try:
            return self._version_of_slot.index(version)
        except ValueError:
            return None

    def loaded_versions(self) -> set[int]:
        return {v for v in self._version_of_slot if v is not None}

    def load(self, version: int, tensors: Mapping[str, torch.Tensor]) -> int | None:
        """Copy a version into a free slot; returns the slot, or None when every slot is taken."""
        existing = self.slot_of(version)
        if existing is not None:
            return existing
        if None not in self._version_of_slot:
            return None
        slot = self._version_of_slot.index(None)
        r, scale = self.spec.rank, self.spec.scaling
        with torch.no_grad():
            for site, mods in self.sites.items():
                width = self.site_rank[site]
                cols = slice(slot * width, (slot + 1) * width)
                a_site, b_site = self.a[site], self.b[site]
                b_site[:, cols].zero_()
                out_offsets = _out_offsets(self.dims, site)
                for layer in range(self.dims.layers):
                    for j, module in enumerate(mods):
                        a_key, b_key = lora_keys(layer, module)
                        rows = slice(slot * width + j * r, slot * width + (j + 1) * r)
                        a_site[layer, :, rows] = tensors[a_key].t()
                        lo, hi = out_offsets[module]
                        b_site[layer, rows, lo:hi] = tensors[b_key].t() * scale
        self._version_of_slot[slot] = version
        return slot

    def evict(self, version: int) -> None:
        slot = self.slot_of(version)
        if slot is not None:
            self._version_of_slot[slot] = None

    def row_masks(self, slots_per_row: torch.Tensor, slot_range: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """Per site, a [rows, slots * R] 0/1 mask selecting each row's version columns among the
        slots of `slot_range` (first, end); all slots by default."""
        first, end = slot_range or (0, self.slots)
        masks = {}
        for site, width in self.site_rank.items():
            col_slot = first + torch.arange((end - first) * width, device=slots_per_row.device) // width
            masks[site] = (col_slot[None, :] == slots_per_row[:, None]).to(self.a[site].dtype)
        return masks


def _out_offsets(dims: ModelDims, site: str) -> dict[str, tuple[int, int]]:
    offsets, start = {}, 0
    for module in SITES[site]:
        width = dims.module_shape(module)[1]
        offsets[module] = (start, start + width)
        start += width
    return offsets
