"""Device memory as PyTorch's caching allocator sees it (allocated vs reserved), when the kernel has torch loaded.

This driver never imports torch: torch is loaded lazily by the first `load`, and starting the dashboard or
telemetry must not pull in a gigabyte of libraries. It reads `sys.modules["torch"]` when that is already there,
and it does not initialise CUDA (an uninitialised device reports nothing rather than creating a context).
"""

from __future__ import annotations

import sys
from typing import Any

from llmsh.drivers.base import Driver


def loaded() -> Any:
    """The torch module if this process has imported it completely, else None.

    The first `load` imports torch in a loader thread, which takes a second or more; meanwhile `sys.modules` already
    holds the half-built module, and touching it from the telemetry thread raised "partially initialized module
    'torch'". Python marks such a module's spec `_initializing` (its own check for that error message)."""
    torch = sys.modules.get("torch")
    if torch is None or getattr(getattr(torch, "__spec__", None), "_initializing", False):
        return None
    return torch


class TorchDriver(Driver):
    """torch's allocator figures per CUDA device (and MPS), plus the intra-op thread count."""

    name = "torch"

    @classmethod
    def probe(cls, **options: Any) -> "TorchDriver | None":
        """A driver when torch is already imported in this process, else None."""
        return cls() if loaded() is not None else None

    def sample(self) -> dict[str, Any]:
        """Allocated/reserved bytes per initialised device."""
        torch = loaded()
        if torch is None:
            return {"devices": []}
        devices = []
        cuda = getattr(torch, "cuda", None)
        if cuda is not None and cuda.is_available() and cuda.is_initialized():
            for i in range(cuda.device_count()):
                devices.append(
                    {"device": f"cuda:{i}", "allocated": cuda.memory_allocated(i), "reserved": cuda.memory_reserved(i)}
                )
        mps = getattr(torch, "mps", None)
        backend = getattr(getattr(torch, "backends", None), "mps", None)
        if mps is not None and backend is not None and backend.is_available():
            devices.append(
                {"device": "mps", "allocated": mps.current_allocated_memory(), "reserved": mps.driver_allocated_memory()}
            )
        return {"version": str(getattr(torch, "__version__", "?")), "threads": torch.get_num_threads(), "devices": devices}
