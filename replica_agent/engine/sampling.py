"""Choosing the next token of each row: TGI's warpers (repetition penalty, temperature, top-k, top-p)."""

from __future__ import annotations

import random

import torch

from .requests import SamplingParams


class RowSampler:
    """The per-request decoding state: its parameters, its RNG and the tokens it has seen."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int]) -> None:
        self.params = params
        self.sampling = params.sampling
        self.seed = None
        self.generator = None
        if self.sampling:
            self.seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
            self.generator = torch.Generator().manual_seed(self.seed)
        self.seen = set(prompt_ids) if params.repetition_penalty not in (None, 1.0) else None

    def choose(self, logits: torch.Tensor) -> tuple[int, float]:
        """Pick a token from one row of float32 logits [V]; returns (token id, its logprob)."""
        p = self.params
        logits = logits.cpu()  # per-row warpers and the seeded CPU generator: a no-op on a CPU replica
        if self.seen:
            # CTRL's penalty, as transformers and TGI apply it: shrink the logits of seen tokens.
            idx = torch.tensor(sorted(self.seen))
            picked = logits[idx]
            logits = logits.clone()
            logits[idx] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        if p.temperature not in (None, 1.0):
            logits = logits / p.temperature
        logprobs = torch.log_softmax(logits, dim=-1)
        if not self.sampling:
            token = int(torch.argmax(logits))
        else:
            filtered = _top_k_top_p(logits, p.top_k, p.top_p)
            probs = torch.softmax(filtered, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        if self.seen is not None:
            self.seen.add(token)
        return token, float(logprobs[token])


def _top_k_top_p(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def greedy_rows(logits: torch.Tensor) -> tuple[list[int], list[float]]:
    """Fast path for rows without warpers: argmax and its logprob for every row at once."""
    tokens = torch.argmax(logits, dim=-1)
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0]
    return tokens.tolist(), logprobs.tolist()
