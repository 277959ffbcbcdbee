"""The built-in tiny model: a byte-level Llama pre-trained briefly on English prose, built offline.

Tests, the demo and CPU benchmarks need a real Llama-architecture model that loads like any Hugging
Face checkpoint, trains fast, and has a domain gap for LoRA to close. So we build one from a seed:
a byte-level tokenizer (one token per UTF-8 byte), a small GQA Llama config, and a short full
pre-training run on `pydoc_data.topics` (the Python reference manual's prose, standard library).
The model never sees Python source files, so later LoRA fine-tuning on code shows a clear loss drop.

The result is an ordinary HF model directory in a cache keyed by a fingerprint of the recipe;
a file lock lets concurrent processes (pytest-xdist workers, several agents) build it once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

log = logging.getLogger(__name__)

# Bump when the build code changes in a way that changes the weights, so old caches are not reused.
RECIPE_VERSION = 1
# Thread count of the build: fixed, so that the weights do not depend on the machine's core count.
BUILD_THREADS = 2
# The prose's eval split: every EVAL_EVERY-th topic (sorted by key) is held out of pre-training.
EVAL_EVERY = 10

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<s>", "</s>"
PAD_ID, BOS_ID, EOS_ID = 256, 257, 258
NUM_TOKENS = 259

# Plain-text turns: the tiny vocabulary has no chat special tokens, and the OpenAI chat route
# needs some template.
CHAT_TEMPLATE = "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"


@dataclass(frozen=True)
class TinySpec:
    """Everything that determines the tiny model's weights (with the torch/transformers versions)."""

    seed: int = 0
    vocab_size: int = 264  # 259 tokens rounded up to a multiple of 8
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2  # GQA, so that the engine's attention handles grouped heads
    intermediate_size: int = 688
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    # Measured on 2 shared CPU cores: about 40 s; more short steps beat fewer long ones here.
    pretrain_steps: int = 500
    pretrain_batch_size: int = 4
    pretrain_seq_len: int = 128
    pretrain_lr: float = 3e-3
    pretrain_warmup_steps: int = 30

    def fingerprint(self) -> str:
        payload = {
            "spec": dataclasses.asdict(self),
            "recipe": RECIPE_VERSION,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("COLLM_CACHE_DIR") or Path.home() / ".cache" / "collm")


def tiny_config(spec: TinySpec = TinySpec()) -> transformers.LlamaConfig:
    if spec.vocab_size < NUM_TOKENS:
        raise ValueError(f"vocab_size {spec.vocab_size} is below the {NUM_TOKENS} tokens of the byte vocabulary")
    return transformers.LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=spec.rope_theta,
        rms_norm_eps=spec.rms_norm_eps,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def _byte_symbols() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order: what the ByteLevel steps use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Byte-level tokenizer: token id b is UTF-8 byte b; then <pad>, <s>, </s>.

    Like Llama tokenizers it prepends <s> (pre-training documents start with it); pass
    `add_special_tokens=False` for the bare bytes. Text containing a literal "<s>", "</s>" or "<pad>"
    encodes to the special token, as in every Hugging Face tokenizer.
    Decoding a cut-off UTF-8 sequence yields U+FFFD, which incremental detokenization handles.
    """
    symbols = _byte_symbols()
    vocab = {symbol: byte for byte, symbol in enumerate(symbols)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split and no prefix space: the text maps to bytes one for one and back exactly.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([PAD_TOKEN, BOS_TOKEN, EOS_TOKEN])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1", special_tokens=[(BOS_TOKEN, BOS_ID)]
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=TinySpec.max_position_embeddings,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id] == [PAD_ID, BOS_ID, EOS_ID]
    return tokenizer


def prose_documents(split: str = "train") -> list[str]:
    """The English prose corpus (Python reference manual topics), split by topic into train/eval."""
    from pydoc_data.topics import topics

    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    keys = sorted(topics)
    held_out = {key for i, key in enumerate(keys) if i % EVAL_EVERY == EVAL_EVERY - 1}
    return [topics[key] for key in keys if (key in held_out) == (split == "eval")]


def document_token_stream(documents: list[str]) -> torch.Tensor:
    """<s> bytes </s> for each document, concatenated: the byte tokenizer's ids, without its overhead."""
    ids: list[int] = []
    for text in documents:
        ids.append(BOS_ID)
        ids.extend(text.encode("utf-8"))
        ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.long)


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _pretrain(model: transformers.LlamaForCausalLM, spec: TinySpec) -> float:
    """Full pre-training on random windows of the prose; returns the mean loss of the last steps."""
    stream = document_token_stream(prose_documents("train"))
    window = spec.pretrain_seq_len + 1
    generator = torch.Generator().manual_seed(spec.seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.1)

    def lr_factor(step: int) -> float:  # linear warmup, cosine decay to 10 %
        if step < spec.pretrain_warmup_steps:
            return (step + 1) / spec.pretrain_warmup_steps
        progress = (step - spec.pretrain_warmup_steps) / max(1, spec.pretrain_steps - spec.pretrain_warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    recent: list[float] = []
    for _ in range(spec.pretrain_steps):
        starts = torch.randint(0, len(stream) - window, (spec.pretrain_batch_size,), generator=generator)
        batch = torch.stack([stream[s : s + window] for s in starts.tolist()])
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        recent = (recent + [loss.item()])[-20:]
    model.eval()
    return sum(recent) / len(recent) if recent else float("nan")


def _build(target: Path, spec: TinySpec) -> dict:
    started = time.perf_counter()
    with _torch_threads(BUILD_THREADS), torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = transformers.LlamaForCausalLM(tiny_config(spec))
        final_loss = _pretrain(model, spec)
    model.generation_config = transformers.GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model.save_pretrained(target, safe_serialization=True)
    build_tokenizer().save_pretrained(target)
    info = {
        "spec": dataclasses.asdict(spec),
        "fingerprint": spec.fingerprint(),
        "build_seconds": round(time.perf_counter() - started, 2),
        "final_pretrain_loss": round(final_loss, 4),
    }
    (target / "collm_tiny.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def ensure_tiny_model(cache_dir: Path | None = None, spec: TinySpec = TinySpec()) -> Path:
    """Return the HF model directory of the tiny model, building it once if the cache lacks it."""
    models_dir = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser() / "models"
    target = models_dir / f"tiny-{spec.fingerprint()[:12]}"
    if target.is_dir():
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    with open(models_dir / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it: wait for it
        if target.is_dir():
            return target
        log.info("building the tiny model into %s (seed %d, %d pre-training steps)", target, spec.seed, spec.pretrain_steps)
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=models_dir))
        try:
            info = _build(scratch, spec)
            scratch.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
            os.rename(scratch, target)  # atomic: readers see no directory or a complete one
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    log.info(
        "built the tiny model in %.1f s, final pre-training loss %.3f nats/byte",
        info["build_seconds"],
        info["final_pretrain_loss"],
    )
    return target
