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
- Results go back to asyncio through `loop.call_soon_threadsafe` into one queue per request; the engine never blocks on a
  client.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from llmsh.engine.process import ExitHow, Process, ProcessTable, ProcState, StateError, cfs_weight

log = logging.getLogger("llmsh.scheduler")

Sink = Callable[[str, Any], None]  # (kind, value): ("token", text) | ("done", finish_reason) | ("error", (ename, line))

DEFAULT_MAX_QUEUE = 64  # queued (not yet batched) requests per process before `busy`
# A burst of requests to an idle process (16 clients pressing enter at once) arrives over a few milliseconds; starting
# the first prefill at the first arrival would split the burst over several steps, each re-reading every weight. So an
# idle device waits until no request came for COALESCE_S (never longer than COALESCE_MAX_S after the first): at most
# a few ms on a first token that takes tens of ms to compute. Running batches never wait: joiners join the next step.
COALESCE_S = 0.003
COALESCE_MAX_S = 0.02


def charge(seconds: float, nice: int) -> float:
    """The virtual runtime that `seconds` of device time costs a process at `nice` (CFS: time × 1024 / weight)."""
    return seconds * 1024 / cfs_weight(nice)


BLOCKED_CHARGE_S = 0.001  # a step that could not run (waiting for KV memory) still costs this much, so others go first


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


