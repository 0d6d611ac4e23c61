"""The threads of this OS process as `threads` rows: pool, state (from /proc), task, CPU time (psutil).

Both the front and each engine report their own threads this way; `threads` shows them side by side.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import psutil


def _thread_comm(native_id: int) -> str:
    """The OS name of a thread started outside Python (ZeroMQ I/O, OpenMP workers…), from /proc (Linux)."""
    try:
        return Path(f"/proc/self/task/{native_id}/comm").read_text().strip() or "(native)"
    except OSError:
        return "(native)"


def _thread_state(native_id: int | None) -> str:
    """R/S/D… from /proc (Linux); '?' elsewhere."""
    if not native_id:
        return "?"
    try:
        stat = Path(f"/proc/self/task/{native_id}/stat").read_text()
        code = stat.rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"
    return {"R": "running", "S": "sleeping", "D": "disk-wait", "Z": "zombie", "T": "stopped", "I": "idle"}.get(code, code)


def thread_rows(known: dict[int, dict[str, Any]], loop_thread: threading.Thread | None = None) -> list[dict[str, Any]]:
    """Every thread of this process; `known` maps a thread ident to its {"pool", "task"} (engine, loader…)."""
    cpu = {t.id: t.user_time + t.system_time for t in psutil.Process().threads()}
    try:
        ntasks = len(asyncio.all_tasks(asyncio.get_running_loop()))
    except RuntimeError:
        ntasks = 0
    rows = []
    for t in threading.enumerate():
        info = known.get(t.ident or 0)
        if t is loop_thread:
            pool, task = "io-loop", f"asyncio event loop, {ntasks} tasks"
        elif info is not None:
            pool, task = info["pool"], info["task"]
        elif t.name.startswith("llmsh-"):  # our other threads: heartbeat, the pager's prefetch, the journal…
            pool, task = t.name[len("llmsh-"):].split("-")[0].split("_")[0], ""
        else:
            pool, task = "other", ""
        rows.append({
            "name": t.name, "native_id": t.native_id, "pool": pool, "state": _thread_state(t.native_id),
            "task": task, "cpu_s": round(cpu.get(t.native_id or -1, 0.0), 3), "daemon": t.daemon,
        })
    seen = {r["native_id"] for r in rows}
    for tid, secs in cpu.items():  # native threads torch/OpenMP/ZeroMQ started outside Python
        if tid not in seen:
            rows.append({"name": _thread_comm(tid), "native_id": tid, "pool": "native", "state": _thread_state(tid),
                         "task": "", "cpu_s": round(secs, 3), "daemon": True})
    return rows
