"""The host CPU and RAM through psutil, plus the kernel process's own footprint.

Per-core utilisation is computed from this driver's own `cpu_times` deltas rather than `psutil.cpu_percent`,
whose baseline is module-global: the telemetry loop and a `top` command in the same process would reset each other.
"""

from __future__ import annotations

import os
import time
from typing import Any

import psutil

from llmsh.drivers.base import Driver


def _busy_idle(t: Any) -> tuple[float, float]:
    """(busy, idle) seconds from one psutil cpu_times tuple; iowait counts as idle, as in top."""
    idle = t.idle + getattr(t, "iowait", 0.0)
    total = sum(t)
    # guest time is already included in user time on Linux
    total -= getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)
    return total - idle, idle


class CpuDriver(Driver):
    """Per-core %, load average, RAM, swap, and RSS/threads/CPU% of one process (default: this one)."""

    name = "cpu"

    def __init__(self, pid: int | None = None) -> None:
        self.proc = psutil.Process(pid or os.getpid())
        self._cores = [_busy_idle(t) for t in psutil.cpu_times(percpu=True)]
        self._proc_cpu = sum(self.proc.cpu_times()[:2])
        self._t = time.monotonic()

    @classmethod
    def probe(cls, **options: Any) -> "CpuDriver":
        """Always present."""
        return cls(options.get("pid"))

    def _percpu(self) -> list[float]:
        now = [_busy_idle(t) for t in psutil.cpu_times(percpu=True)]
        out = []
        for (b0, i0), (b1, i1) in zip(self._cores, now):
            span = (b1 - b0) + (i1 - i0)
            out.append(round(min(100.0, max(0.0, 100.0 * (b1 - b0) / span)), 1) if span > 0 else 0.0)
        self._cores = now
        return out

    def sample(self) -> dict[str, Any]:
        """One reading; utilisation figures are averages since the previous call."""
        percpu = self._percpu()
        vm = psutil.virtual_memory()
        sw = psutil.swap_memory()
        now = time.monotonic()
        with self.proc.oneshot():
            cpu = sum(self.proc.cpu_times()[:2])
            rss = self.proc.memory_info().rss
            threads = self.proc.num_threads()
        dt = now - self._t
        proc_pct = round(max(0.0, 100.0 * (cpu - self._proc_cpu) / dt), 1) if dt > 0 else 0.0
        self._proc_cpu, self._t = cpu, now
        return {
            "count": len(percpu),
            "percent": round(sum(percpu) / len(percpu), 1) if percpu else 0.0,
            "percpu": percpu,
            "load": [round(x, 2) for x in os.getloadavg()],
            "mem": {"total": vm.total, "used": vm.total - vm.available, "available": vm.available},
            "swap": {"total": sw.total, "used": sw.used},
            "proc": {"pid": self.proc.pid, "rss": rss, "threads": threads, "cpu_percent": proc_pct},
        }

    def memory_rows(self, sample: dict[str, Any]) -> list[dict[str, Any]]:
        """The host RAM row (free = available, as `free` calls it)."""
        mem = sample["mem"]
        return [{"device": "cpu", "kind": "host", "total": mem["total"], "used": mem["used"], "free": mem["available"]}]
