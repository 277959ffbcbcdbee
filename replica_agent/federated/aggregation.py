"""Aggregation strategies: how a round turns its participants' updates into one global delta.

Each strategy is a small class with a `name` and `aggregate(updates)` (Flower's shape); transport
and the round state machine never look inside one, and adding one touches nothing else.

- FedAvg: mean weighted by num_samples.
- FFALoRA: FedAvg of the B deltas only. FFA-LoRA freezes A at its shared init, so averaging B
  averages the products B·A exactly; an update that changed A would break that and is rejected.
- CoordinateMedian, TrimmedMean: per coordinate and unweighted (claiming more samples buys no
  influence); a minority of arbitrary updates cannot drag them far.
- Robust(inner, ...): norm-outlier rejection, norm clipping and DP-FedAvg Gaussian noise, around
  any of them (as Flower wraps strategies for differential privacy).

Every strategy first `screen`s the updates: a second update from one participant, an update
trained from another base adapter, with other keys or shapes than the rest, with no samples, or
with NaN/Inf is rejected, never averaged, and the result records who and why.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from replica_agent.engine.adapter_store import adapter_sha256

from .update import AdapterUpdate, is_lora_a


@dataclass(frozen=True)
class Rejection:
    participant: str
    reason: str  # CamelCase, e.g. NonFinite, NormOutlier, ShapeMismatch, WrongBase, TrainedA
    detail: str


class AggregationError(RuntimeError):
    """Nothing left to aggregate; the message says what was rejected and why."""

    def __init__(self, message: str, rejected: Sequence[Rejection] = ()) -> None:
        self.rejected = tuple(rejected)
        reasons = "; ".join(f"{r.participant}: {r.reason} ({r.detail})" for r in self.rejected)
        super().__init__(f"{message}: {reasons}" if reasons else message)


@dataclass(frozen=True)
class AggregateResult:
    delta: dict[str, torch.Tensor]
    accepted: tuple[str, ...]
    rejected: tuple[Rejection, ...]
    clipped: tuple[str, ...]
    weights: dict[str, float]
    clip_norm: float | None = None
    noise_multiplier: float | None = None
    noise_std: float | None = None

    def record(self) -> dict:
        """JSON-ready summary for the round's status (camelCase, as Kubernetes status fields)."""
        return {
            "accepted": list(self.accepted),
            "rejected": [{"participant": r.participant, "reason": r.reason, "detail": r.detail} for r in self.rejected],
            "clipped": list(self.clipped),
            "weights": dict(self.weights),
            "clipNorm": self.clip_norm,
            "noiseMultiplier": self.noise_multiplier,
            "noiseStd": self.noise_std,
            "deltaSha256": adapter_sha256(self.delta),
        }


class Strategy(Protocol):
    name: str

    def aggregate(self, updates: Sequence[AdapterUpdate], *, base_sha256: str | None = None) -> AggregateResult: ...


