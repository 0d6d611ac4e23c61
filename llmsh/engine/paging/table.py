"""The page table's records: a process as the pager sees it (`Proc`), its pages (`Entry`) and their counters (`Stats`).

Plain data with the facts derived from it (resident bytes, the smallest budget a process runs in, its evictable
pages as the policy sees them); `llmsh.engine.paging.core.Pager` owns every instance and changes them under its lock.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from llmsh.engine.paging.policy import Candidate
from llmsh.engine.paging.sources import PageSource
from llmsh.engine.paging.states import IN, OUT, STAGED

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
        """The counters as `mem --json` shows them."""
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

    def discard(self, index: int) -> None:
        """Tensors read for page `index` are dropped without being installed: tell the source, if it cares (its
        views of a mapped file leave the RSS)."""
        discard = getattr(self.source, "discard", None)
        if discard is not None:
            discard(index)

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

    def candidates(self, device: str, protected: set[tuple[int, int]], idle: bool) -> Iterator[Candidate]:
        """Its pages that could be evicted from `device` now: resident and not in use by a step there, or, for the
        host, its pinned host copies. A locked process has none."""
        if self.locked:
            return
        n = len(self.entries)
        for e in self.entries:
            if self.device == device:
                ok = e.state in (IN, STAGED) and (self.pid, e.index) not in protected
            else:
                ok = device == HOST and e.host is not None
            if ok:
                yield Candidate((self.pid, e.index), e.nbytes, e.last_used, self.nice, n, idle, e.on_demand)
