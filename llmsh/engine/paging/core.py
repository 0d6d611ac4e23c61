"""The page table: which layers of which model are resident where, kept within a byte budget per device.

Each page (a transformer block, the embeddings, the head) has its home on disk (the model's mmap'd safetensors)
and may have a copy on its device and, for CUDA models, a pinned copy in host memory. The model calls
`ensure(pid, index)` (through its page hook) right before a page's modules run; a resident page is a hit, a missing
one is read in — after evicting the best victims (`policy.py`) if the budget would be exceeded. Tracked bytes
include reservations for reads in flight, so they never exceed the budget; `check_hooks` let tests verify that
at every page operation.

Locking: one condition variable guards the table; disk reads and device copies happen outside it, so the
prefetch thread reads while the engine thread computes. Installing and releasing a page's parameters are pointer
swaps done under the lock.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from llmsh.engine.paging.budget import default_budget, format_bytes, normalize_device
from llmsh.engine.paging.kv import KVManager
from llmsh.engine.paging.policy import Candidate, eviction_order, score
from llmsh.engine.paging.prefetch import Prefetcher
from llmsh.engine.paging.sources import PageSource
from llmsh.engine.paging.states import IN, LOADING, OUT, STAGED, PageInError, PagerError  # noqa: F401 (re-exported)

log = logging.getLogger("llmsh.pager")

WAIT_FOR_ROOM_S = 10.0  # how long a page-in waits for pages that are only busy for now (read or computed elsewhere)
HOST = "cpu"


@dataclass
class Stats:
    """Counters of one process (or of the whole pager)."""

    page_ins: int = 0
    page_outs: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    hits: int = 0
    misses: int = 0
    prefetched: int = 0  # page-ins done by the prefetch thread
    recycled: int = 0  # page-ins that refilled an evicted page's buffers instead of allocating
    stall_s: float = 0.0  # time the engine waited for pages

    def hit_rate(self) -> float | None:
        """Fraction of page accesses that found the page ready (None before any access)."""
        n = self.hits + self.misses
        return self.hits / n if n else None

    def as_dict(self) -> dict[str, Any]:
        rate = self.hit_rate()
        return {
            "page_ins": self.page_ins,
            "page_outs": self.page_outs,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "bytes_moved": self.bytes_in + self.bytes_out,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": None if rate is None else round(rate, 4),
            "prefetched": self.prefetched,
            "recycled": self.recycled,
            "stall_s": round(self.stall_s, 4),
        }


@dataclass(eq=False)
class Entry:
    """One page of one process."""

    proc: "Proc"
    index: int
    name: str
    nbytes: int
    state: str = OUT
    last_used: int = 0
    staged: dict[str, Any] | None = None  # tensors read in, not yet installed
    host: dict[str, Any] | None = None  # pinned host copy (CUDA models only)
    ready_event: Any = None  # CUDA event: the side-stream copy of `staged` is done
    deps: tuple[int, ...] = ()  # pages that must be resident with this one (a tied head needs the embedding)
    tensors: list[Any] | None = None  # buffers the pager allocated for it while IN (never the checkpoint's mmap)
    buffers: list[Any] | None = None  # an evicted page's buffers to read into (same layout), reserved for it
    layout: tuple | None = None  # shapes/dtype of its buffers, when the source can tell
    on_demand: bool = False  # a MoE expert: used only when a token chooses it (see policy.score)


@dataclass(eq=False)
class Proc:
    """A process as the pager sees it: its pages and its memory policy."""

    pid: int
    name: str
    source: PageSource
    device: str
    nice: int = 0
    locked: bool = False
    keep_alive: float | None = None  # seconds idle before its pages are released (None: never)
    last_active: float = field(default_factory=time.monotonic)
    entries: list[Entry] = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)
    detached: bool = False
    released_idle: bool = False  # keep_alive released its pages; it comes back on the next request

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @property
    def resident_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries if e.state in (IN, STAGED))

    @property
    def host_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries if e.host is not None)

    @property
    def largest_page(self) -> Entry:
        return max(self.entries, key=lambda e: e.nbytes)

    def working_set(self, e: Entry) -> int:
        """Bytes that must be resident together while page e runs (itself and its deps)."""
        return e.nbytes + sum(self.entries[d].nbytes for d in e.deps)

    @property
    def min_bytes(self) -> int:
        """The smallest budget this process can run in."""
        return max(self.working_set(e) for e in self.entries)

    @property
    def state(self) -> str:
        """'resident' (all pages in), 'partial', or 'paged-out' (none)."""
        n = sum(1 for e in self.entries if e.state in (IN, STAGED))
        return "resident" if n == len(self.entries) else ("paged-out" if n == 0 else "partial")


_MALLOC_TUNED = False


def return_freed_memory_to_os(threshold: int = 1 << 20) -> bool:
    """Make glibc serve allocations of at least `threshold` bytes with mmap, so a released page's memory goes back to
    the OS at once. Without it glibc raises its mmap threshold after the first large free (up to 32 MiB) and keeps
    later pages on its heap, where freeing them does not lower the process's RSS. Best effort; False if not glibc."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        M_MMAP_THRESHOLD = -3
        _MALLOC_TUNED = bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False
    return _MALLOC_TUNED


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class Pager:
    """Budgets, the page table, eviction and accounting for every process of the kernel."""

    def __init__(self, budgets: dict[str, int] | None = None, *, prefetch: bool = True, prefetch_depth: int = 1) -> None:
        self._budgets: dict[str, int] = {normalize_device(k): int(v) for k, v in (budgets or {}).items()}
        self._cond = threading.Condition(threading.RLock())
        self.procs: dict[int, Proc] = {}
        self.used: dict[str, int] = {}
        self.tick = 0
        self.totals = Stats()
        self.check_hooks: list[Callable[[str, int, int], None]] = []
        self.busy_probe: Callable[[int], bool] | None = None  # pid → has requests in flight (set by the kernel glue)
        self._running: dict[int, set[tuple[int, int]]] = {}  # thread id → (pid, page)s its current step uses now
        self._streams: dict[str, Any] = {}
        self.prefetch_depth = prefetch_depth
        self.kv = KVManager(lambda device: self.budget("kv:" + device))
        self.prefetcher = None
        if prefetch:
            self.prefetcher = Prefetcher(self)

    # ---- budgets -------------------------------------------------------------------------------------------
    def budget(self, device: str) -> int:
        """The byte budget of a device (its default is computed once, on first use)."""
        device = normalize_device(device)
        if device not in self._budgets:
            self._budgets[device] = default_budget(device)
        return self._budgets[device]

    def set_budget(self, device: str, nbytes: int) -> None:
        """Change a device's budget; shrinking it evicts pages down to the new size."""
        device = normalize_device(device)
        with self._cond:
            self._budgets[device] = int(nbytes)
            self._make_room(device, 0, requester=None)

    def budgets(self) -> dict[str, int]:
        """Every budget known so far (devices with processes get their default filled in)."""
        with self._cond:
            for p in self.procs.values():
                self.budget(p.device)
            return dict(self._budgets)

    def free(self, device: str) -> int:
        device = normalize_device(device)
        return self.budget(device) - self.used.get(device, 0)

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
                    self.used[device] = self.used.get(device, 0) + e.nbytes
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
            source.set_hook(functools.partial(self.ensure, pid))
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
                    self.used[proc.device] -= e.nbytes
                if e.host is not None:
                    self.used[HOST] -= e.nbytes
                e.state, e.staged, e.host, e.tensors, e.buffers = OUT, None, None, None, None
            self._forget_running(pid)
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
    def ensure(self, pid: int, index: int) -> None:
        """Make page `index` of `pid` resident before its modules run (called from the model's page hook)."""
        proc = self.procs.get(pid)
        if proc is None:
            return
        e = proc.entries[index]
        with self._cond:
            # pages in use by this step (this page and what it reads) are protected until this thread moves on
            self._running[threading.get_ident()] = {(pid, d) for d in e.deps} | {(pid, index)}
            self._cond.notify_all()  # the page this thread computed before may be evicted now
            proc.last_active = time.monotonic()
            proc.released_idle = False
            for d in e.deps:
                self._ensure_locked(proc.entries[d], (pid, index))
            self._ensure_locked(e, (pid, index))
        if self.prefetcher is not None:
            self.prefetcher.after(proc, index)

    def _ensure_locked(self, e: Entry, requester: tuple[int, int]) -> None:
        proc = e.proc
        t0 = time.perf_counter()
        self.tick += 1
        e.last_used = self.tick
        if e.state == IN:
            self._count_hit(proc)
            return
        if e.state == STAGED:
            self._count_hit(proc)
            self._install(e)
            return
        self._count_miss(proc)
        while e.state == LOADING:  # the prefetch thread is reading it: wait rather than read twice
            self._cond.wait()
        if e.state == STAGED:
            self._install(e)
        elif e.state == OUT:
            self._reserve(e, requester=requester)
            e.state = LOADING
            self._page_in_sync(e)
        self._add_stall(proc, time.perf_counter() - t0)

    def _page_in_sync(self, e: Entry) -> None:
        """Read a reserved page (state LOADING) and install it; called with the lock held, reads without it."""
        proc = e.proc
        self._cond.release()
        try:
            tensors = self.read_page(e)
        except BaseException as exc:
            self._cond.acquire()
            self._cancel_load(e)
            if _is_oom(exc):
                self._recover_oom(proc.device)
                raise PageInError(
                    f"out of memory reading page {e.name} of {proc.name} ({format_bytes(e.nbytes)}) on {proc.device}; "
                    "the request failed — lower --mem-budget or free memory"
                ) from exc
            raise PageInError(f"could not read page {e.name} of {proc.name}: {exc}") from exc
        self._cond.acquire()
        if e.state != LOADING or proc.detached:
            return
        self._count_in(e)
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
        import torch

        host = e.host
        if host is None:
            host = proc.source.read(e.index, HOST, pin=True)
            with self._cond:  # keep a host copy when the host budget has room for it without evicting
                if e.host is None and not proc.detached and self.free(HOST) >= e.nbytes:
                    e.host = host
                    self.used[HOST] = self.used.get(HOST, 0) + e.nbytes
                    self._check(HOST)
        stream = self._side_stream(proc.device)
        with torch.cuda.stream(stream):
            moved = {k: v.to(proc.device, non_blocking=True) for k, v in host.items()}
            event = torch.cuda.Event()
            event.record(stream)
        e.ready_event = event
        return moved

    def _side_stream(self, device: str) -> Any:
        import torch

        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def _install(self, e: Entry) -> None:
        """STAGED → IN: hand the tensors to the model (lock held)."""
        tensors = e.staged or {}
        if e.ready_event is not None:  # CUDA: the compute stream waits for the side-stream copy, not the CPU
            import torch

            current = torch.cuda.current_stream(e.proc.device)
            current.wait_event(e.ready_event)
            for t in tensors.values():
                t.record_stream(current)
            e.ready_event = None
        e.proc.source.install(e.index, tensors)
        e.tensors = list(tensors.values()) if e.proc.device == HOST else None
        e.staged = None
        e.state = IN
        self._check(e.proc.device)

    def _cancel_load(self, e: Entry) -> None:
        """A read failed or was abandoned: give its reservation back (lock held)."""
        e.buffers = None
        if e.state == LOADING:
            e.state = OUT
            if not e.proc.detached:
                self.used[e.proc.device] -= e.nbytes
        self._cond.notify_all()
        self._check(e.proc.device)

    def _recover_oom(self, device: str) -> None:
        torch = sys.modules.get("torch")
        if device.startswith("cuda") and torch is not None:
            torch.cuda.empty_cache()

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
            self._forget_running(pid)
            self._cond.notify_all()

    def _transient_blockers(self, device: str) -> bool:
        """Are pages of this device held only for now (being read, or being computed by another thread)?"""
        me = threading.get_ident()
        others = set().union(*(keys for tid, keys in self._running.items() if tid != me)) if self._running else set()
        for proc in self.procs.values():
            if proc.device != device:
                continue
            for e in proc.entries:
                if e.state == LOADING or (e.state in (IN, STAGED) and (proc.pid, e.index) in others and not proc.locked):
                    return True
        return False

    def _forget_running(self, pid: int) -> None:
        for tid, keys in list(self._running.items()):
            if any(p == pid for p, _ in keys):
                del self._running[tid]

    def _protected(self) -> set[tuple[int, int]]:
        return set().union(*self._running.values()) if self._running else set()

    def _candidates(self, device: str, *, idle_of: Callable[[Proc], bool] | None = None) -> Iterator[Candidate]:
        protected = self._protected()
        for proc in self.procs.values():
            if proc.locked:
                continue
            idle = idle_of(proc) if idle_of else False
            n = len(proc.entries)
            for e in proc.entries:
                if proc.device == device:
                    ok = e.state in (IN, STAGED) and (proc.pid, e.index) not in protected
                else:
                    ok = device == HOST and e.host is not None
                if ok:
                    yield Candidate((proc.pid, e.index), e.nbytes, e.last_used, proc.nice, n, idle, e.on_demand)

    def _evict(self, device: str, key: tuple[int, int], keep: bool = False) -> list[Any] | None:
        """Page (pid, index) out of `device`; with keep, hand back its buffers (their bytes stay counted)."""
        proc = self.procs[key[0]]
        e = proc.entries[key[1]]
        kept = None
        if proc.device == device:
            if e.state == IN:
                proc.source.release(e.index)
            kept, e.tensors = (e.tensors if keep else None), None
            e.staged = None
            e.ready_event = None
            e.state = OUT
            proc.stats.page_outs += 1
            proc.stats.bytes_out += e.nbytes
            self.totals.page_outs += 1
            self.totals.bytes_out += e.nbytes
        else:
            e.host = None
        if kept is None:
            self.used[device] -= e.nbytes
        self._check(device)
        return kept

    def _make_room(
        self, device: str, need: int, requester: tuple[int, int] | None, limit: float | None = None,
        reuse_for: Entry | None = None,
    ) -> bool:
        """Evict best victims until `need` bytes are free; False if that is impossible (or would evict pages
        scored at most `limit`, i.e. needed sooner than what the room is for). Lock held. With `reuse_for`, a victim
        whose buffers have that page's layout gives them to it (no free + fresh allocation, no page faults)."""
        budget = self.budget(device)
        horizon = len(self.procs[requester[0]].entries) if requester is not None and requester[0] in self.procs else 0
        while budget - self.used.get(device, 0) < need:
            order = eviction_order(self._candidates(device), self.tick, requester, horizon=horizon)
            if not order:
                return False
            victim = order[0]
            best = score(victim, self.tick, requester, horizon)
            if limit is not None and best <= limit:
                return False
            if reuse_for is not None and reuse_for.layout is not None:
                # a victim almost as good whose buffers fit the incoming page saves a free, an allocation and the
                # page faults of touching fresh memory
                for c in order[1:8]:
                    if score(c, self.tick, requester, horizon) < best / 2:
                        break
                    if self._reusable(device, c.key, reuse_for):
                        victim = c
                        break
            if reuse_for is not None and self._reusable(device, victim.key, reuse_for):
                reuse_for.buffers = self._evict(device, victim.key, keep=True)
                reuse_for.proc.stats.recycled += 1
                self.totals.recycled += 1
                return True
            self._evict(device, victim.key)
        return True

    def _reusable(self, device: str, key: tuple[int, int], target: Entry) -> bool:
        v = self.procs[key[0]].entries[key[1]]
        return (v.proc.device == device and v.tensors is not None and target.layout is not None
                and v.layout == target.layout)

    def _reserve(self, e: Entry, requester: tuple[int, int] | None, limit: float | None = None) -> bool:
        """Count e's bytes as used on its device, evicting first; raises PagerError (or returns False with a limit)."""
        device = e.proc.device
        deadline = None
        reuse = e if device == HOST else None  # CUDA's caching allocator already recycles device memory
        if reuse is not None and e.layout is None:
            layout = getattr(e.proc.source, "layout", None)
            e.layout = layout(e.index) if layout is not None else None
        while not self._make_room(device, e.nbytes, requester, limit, reuse_for=reuse):
            if limit is not None:
                return False
            # pages being read, or computed by another engine thread, will become evictable soon: wait for them
            if not self._transient_blockers(device):
                raise PagerError(self._no_room_message(device, e.nbytes, f"page {e.name} of {e.proc.name}"))
            deadline = deadline or time.monotonic() + WAIT_FOR_ROOM_S
            if time.monotonic() > deadline:
                raise PagerError(self._no_room_message(device, e.nbytes, f"page {e.name} of {e.proc.name}"))
            self._cond.wait(0.05)
        if e.buffers is None:  # reused buffers were counted already (their bytes passed from the victim)
            self.used[device] = self.used.get(device, 0) + e.nbytes
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

            def fits(n: int) -> bool:
                return budget - self.used.get(device, 0) >= n

            for tier in (lambda p: self._is_idle(p), lambda p: p.nice > nice):
                while not fits(nbytes):
                    order = [c for c in eviction_order(self._candidates(device, idle_of=self._is_idle), self.tick)
                             if tier(self.procs[c.key[0]])]
                    if not order:
                        break
                    self._evict(device, order[0].key)
            if not fits(largest) and not self._make_room(device, largest, requester=None):
                raise PagerError(self._no_room_message(device, largest, who))
            return before - self.used.get(device, 0)

    def _no_room_message(self, device: str, need: int, what: str) -> str:
        holders = []
        for p in sorted(self.procs.values(), key=lambda p: -p.resident_bytes):
            if p.device == device and p.resident_bytes:
                holders.append(f"pid {p.pid} {p.name} {format_bytes(p.resident_bytes)}{' (mlocked)' if p.locked else ''}")
            elif device == HOST and p.host_bytes:
                holders.append(f"pid {p.pid} {p.name} {format_bytes(p.host_bytes)} host copies")
        held = "; held by " + ", ".join(holders) if holders else ""
        return (
            f"{what} needs {format_bytes(need)} on {device} but only {format_bytes(max(0, self.free(device)))} of the "
            f"{format_bytes(self.budget(device))} budget can be freed{held}; munlock or kill a process, or raise --mem-budget"
        )

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
                self._reserve(e, requester=None)
                e.state = LOADING
                self._page_in_sync(e)

    def page_out(self, pid: int) -> int:
        """Release every page of an idle process (keep_alive, `load` making room); returns bytes released."""
        with self._cond:
            proc = self.proc(pid)
            self._forget_running(pid)
            freed = 0
            for e in proc.entries:
                if e.state in (IN, STAGED):
                    self._evict(proc.device, (pid, e.index))
                    freed += e.nbytes
                if e.host is not None:
                    self._evict(HOST, (pid, e.index))
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
    def _count_hit(self, proc: Proc) -> None:
        proc.stats.hits += 1
        self.totals.hits += 1

    def _count_miss(self, proc: Proc) -> None:
        proc.stats.misses += 1
        self.totals.misses += 1

    def _count_in(self, e: Entry, prefetched: bool = False) -> None:
        for s in (e.proc.stats, self.totals):
            s.page_ins += 1
            s.bytes_in += e.nbytes
            s.prefetched += int(prefetched)

    def _add_stall(self, proc: Proc, dt: float) -> None:
        proc.stats.stall_s += dt
        self.totals.stall_s += dt

    def _check(self, device: str) -> None:
        used = self.used.get(device, 0)
        budget = self.budget(device)
        for hook in self.check_hooks:
            hook(device, used, budget)
        if used > budget:
            log.error("pager over budget on %s: %d > %d", device, used, budget)

    def proc_row(self, pid: int) -> dict[str, Any]:
        """Memory facts of one process (for `mem`, `ps`, `free`)."""
        with self._cond:
            p = self.proc(pid)
            kv = self.kv.held_by(pid)
            return {
                "pid": p.pid,
                "name": p.name,
                "device": p.device,
                "nice": p.nice,
                "locked": p.locked,
                "keep_alive": p.keep_alive,
                "state": p.state,
                "pages": len(p.entries),
                "pages_resident": sum(1 for e in p.entries if e.state in (IN, STAGED)),
                "total_bytes": p.total_bytes,
                # as `ps` counts RES: the weights resident plus the KV cache the process has allocated
                "res_bytes": p.resident_bytes + kv,
                "weight_bytes": p.resident_bytes,
                "kv_bytes": kv,
                "paged_bytes": p.total_bytes - p.resident_bytes,
                "host_bytes": p.host_bytes,
                **p.stats.as_dict(),
            }

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
        if pf is None or pf._thread is None:
            return []
        return [{"thread": pf._thread, "pool": "pager", "task": pf.current}]

    def close(self) -> None:
        """Stop the prefetch thread."""
        if self.prefetcher is not None:
            self.prefetcher.stop()
