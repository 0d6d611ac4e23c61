"""The Driver interface: one small object per kind of device, sampled by telemetry and the `nodes`/`free`/`top` commands.

A driver is found by `probe()` (None when its library or hardware is absent — absence is normal, never an error),
then `sample()` is called at the telemetry rate, so a sample must be cheap: a handful of /proc or NVML reads.
Samples are plain JSON-able dicts because they travel on iopub as they are.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar


class Driver(ABC):
    """One device family on this node (cpu, nvidia, torch)."""

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def probe(cls, **options: Any) -> "Driver | None":
        """A ready driver, or None when its library or device is not there."""

    @abstractmethod
    def sample(self) -> dict[str, Any]:
        """Current load and memory as a JSON-able dict (cheap: called at the telemetry rate)."""

    def memory_rows(self, sample: dict[str, Any]) -> list[dict[str, Any]]:
        """Per-device memory rows `{"device", "kind", "total", "used", "free", …}` for `free`; none by default."""
        return []

    def close(self) -> None:  # noqa: B027  (optional for drivers: most hold nothing)
        """Release library handles (NVML); a no-op by default."""