class Engine:
    """One device's run queue and (unless `threaded=False`, for unit tests) its engine thread."""

    def __init__(self, device: str, sched: Scheduler, *, threaded: bool = True) -> None:
        self.device = device
        self.sched = sched
        self.cond = threading.Condition()
        self.procs: list[Process] = []
        self.min_vruntime = 0.0
        self.steps = 0
        self.batch_sum = 0
        self.last_batch = 0
        self.max_batch = 0
        self.rate: collections.deque = collections.deque(maxlen=2048)  # (t, tokens)
        self.current = "idle"  # what the thread is doing, for `threads`
        self.progressed = True  # did the last step produce anything (else the thread backs off instead of spinning)
        self._closing = False
        self.thread: threading.Thread | None = None
        if threaded:
            self.thread = threading.Thread(target=self._run, name=f"llmsh-engine-{device}", daemon=True)
            self.thread.start()

    # --- run queue ---------------------------------------------------------------------------------------------
    def add(self, proc: Process) -> None:
        with self.cond:
            if proc not in self.procs:
                self.procs.append(proc)
            self.cond.notify_all()

    def discard(self, proc: Process) -> None:
        with self.cond:
            if proc in self.procs:
                self.procs.remove(proc)

    def queued(self) -> int:
        return sum(len(p.pending) for p in self.procs)

    def pick(self) -> Process | None:
        """The runnable process with the lowest vruntime (call with the lock held). Wake-ups start at the minimum."""
        runnable = [p for p in self.procs if p.runnable()]
        for p in self.procs:
            if not p.runnable():
                p.on_rq = False
        if not runnable:
            return None
        queued = [p.vruntime for p in runnable if p.on_rq]
        base = min(queued) if queued else self.min_vruntime
        for p in runnable:
            if not p.on_rq:
                p.vruntime = max(p.vruntime, base)
                p.on_rq = True
        best = min(runnable, key=lambda p: (p.vruntime, p.pid))
        self.min_vruntime = max(self.min_vruntime, best.vruntime)
        return best

    # --- one tick ----------------------------------------------------------------------------------------------
    def tick(self) -> bool:
        """Run one step of the best process; False when nothing was runnable."""
        with self.cond:
            proc = self.pick()
            if proc is None:
                return False
            wait = self._coalesce_wait(proc)
            if wait > 0:
                self.cond.wait(timeout=wait)  # a submit wakes us early; the next tick looks again
                return True
            assert proc.runtime is not None  # runnable() holds only with a model
            changed = proc.runtime.changed_files()
            if changed is not None:  # its mmap'd weights would SIGBUS the whole engine: fail this process only
                self.sched._fail_locked(proc, changed)
            else:
                self._admit(proc)
                idle = not proc.active
                done = self.sched._after_change(proc) if idle else None
                if not idle:
                    proc.stepping = True
                    batch = proc.batch
                    self.current = f"step pid {proc.pid} ({proc.name}), batch {len(proc.active)}"
        if changed is not None:
            self.sched._free(proc)
            return True
        if idle:  # every queued request was cancelled or rejected
            if done:
                self.sched._release(proc, *done)
            return True
        t0 = self.sched.clock()
        error: BaseException | None = None
        out: list = []
        try:
            out = batch.step()
        except Exception as e:  # a model that raises fails itself only
            error = e
            detail = traceback.format_exception_only(type(e), e)[-1].strip()
        dt = self.sched.clock() - t0
        finalize: tuple[ExitHow, str] | None = None
        with self.cond:
            proc.stepping = False
            self.current = "idle"
            self.cond.notify_all()
            if proc.exit_how is not None or proc not in self.procs:  # killed during the step
                finalize = (proc.exit_how or ExitHow.KILL, proc.reason)
            elif error is not None:
                self.sched._fail_locked(proc, f"step failed: {detail}")
            else:
                self._deliver(proc, out, dt)
                finalize = self.sched._after_change(proc)
        if finalize is not None:
            self.sched._release(proc, *finalize)
        elif error is not None:
            self.sched._free(proc)
        return True

    def _coalesce_wait(self, proc: Process) -> float:
        """Seconds to wait for the rest of a burst before the first step of an idle device (0: step now)."""
        c = self.sched.coalesce_s
        assert proc.runtime is not None
        if c <= 0 or proc.active or not proc.pending or len(proc.pending) >= proc.runtime.max_batch:
            return 0.0
        if any(p.active for p in self.procs):  # the device is busy anyway
            return 0.0
        now = time.monotonic()
        return max(0.0, min(proc.pending[-1].t_submit + c, proc.pending[0].t_submit + COALESCE_MAX_S) - now)

    def _admit(self, proc: Process) -> None:
        """Drop cancelled requests, then let queued ones join the batch up to its size."""
        rt = proc.runtime
        assert rt is not None
        for key, req in list(proc.active.items()):
            if req.cancelled or req.final:  # cancelled, or failed from outside (e.g. the pager found no memory)
                self._leave(proc, key, req)
        while proc.pending and len(proc.active) < rt.max_batch:
            req = proc.pending.popleft()
            if req.cancelled:
                continue
            try:
                seq = rt.new_sequence(req.prompt_ids, req.params)
                proc.batch.add(seq)
            except Exception as e:  # bad params or a prompt too long: that request only
                req.fail("failed", f"request rejected: {e}")
                continue
            req.seq, req.status = seq, "active"
            proc.active[id(seq)] = req

    @staticmethod
    def _leave(proc: Process, key: int, req: Request) -> None:
        proc.active.pop(key, None)
        try:
            proc.batch.remove(req.seq)
        except Exception:  # already gone from the batch
            pass

    def _deliver(self, proc: Process, out: list, dt: float) -> None:
        """Stream the step's pieces, retire finished requests, account tokens and vruntime."""
        produced = 0
        for seq, piece in out:
            produced += 1
            req = proc.active.get(id(seq))
            if req is None:
                continue
            req.tokens += 1
            if piece and not req.cancelled:
                req.emit("token", piece)
        for key, req in list(proc.active.items()):
            reason = getattr(req.seq, "finished", None)
            if reason:
                req.finish(reason)
                self._leave(proc, key, req)
        now = time.monotonic()
        bs = int(getattr(proc.batch, "last_batch_size", 0) or len(out))
        self.progressed = bool(produced or bs)
        if not self.progressed:  # the batch could not run (e.g. waiting for KV memory): not a step
            return
        proc.tokens += produced
        proc.steps += 1
        proc.compute_s += dt
        proc.last_batch = bs
        proc.max_batch_seen = max(proc.max_batch_seen, bs)
        proc.rate.append((now, produced))
        proc.vruntime += charge(dt, proc.nice)
        self.steps += 1
        self.batch_sum += bs
        self.last_batch = bs
        self.max_batch = max(self.max_batch, bs)
        self.rate.append((now, produced))

    # --- thread ------------------------------------------------------------------------------------------------
    def has_work(self) -> bool:
        return any(p.runnable() for p in self.procs)

    def _run(self) -> None:
        """Engine thread: tick while anything is runnable, sleep on the condition otherwise."""
        while True:
            with self.cond:
                while not self._closing and not self.has_work():
                    self.cond.wait()
                if self._closing:
                    return
            try:
                self.progressed = True
                self.tick()
                if not self.progressed:
                    with self.cond:
                        self.cond.wait(timeout=0.005)
            except Exception:  # a bug here must not kill the device's thread
                log.exception("engine %s: tick failed", self.device)
                self.current = "error: " + traceback.format_exc(limit=1).strip().splitlines()[-1]
                time.sleep(0.05)

    def close(self) -> None:
        with self.cond:
            self._closing = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=5)

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self.rate) if now - t <= 5.0]
        span = max(now - recent[0][0], 1e-3) if len(recent) > 1 else 5.0
        return {
            "steps": self.steps,
            "last_batch": self.last_batch,
            "mean_batch": round(self.batch_sum / self.steps, 3) if self.steps else 0.0,
            "max_batch": self.max_batch,
            "queue": self.queued(),
            "tok_s": round(sum(n for _, n in recent) / span, 2) if recent else 0.0,
            "procs": len(self.procs),
            "current": self.current,
        }


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
                Engine._leave(proc, id(req.seq), req)
            finalize = self._after_change(proc) if not proc.stepping else None
        if finalize:
            self._release(proc, *finalize)

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
            finalize = self._after_change(proc) if not proc.stepping else None
            eng.cond.notify_all()
        self.procs.changed(proc)
        if finalize:
            self._release(proc, *finalize)

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
            self._release(proc, how, reason)

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
            self._fail_locked(proc, reason)
        self._free(proc)

    def fail_load(self, proc: Process, reason: str) -> None:
        """The loader could not load `proc`: mark it failed (entry kept with its reason) and fail anything queued."""
        eng = self.engine(proc.device)
        with eng.cond:
            self._fail_locked(proc, reason)
        self.procs.changed(proc)

    # --- internals ---------------------------------------------------------------------------------------------
    def _fail_locked(self, proc: Process, reason: str) -> None:
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

    def _after_change(self, proc: Process) -> tuple[ExitHow, str] | None:
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

    def _free(self, proc: Process) -> None:
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

    def _release(self, proc: Process, how: ExitHow, reason: str) -> None:
        """Free the model and take the process out of the table."""
        self._free(proc)
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
