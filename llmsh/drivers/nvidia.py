"""NVIDIA GPUs through NVML (the `nvidia-ml-py` package, module `pynvml`).

`probe()` returns None when pynvml is not installed, the NVML shared library is missing, or there is no GPU: a machine
without NVIDIA hardware simply has no such driver. A query a board does not support (power on some models) gives None
for that field, never an exception.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from llmsh.drivers.base import Driver


def _maybe(fn: Callable[[], Any]) -> Any:
    """Call one NVML query; None when this board or driver does not support it."""
    try:
        return fn()
    except Exception:  # pynvml.NVMLError and its many subclasses; also ctypes failures
        return None


class NvidiaDriver(Driver):
    """Per-GPU utilisation, memory, temperature, power and per-process memory."""

    name = "nvidia"

    def __init__(self, nvml: Any, handles: list[Any], names: list[str]) -> None:
        self.nvml = nvml
        self.handles = handles
        self.names = names

    @classmethod
    def probe(cls, **options: Any) -> "NvidiaDriver | None":
        """A driver over every visible GPU, or None when NVML or a GPU is absent."""
        try:
            import pynvml as nvml
        except ImportError:
            return None
        try:
            nvml.nvmlInit()
        except Exception:  # NVMLError_LibraryNotFound, DriverNotLoaded, …
            return None
        try:
            count = nvml.nvmlDeviceGetCount()
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            names = [_maybe(partial(nvml.nvmlDeviceGetName, h)) or "GPU" for h in handles]
        except Exception:
            count = 0
        if count == 0:
            _maybe(nvml.nvmlShutdown)
            return None
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        return cls(nvml, handles, names)

    def _gpu(self, i: int, h: Any) -> dict[str, Any]:
        nv = self.nvml
        util = _maybe(lambda: nv.nvmlDeviceGetUtilizationRates(h))
        mem = _maybe(lambda: nv.nvmlDeviceGetMemoryInfo(h))
        power = _maybe(lambda: nv.nvmlDeviceGetPowerUsage(h))  # milliwatts
        limit = _maybe(lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h))
        procs = _maybe(lambda: nv.nvmlDeviceGetComputeRunningProcesses(h)) or []
        return {
            "index": i,
            "device": f"cuda:{i}",
            "name": self.names[i],
            "util": getattr(util, "gpu", None),
            "mem_used": getattr(mem, "used", None),
            "mem_total": getattr(mem, "total", None),
            "temp_c": _maybe(lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
            "power_w": round(power / 1000, 1) if power is not None else None,
            "power_limit_w": round(limit / 1000, 1) if limit is not None else None,
            "procs": [{"pid": p.pid, "mem": p.usedGpuMemory} for p in procs],
        }

    def sample(self) -> dict[str, Any]:
        """One reading of every GPU."""
        return {"gpus": [self._gpu(i, h) for i, h in enumerate(self.handles)]}

    def memory_rows(self, sample: dict[str, Any]) -> list[dict[str, Any]]:
        """One row per GPU, from NVML's view (all processes on the board)."""
        rows = []
        for g in sample["gpus"]:
            total, used = g["mem_total"], g["mem_used"]
            if total is None or used is None:
                continue
            rows.append({"device": g["device"], "kind": "gpu", "total": total, "used": used, "free": total - used})
        return rows

    def close(self) -> None:
        """Shut NVML down."""
        _maybe(self.nvml.nvmlShutdown)
