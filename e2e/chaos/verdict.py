"""What a chaos scenario's observations add up to (pure: no cluster, no clock).

Half-applied, defined. Adapter versions are `<cluster version>.<local revision>` plus a sha256
(docs/design.md). A cluster version C is *published* when a round that Succeeded (its AdapterRound
status) or the CollmCluster's `status.adapter` names C with a sha256; version 0 is the initial
adapter the cluster reported. An observation is one adapter a replica served (a completed
request's final event, or the agent's stats: its current and its global adapter). A half-applied
version is any of:
1. a replica serving cluster version C (as its global, or a local revision on top of it) when no
   round published C: a failed round's candidate, or a publish that was never finished;
2. a replica's global adapter C, or its revision C.0, whose sha256 is not the one published for C
   (and a cluster version published with two sha256);
3. one replica serving one label C.R with two different sha256 (versions are immutable);
4. after the fault is cleared, recovery and the settle time, a replica whose global adapter is not
   the cluster's current one (replicas that still disagree).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .traffic import COMPLETED, ERROR_EVENT, LOST, OUTCOMES, REFUSED, RequestRecord


@dataclass(frozen=True)
class Served:
    """One adapter one replica served, as seen at `at` (unix seconds)."""

    at: float
    replica: str
    cluster_version: int
    revision: int
    sha256: str
    source: str  # "response" (a final event), "stats" (current adapter), "global" (the global it rests on)

    @property
    def label(self) -> str:
        return f"{self.cluster_version}.{self.revision}"


def parse_label(label: str) -> tuple[int, int] | None:
    """(cluster version, revision) of "C.R"; None when it is not one."""
    head, _, tail = str(label).partition(".")
    try:
        return int(head), int(tail or 0)
    except ValueError:
        return None


def half_applied(served: Iterable[Served], published: Mapping[int, set[str]]) -> list[str]:
    """Rules 1-3 of the module docstring: one line per distinct violation."""
    found: dict[str, None] = {}
    for version, shas in sorted(published.items()):
        if len(shas) > 1:
            found[f"cluster version {version} was published with {len(shas)} different sha256: {sorted(s[:12] for s in shas)}"] = None
    labels: dict[tuple[str, str], set[str]] = {}
    for s in served:
        if s.cluster_version not in published:
            found[f"{s.replica} served {s.label} ({s.sha256[:12]}): no round published cluster version {s.cluster_version}"] = None
            continue
        is_global = s.source == "global" or s.revision == 0
        if is_global and s.sha256 not in published[s.cluster_version]:
            want = ", ".join(sorted(x[:12] for x in published[s.cluster_version]))
            found[f"{s.replica} served global {s.cluster_version} as {s.sha256[:12]}, published as {want}"] = None
        if s.source != "global":
            labels.setdefault((s.replica, s.label), set()).add(s.sha256)
    for (replica, label), shas in sorted(labels.items()):
        if len(shas) > 1:
            found[f"{replica} served {label} with {len(shas)} different sha256: {sorted(x[:12] for x in shas)}"] = None
    return list(found)


def disagreements(globals_: Mapping[str, tuple[int, str] | None], cluster_adapter: tuple[int, str] | None) -> list[str]:
    """Rule 4: replicas whose global adapter (version, sha256) is not the cluster's, or unknown."""
    if cluster_adapter is None:
        return ["the CollmCluster names no current adapter"]
    out = []
    for replica, seen in sorted(globals_.items()):
        if seen is None:
            out.append(f"{replica} did not answer after recovery")
        elif seen[1] != cluster_adapter[1]:
            out.append(f"{replica} rests on {seen[0]} ({seen[1][:12]}), the cluster on {cluster_adapter[0]} ({cluster_adapter[1][:12]})")
    return out


def request_figures(records: Sequence[RequestRecord]) -> dict:
    """Counts by outcome, error events after/before the first token, latencies of completed requests."""
    counts = {o: sum(r.outcome == o for r in records) for o in OUTCOMES}
    errors = [r for r in records if r.outcome == ERROR_EVENT]
    done = sorted(r.ended - r.started for r in records if r.outcome == COMPLETED)
    return {
        "sent": len(records),
        "accepted": sum(r.status == 200 for r in records),
        **counts,
        "error_events_after_first_token": sum(r.tokens > 0 for r in errors),
        "error_events_after_first_token_saying_incomplete": sum(r.tokens > 0 and "incomplete" in r.detail for r in errors),
        "error_events_before_first_token": sum(r.tokens == 0 for r in errors),
        "error_messages": sorted({r.detail for r in errors})[:5],
        "refusals": sorted({r.detail for r in records if r.outcome == REFUSED})[:5],
        "lost_details": [f"{r.replica or '?'}: {r.detail}" for r in records if r.outcome == LOST][:10],
        "slowest_completed": [
            {"replica": r.replica, "s": round(r.ended - r.started, 2)} for r in sorted(records, key=lambda r: r.started - r.ended) if r.outcome == COMPLETED
        ][:3],
        "latency_p50_s": statistics.median(done) if done else None,
        "latency_max_s": done[-1] if done else None,
    }


def first_after(times: Iterable[float], t0: float) -> float | None:
    """Seconds from `t0` to the earliest time at or after it; None when there is none."""
    later = [t - t0 for t in times if t >= t0]
    return min(later) if later else None


def passed(injected: bool, lost: int, half_applied_count: int) -> bool:
    """The issue's bar: the fault happened, no request was lost silently, no version half-applied."""
    return injected and lost == 0 and half_applied_count == 0
