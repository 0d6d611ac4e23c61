"""How many intra-op threads a device's engine thread uses: every core it may run on while the rest of the machine is
idle, fewer while other programs keep cores busy.

OpenMP's workers either spin between parallel regions (fast: a GPT-2 124M decode step at 64 rows took 63 ms) or sleep
at once (OMP_WAIT_POLICY=PASSIVE: 108 ms, every region paying a wake-up). Spinning is right on cores the engine has
to itself and wrong on shared ones: with one other busy process on a 2-core machine the spinning team took 277 ms a
step, the sleeping one 115 ms, and one thread alone 102 ms (all on this project's 2-core Xeon). So the engine lets
idle workers spin for a short while (`SPIN_COUNT`, set before torch loads OpenMP) and this governor gives a core back
whenever other programs keep it busy: with one thread there is no team to spin.

libgomp (torch's OpenMP on Linux) spins only while it manages no more threads than there are CPUs, counting the idle
workers that every thread which ever ran a parallel region keeps. One load on a loader thread left two of them: the
engine thread's team then slept between regions as if PASSIVE (GPT-2 124M at 64 rows: 94 ms a step instead of 62).
So threads that only run torch now and then (loads, prefetches) free their workers when done
(`release_openmp_workers`), and an accelerator's engine thread, whose host work is small, runs one thread.

The load is what /proc/stat says all CPUs did minus what this process did itself (`os.times`), averaged over at least
`interval` seconds: the same numbers `top` shows, sampled between steps, never on a timer.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger("llmsh.threads")

SPIN_COUNT = "30000"  # libgomp's GOMP_SPINCOUNT: ~as fast as its default (300000) when idle, 10x shorter a spin when not


def set_openmp_spin() -> None:
    """Before torch loads OpenMP: idle workers spin `SPIN_COUNT` (libgomp), unless the user chose a wait policy."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)


def wanted_threads() -> int:
    """Intra-op threads when nothing else runs: `LLMSH_TORCH_THREADS`, else every core this process may run on
    (`sched_getaffinity`, not `cpu_count()`, which overcounts in containers and cgroups)."""
    return int(os.environ.get("LLMSH_TORCH_THREADS", "0") or 0) or len(os.sched_getaffinity(0))


_LIBGOMP: list[ctypes.CDLL] = []  # found once


def _libgomp() -> ctypes.CDLL | None:
    """The libgomp torch loaded (by its path in /proc/self/maps: wheels ship it under a hashed name), or None while
    none is loaded."""
    if _LIBGOMP:
        return _LIBGOMP[0]
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libgomp" in line and "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
            lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
            _LIBGOMP.append(lib)
            return lib
        except (OSError, AttributeError):  # not loadable, or a libgomp older than OpenMP 5.0 (GCC 9)
            continue
    return None


def release_openmp_workers() -> None:
    """Free the calling thread's idle OpenMP workers (libgomp keeps them for its next parallel region); the next
    region starts new ones. Call on a thread that is done with torch for a while; a no-op without libgomp."""
    lib = _libgomp()
    if lib is not None:
        lib.omp_pause_resource_all(1)  # omp_pause_soft: libgomp frees this thread's pool (not other threads')


def machine_busy_seconds() -> float | None:
    """CPU seconds all CPUs spent busy since boot (/proc/stat, idle, iowait and steal excluded); None off Linux."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
    except OSError:
        return None
    # cpu user nice system idle iowait irq softirq steal …: what ran here, not what waited or ran elsewhere
    busy = sum(int(fields[i]) for i in (1, 2, 3, 6, 7))
    return busy / os.sysconf("SC_CLK_TCK")


def own_busy_seconds() -> float:
    """CPU seconds this process (all its threads) has used."""
    t = os.times()
    return t.user + t.system


def torch_set_threads(n: int) -> None:
    """Set the calling thread's intra-op thread count (OpenMP's is per thread: call it on the engine thread)."""
    import torch

    torch.set_num_threads(n)


class ThreadGovernor:
    """Chooses the engine thread's intra-op threads from the cores other programs leave free; `adjust()` between steps."""

    def __init__(self, max_threads: int | None = None, *, cpus: int | None = None, interval: float = 0.5,
                 machine: Callable[[], float | None] = machine_busy_seconds,
                 own: Callable[[], float] = own_busy_seconds,
                 clock: Callable[[], float] = time.monotonic,
                 apply: Callable[[int], None] = torch_set_threads) -> None:
        self.max_threads = max(1, max_threads or wanted_threads())
        self.cpus = cpus or len(os.sched_getaffinity(0))
        self.interval = interval
        self.machine, self.own, self.clock, self.apply = machine, own, clock, apply
        self.threads = 0                 # what the engine thread runs with: set at the first `adjust()`
        self.others = 0.0                # cores other programs kept busy over the last interval
        self._last: tuple[float, float, float] | None = None

    def adjust(self) -> int:
        """Sample the load if `interval` has passed and change the thread count if the free cores changed."""
        if not self.threads:  # OpenMP's count is per thread: the engine thread's own, not the loader's
            self.apply(self.max_threads)
            self.threads = self.max_threads
        now = self.clock()
        if self._last is not None and now - self._last[0] < self.interval:
            return self.threads  # /proc is read once an interval, not every step
        busy = self.machine()
        if busy is None:
            return self.threads
        own = self.own()
        if self._last is None:
            self._last = (now, busy, own)
            return self.threads
        then, busy0, own0 = self._last
        self._last = (now, busy, own)
        self.others = max(0.0, ((busy - busy0) - (own - own0)) / (now - then))
        want = min(self.max_threads, max(1, round(self.cpus - self.others)))
        if want != self.threads:
            log.info("intra-op threads %d -> %d: other programs kept %.1f of %d cores busy", self.threads, want,
                     self.others, self.cpus)
            self.apply(want)
            self.threads = want
        return self.threads
