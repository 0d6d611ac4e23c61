"""The prefetch thread: while the engine reads or computes page i of a model, read pages i+1 … i+depth in.

On CPU the thread reads the mmap'd safetensors into fresh tensors (the copy runs without the GIL, so it overlaps
the matmuls); on CUDA it copies from pinned host memory on a side stream and records an event the compute stream
waits on. A prefetch only evicts pages predicted to be needed later than the page it brings in, so it never
makes things worse; if it cannot make room it is skipped and the engine reads the page itself when it needs it.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import TYPE_CHECKING

from llmsh.engine.paging.policy import age_factor

if TYPE_CHECKING:
    from llmsh.engine.paging.core import Pager
    from llmsh.engine.paging.table import Entry, Proc

log = logging.getLogger("llmsh.pager")


class Prefetcher:
    """One daemon thread fed by `after(proc, index)` from the engine's page hook."""

    def __init__(self, pager: "Pager") -> None:
        self.pager = pager
        self._queue: collections.deque[tuple["Entry", int]] = collections.deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.skipped = 0  # prefetches given up for lack of room
        self.current = "idle"  # what the thread is doing, for `threads`

    @property
    def thread(self) -> threading.Thread | None:
        """The prefetch thread, once started (for `threads`)."""
        return self._thread

    def after(self, proc: "Proc", index: int) -> None:
        """The engine is about to compute page `index`: queue the next pages that are not resident."""
        from llmsh.engine.paging.states import OUT

        n = len(proc.entries)
        todo, ahead, depth = [], 0, min(self.pager.prefetch_depth, n - 1)
        for d in range(1, n):                 # the next pages in forward order, past experts (run only if chosen)
            e = proc.entries[(index + d) % n]
            if ahead >= depth:
                break
            if e.on_demand:
                continue
            if e.state == OUT:
                todo.append((e, index))
            ahead += 1
        if not todo:
            return
        with self._wake:
            self._queue.extend(todo)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="llmsh-prefetch", daemon=True)
                self._thread.start()
            self._wake.notify()

    def stop(self) -> None:
        """Stop the thread (pending prefetches are dropped)."""
        with self._wake:
            self._stop = True
            self._queue.clear()
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        from llmsh.engine.threads import release_openmp_workers

        while True:
            with self._wake:
                if not self._queue:  # idle workers kept here would make the engine thread's team sleep
                    release_openmp_workers()
                while not self._queue and not self._stop:
                    self._wake.wait()
                if self._stop:
                    return
                e, current = self._queue.popleft()
            self.current = f"read {e.proc.name} {e.name}"
            try:
                self._fetch(e, current)
            except Exception:  # a failed prefetch is not an error: the engine reads the page itself
                log.debug("prefetch of %s failed", e.name, exc_info=True)
            finally:
                self.current = "idle"

    def _fetch(self, e: "Entry", current: int) -> None:
        from llmsh.engine.paging.states import LOADING, OUT, STAGED

        pager, proc = self.pager, e.proc
        cond = pager.cond
        with cond:
            if e.state != OUT or proc.detached:
                return
            distance = (e.index - current) % len(proc.entries)
            if not pager.reserve(e, requester=(proc.pid, current), limit=distance * age_factor(proc.nice)):
                self.skipped += 1
                return
            e.state = LOADING
        try:
            tensors = pager.read_page(e)
        except BaseException:
            with cond:
                pager.cancel_load(e)
            raise
        with cond:
            if e.state == LOADING and not proc.detached:
                pager.count_page_in(e, prefetched=True)
                e.staged = tensors
                e.state = STAGED
            else:
                proc.discard(e.index)
            cond.notify_all()
