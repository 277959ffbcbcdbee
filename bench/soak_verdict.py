"""Is a long run leaking? The soak benchmark's figures and verdict, as pure functions of samples.

A process passes when, after the warm-up (allocator pools, thread pools, caches and connection
pools fill during it), its resident memory has no upward trend and its counts of threads, open
descriptors and open regular files do not grow:

- memory slope: the least-squares line through (hours, RSS in MB = 10^6 bytes) of the samples
  taken at or after the warm-up's end; passes under `Targets.memory_mb_per_hour`.
- growth of a count (threads, descriptors, files): the median of the last quarter of the post-warm-up
  samples minus the median of their first quarter (at least one sample each). Medians, because a
  count moves with the requests in flight at the moment of a sample (a socket, a worker thread);
  a leak moves it for good. Passes at or under the target's tolerance.

Fewer than `Targets.min_samples` post-warm-up samples give no verdict (None) and a note that says
to run longer or sample more often; they never pass.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MB = 1_000_000  # bytes: the target is stated in MB


class NotEnoughSamples(ValueError):
    """Too few samples (or no time between them) to fit a trend."""


@dataclass(frozen=True)
class ProcessSample:
    t: float  # seconds from the start of the traffic
    rss_bytes: int
    threads: int
    fds: int  # open descriptors: files, sockets, pipes
    files: int  # open regular files (a subset of fds)

    def as_list(self) -> list[float]:
        return [round(self.t, 3), self.rss_bytes, self.threads, self.fds, self.files]


SAMPLE_FIELDS = ("t_s", "rss_bytes", "threads", "fds", "files")  # the order of ProcessSample.as_list()


@dataclass(frozen=True)
class Targets:
    memory_mb_per_hour: float = 20.0  # the target, per process
    thread_growth: int = 2  # threads a process may gain after warm-up (a worker pool reaching one more worker)
    fd_growth: int = 8  # descriptors a process may gain after warm-up (connections kept alive to a peer)
    file_growth: int = 2  # open regular files a process may gain after warm-up
    failed_requests: int = 0
    min_samples: int = 3  # post-warm-up samples needed for a verdict

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def memory_slope_mb_per_hour(t_s: Sequence[float], rss_bytes: Sequence[float]) -> float:
    """The least-squares slope of RSS over time, in MB per hour."""
    if len(t_s) != len(rss_bytes):
        raise ValueError("one RSS reading per time, please")
    if len(t_s) < 2 or max(t_s) - min(t_s) <= 0:
        raise NotEnoughSamples(f"a slope needs at least two samples at different times, got {len(t_s)}")
    hours = np.asarray(t_s, dtype=float) / 3600.0
    mb = np.asarray(rss_bytes, dtype=float) / MB
    slope, _ = np.polyfit(hours, mb, 1)
    return float(slope)


def count_growth(values: Sequence[int]) -> float:
    """Median of the last quarter minus median of the first quarter (module docstring)."""
    if not values:
        raise NotEnoughSamples("no samples to compare")
    quarter = max(1, len(values) // 4)
    return float(statistics.median(values[-quarter:]) - statistics.median(values[:quarter]))


def _count_figures(all_values: list[int], post: list[int]) -> dict:
    return {
        "first": all_values[0],
        "last": all_values[-1],
        "max": max(all_values),
        "post_warmup_min": min(post) if post else None,
        "growth": count_growth(post) if post else None,
    }


def process_figures(samples: Sequence[ProcessSample], warmup_s: float, targets: Targets = Targets()) -> dict:
    """One process's figures and verdicts (True, False, or None: not enough samples)."""
    if not samples:
        raise NotEnoughSamples("no samples of this process were taken")
    post = [s for s in samples if s.t >= warmup_s]
    enough = len(post) >= targets.min_samples
    rss = [s.rss_bytes for s in samples]
    slope = memory_slope_mb_per_hour([s.t for s in post], [s.rss_bytes for s in post]) if enough else None
    threads = _count_figures([s.threads for s in samples], [s.threads for s in post])
    fds = _count_figures([s.fds for s in samples], [s.fds for s in post])
    files = _count_figures([s.files for s in samples], [s.files for s in post])
    passed = {
        "memory": slope < targets.memory_mb_per_hour if slope is not None else None,
        "threads": threads["growth"] <= targets.thread_growth if enough else None,
        "fds": fds["growth"] <= targets.fd_growth if enough else None,
        "files": files["growth"] <= targets.file_growth if enough else None,
    }
    return {
        "samples": len(samples),
        "post_warmup_samples": len(post),
        "rss_mb": {"first": rss[0] / MB, "last": rss[-1] / MB, "max": max(rss) / MB},
        "memory_slope_mb_per_hour": slope,
        "threads": threads,
        "fds": fds,
        "files": files,
        "passed": passed,
        "note": ""
        if enough
        else f"not enough samples after the warm-up ({len(post)} < {targets.min_samples}): run longer, sample more often or shorten the warm-up",
    }


def overall(processes: dict[str, dict], *, failed_requests: int, kv_freed: bool, targets: Targets = Targets()) -> dict:
    """The run's verdict per target; `all` is True only when every one is True (None never passes)."""

    def every(key: str) -> bool | None:
        values = [p["passed"][key] for p in processes.values()]
        if any(v is False for v in values):
            return False
        return None if any(v is None for v in values) or not values else True

    verdict: dict[str, bool | None] = {
        "memory": every("memory"),
        "threads": every("threads"),
        "fds": every("fds"),
        "files": every("files"),
        "requests": failed_requests <= targets.failed_requests,
        "kv_freed": kv_freed,
    }
    verdict["all"] = all(v is True for v in verdict.values())
    return verdict
