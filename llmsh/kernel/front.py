"""What commands can reach in the front: one typed `Services` built once at start, and `Processes`, the only way
to act on model processes (load, generate, signal, renice, memory), which keeps the table, the journal and the
engine in step.

Each process lives on one node (`entry.node`); every request about it goes to that node's engine link
(`llmsh.kernel.nodes.Nodes`: one local engine, or one per Ray node). PIDs stay the front's, across nodes.

Crashes: when the local engine dies, every request in flight fails at once with the cause, the processes stay in the
table as `paged-out` (not on any engine), and each comes back on a new engine at its first use (pinned ones at once);
one that no longer loads becomes `failed` with the reason. When a remote node goes away, its requests fail at once
the same way and its processes become `lost` (the other nodes go on); when its engine says hello again (Ray restarted
it), they are restored on it. When the whole front dies, the next start finds the journal not closed cleanly and
restores the table the same way (see `restore`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmsh.config import max_procs as config_max_procs
from llmsh.config import ray_address
from llmsh.kernel.engines import EngineDied, EngineLink, EngineRequestError
from llmsh.kernel.errors import KernelError
from llmsh.kernel.jobs import JobTable
from llmsh.kernel.journal import Journal
from llmsh.kernel.mapjobs import MapJobs
from llmsh.kernel.nodes import Nodes
from llmsh.kernel.recovery import Recovery
from llmsh.kernel.reports import StateError
from llmsh.kernel.table import DEFAULT_MAX_PROCS, Entry, ProcessTable
from llmsh.models import default_name, resolve_model
from llmsh.protocol.names import usable_name
from llmsh.protocol.procs import ExitHow, ProcState, cfs_weight

log = logging.getLogger("llmsh.kernel.front")
MAX_CHATS = 256  # conversations kept per kernel (oldest forgotten first)
KILL_SETTLE_S = 10.0  # KILL waits at most this long for the engine's `removed` (one step in flight, at worst)


class NoSuchProcess(KernelError):
    ename = "NoSuchProcess"




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
    cluster: Any = None  # llmsh.kernel.nodes.Nodes with Ray (other nodes' loads for telemetry); None on one machine

    def __post_init__(self) -> None:
        self.table.listeners.append(self._forget_chats)
        if self.maps is None:
            self.maps = MapJobs(self.journal, self.procs.generate)

    def _forget_chats(self, entry: Entry, event: str) -> None:
        """A process's conversations go when it exits."""
        if event == "removed":
            for key in [k for k in self.chats if k[1] == entry.pid]:
                self.chats.pop(key, None)


