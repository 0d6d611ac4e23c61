"""What the dashboard knows: the latest telemetry payload, short histories for sparklines, and shape checks.

A payload comes from the network, so it is checked before any widget sees it: one of an unknown shape (another
version, another program using iopub) is ignored and counted rather than crashing the screen.
"""

from __future__ import annotations

from collections import deque
from typing import Any

MIME = "application/vnd.llmsh.telemetry+json"  # same as llmsh.kernel.telemetry.MIME (not imported: client side)
SCHEMA = "llmsh.telemetry/1"
HISTORY = 120  # samples kept for sparklines (a minute at 2 Hz)
_BLOCKS = " ▁▂▃▄▅▆▇█"


def _list_of_dicts(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(i, dict) for i in x)


def valid(payload: Any) -> bool:
    """True when `payload` has the shape of schema llmsh.telemetry/1 (the parts the dashboard reads)."""
    if not isinstance(payload, dict) or payload.get("schema") != SCHEMA:
        return False
    if not isinstance(payload.get("kernel"), dict) or not isinstance(payload.get("traffic"), dict):
        return False
    if not _list_of_dicts(payload.get("nodes")) or not payload["nodes"] or not _list_of_dicts(payload.get("procs")):
        return False
    for node in payload["nodes"]:
        if not isinstance(node.get("cpu"), dict) or not _list_of_dicts(node.get("gpus", [])):
            return False
        if not isinstance(node["cpu"].get("percpu", []), list):
            return False
    tr = payload["traffic"]
    return _list_of_dicts(tr.get("rates", [])) and _list_of_dicts(tr.get("recent", []))


def spark(values: "list[float] | deque[float]", width: int, top: float | None = None) -> str:
    """A text sparkline of the last `width` values, scaled to `top` (default: their maximum)."""
    vals = list(values)[-width:] if width > 0 else []
    if not vals:
        return ""
    hi = top if top is not None else max(vals)
    if hi <= 0:
        return _BLOCKS[1] * len(vals)
    return "".join(_BLOCKS[max(1, min(8, round(8 * v / hi)))] for v in vals)


class State:
    """The dashboard's model: latest payload, histories, and the messages log."""

    def __init__(self, log_max: int = 500) -> None:
        self.payload: dict[str, Any] | None = None
        self.ignored = 0
        self.received = 0
        self.gpu_util: dict[str, deque[float]] = {}
        self.gpu_mem: dict[str, deque[float]] = {}
        self.cpu: dict[str, deque[float]] = {}
        self.msgs_in: deque[float] = deque(maxlen=HISTORY)
        self.msgs_out: deque[float] = deque(maxlen=HISTORY)
        self.log: deque[dict[str, Any]] = deque(maxlen=log_max)
        self.rates: dict[tuple[str, str], deque[float]] = {}  # (dir, type) → msgs/s history

    def accept(self, payload: Any) -> bool:
        """Take one telemetry payload; False (and counted) when its shape is unknown."""
        if not valid(payload):
            self.ignored += 1
            return False
        self.received += 1
        self.payload = payload
        for node in payload["nodes"]:
            name = str(node.get("name"))
            self.cpu.setdefault(name, deque(maxlen=HISTORY)).append(float(node["cpu"].get("percent") or 0))
            for g in node.get("gpus", []):
                key = f"{name}/{g.get('device')}"
                self.gpu_util.setdefault(key, deque(maxlen=HISTORY)).append(float(g.get("util") or 0))
                total = g.get("mem_total") or 0
                frac = 100.0 * (g.get("mem_used") or 0) / total if total else 0.0
                self.gpu_mem.setdefault(key, deque(maxlen=HISTORY)).append(frac)
        total = payload["traffic"].get("total") or {}
        self.msgs_in.append(float(total.get("in_msgs_s") or 0))
        self.msgs_out.append(float(total.get("out_msgs_s") or 0))
        self.log.extend(payload["traffic"].get("recent", []))
        for r in payload["traffic"].get("rates", []):
            rate_key = (str(r.get("dir")), str(r.get("type")))
            self.rates.setdefault(rate_key, deque(maxlen=HISTORY)).append(float(r.get("msgs_s") or 0))
        return True

    @property
    def nodes(self) -> list[dict[str, Any]]:
        """Nodes of the latest payload."""
        return self.payload["nodes"] if self.payload else []

    @property
    def procs(self) -> list[dict[str, Any]]:
        """Process rows of the latest payload."""
        return self.payload["procs"] if self.payload else []
