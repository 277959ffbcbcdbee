"""The agent process's heap under glibc: few malloc arenas, and freed pages handed back.

glibc gives a thread that allocates while another holds the main arena an arena of its own, up to
8 per core; an agent's engine, trainer, gRPC and HTTP threads each grow one, and what is freed in
one arena is reused only by allocations that land in it. After a round the agent frees megabytes of
tensors (decoded updates, the evaluation's activations) whose pages stay resident. Both showed as a
replica's resident memory climbing through a soak (docs/reliability.md), with no Python object or
tensor count growing. So the agent caps the arenas at start (as MALLOC_ARENA_MAX=2 would; an
operator's own MALLOC_ARENA_MAX wins) and calls malloc_trim after each round, which returns free
pages of every arena to the system. That was not enough: requests and training steps free
activations all the time, not only at rounds, and glibc keeps them (jemalloc and tcmalloc hand
pages back some seconds after they are freed; glibc has no such decay). So a `Trimmer` thread calls
malloc_trim every few seconds (`heap_trim_interval_s`). A fixed low mmap threshold would also hand
activations back, at every free, but page-faults them in again at every allocation: it cost 40% of
the time to first token on CPU (docs/reliability.md). Elsewhere than glibc (musl, macOS) all of
this does nothing. Even so, a 30-minute soak on glibc still climbed; on jemalloc, which the agent
image preloads, it did not. Under jemalloc the glibc knobs stand down (its own decay hands pages
back) and `heap()` reads jemalloc's statistics instead. `heap()` tells a leak from fragmentation
from outside: the agent exports it as `collm_process_heap_bytes`, and `allocator()` as
`collm_process_allocator_info`.
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
def _jemalloc() -> ctypes.CDLL | None:
    """The process's own symbols when jemalloc is its allocator (preloaded, as the image does)."""
    this = ctypes.CDLL(None)
    if not hasattr(this, "mallctl"):
        return None
    this.mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.c_void_p, ctypes.c_size_t]
    return this


JEMALLOC_PATHS = (
    "/usr/local/lib/libjemalloc.so.2",
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
)


def find_jemalloc() -> str | None:
    """Where this machine's jemalloc is (the image's first, then Debian's, Ubuntu's and Fedora's places)."""
    return next((path for path in JEMALLOC_PATHS if os.path.exists(path)), None)


def allocator() -> str:
    """`jemalloc` (preloaded), `glibc` (its malloc), or `other` (musl, macOS...)."""
    return "jemalloc" if _jemalloc() is not None else "glibc" if _glibc() is not None else "other"


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc, when its malloc is the process's: not when jemalloc replaces it."""
    if _jemalloc() is not None:
        return None
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
    """The malloc heap of the whole process, every arena: `in_use` (allocated, mmapped blocks
    included), `free` (kept by the allocator but not allocated: fragmentation shows here, a leak in
    `in_use`). glibc 2.33 or later: mallinfo2's allocated and free chunks. jemalloc: its
    `stats.allocated`, and `stats.resident` less that. None elsewhere."""
    je = _jemalloc()
    if je is not None:
        return _jemalloc_heap(je)
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    info = libc.mallinfo2()
    return {"in_use": info.uordblks + info.hblkhd, "free": info.fordblks}


def _jemalloc_heap(je: ctypes.CDLL) -> dict[str, int] | None:
    epoch, size = ctypes.c_uint64(1), ctypes.c_size_t(8)
    if je.mallctl(b"epoch", ctypes.byref(epoch), ctypes.byref(size), ctypes.byref(epoch), 8) != 0:  # refresh the stats
        return None
    read = {}
    for name in ("stats.allocated", "stats.resident"):
        value, size = ctypes.c_size_t(), ctypes.c_size_t(ctypes.sizeof(ctypes.c_size_t))
        if je.mallctl(name.encode(), ctypes.byref(value), ctypes.byref(size), None, 0) != 0:
            return None  # a jemalloc built without statistics
        read[name] = value.value
    return {"in_use": read["stats.allocated"], "free": max(0, read["stats.resident"] - read["stats.allocated"])}


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
