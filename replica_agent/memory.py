"""The agent process's heap under glibc: few malloc arenas, and freed pages handed back.

glibc gives a thread that allocates while another holds the main arena an arena of its own, up to
8 per core; an agent's engine, trainer, gRPC and HTTP threads each grow one, and what is freed in
one arena is reused only by allocations that land in it. After a round the agent frees megabytes of
tensors (decoded updates, the evaluation's activations) whose pages stay resident. Both showed as a
replica's resident memory climbing through a soak (docs/reliability.md), with no Python object or
tensor count growing. So the agent caps the arenas at start (as MALLOC_ARENA_MAX=2 would; an
operator's own MALLOC_ARENA_MAX wins) and calls malloc_trim after each round, which returns free
pages of every arena to the system. Elsewhere than glibc (musl, macOS) both do nothing. `heap()`
tells the two apart from outside: the agent exports it as `collm_process_heap_bytes`.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
import time

ARENAS = 2
_M_ARENA_MAX = -8  # mallopt's parameter number in glibc's malloc.h


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    if hasattr(libc, "mallinfo2"):  # glibc 2.33 and later
        libc.mallinfo2.restype = _MallInfo2
    return libc


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Cap glibc's malloc arenas; call it before the threads start. False when not done: not glibc,
    or MALLOC_ARENA_MAX set in the environment (glibc has read it already)."""
    libc = _glibc()
    if libc is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, arenas))


def heap() -> dict[str, int] | None:
    """The malloc heap of the whole process, every arena (glibc's mallinfo2): `in_use` (allocated,
    mmapped blocks included), `free` (free chunks kept in the arenas: fragmentation shows here,
    a leak in `in_use`). None elsewhere than glibc 2.33 or later."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    info = libc.mallinfo2()
    return {"in_use": info.uordblks + info.hblkhd, "free": info.fordblks}


def trim() -> bool:
    """Hand free heap pages back to the system; True when glibc released any."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


class Trimmer:
    """malloc_trim every `interval_s` on a thread of its own: free pages go back to the system a few
    seconds after they are freed, whenever in the agent's life that is (jemalloc's and tcmalloc's
    decay, which glibc lacks). One trim walks the free chunks of every arena with each arena's lock
    held: `longest_s` says what that has cost."""

    def __init__(self, interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError(f"heap trim interval must be positive, got {interval_s}")
        self.interval_s = interval_s
        self.trims = 0
        self.longest_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heap-trim", daemon=True)

    def start(self) -> Trimmer:
        if _glibc() is not None:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            began = time.perf_counter()
            trim()
            self.longest_s = max(self.longest_s, time.perf_counter() - began)
            self.trims += 1
