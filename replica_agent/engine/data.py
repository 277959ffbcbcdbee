"""The replica's local private dataset: read, tokenize, pack into fixed-length chunks, split.

Sources are a `.jsonl` file (`text`, or `prompt` + `completion`, per line), a folder of text files,
or one plain text file. Chunks follow the Hugging Face causal-LM convention: `labels` is aligned
with `input_ids` (the model's loss shifts), with -100 where no loss is taken (prompt, padding).
The split is a hash of (seed, chunk index, chunk content), so it is stable across runs and machines.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # importing transformers costs seconds; append_feedback's callers need none of it
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
DEFAULT_INCLUDE: tuple[str, ...] = ("*.py", "*.txt", "*.md", "*.rst", "*.jsonl")
_SPLIT_BUCKETS = 10_000


class DataError(ValueError):
    """The user's data (or its path) cannot be used; the message says what to fix."""


class EmptyDataError(DataError):
    """The data path exists but holds nothing to train on (yet)."""


@dataclass(frozen=True)
class Example:
    """One document (`text`) or one supervised pair (`prompt` + `completion`, loss on completion)."""

    text: str | None = None
    prompt: str | None = None
    completion: str | None = None

    def __post_init__(self) -> None:
        if self.text is not None:
            if self.prompt is not None or self.completion is not None:
                raise DataError("give either 'text' or 'prompt' + 'completion', not both")
            if not isinstance(self.text, str) or not self.text:
                raise DataError("'text' must be a non-empty string")
            return
        if not isinstance(self.prompt, str) or not isinstance(self.completion, str):
            raise DataError("give 'text' (a string) or both 'prompt' and 'completion' (strings)")
        if not self.completion:
            raise DataError("'completion' must be a non-empty string")


def _parse_jsonl(path: Path, content: str) -> list[Example]:
    examples = []
    # Not splitlines(): it also splits at U+2028 and friends, which JSON strings may hold unescaped.
    for lineno, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg}); write one JSON object per line") from exc
        if not isinstance(record, dict):
            raise DataError(f'{where}: expected a JSON object like {{"text": "..."}}, got {type(record).__name__}')
        try:
            examples.append(Example(record.get("text"), record.get("prompt"), record.get("completion")))
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from exc
    return examples


