"""The requests a local cluster replays: a trace's arrivals, each carrying text from one replica's domain.

Every replica's private data is its domain (a standard-library package here). A replayed request is
drawn from the held-out part of a domain, as the CoLLM paper replays a share of its data as
requests: the prompt is a prefix of a held-out window, the reference its true continuation. After
the run each request's quality is scored on that reference (quality.py). The request's home is the
replica whose domain it comes from: the router prefers it while it has room (router/dispatch.py).

Which held-out windows: the replica's own eval gate scores its revisions on the first
`gate_chunks` chunks of the held-out split; requests use only the chunks after those, so no
revision is chosen on the text it is later scored on.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from ..engine.data import LocalDataset
from .traffic import Arrival, at_rate


@dataclass(frozen=True)
class DomainRequest:
    domain: str  # the home replica: whose private data this text comes from
    window: int  # index of the held-out chunk it was cut from
    prompt: str
    reference: tuple[int, ...]  # the true continuation's token ids (what quality is scored on)
    max_new_tokens: int


@dataclass(frozen=True)
class Workload:
    arrivals: list[Arrival]
    requests: list[DomainRequest]  # one per arrival, same order

    def __post_init__(self) -> None:
        if len(self.arrivals) != len(self.requests):
            raise ValueError("a workload needs one request per arrival")

    def at_rate(self, rate: float) -> Workload:
        """The same requests, replayed at a mean rate of `rate` req/s (traffic.at_rate)."""
        return Workload(at_rate(self.arrivals, rate), self.requests)

    @property
    def duration_s(self) -> float:
        return self.arrivals[-1].at_s if self.arrivals else 0.0


def held_out_windows(dataset: LocalDataset, tokenizer, *, gate_chunks: int, min_tokens: int) -> list[list[int]]:
    """The held-out chunks after the gate's, each as its longest run of ordinary tokens (a chunk may
    span two documents); runs shorter than `min_tokens` are left out."""
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    windows = []
    for index, batch in enumerate(dataset.eval_batches(1)):
        if index < gate_chunks:
            continue
        best: list[int] = []
        run: list[int] = []
        for token in batch.input_ids[0].tolist():
            if token in special:
                run = []
                continue
            run.append(token)
            if len(run) > len(best):
                best = list(run)
        if len(best) >= min_tokens:
            windows.append(best)
    return windows


def build_workload(
    arrivals: list[Arrival],
    domains: dict[str, LocalDataset],
    tokenizer,
    *,
    gate_chunks: int,
    reference_tokens: int = 32,
    min_prompt: int = 16,
    seed: int = 0,
    home_skew: Mapping[str, float] | None = None,
) -> Workload:
    """One request per arrival: a domain drawn uniformly (or in proportion to `home_skew`: each
    replica's share of the home users), a held-out window of it, the prompt length from the trace
    (cut to fit the window), the next `reference_tokens` tokens as the reference."""
    if not domains:
        raise ValueError("a workload needs at least one domain (a replica with data)")
    if home_skew is not None and (set(home_skew) != set(domains) or any(w < 0 for w in home_skew.values()) or sum(home_skew.values()) <= 0):
        raise ValueError(f"home_skew needs a share >= 0 for each of {sorted(domains)} (not all 0), got {dict(home_skew)}")
    pools = {name: held_out_windows(ds, tokenizer, gate_chunks=gate_chunks, min_tokens=min_prompt + reference_tokens) for name, ds in domains.items()}
    empty = [name for name, pool in pools.items() if not pool]
    if empty:
        raise ValueError(
            f"no held-out window of at least {min_prompt + reference_tokens} tokens after the gate's {gate_chunks} chunks for {empty}: "
            "give those replicas more data or lower eval_batches"
        )
    rng = random.Random(seed)
    names = sorted(pools)
    requests = []
    for arrival in arrivals:
        domain = rng.choices(names, weights=[home_skew[n] for n in names])[0] if home_skew else rng.choice(names)
        window_index = rng.randrange(len(pools[domain]))
        window = pools[domain][window_index]
        cut = max(min_prompt, min(arrival.shape.prompt_tokens, len(window) - reference_tokens))
        prompt = tokenizer.decode(window[:cut], skip_special_tokens=True)
        requests.append(DomainRequest(domain, window_index, prompt, tuple(window[cut : cut + reference_tokens]), arrival.shape.output_tokens))
    return Workload(list(arrivals), requests)


def workload_for(
    configs, arrivals: list[Arrival], tokenizer, *, reference_tokens: int = 32, seed: int = 0, home_skew: Mapping[str, float] | None = None
) -> Workload:
    """The workload for replicas started with `configs`: their data split exactly as the agents split
    it (same tokenizer, sequence length, eval fraction and seed), requests after each gate's chunks."""
    first = configs[0]
    if any(
        (c.seq_len, c.eval_fraction, c.seed, c.eval_batches, c.micro_batch)
        != (first.seq_len, first.eval_fraction, first.seed, first.eval_batches, first.micro_batch)
        for c in configs
    ):
        raise ValueError("the replicas' data settings (seq_len, eval_fraction, seed, eval_batches, micro_batch) must agree for one workload")
    domains = {
        c.replica_id: LocalDataset.from_path(c.data, tokenizer, seq_len=c.seq_len, eval_fraction=c.eval_fraction, seed=c.seed) for c in configs if c.data
    }
    gate = first.eval_batches * first.micro_batch if first.eval_batches else 10**9
    return build_workload(arrivals, domains, tokenizer, gate_chunks=gate, reference_tokens=reference_tokens, seed=seed, home_skew=home_skew)
