"""Models as processes: the process record, its state machine, and the process table behind `ps`.

A process is one loaded model instance. Its life is a small state machine, kept explicit so that every signal to a
process in the wrong state gets one clear line instead of undefined behaviour:

    loading → ready ⇄ running        (running = it has requests in its batch)
    ready/running/paged-out → stopped → (CONT) back where it was
    ready/running/stopped/paged-out → exiting (TERM: finish what was accepted, then unload)
    any → failed(reason)             (load error, step error); the entry stays until `ps` shows it or `kill` reaps it

KILL is not a state: the process leaves the table at once. This module is pure bookkeeping (no torch, no threads of
its own); the scheduler (`scheduler.py`) drives the transitions and the loader (`loader.py`) fills in the model.
This is the engine's side of a process (its model, batch and scheduling state); the front's table
(`llmsh.kernel.table`) owns its identity (PID, name, nice, pins) and is what `ps` shows. PIDs come from the front.
"""

from __future__ import annotations

import collections
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from llmsh.protocol.names import check_name
from llmsh.protocol.procs import (  # noqa: F401  (re-exported: the engine's modules import them from here)
    RUNNABLE,
    SIGNALS,
    TRANSITIONS,
    ExitHow,
    ProcState,
    StateError,
    cfs_weight,
    parse_signal,
)


class Runtime(Protocol):
    """What the scheduler needs from a loaded model (real: `loader.ModelRuntime`; tests: a fake)."""

    max_batch: int
    max_seq_len: int

    def new_batch(self) -> Any: ...  # a BatchGenerator: .add(seq) .remove(seq) .step() .last_batch_size

    def new_sequence(self, prompt_ids: list[int], params: Any) -> Any: ...  # a Sequence: .finished, .push()

    def resident_bytes(self) -> int: ...

    def changed_files(self) -> str | None: ...  # why its checkpoint can no longer be read safely, else None

    def close(self) -> None: ...


@dataclass(eq=False)
class Process:
    """One model instance. Fields after `reason` belong to the scheduler and are only touched under its engine lock."""

    pid: int
    name: str
    path: str
    device: str = "cpu"
    dtype: str = ""
    nice: int = 0
    state: ProcState = ProcState.LOADING
    reason: str = ""  # why it failed (or how it is exiting)
    node: str = field(default_factory=socket.gethostname)
    started_at: float = field(default_factory=time.time)
    progress: float = 0.0  # loading progress 0..1
    progress_text: str = ""
    runtime: Runtime | None = None
    paged_bytes: int = 0  # set by the pager
    # --- scheduler state -------------------------------------------------------------------------------------
    batch: Any = None
    pending: collections.deque = field(default_factory=collections.deque)  # Requests waiting for a batch slot
    active: dict[int, Any] = field(default_factory=dict)  # id(seq) → Request, in the batch
    vruntime: float = 0.0  # tokens × 1024 / weight
    on_rq: bool = False  # was runnable at the last pick (wake-ups are placed at min vruntime)
    stepping: bool = False  # the engine thread is inside this process's step right now (outside the lock)
    resume_state: ProcState = ProcState.READY  # where CONT goes back to
    tokens: int = 0
    steps: int = 0
    compute_s: float = 0.0  # wall time spent in this process's steps (the TIME column)
    last_batch: int = 0
    max_batch_seen: int = 0
    rate: collections.deque = field(default_factory=lambda: collections.deque(maxlen=512))  # (t, tokens) per step
    exit_how: ExitHow | None = None
    gone: threading.Event = field(default_factory=threading.Event)  # set when the process left the table
    abort_load: bool = False  # KILL while loading: the loader's progress callback raises

    def transition(self, to: ProcState, reason: str = "") -> None:
        """Move to state `to`; raises StateError if the state machine does not allow it."""
        if to is self.state:
            return
        if to not in TRANSITIONS[self.state]:
            raise StateError(f"process {self.pid} ({self.name}) is {self.state.value}; cannot become {to.value}")
        self.state = to
        if reason or to is ProcState.FAILED:
            self.reason = reason

    @property
    def weight(self) -> int:
        return cfs_weight(self.nice)

    def has_work(self) -> bool:
        return bool(self.pending or self.active)

    def runnable(self) -> bool:
        """May the scheduler step this process now?"""
        return self.state in RUNNABLE and self.runtime is not None and self.has_work()

    def tok_s(self, window: float = 5.0, now: float | None = None) -> float:
        """Tokens per second over the last `window` seconds."""
        now = time.monotonic() if now is None else now
        recent = [(t, n) for t, n in list(self.rate) if now - t <= window]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1e-3) if len(recent) > 1 else window
        return sum(n for _, n in recent) / span

    def row(self) -> dict[str, Any]:
        """This process as a `ps` row (contract E keys, plus a few extras for tests and the dashboard)."""
        res = 0
        if self.runtime is not None:
            try:
                res = int(self.runtime.resident_bytes())
            except Exception:  # a half-freed model must not break `ps`
                res = 0
        res = max(0, res - self.paged_bytes)  # weights the pager has moved out are not resident
        return {
            "pid": self.pid,
            "name": self.name,
            "path": self.path,
            "state": self.state.value,
            "nice": self.nice,
            "device": self.device,
            "res_bytes": res,
            "ctx": int(getattr(self.runtime, "max_seq_len", 0) or 0),  # tokens per request (0: not loaded)
            "paged_bytes": self.paged_bytes,
            "reqs_active": len(self.active),
            "reqs_queued": len(self.pending),
            "tok_s": round(self.tok_s(), 2),
            "tokens": self.tokens,
            "time_s": round(self.compute_s, 3),
            "node": self.node,
            "reason": self.reason,
            "dtype": self.dtype,
            "progress": round(self.progress, 3),
            "started_at": self.started_at,
            "steps": self.steps,
            "last_batch": self.last_batch,
            "max_batch": self.max_batch_seen,
            "vruntime": round(self.vruntime, 3),
        }


