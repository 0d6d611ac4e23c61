"""Message counters: what came in and went out on each socket, what was rejected and why, who talked to us.

The kernel records every message here (from its event-loop thread); `snapshot()` may be read from any thread
(telemetry, `kernel status`, the dashboard), so updates and reads share one small lock.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import Any


class Counters:
    """Per-socket, per-type message counts and bytes, rejections by reason, and the last ~200 messages."""

    def __init__(self, clients: dict[str, float] | None = None, recent: int = 200) -> None:
        self._lock = threading.Lock()
        self._in: dict[str, dict[str, list[int]]] = {}
        self._out: dict[str, dict[str, list[int]]] = {}
        self.rejected: Counter[str] = Counter()
        self.cancelled: Counter[str] = Counter()  # foreground commands cancelled, by cause (interrupt, disconnect)
        self.clients: dict[str, float] = clients if clients is not None else {}  # connected now (the kernel prunes it)
        self.clients_seen = 0  # client sessions seen since start
        self.recent: deque[dict[str, Any]] = deque(maxlen=recent)

    def record(self, direction: str, socket: str, msg_type: str, nbytes: int, client: str = "") -> None:
        """Count one verified inbound (`direction="in"`) or sent (`"out"`) message."""
        table = self._in if direction == "in" else self._out
        with self._lock:
            slot = table.setdefault(socket, {}).setdefault(msg_type, [0, 0])
            slot[0] += 1
            slot[1] += nbytes
            self.recent.append(
                {"t": time.time(), "dir": direction, "socket": socket, "type": msg_type, "bytes": nbytes, "client": client}
            )

    def reject(self, reason: str, socket: str, nbytes: int) -> None:
        """Count one dropped message."""
        with self._lock:
            self.rejected[reason] += 1
            self.recent.append(
                {"t": time.time(), "dir": "in", "socket": socket, "type": f"rejected:{reason}", "bytes": nbytes, "client": ""}
            )

    def cancel(self, cause: str) -> None:
        """Count one foreground command cancelled because of `cause`."""
        with self._lock:
            self.cancelled[cause] += 1

    def totals(self, direction: str) -> tuple[int, int]:
        """(messages, bytes) over all sockets in one direction."""
        table = self._in if direction == "in" else self._out
        with self._lock:
            return (
                sum(c for per in table.values() for c, _ in per.values()),
                sum(b for per in table.values() for _, b in per.values()),
            )

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy: {"in": {socket: {type: {count, bytes}}}, "out": …, "rejected": {reason: n}, "clients": n connected,
        "clients_seen": n since start, "cancelled": …}."""

        def dump(table: dict[str, dict[str, list[int]]]) -> dict[str, Any]:
            return {s: {t: {"count": c, "bytes": b} for t, (c, b) in per.items()} for s, per in table.items()}

        with self._lock:
            return {
                "in": dump(self._in),
                "out": dump(self._out),
                "rejected": dict(self.rejected),
                "clients": len(self.clients),
                "clients_seen": self.clients_seen,
                "cancelled": dict(self.cancelled),
            }
