"""The front's process table: the one owner of every process's identity and state (what `ps` shows).

PIDs, names, nice values, pins (mlock), keep-alive and the state are changed here and nowhere else, always on the
front's event loop: commands change them through the methods below, and engine events (`state`, `progress`,
`removed`) are applied through `apply`. Each change that must survive a crash is written to the journal, and waiters
(`wait`, `load`, TERM's grace) are woken by one `asyncio.Condition` instead of polling.

The engine holds the run-time side (model, batch, scheduling): its live numbers (resident bytes, requests, tok/s…)
arrive with `stats` replies and are merged into the rows here.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmsh.kernel.errors import KernelError
from llmsh.kernel.journal import Journal
from llmsh.protocol.names import check_name
from llmsh.protocol.procs import ExitHow, ProcState, cfs_weight

DEFAULT_MAX_PROCS = 16
_ENGINE_STATES = frozenset({"ready", "running", "paged-out", "stopped", "exiting", "failed"})


class TableFull(KernelError):
    """The table already holds `max_procs` processes."""

    ename = "Busy"


@dataclass(eq=False)
class Entry:
    """One process as the front knows it."""

    pid: int
    name: str
    path: str
    device: str = "cpu"
    dtype: str = ""
    nice: int = 0
    state: ProcState = ProcState.LOADING
    reason: str = ""
    node: str = field(default_factory=socket.gethostname)
    started_at: float = field(default_factory=time.time)
    options: dict[str, Any] = field(default_factory=dict)  # what `load` asked for (device, dtype, max_batch, ctx)
    locked: bool = False
    keep_alive: float | None | str = "unset"
    on_engine: bool = False  # the engine has it loaded (false after an engine or kernel crash: restored lazily)
    inflight: int = 0  # generate requests the front has sent and not seen finish
    progress: float = 0.0
    progress_text: str = ""
    live: dict[str, Any] = field(default_factory=dict)  # the engine's latest numbers for this process
    exit_how: ExitHow | None = None

    def journal_row(self) -> dict[str, Any]:
        """What a restart needs to bring this process back."""
        return {
            "pid": self.pid, "name": self.name, "path": self.path, "device": self.device, "dtype": self.dtype,
            "nice": self.nice, "options": self.options, "locked": self.locked, "keep_alive": self.keep_alive,
            "started_at": self.started_at, "state": self.state.value, "reason": self.reason, "node": self.node,
        }

    def row(self) -> dict[str, Any]:
        """A `ps` row (same keys as before the split: pid, name, state, nice, device, res_bytes, reqs…)."""
        live = self.live
        return {
            "pid": self.pid, "name": self.name, "path": self.path, "state": self.state.value, "nice": self.nice,
            "device": self.device, "res_bytes": int(live.get("res_bytes", 0)) if self.on_engine else 0,
            "paged_bytes": int(live.get("paged_bytes", 0)), "reqs_active": int(live.get("reqs_active", 0)),
            "reqs_queued": int(live.get("reqs_queued", 0)), "tok_s": float(live.get("tok_s", 0.0)),
            "tokens": int(live.get("tokens", 0)), "time_s": float(live.get("time_s", 0.0)), "node": self.node,
            "reason": self.reason, "dtype": self.dtype, "progress": round(self.progress, 3),
            "started_at": self.started_at, "steps": int(live.get("steps", 0)),
            "last_batch": int(live.get("last_batch", 0)), "max_batch": int(live.get("max_batch", 0)),
            "vruntime": float(live.get("vruntime", 0.0)), "locked": self.locked,
            "ctx": int(live.get("ctx") or self.options.get("ctx") or 0),  # the context in tokens (0: not known yet)
        }


class ProcessTable:
    """PID → Entry. PIDs increase from 1 and are never reused, across restarts too (the journal keeps the next)."""

    def __init__(self, journal: Journal | None = None, max_procs: int = DEFAULT_MAX_PROCS, exited_keep: int = 64) -> None:
        self.journal = journal
        self.max_procs = max_procs
        self.next_pid = 1
        self._procs: dict[int, Entry] = {}
        self.exited: collections.deque[dict[str, Any]] = collections.deque(maxlen=exited_keep)
        self.changed = asyncio.Condition()
        self.listeners: list[Callable[[Entry, str], None]] = []  # (entry, "added" | "state" | "removed")
        self.scheduler_stats: dict[str, Any] = {}

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._procs.values()))

    def __len__(self) -> int:
        return len(self._procs)

    def get(self, pid: int) -> Entry | None:
        return self._procs.get(pid)

    def resolve(self, ref: str | int) -> Entry:
        """A PID or a name → the entry; LookupError with one line when there is none."""
        text = str(ref).strip()
        if text.isdigit():
            entry = self._procs.get(int(text))
            if entry is None:
                raise LookupError(f"no process with PID {text}; see 'ps'")
            return entry
        for e in self:
            if e.name == text:
                return e
        raise LookupError(f"no process named '{text}'; see 'ps'")

    def unique_name(self, base: str) -> str:
        """`base`, or `base-2`, `base-3`… if a process already has that name."""
        names = {e.name for e in self}
        if base not in names:
            return base
        i = 2
        while f"{base}-{i}" in names:
            i += 1
        return f"{base}-{i}"

    # ---- changes (the one place) ------------------------------------------------------------------------------------
    async def _commit(self, *futs: Any) -> None:
        for fut in futs:
            if fut is not None:
                await asyncio.wrap_future(fut)

    async def _notify(self, entry: Entry, event: str) -> None:
        for fn in list(self.listeners):
            try:
                fn(entry, event)
            except Exception:  # noqa: BLE001 - a listener must never break the table
                pass
        async with self.changed:
            self.changed.notify_all()

    async def add(self, name: str, path: str, *, device: str = "cpu", dtype: str = "", nice: int = 0,
                  options: dict[str, Any] | None = None, pid: int | None = None, node: str | None = None) -> Entry:
        """A new `loading` entry (journalled before this returns); TableFull or ValueError with one line."""
        cfs_weight(nice)
        check_name(name)
        live = [e for e in self if e.state not in (ProcState.FAILED, ProcState.LOST)]
        if pid is None and len(live) >= self.max_procs:
            raise TableFull(f"busy: {self.max_procs} processes already loaded (the limit, max_procs in config.toml); "
                            "kill one first (see 'ps')")
        if any(e.name == name for e in self):
            raise ValueError(f"name '{name}' is already used by another process; choose another with --name")
        if pid is None:
            pid = self.next_pid
        self.next_pid = max(self.next_pid, pid + 1)
        entry = Entry(pid=pid, name=name, path=path, device=device, dtype=dtype, nice=nice, options=dict(options or {}))
        if node is not None:
            entry.node = node
        self._procs[pid] = entry
        if self.journal is not None:
            await self._commit(self.journal.put_proc(pid, entry.journal_row()), self.journal.set_meta(next_pid=self.next_pid))
        await self._notify(entry, "added")
        return entry

    def adopt(self, entry: Entry) -> None:
        """Put back an entry read from the journal at start (already journalled; nothing is waiting yet)."""
        self._procs[entry.pid] = entry
        self.next_pid = max(self.next_pid, entry.pid + 1)

    async def update(self, entry: Entry, **fields: Any) -> None:
        """Change fields of `entry` (state, nice, locked, keep_alive, reason…); journalled, then waiters woken."""
        for key, value in fields.items():
            setattr(entry, key, value)
        if self.journal is not None and entry.pid in self._procs:
            await self._commit(self.journal.put_proc(entry.pid, entry.journal_row()))
        await self._notify(entry, "state")

    async def remove(self, entry: Entry, how: ExitHow, reason: str = "") -> None:
        """Take `entry` out of the table and remember how it ended (shown by `ps -a`)."""
        if self._procs.get(entry.pid) is not entry:
            return
        del self._procs[entry.pid]
        entry.exit_how = how
        entry.reason = reason or entry.reason
        row = entry.row()
        row.update(state="exited", exit=how.value, ended_at=time.time(), tok_s=0.0, res_bytes=0, reqs_active=0,
                   reqs_queued=0)
        self.exited.append(row)
        if self.journal is not None:
            await self._commit(self.journal.drop_proc(entry.pid))
        await self._notify(entry, "removed")

    def progress(self, entry: Entry, frac: float, text: str) -> None:
        """Loading progress (not journalled: a restart reloads anyway)."""
        entry.progress, entry.progress_text = float(frac), text
        for fn in list(self.listeners):
            try:
                fn(entry, "progress")
            except Exception:  # noqa: BLE001
                pass

    def merge_live(self, rows: dict[str, dict[str, Any]], scheduler: dict[str, Any]) -> None:
        """The engine's live numbers (from a `stats` reply)."""
        for pid, row in rows.items():
            entry = self._procs.get(int(pid))
            if entry is not None:
                entry.live = row
                if entry.on_engine and row.get("state") in _ENGINE_STATES:  # ready ⇄ running flip with every request:
                    entry.state = ProcState(row["state"])  # the engine's word, not journalled (a restore reloads)
                    if entry.state is ProcState.FAILED:  # its `state` event (journalled) may still be on its way
                        entry.reason = str(row.get("reason") or entry.reason)
        self.scheduler_stats = scheduler

    # ---- waiting ---------------------------------------------------------------------------------------------------
    async def wait_for(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        """Until `predicate()` holds (re-checked at each change); False on timeout."""
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(predicate), timeout)
            except TimeoutError:
                return False
        return True

    def gone(self, entry: Entry) -> bool:
        return self._procs.get(entry.pid) is not entry

    def exit_code(self, pid: int) -> int | None:
        """Shell-style status: None while busy; 0 settled or exited by TERM; 1 failed; 137 killed."""
        entry = self._procs.get(pid)
        if entry is not None:
            if entry.state in (ProcState.FAILED, ProcState.LOST):
                return 1
            if entry.state in (ProcState.LOADING, ProcState.EXITING) or entry.inflight:
                return None
            return 0
        for row in reversed(self.exited):
            if row["pid"] == pid:
                return {"term": 0, "reaped": 1}.get(row.get("exit", ""), 137)
        raise LookupError(f"no process with PID {pid}; see 'ps'")

    # ---- reading ---------------------------------------------------------------------------------------------------
    def snapshot(self, *, include_exited: bool = False) -> list[dict[str, Any]]:
        """Rows for `ps` and telemetry, by PID."""
        rows = [e.row() for e in sorted(self, key=lambda e: e.pid)]
        if include_exited:
            rows = sorted([*rows, *self.exited], key=lambda r: r["pid"])
        return rows
