"""Early-exit heads: a next token from the boundary state (layer S-1's output), without the deep layers.

Applying the final norm and LM head to a middle layer (the "logit lens") of a model not trained for
early exit gives poor tokens, and its top probability says little about whether the token is right,
so it cannot decide what the edge may emit. The head adds the cheapest thing that fixes both: its own
RMSNorm weight (starting from the final norm's) and a low-rank residual map after it, in front of the
shared, frozen LM head, so an edge device gets hidden x (2 x rank + 1) new numbers and no second
vocabulary matrix. It starts as the logit lens (B is zero) and is trained by distillation: the KL
divergence from the whole model's next-token distribution (same adapter version) to the head's, so
its argmax follows the whole model's greedy token.

Distillation alone makes the head's top probability approximate the whole model's own top
probability, which on a small model is far below how often the two argmaxes agree (measured: the
head becomes under-confident, calibration error rises). Routing needs P(head's token = whole
model's token), so a temperature is then fitted on held-out windows (temperature scaling, Guo et
al. 2017): it minimises the cross-entropy of the whole model's greedy token and leaves every argmax
as it is.

A head belongs to one adapter version (the deep layers it imitates include that adapter): it is
saved with that version's sha256 and an edge partition refuses a head of another version.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from replica_agent.engine.llama import LlamaRuntime, TensorLora

from .split import PinnedAdapter

FORMAT = "collm-exit-head/1"  # safetensors metadata "format" of a saved head


@dataclass
class ExitHead:
    split: int  # S: the head reads the output of layer S-1
    adapter_sha256: str  # the adapter version it was distilled for
    norm: torch.Tensor  # [hidden], float32
    a: torch.Tensor  # [rank, hidden]
    b: torch.Tensor  # [hidden, rank]; zero: the head is the final norm + LM head
    temperature: float = 1.0  # divides the logits: calibrates the confidence, keeps the argmax

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def parameters(self) -> list[torch.Tensor]:
        return [self.norm, self.a, self.b]

    def hidden(self, boundary: torch.Tensor, eps: float) -> torch.Tensor:
        """What the LM head reads instead of the final hidden state (float32)."""
        n = F.rms_norm(boundary.float(), (self.norm.shape[0],), self.norm, eps)
        return n + (n @ self.a.t()) @ self.b.t()

    def logits(self, runtime: LlamaRuntime, boundary: torch.Tensor) -> torch.Tensor:
        return runtime.logits(self.hidden(boundary, runtime.eps).to(runtime.dtype)) / self.temperature

    def to(self, device: torch.device | str) -> ExitHead:
        norm, a, b = (t.detach().to(device) for t in self.parameters())
        return ExitHead(self.split, self.adapter_sha256, norm, a, b, self.temperature)

    def save(self, path: str | os.PathLike) -> None:
        tensors = {"norm": self.norm, "a": self.a, "b": self.b}
        metadata = {"format": FORMAT, "split": str(self.split), "adapter_sha256": self.adapter_sha256, "temperature": repr(self.temperature)}
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, os.fspath(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, *, adapter_sha256: str | None = None, device: torch.device | str = "cpu") -> ExitHead:
        """Raises ValueError for a file that is not a head, or (given `adapter_sha256`) one of another version."""
        with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not an exit head ({FORMAT}): format {meta.get('format')!r}")
            if adapter_sha256 is not None and meta["adapter_sha256"] != adapter_sha256:
                raise ValueError(f"{path} belongs to adapter {meta['adapter_sha256'][:12]}, not {adapter_sha256[:12]}")
            norm, a, b = (f.get_tensor(name) for name in ("norm", "a", "b"))
            return cls(int(meta["split"]), meta["adapter_sha256"], norm, a, b, float(meta["temperature"]))


def init_exit_head(runtime: LlamaRuntime, split: int, adapter_sha256: str, *, rank: int = 16, seed: int = 0) -> ExitHead:
    """The untrained head: exactly the logit lens at layer S-1 (final norm and LM head applied there)."""
    hidden = runtime.dims.hidden
    gen = torch.Generator().manual_seed(seed)
    a = (torch.randn(rank, hidden, generator=gen) / math.sqrt(hidden)).to(runtime.device)
    b = torch.zeros(hidden, rank, device=runtime.device)
    return ExitHead(split, adapter_sha256, runtime.final_norm.detach().float().clone(), a, b)


def token_windows(tokenizer, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """The texts' tokens, concatenated and cut into whole windows [N, seq_len] (the tail is dropped)."""
    ids = [token for text in texts for token in tokenizer(text, verbose=False)["input_ids"]]
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"the texts hold {len(ids)} tokens, fewer than one window of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


@torch.no_grad()
def boundary_and_teacher(runtime: LlamaRuntime, lora: TensorLora | None, split: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(boundary states [B, T, hidden], whole-model logits [B, T, vocab]) of whole windows, from one
    pass: the deep layers continue from the boundary states, as the cloud does."""
    ids = ids.to(runtime.device)
    b, t = ids.shape
    positions = torch.arange(t, device=runtime.device).expand(b, t)

    def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    boundary = runtime.run_layers(runtime.embed[ids], positions, attend, lora, range(split))
    deep = runtime.run_layers(boundary, positions, attend, lora, range(split, runtime.dims.layers))
    return boundary, runtime.logits(runtime.norm(deep))


def distillation_loss(head_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || head) per token, averaged: the head learns the whole model's distribution,
    not just its argmax, which is what makes its top probability a calibrated confidence."""
    vocab = head_logits.shape[-1]
    student = F.log_softmax(head_logits.reshape(-1, vocab).float(), dim=-1)
    teacher = F.log_softmax(teacher_logits.reshape(-1, vocab).float(), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, *, low: float = 0.05, high: float = 20.0, iterations: int = 60) -> float:
    """The temperature T minimising the mean cross-entropy of `targets` under softmax(logits / T).

    The loss is convex in 1/T (a log-sum-exp minus a linear term), so a golden-section search over
    1/T finds the minimum without gradients or a learning rate."""
    logits, targets = logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)

    def loss(inverse: float) -> float:
        return float(F.cross_entropy(logits * inverse, targets))

    ratio = (math.sqrt(5) - 1) / 2
    a, b = 1 / high, 1 / low
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(iterations):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = loss(d)
    return 2 / (a + b)