class Processes(Recovery):
    """Model processes: the front's table on one side, the engines of the nodes on the other."""

    def __init__(self, table: ProcessTable, journal: Journal | None, engines: EngineLink | Nodes) -> None:
        self.table = table
        self.journal = journal
        self.nodes = engines if isinstance(engines, Nodes) else Nodes([engines])
        self.nodes.on_add.append(self._wire)
        for link in self.nodes:
            self._wire(link)
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._applier: asyncio.Task | None = None
        self._restoring: dict[int, asyncio.Task] = {}
        self.crashes = 0
        self.starting: asyncio.Task | None = None  # the engines of a cluster's nodes starting (build_services)

    def _wire(self, link: EngineLink) -> None:
        """Hear a link's events, its engine's end and (remote nodes) its return."""
        link.on_event = self.on_engine_event
        link.on_exit = functools.partial(self.on_engine_exit, link)
        link.on_back = functools.partial(self.on_node_back, link)

    @property
    def engine(self) -> EngineLink:
        """The local engine's link (the first node's with Ray): `kernel status` shows its pid."""
        return self.nodes.single or next(iter(self.nodes))

    def link(self, entry: Entry) -> EngineLink:
        """The engine link of the node `entry` lives on."""
        return self.nodes.link(entry.node)

    def start(self) -> None:
        """Start applying engine events (call on the running loop)."""
        self._applier = asyncio.get_running_loop().create_task(self._apply_events(), name="engine events")

    async def close(self) -> None:
        for task in (self._applier, self.starting):
            if task is not None:
                task.cancel()
        await self.nodes.close()

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

    async def ensure_loaded(self, entry: Entry) -> None:
        """Wait for a loading process; restore one that is not on the engine (after a crash)."""
        if entry.state is ProcState.LOST:
            raise KernelError(f"process {entry.pid} ({entry.name}) is lost: {entry.reason}; 'load' it again to run it "
                              f"on a node that is up, or 'kill {entry.pid}' to forget it", ename="Lost")
        if not entry.on_engine and entry.state is ProcState.PAGED_OUT:
            await self._restore_soon(entry)
        await self.table.wait_for(lambda: entry.state is not ProcState.LOADING or self.table.gone(entry))
        if self.table.gone(entry):
            raise StateError(f"process {entry.pid} ({entry.name}) has exited; see 'ps -a'")
        if entry.state is ProcState.FAILED:
            raise KernelError(f"process {entry.pid} ({entry.name}) failed: {entry.reason}", ename="RequestFailed")

    # ---- load ---------------------------------------------------------------------------------------------------
    async def load(self, source: str, *, name: str | None, device: str, dtype: str | None, nice: int,
                   max_batch: int | None, ctx: int | None, quant: str | None = None,
                   on_progress: Callable[[Entry], None] | None = None, node: str | None = None) -> Entry:
        """A new process: table entry (journalled), placed on a node (`node` overrides), then that node's engine
        loads it; returns when it is ready or failed."""
        cfs_weight(nice)
        for what, v in (("--max-batch", max_batch), ("--ctx", ctx)):
            if v is not None and v < 1:
                raise KernelError(f"{what} {v}: give a positive number", ename="UsageError", status=2)
        path = await asyncio.to_thread(resolve_model, source)  # scans model dirs: not on the loop
        base = name if name is not None else self.table.unique_name(usable_name(default_name(path)))
        single = self.nodes.single
        if single is not None and node is not None:
            self.nodes.link(node)  # one line naming the nodes when it is not this one
        try:
            entry = await self.table.add(base, path, device=device, dtype=dtype or "", nice=nice,
                                         options={"device": device, "dtype": dtype, "max_batch": max_batch, "ctx": ctx,
                                                  "quant": quant}, node=single.node if single is not None else "")
        except ValueError as e:
            raise KernelError(str(e)) from None
        entry.progress_text = "queued" if single is not None else "placing"
        choice = None
        if single is None:
            try:
                choice = await self.nodes.choose(path, device=device, nice=nice, node=node, pid=entry.pid)
            except BaseException as e:
                if not self.table.gone(entry):
                    await self.table.remove(entry, ExitHow.REAPED, f"not placed: {e}")
                raise
            await self.table.update(entry, node=choice.node)
            self.dmesg("place", choice.reason, entry.pid)
        self.dmesg("load", f"pid {entry.pid} ({entry.name}): loading {path}"
                   + (f" on node {entry.node}" if single is None else ""), entry.pid)
        listener = None
        if on_progress is not None:
            def listener(e: Entry, event: str) -> None:
                if e is entry and event == "progress":
                    on_progress(e)
            self.table.listeners.append(listener)
        try:
            row = await self.link(entry).request("load", **self._load_fields(entry))
        except asyncio.CancelledError:  # Ctrl-C on a foreground load aborts it
            if not self.table.gone(entry):
                asyncio.get_running_loop().create_task(self._kill_quietly(entry, "load interrupted"))
            raise
        except EngineRequestError as e:
            line = str(e) if single is not None or entry.node in str(e) else f"node {entry.node}: {e}"
            if not self.table.gone(entry) and e.ename != "Killed":
                await self.table.update(entry, state=ProcState.FAILED, reason=line)
            raise KernelError(line, ename="LoadError" if e.ename != "Killed" else "Killed") from None
        except EngineDied as e:
            raise KernelError(str(e), ename="LoadError") from None
        finally:
            if listener is not None:
                self.table.listeners.remove(listener)
            if choice is not None:
                self.nodes.release(choice)
        if not self.table.gone(entry):
            await self.table.update(entry, on_engine=True, state=ProcState(row["state"]), dtype=row.get("dtype", ""),
                                    device=row.get("device", device), progress=1.0, progress_text="ready", live=row)
        return entry

    async def _kill_quietly(self, entry: Entry, reason: str) -> None:
        try:
            await self.link(entry).request("signal", pid=entry.pid, sig="KILL", how=ExitHow.KILL.value, reason=reason)
        except KernelError:
            pass
        if not self.table.gone(entry):
            await self.table.remove(entry, ExitHow.KILL, reason)

    # ---- generate -------------------------------------------------------------------------------------------------
    async def generate(self, entry: Entry, *, prompt: str | None = None, messages: list[dict[str, str]] | None = None,
                       params: dict[str, Any], client: str, result: dict[str, Any]) -> AsyncIterator[str]:
        """Stream the text of one request; `result` gets finish_reason, prompt_tokens, tokens."""
        link = self.link(entry)
        if entry.state is not ProcState.LOST:
            await link.ensure_started()  # first: a crash not yet handled marks the entry for restore
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
            async for piece in link.generate(entry.pid, fields, result):
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
                await self.table.remove(entry, ExitHow.TERM if sig == "TERM" else ExitHow.KILL, f"{sig} while {entry.state.value}")
                self.dmesg("signal", f"{sig} pid {entry.pid} ({entry.name})", entry.pid)
                return "exited"
            if sig == "STOP":
                raise StateError(f"STOP: process {entry.pid} ({entry.name}) is {entry.state.value}; STOP needs a ready "
                                 "or running process")
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
            return dict(await self.link(entry).request("signal", pid=entry.pid, sig=sig, **extra))
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
                await self.link(entry).request("renice", pid=entry.pid, nice=nice)
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

    def resolve(self, ref: str) -> Entry:
        try:
            return self.table.resolve(ref)
        except LookupError as e:
            raise NoSuchProcess(str(e)) from None


def build_services(runtime_dir: Path, log_path: Path, journal_path: Path | None, *, mem_budget: str | None,
                   node: str | None = None, max_procs: int | None = None, ray: str | None = None) -> Services:
    """The front's services for one kernel (call on the running loop). `ray`: the address of a Ray cluster whose
    nodes get an engine each (Ray is imported only then); else one local engine, spawned on first use."""
    ray = ray_address(ray)  # --ray, else config.toml's `ray`
    journal = Journal(journal_path) if journal_path is not None else None
    table = ProcessTable(journal, max_procs=max_procs or config_max_procs(DEFAULT_MAX_PROCS))
    if ray:
        from llmsh.cluster.ray_engines import connect  # Ray itself is imported there, and only there

        nodes = connect(ray, mem_budget=mem_budget)
    else:
        nodes = Nodes([EngineLink(node or socket.gethostname(), runtime_dir / f"engine-{os.getpid()}.sock", log_path,
                                  mem_budget=mem_budget)])
    procs = Processes(table, journal, nodes)
    procs.start()
    if ray:
        procs.starting = asyncio.get_running_loop().create_task(nodes.start_all(), name="start node engines")
    return Services(table=table, procs=procs, journal=journal, cluster=nodes if ray else None)
