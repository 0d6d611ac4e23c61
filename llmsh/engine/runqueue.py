"""One device's run queue and the engine thread that steps it: CFS pick by vruntime, request admission into the
batch, one step, token delivery and device-time accounting (see `llmsh.engine.scheduler` for why this shape).

`llmsh.engine.scheduler.Scheduler` owns the engines (one per device) and the process lifecycle; an `Engine` asks
it to fail, free or release a process when a step ends one, under the engine's own lock as the scheduler does.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

from llmsh.engine.process import ExitHow, Process, cfs_weight
from llmsh.engine.threads import ThreadGovernor

if TYPE_CHECKING:
    from llmsh.engine.scheduler import Request, Scheduler

log = logging.getLogger("llmsh.scheduler")

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
        # the engine thread's intra-op threads: the cores others leave free; one where the device computes
        self.governor = ThreadGovernor(None if device == "cpu" else 1)
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
                self.sched.fail_locked(proc, changed)
            else:
                self._admit(proc)
                idle = not proc.active
                done = self.sched.after_change(proc) if idle else None
                if not idle:
                    proc.stepping = True
                    batch = proc.batch
                    self.current = f"step pid {proc.pid} ({proc.name}), batch {len(proc.active)}"
        if changed is not None:
            self.sched.free(proc)
            return True
        if idle:  # every queued request was cancelled or rejected
            if done:
                self.sched.release(proc, *done)
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
                self.sched.fail_locked(proc, f"step failed: {detail}")
            else:
                self._deliver(proc, out, dt)
                finalize = self.sched.after_change(proc)
        if finalize is not None:
            self.sched.release(proc, *finalize)
        elif error is not None:
            self.sched.free(proc)
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
                self.leave(proc, key, req)
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
    def leave(proc: Process, key: int, req: Request) -> None:
        """Take `req` out of the batch of `proc` (lock held)."""
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
                self.leave(proc, key, req)
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
                self.governor.adjust()
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