class ProcessTable:
    """PID → Process. PIDs increase from 1 and are never reused within a kernel's life."""

    def __init__(self, max_procs: int = 16, exited_keep: int = 64) -> None:
        self.max_procs = max_procs
        self._procs: dict[int, Process] = {}
        self._next_pid = 1
        self._lock = threading.RLock()
        self.exited: collections.deque[dict[str, Any]] = collections.deque(maxlen=exited_keep)
        self.listeners: list[Callable[[Process, str], None]] = []  # (process, event) — e.g. the journal, telemetry

    def __len__(self) -> int:
        return len(self._procs)

    def __iter__(self):
        with self._lock:
            return iter(list(self._procs.values()))

    def live(self) -> list[Process]:
        """Processes that hold (or are getting) a model: everything but failed entries."""
        return [p for p in self if p.state is not ProcState.FAILED]

    def unique_name(self, base: str) -> str:
        """`base`, or `base-2`, `base-3`… if a live process already has that name."""
        names = {p.name for p in self}
        if base not in names:
            return base
        i = 2
        while f"{base}-{i}" in names:
            i += 1
        return f"{base}-{i}"

    def add(
        self, name: str, path: str, *, device: str = "cpu", dtype: str = "", nice: int = 0, pid: int | None = None
    ) -> Process:
        """Create a `loading` process (with the next PID, or `pid` as the front assigned it); TableFull when full."""
        cfs_weight(nice)
        check_name(name)  # not all digits, no leading %, no control characters (llmsh/protocol/names.py)
        with self._lock:
            if pid is not None:
                if pid in self._procs:
                    raise ValueError(f"pid {pid} is already in use")
                self._next_pid = max(self._next_pid, pid)
            if len(self.live()) >= self.max_procs:
                raise TableFull(
                    f"busy: {self.max_procs} processes already loaded; kill one first (see 'ps')"
                )
            if any(p.name == name for p in self._procs.values()):
                raise ValueError(f"name '{name}' is already used by another process; choose another with --name")
            proc = Process(pid=self._next_pid, name=name, path=path, device=device, dtype=dtype, nice=nice)
            self._next_pid += 1
            self._procs[proc.pid] = proc
        self._emit(proc, "added")
        return proc

    def get(self, pid: int) -> Process | None:
        return self._procs.get(pid)

    def resolve(self, ref: str | int) -> Process:
        """A PID or a name → the process; LookupError with one line when there is none."""
        text = str(ref).strip()
        if text.isdigit():
            proc = self._procs.get(int(text))
            if proc is None:
                raise LookupError(f"no process with PID {text}; see 'ps'")
            return proc
        matches = [p for p in self if p.name == text]
        if not matches:
            raise LookupError(f"no process named '{text}'; see 'ps'")
        return matches[0]

    def remove(self, proc: Process, how: ExitHow, reason: str = "") -> None:
        """Take `proc` out of the table and remember how it ended (shown by `ps -a`)."""
        with self._lock:
            if self._procs.get(proc.pid) is not proc:
                return
            del self._procs[proc.pid]
            proc.exit_how = how
            row = proc.row()
            row.update(state="exited", exit=how.value, reason=reason or proc.reason, ended_at=time.time(), tok_s=0.0,
                       res_bytes=0, reqs_active=0, reqs_queued=0)
            self.exited.append(row)
        proc.gone.set()
        self._emit(proc, "removed")

    def snapshot(self, *, reap: bool = False, include_exited: bool = False) -> list[dict[str, Any]]:
        """Rows for `ps` (contract E). With `reap=True`, failed entries are removed after being shown once."""
        with self._lock:
            procs = sorted(self._procs.values(), key=lambda p: p.pid)
        rows = [p.row() for p in procs]
        exited = list(self.exited)  # before reaping: a failed entry shown now must not also show as exited (reaped)
        if reap:
            for p in procs:
                if p.state is ProcState.FAILED:
                    self.remove(p, ExitHow.REAPED)
        if include_exited:
            rows = sorted([*rows, *exited], key=lambda r: r["pid"])
        return rows

    def exit_code(self, pid: int) -> int | None:
        """Shell-style status of a process: None while busy; 0 settled (ready, idle) or exited by TERM; 1 failed; 137 killed."""
        proc = self._procs.get(pid)
        if proc is not None:
            if proc.state is ProcState.FAILED:
                return 1
            if proc.state in (ProcState.LOADING, ProcState.EXITING) or proc.has_work():
                return None
            return 0
        for row in reversed(self.exited):
            if row["pid"] == pid:
                return {"term": 0, "reaped": 1}.get(row.get("exit", ""), 137)
        raise LookupError(f"no process with PID {pid}; see 'ps'")

    def changed(self, proc: Process, event: str = "state") -> None:
        """Tell listeners that `proc` changed (state, progress)."""
        self._emit(proc, event)

    def _emit(self, proc: Process, event: str) -> None:
        for fn in list(self.listeners):
            try:
                fn(proc, event)
            except Exception:  # a listener must never break the table
                pass


class TableFull(RuntimeError):
    """The table already holds `max_procs` processes."""


def describe(procs: Iterable[Process]) -> str:
    """Short `pid:name` list, for messages."""
    return ", ".join(f"{p.pid}:{p.name}" for p in procs)
