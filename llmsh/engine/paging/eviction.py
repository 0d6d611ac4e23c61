"""Making room on a device: which pages may go (not locked, not in use by a running step), picking the best victims
with `policy`, paging them out, and handing a victim's buffers to the page that needs them.

`llmsh.engine.paging.core.Pager` owns the table and its lock and calls the `Evictor` with that lock held; the
Evictor owns only the record of which pages each engine thread's current step is using.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from llmsh.engine.paging.accounting import Ledger
from llmsh.engine.paging.policy import Candidate, eviction_order, score
from llmsh.engine.paging.states import IN, LOADING, OUT, STAGED
from llmsh.engine.paging.table import Entry, Proc

Key = tuple[int, int]  # (pid, page index)


class Evictor:
    """Victim choice and page-out over the pager's processes (every method: the pager's lock held)."""

    def __init__(self, procs: dict[int, Proc], ledger: Ledger) -> None:
        self._procs = procs  # the pager's table, read here; only the pager adds and removes processes
        self._ledger = ledger
        self._running: dict[int, set[Key]] = {}  # thread id → (pid, page)s its current step uses now

    # ---- pages in use by running steps ---------------------------------------------------------------------
    def use(self, thread: int, keys: set[Key]) -> None:
        """`thread`'s step now uses `keys` (and no longer the pages it used before): they may not be evicted."""
        self._running[thread] = keys

    def forget(self, pid: int) -> None:
        """The steps using pages of `pid` are over (or the process is going)."""
        for tid, keys in list(self._running.items()):
            if any(p == pid for p, _ in keys):
                del self._running[tid]

    def transient_blockers(self, device: str, me: int) -> bool:
        """Are pages of this device held only for now (being read, or being computed by a thread other than `me`)?"""
        others = set().union(*(keys for tid, keys in self._running.items() if tid != me)) if self._running else set()
        for proc in self._procs.values():
            if proc.device != device:
                continue
            for e in proc.entries:
                if e.state == LOADING or (e.state in (IN, STAGED) and (proc.pid, e.index) in others and not proc.locked):
                    return True
        return False

    # ---- victims -------------------------------------------------------------------------------------------
    def candidates(self, device: str, *, idle_of: Callable[[Proc], bool] | None = None) -> Iterator[Candidate]:
        """Every page that could leave `device` now, as the policy sees it."""
        protected = set().union(*self._running.values()) if self._running else set()
        for proc in self._procs.values():
            if not proc.locked:
                yield from proc.candidates(device, protected, idle_of(proc) if idle_of else False)

    def evict(self, device: str, key: Key, keep: bool = False) -> list[Any] | None:
        """Page (pid, index) out of `device`; with keep, hand back its buffers (their bytes stay counted)."""
        proc = self._procs[key[0]]
        e = proc.entries[key[1]]
        kept = None
        if proc.device == device:
            if e.state == IN:
                proc.source.release(e.index)
            elif e.state == STAGED:
                proc.discard(e.index)
            kept, e.tensors = (e.tensors if keep else None), None
            e.staged = None
            e.ready_event = None
            e.state = OUT
            self._ledger.paged_out(e)
        else:
            e.host = None
        if kept is None:
            self._ledger.credit(device, e.nbytes)
        self._ledger.check(device)
        return kept

    def make_room(
        self, device: str, need: int, tick: int, requester: Key | None, limit: float | None = None,
        reuse_for: Entry | None = None,
    ) -> bool:
        """Evict best victims until `need` bytes are free; False if that is impossible (or would evict pages
        scored at most `limit`, i.e. needed sooner than what the room is for). With `reuse_for`, a victim
        whose buffers have that page's layout gives them to it (no free + fresh allocation, no page faults)."""
        budget = self._ledger.budget(device)
        horizon = len(self._procs[requester[0]].entries) if requester is not None and requester[0] in self._procs else 0
        while budget - self._ledger.used.get(device, 0) < need:
            order = eviction_order(self.candidates(device), tick, requester, horizon=horizon)
            if not order:
                return False
            victim = order[0]
            best = score(victim, tick, requester, horizon)
            if limit is not None and best <= limit:
                return False
            if reuse_for is not None and reuse_for.layout is not None:
                # a victim almost as good whose buffers fit the incoming page saves a free, an allocation and the
                # page faults of touching fresh memory (~2 GB/s where a refill runs at ~10). Looked for along the
                # whole order: an idle model's pages all score alike, and its embedding, used last by a tied head,
                # comes last; with a window of 8, five blocks of it went first, then the embedding anyway.
                for c in order[1:]:
                    if score(c, tick, requester, horizon) < best / 2:
                        break
                    if self._reusable(device, c.key, reuse_for):
                        victim = c
                        break
            if reuse_for is not None and self._reusable(device, victim.key, reuse_for):
                reuse_for.buffers = self.evict(device, victim.key, keep=True)
                self._ledger.recycled(reuse_for.proc)
                return True
            self.evict(device, victim.key)
        return True

    def evict_by_tier(self, device: str, need: int, tick: int, tiers: tuple[Callable[[Proc], bool], ...],
                      idle_of: Callable[[Proc], bool]) -> None:
        """Before a load: page out the best victims among the processes of each tier in turn (e.g. idle ones, then
        lower-priority ones) until `need` bytes are free or the tiers run out."""
        budget = self._ledger.budget(device)
        for tier in tiers:
            while budget - self._ledger.used.get(device, 0) < need:
                order = [c for c in eviction_order(self.candidates(device, idle_of=idle_of), tick)
                         if tier(self._procs[c.key[0]])]
                if not order:
                    break
                self.evict(device, order[0].key)

    def _reusable(self, device: str, key: Key, target: Entry) -> bool:
        v = self._procs[key[0]].entries[key[1]]
        return (v.proc.device == device and v.tensors is not None and target.layout is not None
                and v.layout == target.layout)
