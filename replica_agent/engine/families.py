"""The model families the engine serves, and small random models of each for tests and benchmarks.

Llama, Mistral, Qwen2/Qwen2.5 and Qwen3 share one layer layout (RMSNorm, rotary attention with
grouped KV heads, SwiGLU MLP, projections named q/k/v/o and gate/up/down), so one forward pass
(`llama.LlamaRuntime`) serves all four. What differs is data, kept here:

- biases on projections (Qwen2's q/k/v, Llama's optional `attention_bias` / `mlp_bias`) are read
  from the weights: a site has a bias exactly when the checkpoint has one;
- Qwen3 normalises q and k per head (RMSNorm over `head_dim`) before the rotary embedding, and
  states `head_dim` explicitly (it need not be hidden / heads);
- rope scaling (Llama 3.x's `llama3`, `linear`, `yarn`...) comes from transformers' own rope
  functions;
- a sliding attention window (Mistral's `sliding_window`, Qwen's `use_sliding_window`) caps the
  context a replica serves, so that no attention span ever exceeds the window and full attention
  stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers

from .tiny import BOS_ID, EOS_ID, NUM_TOKENS, PAD_ID, TinySpec


@dataclass(frozen=True)
class Family:
    name: str  # as users know it
    model_type: str  # Hugging Face config.model_type
    qk_norm: bool  # RMSNorm on q and k per head (Qwen3)
    config_class: type[transformers.PretrainedConfig]


FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family("Llama", "llama", False, transformers.LlamaConfig),
        Family("Mistral", "mistral", False, transformers.MistralConfig),
        Family("Qwen2", "qwen2", False, transformers.Qwen2Config),
        Family("Qwen3", "qwen3", True, transformers.Qwen3Config),
    )
}


def supported() -> str:
    return ", ".join(f"{f.name} ({f.model_type!r})" for f in FAMILIES.values())


def family_of(config: transformers.PretrainedConfig) -> Family:
    """The family of a Hugging Face config, or a ValueError that names the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported; CoLLM serves {supported()}")
    activation = getattr(config, "hidden_act", "silu")
    if activation != "silu":
        raise ValueError(f"hidden_act {activation!r} is not supported (the {FAMILIES[model_type].name} layout uses silu)")
    return FAMILIES[model_type]


def attention_window(config: transformers.PretrainedConfig) -> int | None:
    """The sliding attention window, when the config turns one on (None: full attention)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return int(window)


# Longer contexts than this need KV-cache memory no replica here has; configs may claim 128k.
MAX_CONTEXT_CAP = 8192


def max_context(config: transformers.PretrainedConfig) -> int:
    """The longest sequence a replica serves: the model's, capped by the window and MAX_CONTEXT_CAP."""
    window = attention_window(config)
    return min(int(config.max_position_embeddings), MAX_CONTEXT_CAP, window if window is not None else MAX_CONTEXT_CAP)


# -- random models ----------------------------------------------------------------------------
# Random weights are enough to check a forward pass against transformers', to serve and train in
# the agent, and to measure throughput on a GPU; they say nothing about quality.

SIZES: dict[str, dict] = {
    # The tiny model's shape (byte vocabulary): fast enough for tests on two CPU cores.
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=688),
    # Llama-3.2-1B's shape with a 32k vocabulary: GPU throughput figures.
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192),
}
RANDOM_SOURCE_PREFIX = "random:"


def parse_random_source(source: str) -> tuple[Family, str]:
    """'random:qwen3' or 'random:llama-1b' -> (family, size)."""
    body = source.removeprefix(RANDOM_SOURCE_PREFIX)
    model_type, _, size = body.partition("-")
    size = size or "small"
    if model_type not in FAMILIES or size not in SIZES:
        raise ValueError(
            f"random model {source!r} is not known; use random:<family>[-<size>] with family one of {', '.join(FAMILIES)} and size one of {', '.join(SIZES)}"
        )
    return FAMILIES[model_type], size


def random_config(family: Family, size: str = "small", **overrides) -> transformers.PretrainedConfig:
    shape = dict(SIZES[size])
    kwargs: dict = dict(
        vocab_size=-(-NUM_TOKENS // 8) * 8 if size == "small" else 32768,
        max_position_embeddings=TinySpec.max_position_embeddings,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=size == "small",
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    if family.model_type == "qwen3":
        kwargs["head_dim"] = 2 * shape["hidden_size"] // shape["num_attention_heads"]  # not hidden/heads, as in Qwen3
    if family.model_type == "mistral":
        kwargs["sliding_window"] = TinySpec.max_position_embeddings // 2
    kwargs.update(shape)
    kwargs.update(overrides)
    return family.config_class(**kwargs)


def randomize_vectors(model: torch.nn.Module, *, seed: int) -> None:
    """Give norms and biases values away from their init (ones, zeros), so that a forward that
    skipped or misplaced one of them could not agree with the reference by chance."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                noise = torch.randn(param.shape, generator=generator) * (0.2 if "norm" in name else 0.05)
                param.add_(noise.to(param.device, param.dtype))


def build_random_model(family: Family, size: str = "small", *, seed: int = 0, dtype=torch.float32, device=None, **overrides) -> transformers.PreTrainedModel:
    """A Hugging Face model of the family with seeded random weights (eval mode), built on `device`."""
    config = random_config(family, size, **overrides)
    with torch.random.fork_rng(devices=[]), torch.device(device or "cpu"):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        randomize_vectors(model, seed=seed + 1)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    return model.eval()
