"""Per-request quality, measured on the requests after the run (not timed).

DESIGN's Q of a request is 1 / cross-entropy of its reference continuation under exactly the
adapter version that served it (the sha256 in its final stream event). The versions come from the
replicas' adapter archives (engine/archive.py): every version any replica published is there. The
input is what the engine saw: the prompt as the tokenizer encodes it (BOS included), then the
reference tokens; only the reference positions are scored.

Requests are grouped by adapter and scored in padded batches; a repeated (adapter, prompt,
reference) is scored once.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..engine.archive import load_archived
from ..engine.llama import LlamaRuntime, TensorLora
from ..engine.lora import LoraSpec
from ..engine.model_host import BaseModel


@dataclass(frozen=True)
class ScoreItem:
    key: int  # the caller's id for the request
    sha256: str  # the adapter that served it
    prompt: str
    reference: tuple[int, ...]


class RequestScorer:
    def __init__(self, base: BaseModel, spec: LoraSpec, archives: Iterable[str | Path], *, batch: int = 32) -> None:
        self.runtime = LlamaRuntime(base.config, base.state_dict)
        self.tokenizer, self.spec, self.batch = base.tokenizer, spec, batch
        self.archives = [Path(a) for a in archives]
        self._adapters: dict[str, dict[str, torch.Tensor]] = {}

    def adapter(self, sha256: str) -> dict[str, torch.Tensor]:
        if sha256 not in self._adapters:
            for folder in self.archives:
                if (folder / f"{sha256}.safetensors").exists():
                    self._adapters[sha256] = load_archived(folder, sha256)
                    break
            else:
                raise KeyError(f"adapter {sha256[:12]} is in none of the archives {[str(a) for a in self.archives]}")
        return self._adapters[sha256]

    def add_adapter(self, sha256: str, tensors: Mapping[str, torch.Tensor]) -> None:
        self._adapters[sha256] = dict(tensors)

    @torch.no_grad()
    def cross_entropy(self, items: Iterable[ScoreItem]) -> dict[int, float]:
        """Mean cross-entropy (nats per token) of each item's reference under its adapter."""
        by_adapter: dict[str, dict[tuple, list[int]]] = defaultdict(lambda: defaultdict(list))
        for item in items:
            by_adapter[item.sha256][(item.prompt, item.reference)].append(item.key)
        out: dict[int, float] = {}
        for sha, groups in by_adapter.items():
            lora = TensorLora(self.adapter(sha), self.spec, self.runtime.dims)
            pairs = list(groups.items())
            for start in range(0, len(pairs), self.batch):
                chunk = pairs[start : start + self.batch]
                losses = self._batch_loss([(self.tokenizer.encode(p), list(r)) for (p, r), _ in chunk], lora)
                for ((_, _), keys), loss in zip(chunk, losses):
                    for key in keys:
                        out[key] = loss
        return out

    def _batch_loss(self, rows: list[tuple[list[int], list[int]]], lora: TensorLora) -> list[float]:
        length = max(len(p) + len(r) for p, r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        for i, (prompt, reference) in enumerate(rows):
            ids[i, : len(prompt) + len(reference)] = torch.tensor(prompt + reference)
            labels[i, len(prompt) : len(prompt) + len(reference)] = torch.tensor(reference)
        logits = self.runtime.forward_train(ids.to(self.runtime.device), lora).float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100, reduction="none")
        nll = nll.view(len(rows), length - 1)
        mask = (labels[:, 1:] != -100).to(nll.device)
        return [float(v) for v in (nll * mask).sum(1) / mask.sum(1).clamp(min=1)]


def quality(cross_entropy: float) -> float:
    """Q = 1 / cross-entropy (0 for a request whose cross-entropy could not be measured)."""
    return 1.0 / cross_entropy if cross_entropy > 0 and math.isfinite(cross_entropy) else 0.0


def quality_cdf(values: list[float], levels: list[float]) -> list[float]:
    """The share of requests at or above each quality level (the CoLLM paper's quality CDF)."""
    n = len(values)
    return [sum(1 for v in values if v >= level) / n if n else 0.0 for level in levels]