# -- shared pieces ------------------------------------------------------------------------------
def update_norm(delta: dict[str, torch.Tensor]) -> float:
    """L2 norm of the whole update, all tensors as one vector."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in delta.values()))


def clip_update(update: AdapterUpdate, clip_norm: float) -> AdapterUpdate:
    """The update scaled down to norm `clip_norm` when above it; the same object otherwise."""
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    norm = update_norm(update.delta)
    if not norm > clip_norm:  # also leaves NaN updates alone: screening rejects them
        return update
    scale = clip_norm / norm
    delta = {k: (v.double() * scale).to(v.dtype) for k, v in update.delta.items()}
    return replace(update, delta=delta, sha256=adapter_sha256(delta))


def _signature(delta: dict[str, torch.Tensor]) -> tuple:
    return tuple(sorted((k, tuple(v.shape)) for k, v in delta.items()))


def _shape_difference(got: tuple, want: tuple) -> str:
    got_d, want_d = dict(got), dict(want)
    missing, extra = sorted(set(want_d) - set(got_d)), sorted(set(got_d) - set(want_d))
    if missing or extra:
        return f"keys differ from the other updates: missing {missing[:2]}, unexpected {extra[:2]}"
    key = next(k for k in want_d if got_d[k] != want_d[k])
    return f"{key} has shape {got_d[key]}, the other updates {want_d[key]}"


def screen(updates: Sequence[AdapterUpdate], base_sha256: str | None = None) -> tuple[list[AdapterUpdate], list[Rejection]]:
    """Split updates into those fit to aggregate and rejections. The round's base is `base_sha256`,
    else the most common one; the reference keys/shapes are the most common among those."""
    if not updates:
        raise AggregationError("no updates to aggregate")
    base = base_sha256 or Counter(u.base_sha256 for u in updates).most_common(1)[0][0]
    same_base = [_signature(u.delta) for u in updates if u.base_sha256 == base]
    shapes = Counter(same_base).most_common(1)[0][0] if same_base else None
    kept, rejected, seen = [], [], set()
    for u in updates:
        rejection = None
        if u.participant in seen:
            rejection = Rejection(u.participant, "Duplicate", "a second update from this participant in the round")
        elif u.base_sha256 != base:
            rejection = Rejection(u.participant, "WrongBase", f"trained from adapter {u.base_sha256[:12]}, the round's is {base[:12]}")
        elif (sig := _signature(u.delta)) != shapes:
            rejection = Rejection(u.participant, "ShapeMismatch", _shape_difference(sig, shapes))
        elif u.num_samples < 1:
            rejection = Rejection(u.participant, "NoSamples", f"num_samples is {u.num_samples}")
        else:
            bad = next((k for k, v in u.delta.items() if not torch.isfinite(v).all()), None)
            if bad is not None:
                rejection = Rejection(u.participant, "NonFinite", f"{bad} has NaN or Inf values")
        seen.add(u.participant)
        if rejection:
            rejected.append(rejection)
        else:
            kept.append(u)
    return kept, rejected


def _stack(updates: Sequence[AdapterUpdate], key: str) -> torch.Tensor:
    return torch.stack([u.delta[key].double() for u in updates])


# -- the rules ----------------------------------------------------------------------------------
class FedAvg:
    name = "fedavg"

    def aggregate(self, updates: Sequence[AdapterUpdate], *, base_sha256: str | None = None) -> AggregateResult:
        kept, rejected = screen(updates, base_sha256)
        kept, rejected = self._admit(kept, rejected)
        if not kept:
            raise AggregationError("every update was rejected", rejected)
        weights = self._weights(kept)
        delta = {key: self._combine(_stack(kept, key), [weights[u.participant] for u in kept]).to(kept[0].delta[key].dtype) for key in sorted(kept[0].delta)}
        return AggregateResult(delta, tuple(u.participant for u in kept), tuple(rejected), (), weights)

    def _admit(self, kept: list[AdapterUpdate], rejected: list[Rejection]):
        return kept, rejected

    def _weights(self, kept: Sequence[AdapterUpdate]) -> dict[str, float]:
        total = sum(u.num_samples for u in kept)
        return {u.participant: u.num_samples / total for u in kept}

    def _combine(self, stacked: torch.Tensor, weights: list[float]) -> torch.Tensor:
        w = torch.tensor(weights, dtype=torch.float64).reshape(-1, *([1] * (stacked.dim() - 1)))
        return (stacked * w).sum(0)


class FFALoRA(FedAvg):
    """FedAvg over B only; A deltas must be absent or zero (A frozen), and the result has B keys only."""

    name = "ffa"

    def _admit(self, kept, rejected):
        admitted = []
        for u in kept:
            trained = next((k for k, v in u.delta.items() if is_lora_a(k) and torch.count_nonzero(v)), None)
            if trained is not None:
                rejected.append(
                    Rejection(
                        u.participant,
                        "TrainedA",
                        f"{trained} changed; FFA-LoRA trains B only: freeze A in the trainer or aggregate with fedavg",
                    )
                )
                continue
            delta = {k: v for k, v in u.delta.items() if not is_lora_a(k)}
            admitted.append(u if len(delta) == len(u.delta) else replace(u, delta=delta, sha256=adapter_sha256(delta)))
        return admitted, rejected


class TrimmedMean(FedAvg):
    """Per coordinate, drop the ceil(trim_fraction * n) smallest and largest values and average the rest
    (at least one value is kept; with trim_fraction > 0 and n >= 3 at least one is dropped each side)."""

    name = "trimmed_mean"

    def __init__(self, trim_fraction: float = 0.1) -> None:
        if not 0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
        self.trim_fraction = trim_fraction

    def _trim(self, n: int) -> int:
        return min(math.ceil(self.trim_fraction * n - 1e-9), (n - 1) // 2)

    def _weights(self, kept):
        return {u.participant: 1 / len(kept) for u in kept}

    def _combine(self, stacked, weights):
        n = stacked.shape[0]
        k = self._trim(n)
        return stacked.sort(dim=0).values[k : n - k].mean(0)


class CoordinateMedian(TrimmedMean):
    """Per-coordinate median (the mean of the two middle values for an even count)."""

    name = "median"

    def __init__(self) -> None:
        super().__init__(0.0)

    def _trim(self, n: int) -> int:
        return (n - 1) // 2


class Robust:
    """Outlier rejection, clipping and DP noise around any strategy, in that order:

    1. with >= 3 screened updates, reject those whose norm exceeds `outlier_factor` x the median norm;
    2. scale every update above `clip_norm` down to it (recorded in `clipped`);
    3. with `noise_multiplier`, average unweighted (DP-FedAvg: each participant's influence is bounded
       by clip_norm, whatever it claims as num_samples) and add N(0, std^2) to every coordinate,
       std = noise_multiplier * clip_norm / number of accepted updates.
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        clip_norm: float | None = None,
        outlier_factor: float | None = None,
        noise_multiplier: float | None = None,
        seed: int | None = None,
    ) -> None:
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
        if outlier_factor is not None and not outlier_factor > 1:
            raise ValueError(f"outlier_factor must be > 1 (a multiple of the median norm), got {outlier_factor}")
        if noise_multiplier is not None:
            if not noise_multiplier >= 0:
                raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
            if clip_norm is None:
                raise ValueError("DP noise needs clip_norm: the noise is calibrated to the clipped update norm")
            if not isinstance(inner, FedAvg) or isinstance(inner, TrimmedMean):
                raise ValueError(f"DP noise is calibrated for the mean (DP-FedAvg); use fedavg or ffa, not {inner.name}")
        self.inner, self.name = inner, inner.name
        self.clip_norm, self.outlier_factor, self.noise_multiplier = clip_norm, outlier_factor, noise_multiplier
        self._gen = torch.Generator()
        if seed is None:
            self._gen.seed()
        else:
            self._gen.manual_seed(seed)

    def aggregate(self, updates: Sequence[AdapterUpdate], *, base_sha256: str | None = None) -> AggregateResult:
        kept, rejected = screen(updates, base_sha256)
        if self.outlier_factor is not None and len(kept) >= 3:
            norms = {u.participant: update_norm(u.delta) for u in kept}
            limit = self.outlier_factor * statistics.median(norms.values())
            for u in kept:
                if norms[u.participant] > limit:
                    detail = f"norm {norms[u.participant]:.4g} > {self.outlier_factor:g} x the round's median = {limit:.4g}"
                    rejected.append(Rejection(u.participant, "NormOutlier", detail))
            kept = [u for u in kept if norms[u.participant] <= limit]
        clipped: list[str] = []
        if self.clip_norm is not None:
            clipped_updates = [clip_update(u, self.clip_norm) for u in kept]
            clipped = [u.participant for u, c in zip(kept, clipped_updates) if c is not u]
            kept = clipped_updates
        if self.noise_multiplier is not None:
            kept = [replace(u, num_samples=1) for u in kept]
        if not kept:
            raise AggregationError("every update was rejected", rejected)
        try:
            result = self.inner.aggregate(kept, base_sha256=kept[0].base_sha256)
        except AggregationError as exc:
            raise AggregationError("every update was rejected", rejected + list(exc.rejected)) from None
        delta, noise_std = result.delta, None
        if self.noise_multiplier is not None:
            noise_std = self.noise_multiplier * self.clip_norm / len(result.accepted)
            delta = {k: (v.double() + torch.randn(v.shape, generator=self._gen, dtype=torch.float64) * noise_std).to(v.dtype) for k, v in delta.items()}
        return replace(
            result,
            delta=delta,
            rejected=tuple(rejected) + result.rejected,
            clipped=tuple(p for p in clipped if p in result.accepted),
            clip_norm=self.clip_norm,
            noise_multiplier=self.noise_multiplier,
            noise_std=noise_std,
        )


STRATEGIES = ("fedavg", "ffa", "median", "trimmed_mean")


def build_strategy(
    name: str,
    *,
    clip_norm: float | None = None,
    noise_multiplier: float | None = None,
    outlier_factor: float | None = None,
    trim_fraction: float = 0.1,
    seed: int | None = None,
) -> Strategy:
    """The named rule, wrapped in Robust when any robustness or privacy option is set."""
    rules = {"fedavg": FedAvg, "ffa": FFALoRA, "median": CoordinateMedian, "trimmed_mean": lambda: TrimmedMean(trim_fraction)}
    if name not in rules:
        raise ValueError(f"unknown aggregation strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    rule = rules[name]()
    if clip_norm is None and noise_multiplier is None and outlier_factor is None:
        return rule
    return Robust(rule, clip_norm=clip_norm, outlier_factor=outlier_factor, noise_multiplier=noise_multiplier, seed=seed)
