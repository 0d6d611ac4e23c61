"""What commands can reach in the front: one typed `Services` built once at start, and `Processes`, the only way
to act on model processes (load, generate, signal, renice, memory), which keeps the table, the journal and the
engine in step.

Crashes: when the engine dies, every request in flight fails at once with the cause, the processes stay in the table
as `paged-out` (not on any engine), and each comes back on a new engine at its first use (pinned ones at once);
one that no longer loads becomes `failed` with the reason. When the whole front dies, the next start finds the
journal not closed cleanly and restores the table the same way (see `restore`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmsh.config import max_procs as config_max_procs
from llmsh.kernel.engines import EngineDied, EngineLink, EngineRequestError
from llmsh.kernel.errors import KernelError
from llmsh.kernel.jobs import JobTable
from llmsh.kernel.journal import Journal
from llmsh.kernel.mapjobs import MapJobs
from llmsh.kernel.table import DEFAULT_MAX_PROCS, Entry, ProcessTable
from llmsh.models import default_name, resolve_model
from llmsh.protocol.names import usable_name
from llmsh.protocol.procs import ExitHow, ProcState, cfs_weight

log = logging.getLogger("llmsh.kernel.front")
MAX_CHATS = 256  # conversations kept per kernel (oldest forgotten first)
SIGBUS_HINT = "its checkpoint file changed on disk?"
KILL_SETTLE_S = 10.0  # KILL waits at most this long for the engine's `removed` (one step in flight, at worst)


class NoSuchProcess(KernelError):
    ename = "NoSuchProcess"


class StateError(KernelError):
    ename = "StateError"


@dataclass
class Services:
    """The front's services, built once at start (commands reach them as `ctx.kernel.services`)."""

    table: ProcessTable
    procs: Processes
    journal: Journal | None
    jobs: JobTable = field(default_factory=JobTable)
    chats: dict[tuple[str, int], list[dict[str, str]]] = field(default_factory=dict)
    maps: MapJobs | None = None  # `map` jobs (built in __post_init__)
    telemetry: Any = None  # llmsh.kernel.telemetry.Telemetry, when --telemetry-hz > 0
    cluster: Any = None  # node loads of other nodes (the Nodes issue); None on one machine

    def __post_init__(self) -> None:
        self.table.listeners.append(self._forget_chats)
        if self.maps is None:
            self.maps = MapJobs(self.journal, self.procs.generate)

    def _forget_chats(self, entry: Entry, event: str) -> None:
        """A process's conversations go when it exits."""
        if event == "removed":
            for key in [k for k in self.chats if k[1] == entry.pid]:
                self.chats.pop(key, None)


