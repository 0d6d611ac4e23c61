"""Device drivers of one node: `cpu` (always), `nvidia` (when NVML and a GPU are there), `torch` (when torch is loaded).

`Drivers` is what telemetry and the node commands hold: it probes once, re-checks torch at each sample (torch is imported
lazily by the first `load`), and turns samples into the node-load dict that travels in telemetry and the per-device
memory rows that `free` prints.
"""

from __future__ import annotations

import socket
from typing import Any

from llmsh.drivers.base import Driver
from llmsh.drivers.cpu import CpuDriver
from llmsh.drivers.nvidia import NvidiaDriver
from llmsh.drivers.torchmem import TorchDriver

__all__ = ["Driver", "CpuDriver", "NvidiaDriver", "TorchDriver", "Drivers", "probe_all", "memory_rows"]


def probe_all(pid: int | None = None) -> list[Driver]:
    """Every driver present on this node, cpu first; absent libraries or devices are just left out."""
    found: list[Driver] = [CpuDriver.probe(pid=pid)]
    for cls in (NvidiaDriver, TorchDriver):
        drv = cls.probe()
        if drv is not None:
            found.append(drv)
    return found


class Drivers:
    """The drivers of this node, sampled together into one node-load dict."""

    def __init__(self, pid: int | None = None, node: str | None = None) -> None:
        self.node = node or socket.gethostname()
        self.list: list[Driver] = probe_all(pid)

    def names(self) -> list[str]:
        """Names of the drivers currently listed."""
        return [d.name for d in self.list]

    def _refresh_torch(self) -> None:
        has = any(isinstance(d, TorchDriver) for d in self.list)
        if not has:
            drv = TorchDriver.probe()
            if drv is not None:
                self.list.append(drv)

    def sample(self) -> dict[str, Any]:
        """Node load: `{"name", "local", "drivers", "cpu", "gpus", "torch", "memory"}` (see telemetry schema)."""
        self._refresh_torch()
        samples = {d.name: d.sample() for d in self.list}
        rows: list[dict[str, Any]] = []
        for d in self.list:
            rows.extend(d.memory_rows(samples[d.name]))
        return {
            "name": self.node,
            "local": True,
            "drivers": self.names(),
            "cpu": samples["cpu"],
            "gpus": samples.get("nvidia", {}).get("gpus", []),
            "torch": samples.get("torch"),
            "memory": merge_torch(rows, samples.get("torch")),
        }

    def close(self) -> None:
        """Release every driver."""
        for d in self.list:
            d.close()


def merge_torch(rows: list[dict[str, Any]], torch_sample: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Add torch's allocated/reserved to the matching device rows (a device only torch knows gets its own row)."""
    if not torch_sample:
        return rows
    by_dev = {r["device"]: r for r in rows}
    for t in torch_sample.get("devices", []):
        row = by_dev.get(t["device"])
        if row is None:
            row = {"device": t["device"], "kind": "gpu", "total": None, "used": None, "free": None}
            rows.append(row)
        row["allocated"], row["reserved"] = t["allocated"], t["reserved"]
    return rows


def memory_rows(node_load: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-device memory rows of one node-load dict (what `free` prints)."""
    return list(node_load.get("memory", []))
