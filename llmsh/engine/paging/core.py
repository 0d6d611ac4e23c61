"""The page table: which layers of which model are resident where, kept within a byte budget per device.

Each page (a transformer block, the embeddings, the head) has its home on disk (the model's mmap'd safetensors)
and may have a copy on its device and, for CUDA models, a pinned copy in host memory. The model calls
`ensure(pid, index)` (through its page hook) right before a page's modules run; a resident page is a hit, a missing
one is read in — after evicting the best victims (`policy.py`) if the budget would be exceeded. Tracked bytes
include reservations for reads in flight, so they never exceed the budget; `check_hooks` let tests verify that
at every page operation.

The pager is this module's `Pager` (the table, its lock, the hot path and whole-process operations) and the parts it
drives: `table` (its records), `accounting` (budgets, bytes used, counters, reports), `eviction` (victims and
page-out), `transfer` (CUDA side-stream copies), `memory` (the allocators underneath), `prefetch` (the thread).

Locking: one condition variable guards the table; disk reads and device copies happen outside it, so the
prefetch thread reads while the engine thread computes. Installing and releasing a page's parameters are pointer
swaps done under the lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from llmsh.engine.paging.accounting import Ledger, proc_row
from llmsh.engine.paging.budget import format_bytes, normalize_device
from llmsh.engine.paging.eviction import Evictor
from llmsh.engine.paging.kv import KVManager
from llmsh.engine.paging.memory import is_oom, recover_oom, return_freed_memory_to_os
from llmsh.engine.paging.prefetch import Prefetcher
from llmsh.engine.paging.sources import PageHook, PageSource
from llmsh.engine.paging.states import IN, LOADING, OUT, STAGED, PageInError, PagerError  # noqa: F401 (re-exported)
from llmsh.engine.paging.table import HOST, Entry, Proc, Stats
from llmsh.engine.paging.transfer import DeviceCopies

log = logging.getLogger("llmsh.pager")

WAIT_FOR_ROOM_S = 10.0  # how long a page-in waits for pages that are only busy for now (read or computed elsewhere)


class Pager:
    """The page table of every process of the kernel, under one lock: page-in on demand, reservations within the
    budgets (evicting through `Evictor`), and the whole-process operations (mlock, page-out, keep_alive)."""

    # How many pages ahead the prefetch thread reads: as far as the budget lets it (a reservation only evicts pages
    # needed later than the page it brings in). Switching between two GPT-2 models, reading one page ahead left
    # the engine computing each layer while the thread read the next (both slower, on 2 cores): 0.78 of
    # all-resident; reading the whole pass ahead, done before the first third of the prefill, 0.84.
    PREFETCH_DEPTH = 64

    def __init__(self, budgets: dict[str, int] | None = None, *, prefetch: bool = True,
                 prefetch_depth: int = PREFETCH_DEPTH) -> None:
        self.ledger = Ledger(budgets)  # budgets, bytes used and counters: changed only under the lock
        self._cond = threading.Condition(threading.RLock())
        self.procs: dict[int, Proc] = {}
        self.tick = 0
        self.busy_probe: Callable[[int], bool] | None = None  # pid → has requests in flight (set by the kernel glue)
        self.evictor = Evictor(self.procs, self.ledger)
        self._copies = DeviceCopies()
        self.prefetch_depth = prefetch_depth
        self.kv = KVManager(lambda device: self.budget("kv:" + device))
        self.prefetcher = None
        if prefetch:
            self.prefetcher = Prefetcher(self)

    @property
    def cond(self) -> threading.Condition:
        """The table's lock (the prefetch thread reserves and stages pages under it, as the hot path does)."""
        return self._cond

    # ---- budgets -------------------------------------------------------------------------------------------
    @property
    def used(self) -> dict[str, int]:
        """Bytes counted as used per device (reservations for reads in flight included)."""
        return self.ledger.used

    @property
    def totals(self) -> Stats:
        """The counters of every process together."""
        return self.ledger.totals

    @property
    def check_hooks(self) -> list[Callable[[str, int, int], None]]:
        """Called with (device, used, budget) at every page operation (tests check the budget holds)."""
        return self.ledger.check_hooks

    def budget(self, device: str) -> int:
        """The byte budget of a device (its default is computed once, on first use)."""
        return self.ledger.budget(device)

    def set_budget(self, device: str, nbytes: int) -> None:
        """Change a device's budget; shrinking it evicts pages down to the new size."""
        device = normalize_device(device)
        with self._cond:
            self.ledger.set_budget(device, nbytes)
            self.evictor.make_room(device, 0, self.tick, requester=None)

    def budgets(self) -> dict[str, int]:
        """Every budget known so far (devices with processes get their default filled in)."""
        with self._cond:
            for p in self.procs.values():
                self.budget(p.device)
            return self.ledger.known_budgets()

    def free(self, device: str) -> int:
        """Bytes of a device's budget not in use."""
        return self.ledger.free(device)

    # ---- processes -----------------------------------------------------------------------------------------
    def attach(
        self,
        pid: int,
        source: PageSource,
        *,
        name: str = "",
        nice: int = 0,
        locked: bool = False,
        keep_alive: float | None = None,
        hook: bool = True,
    ) -> Proc:
        """Put a loaded model under the pager: its resident pages are counted, those that do not fit released."""
        device = normalize_device(source.device)
        infos = source.page_infos()
        if not infos:
            raise PagerError(f"{name or pid}: the model has no pages to manage")
        proc = Proc(pid=pid, name=name or str(pid), source=source, device=device, nice=nice, keep_alive=keep_alive)
        proc.entries = [Entry(proc, i, info.name, int(info.nbytes), on_demand=getattr(info, "on_demand", False))
                        for i, info in enumerate(infos)]
        deps = getattr(source, "deps", None)
        for e in proc.entries:
            e.deps = tuple(d for d in (deps(e.index) if deps else ()) if d != e.index)
        with self._cond:
            if pid in self.procs:
                raise PagerError(f"pid {pid} is already attached to the pager")
            self._check_largest(proc)
            resident = [e for e in proc.entries if source.is_resident(e.index)]
            need = sum(e.nbytes for e in resident)
            self.make_room(device, need, nice=nice, largest=proc.min_bytes, who=proc.name)
            free = self.free(device)
            for e in resident:  # keep what fits, in forward order; release the rest before it is ever counted
                if e.nbytes <= free:
                    free -= e.nbytes
                    e.state = IN
                    e.last_used = self.tick
                    self.ledger.charge(device, e.nbytes)
                else:
                    source.release(e.index)
            self.procs[pid] = proc
            if locked:
                proc.locked = True
            on_device = sum(p.total_bytes for p in self.procs.values() if p.device == device)
            if not device.startswith("cuda") and on_device > self.budget(device):
                # paging is in play on the host: make freed pages leave the process (only now, since serving every
                # allocation of 1 MiB or more with mmap has a cost for large activations)
                return_freed_memory_to_os()
            self._check(device)
        if hook:
            source.set_hook(PageHook(self, pid))
        if locked:
            self.mlock(pid)
        return proc

    def detach(self, pid: int) -> None:
        """Forget a process (it is being unloaded): its bytes stop counting, its page hook is removed."""
        with self._cond:
            proc = self.procs.pop(pid, None)
            if proc is None:
                return
            proc.detached = True
            for e in proc.entries:
                if e.state != OUT:
                    self.ledger.credit(proc.device, e.nbytes)
                if e.state == STAGED:
                    proc.discard(e.index)
                if e.host is not None:
                    self.ledger.credit(HOST, e.nbytes)
                e.state, e.staged, e.host, e.tensors, e.buffers = OUT, None, None, None, None
            self.evictor.forget(pid)
            self._cond.notify_all()
            self._check(proc.device)
        try:
            proc.source.set_hook(None)
        except Exception:  # the model may already be gone
            log.debug("could not remove the page hook of %s", pid, exc_info=True)

    def proc(self, pid: int) -> Proc:
        p = self.procs.get(pid)
        if p is None:
            raise PagerError(f"no process with pid {pid} under the pager; see 'ps'")
        return p

    def set_nice(self, pid: int, nice: int) -> None:
        """Follow a renice: the process's pages age by its new weight."""
        with self._cond:
            if pid in self.procs:
                self.procs[pid].nice = int(nice)

    def set_keep_alive(self, pid: int, seconds: float | None) -> None:
        """Release the pages of this process after `seconds` idle (None: keep them)."""
        with self._cond:
            self.proc(pid).keep_alive = seconds

    # ---- the hot path --------------------------------------------------------------------------------------
    def hold_all(self, pid: int) -> bool:
        """If every page of `pid` is resident, hold them all for this thread's step (as `ensure` holds one page) and
        return True, so that the model may run the whole step in one call; else do nothing and return False."""
        proc = self.procs.get(pid)
        if proc is None:
            return False
        with self._cond:
            if any(e.state != IN for e in proc.entries):
                return False
            self._hold(proc, {(pid, e.index) for e in proc.entries})
            for e in proc.entries:
                self.tick += 1
                e.last_used = self.tick
                self.ledger.hit(proc)
        return True

    def ensure(self, pid: int, index: int) -> None:
        """Make page `index` of `pid` resident before its modules run (called from the model's page hook)."""
        proc = self.procs.get(pid)
        if proc is None:
            return
        e = proc.entries[index]
        if self.prefetcher is not None:  # first: the next pages are read while this thread reads this one
            self.prefetcher.after(proc, index)
        with self._cond:
            self._hold(proc, {(pid, d) for d in e.deps} | {(pid, index)})    # this page and what it reads
            for d in e.deps:
                self._ensure_locked(proc.entries[d], (pid, index))
            self._ensure_locked(e, (pid, index))

    def _hold(self, proc: Proc, keys: set[tuple[int, int]]) -> None:
        """The pages this thread's step uses now (lock held): protected until it moves on; the ones it held before
        may be evicted again."""
        self.evictor.use(threading.get_ident(), keys)
        self._cond.notify_all()
        proc.last_active = time.monotonic()
        proc.released_idle = False

    def _ensure_locked(self, e: Entry, requester: tuple[int, int]) -> None:
        proc = e.proc
        t0 = time.perf_counter()
        self.tick += 1
        e.last_used = self.tick
        if e.state == IN:
            self.ledger.hit(proc)
            return
        if e.state == STAGED:
            self.ledger.hit(proc)
            self._install(e)
            return
        self.ledger.miss(proc)
        while e.state == LOADING:  # the prefetch thread is reading it: wait rather than read twice
            self._cond.wait()
        if e.state == STAGED:
            self._install(e)
        elif e.state == OUT:
            self.reserve(e, requester=requester)
            e.state = LOADING
            self._page_in_sync(e)
        self.ledger.stalled(proc, time.perf_counter() - t0)

    def _page_in_sync(self, e: Entry) -> None:
        """Read a reserved page (state LOADING) and install it; called with the lock held, reads without it."""
        proc = e.proc
        self._cond.release()
        try:
            tensors = self.read_page(e)
        except BaseException as exc:
            self._cond.acquire()
            self.cancel_load(e)
            if is_oom(exc):
                recover_oom(proc.device)
                raise PageInError(
                    f"out of memory reading page {e.name} of {proc.name} ({format_bytes(e.nbytes)}) on {proc.device}; "
                    "the request failed — lower --mem-budget or free memory"
                ) from exc
            raise PageInError(f"could not read page {e.name} of {proc.name}: {exc}") from exc
        self._cond.acquire()
        if e.state != LOADING or proc.detached:
            proc.discard(e.index)
            return
        self.ledger.paged_in(e)
        e.staged = tensors
        e.state = STAGED
        self._install(e)

    def read_page(self, e: Entry) -> dict[str, Any]:
        """Bring one page's tensors to its device (no lock held): from the host copy, or from disk."""
        proc = e.proc
        if proc.device == HOST:
            out, e.buffers = e.buffers, None
            if out is not None:
                return proc.source.read(e.index, HOST, out=out)
            return proc.source.read(e.index, HOST)
        host = e.host
        if host is None:
            host = proc.source.read(e.index, HOST, pin=True)
            with self._cond:  # keep a host copy when the host budget has room for it without evicting
                if e.host is None and not proc.detached and self.free(HOST) >= e.nbytes:
                    e.host = host
                    self.ledger.charge(HOST, e.nbytes)
                    self.ledger.check(HOST)
        return self._copies.to_device(e, host)

    def _install(self, e: Entry) -> None:
        """STAGED → IN: hand the tensors to the model (lock held)."""
        tensors = e.staged or {}
        self._copies.wait_for_copy(e, tensors)  # CUDA: the compute stream waits for the side-stream copy
        e.proc.source.install(e.index, tensors)
        e.tensors = list(tensors.values()) if e.proc.device == HOST else None
        e.staged = None
        e.state = IN
        self._check(e.proc.device)

    def cancel_load(self, e: Entry) -> None:
        """A read failed or was abandoned: give its reservation back (lock held)."""
        e.buffers = None
        if e.state == LOADING:
            e.state = OUT
            if not e.proc.detached:
                self.ledger.credit(e.proc.device, e.nbytes)
        self._cond.notify_all()
        self._check(e.proc.device)

    # ---- reservations and eviction -------------------------------------------------------------------------
    def _check_largest(self, proc: Proc) -> None:
        big = max(proc.entries, key=proc.working_set)
        need = proc.working_set(big)
        budget = self.budget(proc.device)
        if need > budget:
            with_deps = f" with {', '.join(proc.entries[d].name for d in big.deps)}" if big.deps else ""
            raise PagerError(
                f"the {proc.device} budget {format_bytes(budget)} is smaller than the largest page of {proc.name} "
                f"({big.name}{with_deps}, {format_bytes(need)}); start the kernel with a larger --mem-budget"
            )

    def step_done(self, pid: int) -> None:
        """The step of `pid` is over: the pages it was using may be evicted again."""
        with self._cond:
            self.evictor.forget(pid)
            self._cond.notify_all()

    def reserve(self, e: Entry, requester: tuple[int, int] | None, limit: float | None = None) -> bool:
        """Count e's bytes as used on its device, evicting first; raises PagerError (or returns False with a limit)."""
        device = e.proc.device
        deadline = None
        reuse = e if device == HOST else None  # CUDA's caching allocator already recycles device memory
        if reuse is not None and e.layout is None:
            layout = getattr(e.proc.source, "layout", None)
            e.layout = layout(e.index) if layout is not None else None
        while not self.evictor.make_room(device, e.nbytes, self.tick, requester, limit, reuse_for=reuse):
            if limit is not None:
                return False
            # pages being read, or computed by another engine thread, will become evictable soon: wait for them
            if not self.evictor.transient_blockers(device, threading.get_ident()):
                raise PagerError(self._no_room_message(device, e.nbytes, f"page {e.name} of {e.proc.name}"))
            deadline = deadline or time.monotonic() + WAIT_FOR_ROOM_S
            if time.monotonic() > deadline:
                raise PagerError(self._no_room_message(device, e.nbytes, f"page {e.name} of {e.proc.name}"))
            self._cond.wait(0.05)
        if e.buffers is None:  # reused buffers were counted already (their bytes passed from the victim)
            self.ledger.charge(device, e.nbytes)
        self._check(device)
        return True

    def _is_idle(self, proc: Proc) -> bool:
        if self.busy_probe is not None:
            try:
                return not self.busy_probe(proc.pid)
            except Exception:
                log.debug("busy probe failed for %s", proc.pid, exc_info=True)
        return time.monotonic() - proc.last_active > 2.0

    def make_room(self, device: str, nbytes: int, *, nice: int = 0, largest: int = 0, who: str = "the model") -> int:
        """Before (or while) loading a model of `nbytes` whose largest page is `largest`: page out idle processes
        first, then lower-priority ones, until it fits; if it cannot fully fit it still runs paged as long as its
        largest page fits — otherwise PagerError saying what is needed and what holds memory. Returns bytes freed."""
        device = normalize_device(device)
        with self._cond:
            budget = self.budget(device)
            if largest > budget:
                raise PagerError(
                    f"{who} needs pages of up to {format_bytes(largest)} but the {device} budget is "
                    f"{format_bytes(budget)}; start the kernel with a larger --mem-budget"
                )
            before = self.used.get(device, 0)

            self.evictor.evict_by_tier(device, nbytes, self.tick, (self._is_idle, lambda p: p.nice > nice), self._is_idle)
            fits = budget - self.used.get(device, 0) >= largest
            if not fits and not self.evictor.make_room(device, largest, self.tick, requester=None):
                raise PagerError(self._no_room_message(device, largest, who))
            return before - self.used.get(device, 0)

    def _no_room_message(self, device: str, need: int, what: str) -> str:
        return self.ledger.no_room_message(self.procs.values(), device, need, what)

    # ---- whole-process operations --------------------------------------------------------------------------
    def page_in_all(self, pid: int) -> None:
        """Bring every page of a process in (mlock, warm-up); raises PagerError if it cannot fit."""
        proc = self.proc(pid)
        for e in proc.entries:
            with self._cond:
                while e.state == LOADING:
                    self._cond.wait()
                if e.state == STAGED:
                    self._install(e)
                if e.state == IN:
                    continue
                self.tick += 1
                e.last_used = self.tick
                self.reserve(e, requester=None)
                e.state = LOADING
                self._page_in_sync(e)

    def page_out(self, pid: int) -> int:
        """Release every page of an idle process (keep_alive, `load` making room); returns bytes released."""
        with self._cond:
            proc = self.proc(pid)
            self.evictor.forget(pid)
            freed = 0
            for e in proc.entries:
                if e.state in (IN, STAGED):
                    self.evictor.evict(proc.device, (pid, e.index))
                    freed += e.nbytes
                if e.host is not None:
                    self.evictor.evict(HOST, (pid, e.index))
            return freed

    def mlock(self, pid: int) -> None:
        """Pin a process resident: its pages are brought in and never evicted (PagerError if they cannot fit)."""
        with self._cond:
            proc = self.proc(pid)
            same = [p for p in self.procs.values() if p.device == proc.device and p is not proc]
            locked = sum(p.total_bytes for p in same if p.locked)
            budget = self.budget(proc.device)
            if locked + proc.total_bytes > budget:
                raise PagerError(
                    f"cannot lock pid {pid} ({format_bytes(proc.total_bytes)}): {format_bytes(locked)} of the "
                    f"{format_bytes(budget)} {proc.device} budget is already locked; munlock another process or raise --mem-budget"
                )
            others = [p for p in same if not p.locked]
            need = max((p.min_bytes for p in others), default=0)
            left = budget - locked - proc.total_bytes
            if need > left:
                who = max(others, key=lambda p: p.min_bytes)
                raise PagerError(
                    f"cannot lock pid {pid} ({format_bytes(proc.total_bytes)}): it would leave {format_bytes(left)} of the "
                    f"{format_bytes(budget)} {proc.device} budget, and pid {who.pid} {who.name} needs {format_bytes(need)} to run; "
                    "kill or unload it first, or raise --mem-budget"
                )
            proc.locked = True
        try:
            self.page_in_all(pid)
        except BaseException:
            with self._cond:
                proc.locked = False
            raise

    def munlock(self, pid: int) -> None:
        """Let a process's pages be evicted again."""
        with self._cond:
            self.proc(pid).locked = False

    def reap_idle(self, now: float | None = None) -> list[int]:
        """Release the pages of processes idle for longer than their keep_alive; returns their pids."""
        now = time.monotonic() if now is None else now
        out = []
        with self._cond:
            for proc in list(self.procs.values()):
                if proc.keep_alive is None or proc.locked or proc.released_idle:
                    continue
                busy = self.busy_probe is not None and self.busy_probe(proc.pid)
                if now - proc.last_active > proc.keep_alive and not busy:
                    self.page_out(proc.pid)
                    proc.released_idle = True
                    out.append(proc.pid)
        return out

    # ---- accounting ----------------------------------------------------------------------------------------
    def _check(self, device: str) -> None:
        self.ledger.check(device)

    def count_page_in(self, e: Entry, prefetched: bool = False) -> None:
        """Count a page read in outside the hot path (by the prefetch thread)."""
        self.ledger.paged_in(e, prefetched)

    def proc_row(self, pid: int) -> dict[str, Any]:
        """Memory facts of one process (for `mem`, `ps`, `free`)."""
        with self._cond:
            return proc_row(self.proc(pid), self.kv.held_by(pid))

    def snapshot(self) -> dict[str, Any]:
        """Everything `mem --json` shows: budgets, use, per-process rows, totals."""
        with self._cond:
            devices = {}
            for dev in self.kv.guards:  # a KV budget shows once something uses it
                self.budget("kv:" + dev)
            for dev, budget in sorted(self.budgets().items()):
                used = self.kv.used(dev[3:]) if dev.startswith("kv:") else self.used.get(dev, 0)
                devices[dev] = {"budget": budget, "used": used, "free": budget - used}
            return {
                "devices": devices,
                "procs": [self.proc_row(pid) for pid in sorted(self.procs)],
                "totals": self.totals.as_dict(),
                "kv": self.kv.snapshot(),
            }

    def threads(self) -> list[dict[str, Any]]:
        """The prefetch thread, for `threads` (same shape as the scheduler's and loader's rows)."""
        pf = self.prefetcher
        if pf is None or pf.thread is None:
            return []
        return [{"thread": pf.thread, "pool": "pager", "task": pf.current}]

    def close(self) -> None:
        """Stop the prefetch thread."""
        if self.prefetcher is not None:
            self.prefetcher.stop()

