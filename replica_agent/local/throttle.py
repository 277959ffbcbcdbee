"""A slower device for one replica process: it may use only `share` of its CPU core.

Heterogeneous clusters (`collm bench goodput --cluster hetero`) need a replica that is honestly
slower, engine and trainer alike, without changing its code. The kernel's CFS bandwidth control
does exactly that: in every `period` the process's threads together run for at most
`share x period`, then wait for the next period (a duty cycle). It needs a writable cgroup cpu
controller (v2 `cpu.max`, or v1 `cpu.cfs_quota_us`); without one the same duty cycle is imposed
from outside with SIGSTOP/SIGCONT (coarser: a thread of this process drives it). `method` says
which one ran; the benchmark's JSON records it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 20_000  # 20 ms: short next to the SLO's TPOT, long next to the kernel's accounting


class Throttle:
    def __init__(self, pid: int, share: float, *, name: str, period_us: int = PERIOD_US) -> None:
        if not 0.05 <= share <= 1.0:
            raise ValueError(f"a throttle share must be between 0.05 and 1 of a core, got {share!r}")
        self.pid, self.share, self.period_us = pid, share, period_us
        self._group: Path | None = None
        self._parent_procs: Path | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        quota = max(1000, round(share * period_us))
        for attempt in (self._cgroup_v2, self._cgroup_v1):
            try:
                self.method = attempt(f"collm-{name}-{pid}", quota)
                return
            except OSError:
                self._remove_group()
        self.method = f"SIGSTOP/SIGCONT duty cycle ({share:.0%} of every {period_us / 1000:g} ms)"
        self._thread = threading.Thread(target=self._duty_cycle, name=f"collm-throttle-{name}", daemon=True)
        self._thread.start()

    def _cgroup_v2(self, group: str, quota: int) -> str:
        if "cpu" not in (CGROUP_ROOT / "cgroup.controllers").read_text().split():
            raise OSError("no cgroup v2 cpu controller")
        self._group, self._parent_procs = CGROUP_ROOT / group, CGROUP_ROOT / "cgroup.procs"
        self._group.mkdir()
        (self._group / "cpu.max").write_text(f"{quota} {self.period_us}")
        (self._group / "cgroup.procs").write_text(str(self.pid))
        return f"cgroup v2 cpu.max {quota} {self.period_us}"

    def _cgroup_v1(self, group: str, quota: int) -> str:
        root = CGROUP_ROOT / "cpu"
        self._group, self._parent_procs = root / group, root / "cgroup.procs"
        self._group.mkdir()
        (self._group / "cpu.cfs_period_us").write_text(str(self.period_us))
        (self._group / "cpu.cfs_quota_us").write_text(str(quota))
        (self._group / "cgroup.procs").write_text(str(self.pid))
        return f"cgroup v1 cpu.cfs_quota_us {quota} per {self.period_us} us"

    def _duty_cycle(self) -> None:
        on, off = self.share * self.period_us / 1e6, (1 - self.share) * self.period_us / 1e6
        try:
            while not self._stop.is_set():
                os.kill(self.pid, signal.SIGCONT)
                time.sleep(on)
                if off > 0 and not self._stop.is_set():
                    os.kill(self.pid, signal.SIGSTOP)
                    time.sleep(off)
        except ProcessLookupError:
            return
        finally:
            try:
                os.kill(self.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def _remove_group(self) -> None:
        if self._group is None:
            return
        try:
            if self._parent_procs is not None and (self._group / "cgroup.procs").exists():
                for pid in (self._group / "cgroup.procs").read_text().split():
                    try:
                        self._parent_procs.write_text(pid)
                    except OSError:
                        pass  # it exited meanwhile
            self._group.rmdir()
        except OSError:
            pass
        self._group = None

    def release(self) -> None:
        """Give the process its whole core back (and remove the cgroup)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._remove_group()

    def as_dict(self) -> dict:
        return {"share_of_core": self.share, "period_us": self.period_us, "method": self.method}


def throttle_all(pids: dict[str, int], shares: Mapping[str, float] | None) -> dict[str, Throttle]:
    """Throttle each named process (name -> pid) to its share of a core; names without a share run free."""
    return {name: Throttle(pids[name], share, name=name) for name, share in (shares or {}).items()}
