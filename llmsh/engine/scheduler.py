"""The scheduler: one engine thread per device, sharing it between model processes token by token.

Why this shape:
- Generation is stepped (one prefill for newly joined requests + one decode step for all running ones), so a device can be
  time-shared at token granularity. Each tick the engine picks ONE process and runs one step of its `BatchGenerator`.
- Across processes it is Linux CFS over device time: a process's virtual runtime grows by
  `seconds of its steps × 1024 / weight(nice)` and the runnable process with the lowest vruntime runs next, so under
  contention shares of the device follow the nice weights (nice 0 : nice 5 = 1024 : 335), and a large and a small model
  at equal nice get equal device time, not equal tokens (counting tokens let a large model's slow steps starve a small
  one: a 600-token run took 1.0 s alone and 17.8 s beside a large model). Processes that wake up (new work, CONT) are placed at the
  queue's minimum vruntime so a long sleeper cannot monopolise the device.
- Within a process it is continuous batching: requests join the batch at the next step and leave as soon as they finish.
- All mutable state is touched under the engine's lock, except the step itself (the forward pass), which runs unlocked with
  `proc.stepping` set; signals that arrive meanwhile (STOP, KILL, cancel) are applied right after the step.
- The per-device part (run queue, engine thread, one tick) is `llmsh.engine.runqueue.Engine`; this module owns the
  engines, the requests and the signals (STOP, CONT, TERM, KILL, renice) and the process's exit.
- Results go back to asyncio through `loop.call_soon_threadsafe` into one queue per request; the engine never blocks on a
  client.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from llmsh.engine.process import ExitHow, Process, ProcessTable, ProcState, StateError, cfs_weight
from llmsh.engine.runqueue import Engine

Sink = Callable[[str, Any], None]  # (kind, value): ("token", text) | ("done", finish_reason) | ("error", (ename, line))

DEFAULT_MAX_QUEUE = 64  # queued (not yet batched) requests per process before `busy`
class BusyError(RuntimeError):
    """A bounded queue is full; the message says which and what to do."""


class RequestError(RuntimeError):
    """A request ended without finishing: `kind` is killed, failed, cancelled or exiting."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


_ids = itertools.count(1)


@dataclass(eq=False)
class Request:
    """One generation request on one process; `sink` receives its events from the engine thread."""

    proc: Process
    prompt_ids: list[int]
    params: Any
    sink: Sink
    client: str = ""
    id: int = field(default_factory=lambda: next(_ids))
    seq: Any = None
    status: str = "queued"  # queued → active → done | failed | cancelled
    cancelled: bool = False
    tokens: int = 0
    finish_reason: str | None = None
    t_submit: float = field(default_factory=time.monotonic)

    @property
    def final(self) -> bool:
        return self.status in ("done", "failed", "cancelled")

    def emit(self, kind: str, value: Any) -> None:
        """Send one event to the client side, never raising into the engine."""
        try:
            self.sink(kind, value)
        except Exception:
            pass

    def finish(self, reason: str) -> None:
        if not self.final:
            self.status, self.finish_reason = "done", reason
            self.emit("done", reason)

    def fail(self, kind: str, line: str) -> None:
        if not self.final:
            self.status = "failed"
            self.emit("error", (kind, line))


