"""The pager in the engine: more models open than fit, each kept within the memory budget of its device.

The engine (`llmsh.engine.service`) builds a `Pager` (llmsh/engine/paging/) from `--mem-budget`, and `PagerService`
wires it to the engine's processes and scheduler: a model that finishes loading is put under the pager (its page hook installed),
renice changes its pages' priority, an unloaded process is forgotten, and a periodic task releases processes idle for
longer than their keep_alive and keeps each row's `paged_bytes` and the `paged-out` state in step with the page table.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from llmsh.engine.paging.core import PageInError, Pager, PagerError
from llmsh.engine.paging.sources import ModelSource
from llmsh.runtime.errors import CheckpointChanged  # torch-free
from llmsh.units import parse_duration

CHECKPOINT_CHANGED = CheckpointChanged.MARK

__all__ = ["Pager", "PagerError", "PageInError", "PagerService", "parse_duration"]

log = logging.getLogger("llmsh.pager")
REAP_INTERVAL = 0.25  # seconds between keep_alive checks / ps row updates


def default_keep_alive() -> float | None:
    """keep_alive of newly loaded processes: `LLMSH_KEEP_ALIVE` (e.g. 5m, like OLLAMA_KEEP_ALIVE), else forever."""
    text = os.environ.get("LLMSH_KEEP_ALIVE", "").strip()
    if not text:
        return None
    try:
        return parse_duration(text)
    except ValueError as e:
        log.warning("LLMSH_KEEP_ALIVE: %s; keeping processes resident", e)
        return None


class PagerService:
    """Glue between the pager and the process table / scheduler (all of it optional, so tests can use parts)."""

    def __init__(self, pager: Pager, procs: Any = None, sched: Any = None) -> None:
        self.pager = pager
        self._table = procs
        self._sched = sched
        self.procs: Any = None
        self.sched: Any = None
        self._task: asyncio.Task | None = None
        self._guards: dict[int, Any] = {}
        self.default_keep_alive = default_keep_alive()

    def _forget(self, pid: int) -> None:
        """A process is unloaded: its pages and KV guard stop counting."""
        self.pager.detach(pid)
        guard = self._guards.pop(pid, None)
        if guard is not None:
            self.pager.kv.forget(guard)

    def connect(self) -> None:
        """Subscribe to the process table and scheduler (once both exist)."""
        if self.procs is not None:
            return
        procs = self._table
        if procs is None:
            return
        self.procs = procs
        self.sched = self._sched
        procs.listeners.append(self._on_proc_event)
        if self.sched is not None and hasattr(self.sched, "on_release"):
            self.sched.on_release.append(lambda proc: self._forget(proc.pid))
        self.pager.busy_probe = self._busy
        for proc in list(procs):  # processes loaded before the pager was connected
            self._on_proc_event(proc, "state")

    def _busy(self, pid: int) -> bool:
        proc = self.procs.get(pid) if self.procs is not None else None
        return bool(proc is not None and (proc.has_work() or proc.stepping))

    def _on_proc_event(self, proc: Any, event: str) -> None:
        pager = self.pager
        if event == "removed":
            self._forget(proc.pid)
            return
        if event == "added":
            self._make_room_for(proc)
            return
        if proc.pid in pager.procs:
            pager.set_nice(proc.pid, proc.nice)
            return
        runtime = getattr(proc, "runtime", None)
        model = getattr(runtime, "model", None)
        if model is None or not hasattr(model, "set_page_hook") or str(getattr(proc.state, "value", proc.state)) == "failed":
            return
        try:
            # no step of this process may run while its pages are being put under the pager (a forward that started
            # without the page hook would meet released pages): hold its engine's lock with the process not stepping
            eng = self.sched.engine(proc.device) if self.sched is not None else None
            with eng.cond if eng is not None else _nolock():
                while eng is not None and proc.stepping:
                    eng.cond.wait(0.01)
                if proc.pid in pager.procs:  # another thread's event (a renice racing the load's end) attached it
                    return
                pager.attach(proc.pid, ModelSource(model), name=proc.name, nice=proc.nice,
                             keep_alive=self.default_keep_alive)
        except PagerError as e:
            log.warning("load of pid %s refused by the pager: %s", proc.pid, e)
            self._fail(proc, str(e))
            return
        self._guard_kv(proc)
        self.sync_rows()

    def _guard_kv(self, proc: Any) -> None:
        """Put the process's batch under the device's KV budget (the engine steps the guard like the batch)."""
        batch = getattr(proc, "batch", None)
        if batch is None or not hasattr(batch, "cache") or hasattr(batch, "manager"):
            return

        def blocked() -> None:
            # every request of this process waits for KV room held by higher-priority work: charge it a little virtual
            # runtime so the fair scheduler moves on to the others instead of picking it again at once
            from llmsh.engine.runqueue import BLOCKED_CHARGE_S, charge

            proc.vruntime += charge(BLOCKED_CHARGE_S, proc.nice)

        guard = self.pager.kv.guard(batch, pid=proc.pid, device=str(proc.device), nice=lambda: proc.nice,
                                    on_blocked=blocked, after_step=lambda: self.pager.step_done(proc.pid),
                                    on_error=lambda seqs, line: self._fail_requests(proc, seqs, line))
        lock = self.sched.engine(proc.device).cond if self.sched is not None else _nolock()
        with lock:
            proc.batch = guard
        self._guards[proc.pid] = guard

    def _fail_requests(self, proc: Any, seqs: list[Any], line: str) -> None:
        """A step could not get its pages: fail those requests (their clients get the line); the process lives on,
        unless its checkpoint file changed on disk: then no later step can be trusted and the process fails too."""
        for seq in seqs:
            req = proc.active.get(id(seq))
            if req is not None:
                req.fail("failed", f"process {proc.pid} ({proc.name}): {line}")
        if CHECKPOINT_CHANGED in line:
            self._fail(proc, line[line.find(": ") + 2 :] if line.startswith("could not read page") else line)

    def _make_room_for(self, proc: Any) -> None:
        """A load is starting: page out idle / lower-priority processes for its weights (estimated from the files)."""
        try:
            nbytes = sum(f.stat().st_size for f in Path(proc.path).glob("*.safetensors"))
        except OSError:
            return
        if not nbytes:
            return
        try:
            self.pager.make_room(proc.device, nbytes, nice=proc.nice, who=f"load {proc.name}")
        except PagerError as e:  # the real check is at attach, when the page sizes are known
            log.info("before loading %s: %s", proc.name, e)
        except Exception:
            log.debug("make_room before load failed", exc_info=True)

    def _fail(self, proc: Any, line: str) -> None:
        sched = self.sched
        if sched is None:
            return
        try:
            sched.fail(proc, line)
        except Exception:
            log.exception("could not fail pid %s after the pager refused it", proc.pid)

    def sync_rows(self) -> None:
        """Copy paged bytes into the process rows; READY with every page out ⇄ PAGED_OUT."""
        if self.procs is None:
            return
        from llmsh.engine.process import ProcState

        for pid, pp in list(self.pager.procs.items()):
            proc = self.procs.get(pid)
            if proc is None:
                continue
            proc.paged_bytes = pp.total_bytes - pp.resident_bytes
            state = pp.state
            changed = False
            eng = self.sched.engine(proc.device) if self.sched is not None else None
            lock = eng.cond if eng is not None else _nolock()
            with lock:
                if state == "paged-out" and proc.state is ProcState.READY and not proc.has_work():
                    proc.transition(ProcState.PAGED_OUT)
                    changed = True
                elif state != "paged-out" and proc.state is ProcState.PAGED_OUT and not proc.has_work():
                    proc.transition(ProcState.READY)
                    changed = True
            if changed:
                self.procs.changed(proc)

    async def run(self) -> None:
        """Periodic task: keep_alive releases and row updates."""
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            try:
                self.connect()
                released = self.pager.reap_idle()
                for pid in released:
                    log.info("pid %s idle longer than its keep_alive: pages released", pid)
                self.sync_rows()
            except Exception:
                log.exception("pager housekeeping failed")

    def resolve(self, ref: str) -> int:
        """A PID or process name → pid (LookupError with one line)."""
        if self.procs is not None:
            return int(self.procs.resolve(ref).pid)
        if str(ref).isdigit() and int(ref) in self.pager.procs:
            return int(ref)
        raise LookupError(f"no process {ref!r} under the pager; see 'ps'")


class _nolock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
