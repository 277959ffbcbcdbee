"""replica_agent.memory: glibc's arena cap and malloc_trim, through ctypes (nothing elsewhere)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from replica_agent import memory

glibc = pytest.mark.skipif(memory._glibc() is None, reason="glibc only")


@glibc
def test_trim_hands_freed_pages_back():
    blocks = [bytearray(64 * 1024) for _ in range(2000)]  # below the mmap threshold: on the heap
    kept = blocks[1::2]  # every other block stays: the freed ones are holes, not the heap's top (which free() trims itself)
    del blocks
    assert memory.trim()  # pages inside the holes went back
    assert len(kept) == 1000


@glibc
def test_limit_arenas_defers_to_malloc_arena_max_in_the_environment():
    code = "from replica_agent import memory; print(memory.limit_arenas())"
    run = lambda env: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout.strip()  # noqa: E731
    assert run({"PATH": ""}) == "True"
    assert run({"PATH": "", "MALLOC_ARENA_MAX": "4"}) == "False"


@glibc
def test_trimmer_trims_on_its_own_thread_until_stopped():
    trimmer = memory.Trimmer(0.01).start()
    deadline = time.monotonic() + 10
    while trimmer.trims < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    trimmer.stop()
    assert trimmer.trims >= 3 and trimmer.longest_s > 0
    done = trimmer.trims
    time.sleep(0.05)
    assert trimmer.trims == done  # stopped means stopped


def test_trimmer_wants_a_positive_interval():
    with pytest.raises(ValueError, match="heap trim interval must be positive"):
        memory.Trimmer(0)


JEMALLOC = memory.find_jemalloc()


def test_the_allocator_is_named():
    assert memory.allocator() in {"glibc", "other"}  # nothing preloaded into the test process
    assert (memory.allocator() == "glibc") == (memory._glibc() is not None)


@pytest.mark.skipif(JEMALLOC is None, reason="needs jemalloc (Debian's libjemalloc2), which the agent image installs")
def test_under_jemalloc_the_heap_is_jemallocs_and_glibcs_knobs_stand_down():
    code = (
        "import torch; from replica_agent import memory; x = torch.ones(10**7); "
        "h = memory.heap(); print(memory.allocator(), h['in_use'] > 40_000_000, memory.limit_arenas(), memory.trim())"
    )
    env = {"PATH": "", "LD_PRELOAD": JEMALLOC}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout.split()
    assert out == ["jemalloc", "True", "False", "False"]