class Scheduler:
    """Devices → engines; the signal and request API that the commands use."""

    def __init__(
        self, procs: ProcessTable, *, max_queue: int = DEFAULT_MAX_QUEUE, threaded: bool = True, coalesce_s: float = 0.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.procs = procs
        self.clock = clock  # measures each step's device time (tests pass a clock their fake models advance)
        self.max_queue = max_queue
        self.coalesce_s = coalesce_s
        self.threaded = threaded
        self.engines: dict[str, Engine] = {}
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self.on_release: list[Callable[[Process], None]] = []  # e.g. the pager forgetting a process's pages

    def engine(self, device: str) -> Engine:
        """The engine of `device`, started on first use."""
        with self._lock:
            eng = self.engines.get(device)
            if eng is None:
                eng = self.engines[device] = Engine(device, self, threaded=self.threaded)
            return eng

    def attach(self, proc: Process) -> bool:
        """A process finished loading: give it a batch and put it on its device's run queue.

        False (and nothing attached) when it was killed while loading; the caller drops the model."""
        with self._load_lock:  # against kill() of a loading process
            if proc.abort_load:
                return False
            eng = self.engine(proc.device)
            with eng.cond:
                assert proc.runtime is not None, "attach() is for a loaded process"
                proc.batch = proc.runtime.new_batch()
                proc.transition(ProcState.READY)
                eng.add(proc)
        self.procs.changed(proc)
        return True

    # --- requests ----------------------------------------------------------------------------------------------
    def submit(self, proc: Process, prompt_ids: list[int], params: Any, sink: Sink, client: str = "") -> Request:
        """Queue a request (it joins the batch at the next step); raises BusyError or StateError with one line."""
        eng = self.engine(proc.device)
        with eng.cond:
            if proc.exit_how is not None:
                raise StateError(f"process {proc.pid} ({proc.name}) has exited")
            if proc.state is ProcState.EXITING:
                raise StateError(f"process {proc.pid} ({proc.name}) is exiting and takes no new requests")
            if proc.state is ProcState.FAILED:
                raise StateError(f"process {proc.pid} ({proc.name}) failed: {proc.reason}")
            if len(proc.pending) >= self.max_queue:
                raise BusyError(
                    f"busy: process {proc.pid} ({proc.name}) already has {len(proc.pending)} queued requests; "
                    "try again later or load another instance"
                )
            req = Request(proc, list(prompt_ids), params, sink, client)
            proc.pending.append(req)
            eng.cond.notify_all()
        return req

    def cancel(self, req: Request) -> None:
        """The client went away: drop the request now (or right after the step in flight)."""
        proc = req.proc
        eng = self.engine(proc.device)
        finalize = None
        with eng.cond:
            if req.final:
                return
            req.cancelled = True
            req.status = "cancelled"
            if req in proc.pending:
                proc.pending.remove(req)
            elif req.seq is not None and not proc.stepping:
                Engine.leave(proc, id(req.seq), req)
            finalize = self.after_change(proc) if not proc.stepping else None
        if finalize:
            self.release(proc, *finalize)

    async def stream(
        self, proc: Process, prompt_ids: list[int], params: Any, client: str = ""
    ) -> AsyncIterator[str]:
        """Submit and yield text pieces as the engine produces them; raises RequestError if the request is ended."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(kind: str, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        req = self.submit(proc, prompt_ids, params, sink, client)
        try:
            while True:
                kind, value = await queue.get()
                if kind == "token":
                    yield value
                elif kind == "done":
                    return
                else:
                    raise RequestError(*value)
        finally:
            if not req.final:
                self.cancel(req)

    # --- signals -----------------------------------------------------------------------------------------------
    def stop(self, proc: Process) -> None:
        """SIGSTOP: off the run queue at once, every request keeps its KV cache."""
        eng = self.engine(proc.device)
        with eng.cond:
            if proc.state is ProcState.STOPPED:
                raise StateError(f"process {proc.pid} ({proc.name}) is already stopped")
            if proc.state not in (ProcState.READY, ProcState.RUNNING, ProcState.PAGED_OUT):
                raise StateError(f"process {proc.pid} ({proc.name}) is {proc.state.value}; STOP needs a ready or running process")
            proc.resume_state = proc.state
            proc.transition(ProcState.STOPPED)
        self.procs.changed(proc)

    def cont(self, proc: Process) -> None:
        """SIGCONT: back on the run queue, exactly where it stopped; a process that is not stopped is left as it is
        (as POSIX does: CONT to a running process is no error)."""
        eng = self.engine(proc.device)
        with eng.cond:
            if proc.state is ProcState.FAILED:
                raise StateError(f"process {proc.pid} ({proc.name}) failed: {proc.reason}")
            if proc.state is not ProcState.STOPPED:
                return
            self._resume_locked(proc)
            eng.cond.notify_all()
        self.procs.changed(proc)

    def wait_step_done(self, proc: Process, timeout: float = 30.0) -> None:
        """Block until no step of `proc` is running (after STOP: not one more token once this returns)."""
        eng = self.engine(proc.device)
        with eng.cond:
            eng.cond.wait_for(lambda: not proc.stepping, timeout=timeout)

    def _resume_locked(self, proc: Process) -> None:
        back = proc.resume_state if proc.resume_state is ProcState.PAGED_OUT else ProcState.READY
        proc.transition(ProcState.RUNNING if proc.active and back is ProcState.READY else back)

    def terminate(self, proc: Process) -> None:
        """SIGTERM: finish the accepted requests, refuse new ones, then unload (a stopped process is continued first)."""
        if proc.state is ProcState.LOADING:
            raise StateError(f"process {proc.pid} ({proc.name}) is still loading; wait for it, or 'kill -KILL {proc.pid}'")
        if proc.state is ProcState.EXITING:
            raise StateError(f"process {proc.pid} ({proc.name}) is already exiting; 'kill -KILL {proc.pid}' aborts it now")
        if proc.state is ProcState.FAILED:
            self.procs.remove(proc, ExitHow.REAPED)
            return
        eng = self.engine(proc.device)
        with eng.cond:
            if proc.state is ProcState.STOPPED:
                self._resume_locked(proc)
            proc.transition(ProcState.EXITING, "TERM: finishing accepted requests")
            finalize = self.after_change(proc) if not proc.stepping else None
            eng.cond.notify_all()
        self.procs.changed(proc)
        if finalize:
            self.release(proc, *finalize)

    def kill(self, proc: Process, how: ExitHow = ExitHow.KILL, reason: str = "killed") -> None:
        """SIGKILL: abort now; every waiting client gets a `killed` error and the memory is freed."""
        if proc.state is ProcState.FAILED:
            self.procs.remove(proc, ExitHow.REAPED)
            return
        with self._load_lock:
            if proc.state is ProcState.LOADING:
                proc.abort_load = True  # the loader drops the model when it notices (attach refuses it)
                self.procs.remove(proc, how, reason)
                return
        eng = self.engine(proc.device)
        with eng.cond:
            if proc.exit_how is not None:
                return
            line = f"process {proc.pid} ({proc.name}) was killed"
            for req in [*proc.pending, *proc.active.values()]:
                req.fail("killed", line)
            proc.pending.clear()
            proc.exit_how = how
            proc.reason = reason
            stepping = proc.stepping
            if stepping:  # released right after the step; until then `ps` shows it going, not still running
                proc.active.clear()
                proc.transition(ProcState.EXITING, "KILL: aborting the step in progress")
            if proc in eng.procs:
                eng.procs.remove(proc)
        if not stepping:  # otherwise the engine releases it right after the step
            self.release(proc, how, reason)

    def renice(self, proc: Process, nice: int) -> int:
        """Change the nice value (−20..19); returns the old one."""
        cfs_weight(nice)
        eng = self.engine(proc.device)
        with eng.cond:
            old, proc.nice = proc.nice, nice
        self.procs.changed(proc)
        return old

    def fail(self, proc: Process, reason: str) -> None:
        """Fail a loaded process from outside the scheduler (the pager could not place it, or its checkpoint changed):
        every request gets the line, the model is dropped, the entry stays with its reason."""
        eng = self.engine(proc.device)
        with eng.cond:
            self.fail_locked(proc, reason)
        self.free(proc)

    def fail_load(self, proc: Process, reason: str) -> None:
        """The loader could not load `proc`: mark it failed (entry kept with its reason) and fail anything queued."""
        eng = self.engine(proc.device)
        with eng.cond:
            self.fail_locked(proc, reason)
        self.procs.changed(proc)

    # --- internals ---------------------------------------------------------------------------------------------
    def fail_locked(self, proc: Process, reason: str) -> None:
        """Fail `proc` and every request it has, off the run queue (its engine's lock held; then `free` it)."""
        line = f"process {proc.pid} ({proc.name}) failed: {reason}"
        for req in [*proc.pending, *proc.active.values()]:
            req.fail("failed", line)
        proc.pending.clear()
        proc.active.clear()
        if proc.state is not ProcState.FAILED:
            proc.state = ProcState.FAILED  # any state may fail
        proc.reason = reason
        eng = self.engines.get(proc.device)
        if eng is not None and proc in eng.procs:
            eng.procs.remove(proc)

    def after_change(self, proc: Process) -> tuple[ExitHow, str] | None:
        """Fix ready/running after work changed; an exiting process with no work left is due for release."""
        if proc.state in (ProcState.READY, ProcState.RUNNING):
            proc.state = ProcState.RUNNING if proc.active else ProcState.READY
        elif proc.state is ProcState.PAGED_OUT and proc.active and proc.steps:
            proc.state = ProcState.RUNNING
        elif proc.state is ProcState.EXITING and not proc.has_work() and not proc.stepping:
            proc.exit_how = ExitHow.TERM
            eng = self.engines.get(proc.device)
            if eng is not None and proc in eng.procs:
                eng.procs.remove(proc)
            return (ExitHow.TERM, "exited after TERM")
        return None

    def free(self, proc: Process) -> None:
        """Drop the model and its KV cache (the failed entry itself stays in the table)."""
        rt, proc.runtime, proc.batch = proc.runtime, None, None
        for fn in list(self.on_release):
            try:
                fn(proc)
            except Exception:
                pass
        if rt is not None:
            try:
                rt.close()
            except Exception:
                pass
        self.procs.changed(proc)

    def release(self, proc: Process, how: ExitHow, reason: str) -> None:
        """Free the model and take the process out of the table."""
        self.free(proc)
        self.procs.remove(proc, how, reason)

    def stats(self) -> dict[str, Any]:
        """Contract E: per-device steps, batch sizes, queue length and token rate."""
        return {"devices": {dev: eng.stats() for dev, eng in list(self.engines.items())}}

    def threads(self) -> list[dict[str, Any]]:
        """The engine threads, for `threads`."""
        return [
            {"thread": eng.thread, "pool": "engine", "task": eng.current}
            for eng in self.engines.values()
            if eng.thread is not None
        ]

    def close(self) -> None:
        """Stop every engine thread (kernel shutdown)."""
        for eng in list(self.engines.values()):
            eng.close()
