"""A replica made a slower device (replica_agent/local/throttle.py): it gets its share of the core
and no more, by the kernel's CPU quota where a cgroup is writable and by a duty cycle elsewhere."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from replica_agent.local import throttle as throttle_module
from replica_agent.local.throttle import Throttle

BUSY = "import os\nos.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\nwhile True: pass"


def cpu_share(pid: int, seconds: float = 1.5) -> float:
    p = psutil.Process(pid)
    before = sum(p.cpu_times()[:2])
    time.sleep(seconds)
    return (sum(p.cpu_times()[:2]) - before) / seconds


@pytest.fixture
def busy():
    proc = subprocess.Popen([sys.executable, "-c", BUSY])
    time.sleep(0.3)
    yield proc
    proc.kill()
    proc.wait(10)


def check(throttle: Throttle, pid: int) -> None:
    try:
        assert cpu_share(pid) <= throttle.share + 0.15, throttle.method
    finally:
        throttle.release()
    assert cpu_share(pid, 1.0) > throttle.share + 0.2  # released: its whole core again


def test_a_throttled_process_gets_its_share_of_the_core(busy):
    check(Throttle(busy.pid, 0.3, name="test"), busy.pid)


def test_without_a_writable_cgroup_a_duty_cycle_throttles(busy, tmp_path, monkeypatch):
    monkeypatch.setattr(throttle_module, "CGROUP_ROOT", tmp_path)  # no cpu controller here
    t = Throttle(busy.pid, 0.3, name="test")
    assert t.method.startswith("SIGSTOP/SIGCONT")
    check(t, busy.pid)


def test_a_share_out_of_range_is_refused():
    with pytest.raises(ValueError, match="between 0.05 and 1"):
        Throttle(1, 0.0, name="x")