def train_exit_head(
    runtime: LlamaRuntime,
    adapter: PinnedAdapter,
    texts: Sequence[str],
    steps: int,
    *,
    tokenizer,
    split: int,
    head: ExitHead | None = None,
    rank: int = 16,
    batch_size: int = 4,
    seq_len: int = 128,
    learning_rate: float = 1e-2,
    calibration_windows: int = 32,
    seed: int = 0,
) -> ExitHead:
    """Distil an exit head at layer `split` for `adapter` on `texts` for `steps` AdamW steps, then fit
    its temperature on the last windows of the texts, which training never sees (at most
    `calibration_windows`, a tenth of them). Continues `head` when given (e.g. across the agent's
    training gaps), else starts from the logit lens. The base weights and the adapter stay frozen."""
    if head is None:
        head = init_exit_head(runtime, split, adapter.sha256, rank=rank, seed=seed)
    elif head.split != split or head.adapter_sha256 != adapter.sha256:
        raise ValueError("the head to continue belongs to another split or adapter version")
    windows = token_windows(tokenizer, texts, seq_len)
    held_out = min(calibration_windows, len(windows) // 10)
    if held_out < 1:
        raise ValueError(f"the texts make {len(windows)} windows of {seq_len} tokens; calibration needs at least 10")
    train, calibration = windows[:-held_out], windows[-held_out:]
    lora = adapter.lora(runtime)
    norm, a, b = (p.detach().clone().requires_grad_(True) for p in head.parameters())
    trained = ExitHead(split, adapter.sha256, norm, a, b)  # temperature 1 while distilling
    optimizer = torch.optim.AdamW(trained.parameters(), lr=learning_rate, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = train[torch.randint(0, len(train), (min(batch_size, len(train)),), generator=gen)]
        boundary, teacher = boundary_and_teacher(runtime, lora, split, batch)
        loss = distillation_loss(trained.logits(runtime, boundary), teacher)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    trained = trained.to(runtime.device)
    with torch.no_grad():
        boundary, teacher = boundary_and_teacher(runtime, lora, split, calibration)
        trained.temperature = fit_temperature(trained.logits(runtime, boundary), teacher.argmax(dim=-1))
    return trained


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = 10) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by their token counts:
    0 when a top probability of p is right p of the time, as routing on a threshold assumes."""
    confidence, correct = confidence.flatten().float(), correct.flatten().float()
    if confidence.numel() == 0:
        return math.nan
    index = (confidence * bins).long().clamp(0, bins - 1)
    error = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            error += float(members.float().mean() * (correct[members].mean() - confidence[members].mean()).abs())
    return error


@dataclass(frozen=True)
class ExitMetrics:
    tokens: int
    accuracy: float  # the head's argmax equals the whole model's greedy token
    ece: float  # expected calibration error of the head's top probability (10 bins)
    exit_rate: dict[float, float]  # threshold -> fraction of tokens with top probability >= threshold
    exit_accuracy: dict[float, float]  # threshold -> accuracy on those tokens (nan when none)


def exit_metrics(head_logits: torch.Tensor, teacher_logits: torch.Tensor, thresholds: Sequence[float] = (0.5, 0.8, 0.9)) -> ExitMetrics:
    """Agreement and calibration of exit logits against the whole model's, position by position."""
    vocab = head_logits.shape[-1]
    probs = F.softmax(head_logits.reshape(-1, vocab).float(), dim=-1)
    confidence, guess = probs.max(dim=-1)
    correct = guess == teacher_logits.reshape(-1, vocab).argmax(dim=-1)
    rate, accuracy = {}, {}
    for t in thresholds:
        exits = confidence >= t
        rate[t] = float(exits.float().mean())
        accuracy[t] = float(correct[exits].float().mean()) if exits.any() else math.nan
    return ExitMetrics(len(correct), float(correct.float().mean()), expected_calibration_error(confidence, correct), rate, accuracy)


@torch.no_grad()
def evaluate_exit_head(
    runtime: LlamaRuntime,
    adapter: PinnedAdapter,
    head: ExitHead,
    texts: Sequence[str],
    *,
    tokenizer,
    seq_len: int = 128,
    thresholds: Sequence[float] = (0.5, 0.8, 0.9),
) -> ExitMetrics:
    """`exit_metrics` over every whole window of `texts`."""
    if head.adapter_sha256 != adapter.sha256:
        raise ValueError("the head belongs to another adapter version")
    windows = token_windows(tokenizer, texts, seq_len)
    lora = adapter.lora(runtime)
    head_logits, teacher_logits = [], []
    for batch in windows.split(4):
        boundary, teacher = boundary_and_teacher(runtime, lora, head.split, batch)
        head_logits.append(head.logits(runtime, boundary))
        teacher_logits.append(teacher)
    return exit_metrics(torch.cat(head_logits), torch.cat(teacher_logits), thresholds)