class Processes:
    """Model processes: the front's table on one side, the engine on the other."""

    def __init__(self, table: ProcessTable, journal: Journal | None, engine: EngineLink) -> None:
        self.table = table
        self.journal = journal
        self.engine = engine
        engine.on_event = self.on_engine_event
        engine.on_exit = self.on_engine_exit
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._applier: asyncio.Task | None = None
        self._restoring: dict[int, asyncio.Task] = {}
        self.node = engine.node
        self.crashes = 0

    def start(self) -> None:
        """Start applying engine events (call on the running loop)."""
        self._applier = asyncio.get_running_loop().create_task(self._apply_events(), name="engine events")

    async def close(self) -> None:
        if self._applier is not None:
            self._applier.cancel()
        await self.engine.close()

    def dmesg(self, kind: str, text: str, pid: int | None = None) -> None:
        """One line in the event log (journalled off the loop)."""
        log.info("%s: %s", kind, text)
        if self.journal is not None:
            self.journal.event(kind, text, pid)

    # ---- engine events --------------------------------------------------------------------------------------------
    def on_engine_event(self, msg: dict[str, Any]) -> None:
        """From the engine link (on the loop): queued, applied in order by one task."""
        if msg["type"] == "progress":  # frequent and not journalled: applied at once
            entry = self.table.get(int(msg["pid"]))
            if entry is not None:
                self.table.progress(entry, float(msg["progress"]), str(msg["text"]))
            return
        self._events.put_nowait(msg)

    async def _apply_events(self) -> None:
        while True:
            msg = await self._events.get()
            try:
                await self._apply(msg)
            except Exception:
                log.exception("applying engine event %s failed", msg.get("type"))
            finally:
                self._events.task_done()

    async def _apply(self, msg: dict[str, Any]) -> None:
        entry = self.table.get(int(msg["pid"]))
        if entry is None:
            return
        if msg["type"] == "state":
            state = ProcState(msg["state"])
            fields: dict[str, Any] = {"state": state, "reason": msg.get("reason") or ""}
            if msg.get("dtype"):
                fields["dtype"] = msg["dtype"]
            if msg.get("device"):
                fields["device"] = msg["device"]
            if state is ProcState.FAILED and entry.state is not ProcState.FAILED:
                self.dmesg("failed", f"pid {entry.pid} ({entry.name}) failed: {fields['reason']}", entry.pid)
            if state is ProcState.READY and entry.state is ProcState.LOADING:
                self.dmesg("loaded", f"pid {entry.pid} ({entry.name}) loaded from {entry.path}", entry.pid)
                fields["on_engine"] = True
            await self.table.update(entry, **fields)
        elif msg["type"] == "removed":
            how = ExitHow(msg["how"])
            reason = msg.get("reason") or ""
            self.dmesg("exit", f"pid {entry.pid} ({entry.name}) exited ({how.value}){': ' + reason if reason else ''}", entry.pid)
            await self.table.remove(entry, how, reason)

    async def on_engine_exit(self, cause: str) -> str:
        """The engine died: say why (naming the process that was running), keep the table, restore on use."""
        self.crashes += 1
        busy = [e for e in self.table if e.inflight]
        line = f"engine exited: {cause}"
        if busy:
            line += " while running " + ", ".join(f"pid {e.pid} ({e.name})" for e in busy)
        if cause == "SIGBUS":
            line += f"; {SIGBUS_HINT}"
        self.dmesg("engine-crash", line)
        for entry in self.table:
            if entry.state is ProcState.FAILED:
                await self.table.remove(entry, ExitHow.REAPED, entry.reason)
                continue
            was_loading = entry.state is ProcState.LOADING and not entry.on_engine
            await self.table.update(entry, on_engine=False, live={},
                                    state=ProcState.FAILED if was_loading else ProcState.PAGED_OUT,
                                    reason=line if was_loading else "")
        asyncio.get_running_loop().create_task(self._restart_after_crash(), name="restart engine")
        return line

    async def _restart_after_crash(self) -> None:
        """A new engine at once, with the pinned processes loaded (the others come back at first use)."""
        try:
            await self.engine.ensure_started()
        except KernelError as e:
            self.dmesg("engine-crash", f"the engine did not restart: {e}")
            return
        self.dmesg("engine", f"engine restarted (pid {self.engine.engine_pid})")
        for entry in self.table:
            if entry.locked and not entry.on_engine:
                self._restore_soon(entry)

    def _restore_soon(self, entry: Entry) -> asyncio.Task:
        task = self._restoring.get(entry.pid)
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._restore(entry), name=f"restore pid {entry.pid}")
            self._restoring[entry.pid] = task
        return task

    async def _restore(self, entry: Entry) -> None:
        """Load a journalled process on the engine again (same PID, name, nice, pins, keep-alive)."""
        try:
            row = await self.engine.request("load", **self._load_fields(entry))
        except KernelError as e:
            if not self.table.gone(entry):
                await self.table.update(entry, state=ProcState.FAILED, reason=f"restore failed: {e}")
                self.dmesg("restore", f"pid {entry.pid} ({entry.name}) could not be restored: {e}", entry.pid)
            return
        if not self.table.gone(entry):
            await self.table.update(entry, on_engine=True, state=ProcState(row["state"]), dtype=row.get("dtype", ""),
                                    device=row.get("device", entry.device))
            self.dmesg("restore", f"pid {entry.pid} ({entry.name}) restored on engine {self.node}", entry.pid)

    def _load_fields(self, entry: Entry) -> dict[str, Any]:
        o = entry.options
        return {
            "pid": entry.pid, "name": entry.name, "path": entry.path, "device": o.get("device") or "cpu",
            "dtype": o.get("dtype"), "nice": entry.nice, "max_batch": o.get("max_batch"), "ctx": o.get("ctx"),
            "quant": o.get("quant"),
            "keep_alive": entry.keep_alive, "locked": entry.locked,
        }

    async def ensure_loaded(self, entry: Entry) -> None:
        """Wait for a loading process; restore one that is not on the engine (after a crash)."""
        if not entry.on_engine and entry.state is ProcState.PAGED_OUT:
            await self._restore_soon(entry)
        await self.table.wait_for(lambda: entry.state is not ProcState.LOADING or self.table.gone(entry))
        if self.table.gone(entry):
            raise StateError(f"process {entry.pid} ({entry.name}) has exited; see 'ps -a'")
        if entry.state is ProcState.FAILED:
            raise KernelError(f"process {entry.pid} ({entry.name}) failed: {entry.reason}", ename="RequestFailed")

    # ---- restore after a crash of the whole kernel ------------------------------------------------------------------
    def restore(self, state: dict[str, Any], *, crashed: bool) -> str:
        """Bring back the journalled table at start; returns the notice for the first client ('' if none)."""
        meta = state.get("meta", {})
        self.table.next_pid = max(int(meta.get("next_pid", 1)), *(int(p["pid"]) + 1 for p in state["procs"]), 1)
        if not state["procs"]:
            return ""
        notice = ""
        for row in state["procs"]:
            entry = Entry(pid=int(row["pid"]), name=row["name"], path=row["path"], device=row.get("device", "cpu"),
                          dtype=row.get("dtype", ""), nice=int(row.get("nice", 0)), options=row.get("options", {}),
                          locked=bool(row.get("locked")), keep_alive=row.get("keep_alive", "unset"),
                          started_at=float(row.get("started_at", time.time())), state=ProcState.PAGED_OUT)
            self.table.adopt(entry)
        n, reqs = len(state["procs"]), len(state.get("requests", []))
        if crashed:
            at = time.strftime("%H:%M:%S", time.localtime(float(meta.get("alive_at") or time.time())))
            notice = (f"kernel restarted after a crash at {at}: {n} process{'es' if n != 1 else ''} restored, "
                      f"{reqs} request{'s' if reqs != 1 else ''} interrupted (see dmesg)")
            self.dmesg("restore", notice)
        else:
            self.dmesg("restore", f"{n} processes restored from the last clean stop (--restore)")
        return notice

    def restore_pinned(self) -> None:
        """Pinned processes come back at once (on a new engine); the others at first use."""
        for entry in self.table:
            if entry.locked:
                self._restore_soon(entry)

    # ---- load ---------------------------------------------------------------------------------------------------
    async def load(self, source: str, *, name: str | None, device: str, dtype: str | None, nice: int,
                   max_batch: int | None, ctx: int | None, quant: str | None = None,
                   on_progress: Callable[[Entry], None] | None = None) -> Entry:
        """A new process: table entry (journalled), then the engine loads it; returns when it is ready or failed."""
        cfs_weight(nice)
        for what, v in (("--max-batch", max_batch), ("--ctx", ctx)):
            if v is not None and v < 1:
                raise KernelError(f"{what} {v}: give a positive number", ename="UsageError", status=2)
        path = await asyncio.to_thread(resolve_model, source)  # scans model dirs: not on the loop
        base = name if name is not None else self.table.unique_name(usable_name(default_name(path)))
        try:
            entry = await self.table.add(base, path, device=device, dtype=dtype or "", nice=nice,
                                         options={"device": device, "dtype": dtype, "max_batch": max_batch, "ctx": ctx,
                                                  "quant": quant})
        except ValueError as e:
            raise KernelError(str(e)) from None
        entry.progress_text = "queued"
        self.dmesg("load", f"pid {entry.pid} ({entry.name}): loading {path}", entry.pid)
        listener = None
        if on_progress is not None:
            def listener(e: Entry, event: str) -> None:
                if e is entry and event == "progress":
                    on_progress(e)
            self.table.listeners.append(listener)
        try:
            row = await self.engine.request("load", **self._load_fields(entry))
        except asyncio.CancelledError:  # Ctrl-C on a foreground load aborts it
            if not self.table.gone(entry):
                asyncio.get_running_loop().create_task(self._kill_quietly(entry, "load interrupted"))
            raise
        except EngineRequestError as e:
            if not self.table.gone(entry) and e.ename != "Killed":
                await self.table.update(entry, state=ProcState.FAILED, reason=str(e))
            raise KernelError(str(e), ename="LoadError" if e.ename != "Killed" else "Killed") from None
        except EngineDied as e:
            raise KernelError(str(e), ename="LoadError") from None
        finally:
            if listener is not None:
                self.table.listeners.remove(listener)
        if not self.table.gone(entry):
            await self.table.update(entry, on_engine=True, state=ProcState(row["state"]), dtype=row.get("dtype", ""),
                                    device=row.get("device", device), progress=1.0, progress_text="ready", live=row)
        return entry

    async def _kill_quietly(self, entry: Entry, reason: str) -> None:
        try:
            await self.engine.request("signal", pid=entry.pid, sig="KILL", how=ExitHow.KILL.value, reason=reason)
        except KernelError:
            pass
        if not self.table.gone(entry):
            await self.table.remove(entry, ExitHow.KILL, reason)

    # ---- generate -------------------------------------------------------------------------------------------------
    async def generate(self, entry: Entry, *, prompt: str | None = None, messages: list[dict[str, str]] | None = None,
                       params: dict[str, Any], client: str, result: dict[str, Any]) -> AsyncIterator[str]:
        """Stream the text of one request; `result` gets finish_reason, prompt_tokens, tokens."""
        await self.engine.ensure_started()  # first: a crash not yet handled marks the entry for restore
        await self.ensure_loaded(entry)
        fields: dict[str, Any] = {"params": params, "client": client}
        if messages is not None:
            fields["messages"] = messages
        else:
            fields["prompt"] = prompt
        entry.inflight += 1
        rid = f"{os.getpid()}.{id(result)}.{time.monotonic_ns()}"
        if self.journal is not None:
            self.journal.request_started(rid, entry.pid)
        try:
            async for piece in self.engine.generate(entry.pid, fields, result):
                yield piece
        finally:
            entry.inflight -= 1
            if self.journal is not None:
                self.journal.request_ended(rid)
            await self.table.update(entry)  # wakes `wait PID`

    # ---- signals --------------------------------------------------------------------------------------------------
    async def signal(self, entry: Entry, sig: str, *, grace: float = 30.0) -> str:
        """Deliver TERM/KILL/STOP/CONT; returns the state after it. TERM escalates to KILL after `grace` seconds."""
        if entry.state is ProcState.FAILED:
            if entry.on_engine:
                await self._engine_signal(entry, "KILL")
            await self.table.remove(entry, ExitHow.REAPED, entry.reason)
            return "exited"
        if not entry.on_engine:  # not on any engine (restored after a crash, not used yet)
            if sig in ("TERM", "KILL"):
                await self.table.remove(entry, ExitHow.TERM if sig == "TERM" else ExitHow.KILL, f"{sig} while paged out")
                self.dmesg("signal", f"{sig} pid {entry.pid} ({entry.name})", entry.pid)
                return "exited"
            if sig == "STOP":
                raise StateError(f"STOP: process {entry.pid} ({entry.name}) is paged-out; STOP needs a ready or running process")
            if sig == "CONT":  # not stopped: nothing to resume, as POSIX's CONT to a running process
                return entry.state.value
        reply = await self._engine_signal(entry, sig)
        self.dmesg("signal", f"{sig} pid {entry.pid} ({entry.name})", entry.pid)
        if sig == "KILL":  # the engine has freed it (or does right after the step in flight): so has the table
            await self.table.wait_for(lambda: self.table.gone(entry), timeout=KILL_SETTLE_S)
        if sig == "TERM" and not self.table.gone(entry):
            asyncio.get_running_loop().create_task(self._term_then_kill(entry, grace), name=f"term-grace pid {entry.pid}")
        return str(reply.get("state", entry.state.value))

    async def _engine_signal(self, entry: Entry, sig: str, **extra: Any) -> dict[str, Any]:
        try:
            return dict(await self.engine.request("signal", pid=entry.pid, sig=sig, **extra))
        except EngineRequestError as e:
            if e.ename == "NoSuchProcess" and sig in ("TERM", "KILL"):  # already gone on the engine
                await self.table.remove(entry, ExitHow.KILL, str(e))
                return {"state": "exited"}
            raise StateError(str(e)) from None

    async def _term_then_kill(self, entry: Entry, grace: float) -> None:
        """TERM's escalation: still there after `grace` seconds → KILL, recorded as kill-after-term."""
        if await self.table.wait_for(lambda: self.table.gone(entry), timeout=grace):
            return
        try:
            await self._engine_signal(entry, "KILL", how=ExitHow.KILL_AFTER_TERM.value,
                                      reason=f"killed after TERM grace of {grace:g}s")
        except KernelError:
            pass

    async def wait_gone(self, entry: Entry) -> None:
        await self.table.wait_for(lambda: self.table.gone(entry))

    async def renice(self, entry: Entry, nice: int) -> int:
        """New nice value (journalled); returns the old one."""
        cfs_weight(nice)
        old = entry.nice
        if entry.on_engine:
            try:
                await self.engine.request("renice", pid=entry.pid, nice=nice)
            except EngineRequestError as e:
                raise StateError(str(e)) from None
        await self.table.update(entry, nice=nice)
        self.dmesg("renice", f"pid {entry.pid} ({entry.name}): nice {old} -> {nice}", entry.pid)
        return old

    async def wait(self, pid: int) -> int:
        """`wait PID`: until the process has settled; its shell status (LookupError when there is none)."""
        code: list[int | None] = [self.table.exit_code(pid)]

        def settled() -> bool:
            code[0] = self.table.exit_code(pid)
            return code[0] is not None

        await self.table.wait_for(settled)
        return int(code[0] or 0)

    # ---- reports and memory ----------------------------------------------------------------------------------------
    async def refresh(self) -> None:
        """Fresh live numbers from the engine into the table (no engine: nothing to refresh)."""
        if not self.engine.running:
            return
        try:
            data = await self.engine.request("stats")
        except KernelError:
            return
        await self._events.join()  # the events the engine sent before this reply are applied first (same socket, in order)
        self.table.merge_live(data["rows"], data["scheduler"])

    async def memory(self, what: str, entry: Entry | None = None, **fields: Any) -> Any:
        """mem, mlock, munlock, keepalive, pageout: the engine's pager answers."""
        if entry is not None:
            if not entry.on_engine:
                if what == "keepalive":
                    await self.table.update(entry, keep_alive=fields["seconds"])
                    return {"pid": entry.pid, "keep_alive_s": fields["seconds"]}
                if what in ("mlock",):
                    await self.ensure_loaded(entry)
                else:
                    raise StateError(f"process {entry.pid} ({entry.name}) is paged out (not on the engine since a restart)")
            fields["pid"] = entry.pid
        if what == "mem" and not self.engine.running:
            return None
        try:
            data = await self.engine.request(what, **fields)
        except EngineRequestError as e:
            raise KernelError(str(e), ename=e.ename) from None
        if entry is not None and what in ("mlock", "munlock"):
            await self.table.update(entry, locked=(what == "mlock"))
        elif entry is not None and what == "keepalive":
            await self.table.update(entry, keep_alive=fields["seconds"])
        return data

    async def tokens(self, what: str, entry: Entry, **fields: Any) -> Any:
        """Tokenizer questions for `map --split` and `reduce` ("split" or "count"), answered by the engine."""
        await self.engine.ensure_started()
        await self.ensure_loaded(entry)
        try:
            return await self.engine.request(what, pid=entry.pid, **fields)
        except EngineRequestError as e:
            raise KernelError(str(e), ename=e.ename, status=e.status) from None

    async def threads(self) -> list[dict[str, Any]]:
        if not self.engine.running:
            return []
        rows = await self.engine.request("threads")
        return [dict(r, process=f"engine {self.engine.engine_pid}") for r in rows]

    def resolve(self, ref: str) -> Entry:
        try:
            return self.table.resolve(ref)
        except LookupError as e:
            raise NoSuchProcess(str(e)) from None


def build_services(runtime_dir: Path, log_path: Path, journal_path: Path | None, *, mem_budget: str | None,
                   node: str | None = None, max_procs: int | None = None) -> Services:
    """The front's services for one kernel (call on the running loop)."""
    journal = Journal(journal_path) if journal_path is not None else None
    table = ProcessTable(journal, max_procs=max_procs or config_max_procs(DEFAULT_MAX_PROCS))
    link = EngineLink(node or socket.gethostname(), runtime_dir / f"engine-{os.getpid()}.sock", log_path,
                      mem_budget=mem_budget)
    procs = Processes(table, journal, link)
    procs.start()
    return Services(table=table, procs=procs, journal=journal)
