"""What the front does when an engine, a node or the front itself goes away: the `Recovery` half of `Processes`.

- The local engine dies (SIGBUS, segfault, OOM killer): every request in flight fails at once with the cause, the
  processes stay in the table as `paged-out` (not on any engine), a new engine starts at once with the pinned ones,
  and each other comes back at its first use; one that no longer loads becomes `failed` with the reason.
- A remote node goes away (machine down, Ray actor lost): its requests fail at once with one line, its processes
  become `lost` with the reason, the other nodes go on. When its engine says hello again (Ray restarted the actor),
  what it still holds is as it was and the rest is restored on it from the journal.
- The front dies: the next start reads the journal (`restore`) and brings the table back with the same PIDs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from llmsh.kernel.engines import EngineLink
from llmsh.kernel.errors import KernelError
from llmsh.kernel.reports import Reports
from llmsh.kernel.table import Entry
from llmsh.protocol.procs import ExitHow, ProcState

log = logging.getLogger("llmsh.kernel.front")
SIGBUS_HINT = "its checkpoint file changed on disk?"


class Recovery(Reports):
    """Engine deaths, lost nodes and the journal's restore (mixed into `Processes`, which provides the rest)."""

    crashes: int
    _restoring: dict[int, asyncio.Task]

    def dmesg(self, kind: str, text: str, pid: int | None = None) -> None:
        raise NotImplementedError

    @property
    def engine(self) -> EngineLink:
        raise NotImplementedError

    async def on_engine_exit(self, link: EngineLink, cause: str) -> str:
        """An engine died: say why (naming the process that was running), keep the table, restore on use. A remote
        node's engine: its processes are lost (see `node_lost`)."""
        self.crashes += 1
        if link.remote:
            return await self.node_lost(link, cause)
        here = [e for e in self.table if e.node == link.node]
        busy = [e for e in here if e.inflight]
        line = f"engine exited: {cause}"
        if busy:
            line += " while running " + ", ".join(f"pid {e.pid} ({e.name})" for e in busy)
        if cause == "SIGBUS":
            line += f"; {SIGBUS_HINT}"
        self.dmesg("engine-crash", line)
        for entry in here:
            if entry.state is ProcState.FAILED:
                await self.table.remove(entry, ExitHow.REAPED, entry.reason)
                continue
            was_loading = entry.state is ProcState.LOADING and not entry.on_engine
            await self.table.update(entry, on_engine=False, live={},
                                    state=ProcState.FAILED if was_loading else ProcState.PAGED_OUT,
                                    reason=line if was_loading else "")
        asyncio.get_running_loop().create_task(self._restart_after_crash(link), name="restart engine")
        return line

    async def _restart_after_crash(self, link: EngineLink) -> None:
        """A new engine at once, with the pinned processes loaded (the others come back at first use)."""
        try:
            await link.ensure_started()
        except KernelError as e:
            self.dmesg("engine-crash", f"the engine did not restart: {e}")
            return
        self.dmesg("engine", f"engine restarted (pid {link.engine_pid})")
        for entry in self.table:
            if entry.locked and not entry.on_engine and entry.node == link.node:
                self._restore_soon(entry)

    async def node_lost(self, link: EngineLink, cause: str) -> str:
        """A remote node went away: its processes become `lost` with the reason; returns the line its requests in
        flight end with. Other nodes are not touched."""
        reason = f"node {link.node} lost: {cause}"
        here = [e for e in self.table if e.node == link.node]
        lost = [e for e in here if e.state is not ProcState.FAILED]
        line = reason
        if lost:
            line += ("; " + ", ".join(f"pid {e.pid} ({e.name})" for e in lost) + (" is" if len(lost) == 1 else " are")
                     + " lost (see 'ps'); 'load' again to run elsewhere")
        self.dmesg("node-lost", line)
        for entry in here:
            if entry.state is ProcState.FAILED:
                await self.table.remove(entry, ExitHow.REAPED, entry.reason)
            else:
                await self.table.update(entry, on_engine=False, live={}, state=ProcState.LOST, reason=reason)
        return line

    async def on_node_back(self, link: EngineLink) -> None:
        """A lost node's engine answers again: processes it still holds are as they were, the others are restored
        on it from the journal (same PIDs, names, nice, pins)."""
        self.dmesg("node", f"node {link.node} is back (engine pid {link.engine_pid})")
        try:
            held = (await link.request("stats"))["rows"]
        except KernelError as e:
            self.dmesg("node", f"node {link.node}: could not ask what it holds: {e}")
            held = {}
        for entry in self.table:
            if entry.node != link.node or entry.state is not ProcState.LOST:
                continue
            row = held.get(str(entry.pid))
            if row is not None:
                await self.table.update(entry, on_engine=True, state=ProcState(row["state"]), reason="")
            else:
                await self.table.update(entry, state=ProcState.PAGED_OUT, reason="")
                self._restore_soon(entry)

    def _restore_soon(self, entry: Entry) -> asyncio.Task:
        task = self._restoring.get(entry.pid)
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._restore(entry), name=f"restore pid {entry.pid}")
            self._restoring[entry.pid] = task
        return task

    async def _restore(self, entry: Entry) -> None:
        """Load a journalled process on its node's engine again (same PID, name, nice, pins, keep-alive)."""
        try:
            row = await self.link(entry).request("load", **self._load_fields(entry))
        except KernelError as e:
            if self.nodes.is_lost(entry.node):  # its node went away meanwhile: lost, not failed
                return
            if not self.table.gone(entry):
                await self.table.update(entry, state=ProcState.FAILED, reason=f"restore failed: {e}")
                self.dmesg("restore", f"pid {entry.pid} ({entry.name}) could not be restored: {e}", entry.pid)
            return
        if not self.table.gone(entry):
            await self.table.update(entry, on_engine=True, state=ProcState(row["state"]), dtype=row.get("dtype", ""),
                                    device=row.get("device", entry.device))
            self.dmesg("restore", f"pid {entry.pid} ({entry.name}) restored on node {entry.node}", entry.pid)

    def _load_fields(self, entry: Entry) -> dict[str, Any]:
        o = entry.options
        return {
            "pid": entry.pid, "name": entry.name, "path": entry.path, "device": o.get("device") or "cpu",
            "dtype": o.get("dtype"), "nice": entry.nice, "max_batch": o.get("max_batch"), "ctx": o.get("ctx"),
            "quant": o.get("quant"),
            "keep_alive": entry.keep_alive, "locked": entry.locked,
        }

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
            entry.node = self._home(str(row.get("node") or ""))
            if entry.node not in self.nodes.links:
                entry.state, entry.reason = ProcState.LOST, f"node {entry.node} is not a node of this kernel"
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

    def _home(self, node: str) -> str:
        """The node a journalled process goes back to: its own, or the local engine's for rows from before nodes (or
        from another host name)."""
        single = self.nodes.single
        if single is not None and (not node or node not in self.nodes.links):
            return single.node
        return node or self.engine.node

    def restore_pinned(self) -> None:
        """Pinned processes come back at once (on a new engine); the others at first use."""
        for entry in self.table:
            if entry.locked and entry.state is not ProcState.LOST:
                self._restore_soon(entry)