def _decode(path: Path) -> str | None:
    """The file's text, or None when it is not UTF-8 text."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        return None
    return None if "\x00" in text else text


PROSE = "prose"


def stdlib_domain(name: str, cache_dir: str | Path | None = None) -> Path:
    """Offline non-IID data for one replica: a standard-library package (Python code, e.g. "json")
    or "prose", the English of Python's reference documentation (`pydoc_data.topics`, one topic
    per line of a .jsonl file written once under `cache_dir`, default ~/.cache/collm). Code and
    prose share little, so what one replica learns helps the other's requests much less than two
    code packages would."""
    if name != PROSE:
        return stdlib_package_dir(name)
    from pydoc_data.topics import topics

    folder = Path(cache_dir or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "collm" / "domains"
    lines = "".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for _, text in sorted(topics.items()))
    path = folder / f"prose-{hashlib.sha256(lines.encode()).hexdigest()[:12]}.jsonl"  # named by content: a Python upgrade writes a new file
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(lines, encoding="utf-8")
        os.replace(partial, path)  # atomic: replicas starting together never read half a file
    return path


def _read_file(path: Path) -> list[Example]:
    text = _decode(path)
    if text is None:
        raise DataError(f"{path} is not UTF-8 text; convert it or point at a folder of text files")
    if path.suffix == ".jsonl":
        return _parse_jsonl(path, text)
    return [Example(text=text)] if text.strip() else []


def _read_folder(root: Path, include: Sequence[str]) -> list[Example]:
    def wanted(path: Path) -> bool:
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):  # .git, .venv, editor files
            return False
        return path.is_file() and any(fnmatchcase(rel.name, g) or fnmatchcase(rel.as_posix(), g) for g in include)

    examples: list[Example] = []
    for path in sorted(filter(wanted, root.rglob("*")), key=lambda p: p.relative_to(root).as_posix()):
        text = _decode(path)
        if text is None:
            log.warning("skipping %s: not UTF-8 text", path)
        elif path.suffix == ".jsonl":
            examples.extend(_parse_jsonl(path, text))
        elif text.strip():
            examples.append(Example(text=text))
    return examples


def read_examples(path: str | Path, include: Sequence[str] = DEFAULT_INCLUDE) -> list[Example]:
    """Every example under `path`: a .jsonl file, a text file, or a folder searched recursively
    (hidden entries skipped, files sorted by relative path, each text file one document)."""
    path = Path(path)
    if path.is_dir():
        examples = _read_folder(path, include)
        what = f"no non-empty file under {path} matches {list(include)}"
    elif path.is_file():
        examples = _read_file(path)
        what = f"{path} holds no example"
    else:
        raise DataError(f"data path {path} does not exist; point at a .jsonl file, a text file or a folder")
    if not examples:
        raise EmptyDataError(f"empty dataset: {what}; add data or change the path/include globs")
    return examples


@dataclass(frozen=True, eq=False)
class Batch:
    input_ids: torch.Tensor  # [micro_batch, seq_len] long
    labels: torch.Tensor  # same shape; IGNORE_INDEX where no loss is taken

    @property
    def tokens(self) -> int:
        """Training tokens: positions that carry a label."""
        return int((self.labels != IGNORE_INDEX).sum())


def _token_streams(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; documents could not be separated when packed")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []

    def encode(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []

    plain = iter(encode([e.text for e in examples if e.text is not None]))
    pairs = [e for e in examples if e.text is None]
    prompts = iter(encode([e.prompt for e in pairs]))
    completions = iter(encode([e.completion for e in pairs]))
    ids: list[int] = []
    labels: list[int] = []
    for example in examples:  # keep the examples' order: the pack is a function of the data order
        if example.text is not None:
            doc = bos + next(plain) + [eos]
            ids += doc
            labels += doc
        else:
            prompt, completion = bos + next(prompts), next(completions) + [eos]
            ids += prompt + completion
            labels += [IGNORE_INDEX] * len(prompt) + completion
    return ids, labels


def _split_score(seed: int, index: int, ids: torch.Tensor, labels: torch.Tensor) -> int:
    digest = hashlib.sha256(f"{seed}:{index}:".encode())
    digest.update(ids.numpy().tobytes())
    digest.update(labels.numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], "big") % _SPLIT_BUCKETS


def _epoch_seed(seed: int, epoch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:8], "big") >> 1


class LocalDataset:
    """Tokenized, packed, split into train/eval deterministically."""

    def __init__(
        self,
        examples: Sequence[Example],
        tokenizer: PreTrainedTokenizerBase,
        *,
        seq_len: int = 128,
        eval_fraction: float = 0.1,
        seed: int = 0,
        max_eval_chunks: int = 64,
    ) -> None:
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
        if max_eval_chunks < 1:
            raise ValueError(f"max_eval_chunks must be >= 1, got {max_eval_chunks}")
        if not examples:
            raise DataError("empty dataset: no example to train on")
        self.seq_len = seq_len
        self.seed = seed

        ids, labels = _token_streams(examples, tokenizer)
        pad_len = -len(ids) % seq_len
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        all_ids = torch.tensor(ids + [pad] * pad_len, dtype=torch.long).view(-1, seq_len)
        all_labels = torch.tensor(labels + [IGNORE_INDEX] * pad_len, dtype=torch.long).view(-1, seq_len)
        # The loss shifts, so a label at position 0 is never predicted: a chunk without a label
        # after position 0 would give a 0/0 loss. Drop such chunks (all-prompt spans, a 1-token tail).
        usable = (all_labels[:, 1:] != IGNORE_INDEX).any(dim=1)
        all_ids, all_labels = all_ids[usable], all_labels[usable]
        n_chunks = len(all_ids)
        if n_chunks < 2:
            raise DataError(
                f"the data packs into {n_chunks} usable chunk(s) of seq_len={seq_len} ({len(ids)} tokens); "
                f"need at least 2 (one to train, one to evaluate), i.e. at least {seq_len + 2} tokens "
                "with labels: add data or lower seq_len"
            )

        scores = [_split_score(seed, i, all_ids[i], all_labels[i]) for i in range(n_chunks)]
        by_hash = sorted(range(n_chunks), key=lambda i: (scores[i], i))
        threshold = eval_fraction * _SPLIT_BUCKETS
        eval_set = [i for i in by_hash if scores[i] < threshold]
        if not eval_set:
            eval_set = by_hash[:1]
        elif len(eval_set) == n_chunks:
            eval_set = by_hash[:-1]
        # Capped-out chunks go to training rather than being wasted.
        eval_index = sorted(eval_set[:max_eval_chunks])
        in_eval = torch.zeros(n_chunks, dtype=torch.bool)
        in_eval[eval_index] = True
        self._train_ids, self._train_labels = all_ids[~in_eval], all_labels[~in_eval]
        self._eval_ids, self._eval_labels = all_ids[in_eval], all_labels[in_eval]

    @classmethod
    def from_path(cls, path: str | Path, tokenizer: PreTrainedTokenizerBase, *, include: Sequence[str] = DEFAULT_INCLUDE, **kw) -> LocalDataset:
        return cls(read_examples(path, include), tokenizer, **kw)

    @property
    def train_chunks(self) -> int:
        return len(self._train_ids)

    @property
    def eval_chunks(self) -> int:
        return len(self._eval_ids)

    @cached_property
    def train_tokens(self) -> int:
        """Counted once: the chunks are fixed when the dataset is built (the agent reports it in every GetStats)."""
        return int((self._train_labels != IGNORE_INDEX).sum())

    def train_batches(self, micro_batch: int, *, seed: int | None = None) -> Iterator[Batch]:
        """Endless batches of exactly `micro_batch` chunks.

        Epochs are concatenated into one stream (a batch may straddle two epochs), so every batch
        has the same shape and no chunk is dropped; each epoch is a fresh permutation drawn from
        (seed, epoch), with seed defaulting to the dataset's.
        """
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        seed = self.seed if seed is None else seed
        pending: list[int] = []
        epoch = 0
        while True:
            while len(pending) < micro_batch:
                generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
                pending += torch.randperm(self.train_chunks, generator=generator).tolist()
                epoch += 1
            rows, pending = pending[:micro_batch], pending[micro_batch:]
            yield Batch(self._train_ids[rows], self._train_labels[rows])

    def eval_batches(self, micro_batch: int) -> Iterator[Batch]:
        """Every eval chunk once, in a fixed order; the last batch may be smaller."""
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        for start in range(0, self.eval_chunks, micro_batch):
            end = start + micro_batch
            yield Batch(self._eval_ids[start:end], self._eval_labels[start:end])

    def fingerprint(self) -> str:
        """sha256 over the packed train and eval chunks (ids and labels), split included."""
        digest = hashlib.sha256(f"seq_len={self.seq_len}".encode())
        for tensor in (self._train_ids, self._train_labels, self._eval_ids, self._eval_labels):
            digest.update(f"|{len(tensor)}|".encode())
            digest.update(tensor.contiguous().numpy().tobytes())
        return digest.hexdigest()


def append_feedback(path: str | Path, prompt: str, completion: str) -> None:
    """Append one served interaction as a `prompt`/`completion` line to a local .jsonl file."""
    path = Path(path)
    if path.suffix != ".jsonl":
        raise DataError(f"feedback goes to a .jsonl file, got {path}")
    for name, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, str) or not value:
            raise DataError(f"feedback '{name}' must be a non-empty string")
    line = json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        # A file whose last line lacks its newline would glue our line onto it.
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode("utf-8"))  # one write in append mode: concurrent appenders do not interleave
        f.flush()
        os.fsync(f.fileno())


def stdlib_package_dir(package: str) -> Path:
    """Folder of a standard-library package ("json", "email", "email.mime"): offline non-IID text."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    folder = stdlib.joinpath(*package.split("."))
    if not package or "/" in package or "\\" in package or not (folder / "__init__.py").is_file():
        raise DataError(f"{package!r} is not a standard-library package under {stdlib}; try e.g. json, email, asyncio")
    return folder
