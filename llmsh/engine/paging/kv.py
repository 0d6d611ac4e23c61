"""KV-cache budget with preemption: the caches of a device's processes stay within its `kv` budget; when they would
outgrow it, new requests wait and the lowest-priority running ones are swapped out to host memory and resume later
with exactly the state they left.

Each process's `BatchGenerator` (llmsh/runtime/generation.py) is wrapped by a `KVGuard`, which the engine thread
steps like the batch itself. A cache holds what it has allocated (runtime/kv_cache.py: it grows with its sequences
and shrinks when they leave), and that is what counts against the budget and what `mem` shows. Before a step the
guard computes the least the cache must grow for it (a row per joining sequence, room for one more token of the
longest running one and the longest joining prompt); if the device's KV bytes would exceed the budget, the device's
caches first give back the capacity their sequences do not use (a cache keeps some between joins), then it preempts
victims across all guarded batches of the device — highest nice first, newest request first among equals (vLLM's
LIFO) — by copying their cache rows to host and freeing their slots; joining requests of the stepping batch are
simply held back (they wait). Then it grows the cache, by as much as the budget leaves room for. Swapped requests
come back (oldest first) as soon as they fit. Because the cache rows and the sampler state are restored as they
were, greedy output is identical to an uninterrupted run. A request that alone could never fit ends: a running one
as at a full context ('length'), a prompt with one line naming the budget.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmsh.engine.paging.budget import format_bytes
from llmsh.engine.paging.states import PagerError


@dataclass(eq=False)
class Swapped:
    """A preempted sequence and its cache rows on the host."""

    seq: Any
    length: int
    k: list[Any]
    v: list[Any]
    order: int

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k) + sum(t.nbytes for t in self.v)


@dataclass
class KVStats:
    preemptions: int = 0
    resumes: int = 0
    held: int = 0  # joins delayed for lack of KV room
    swapped_bytes: int = 0  # bytes copied to host by preemptions
    too_long: int = 0  # requests ended because they alone outgrow the budget


class KVManager:
    """The KV budget of each device and the guards of the batches on it."""

    def __init__(self, budget: Callable[[str], int]) -> None:
        self._budget = budget  # device → bytes ('kv:cpu' budgets come from the pager)
        self.lock = threading.RLock()
        self.guards: dict[str, list["KVGuard"]] = {}
        self.stats = KVStats()
        self._order = 0
        self.check_hooks: list[Callable[[str, int, int], None]] = []

    def budget(self, device: str) -> int:
        return self._budget(device)

    def guard(self, batch: Any, *, pid: int, device: str, nice: Callable[[], int],
              on_blocked: Callable[[], None] | None = None, after_step: Callable[[], None] | None = None,
              on_error: Callable[[list[Any], str], None] | None = None) -> "KVGuard":
        """Wrap a BatchGenerator so its steps respect the device's KV budget."""
        g = KVGuard(self, batch, pid=pid, device=device, nice=nice, on_blocked=on_blocked, after_step=after_step,
                    on_error=on_error)
        with self.lock:
            self.guards.setdefault(device, []).append(g)
        return g

    def forget(self, guard: "KVGuard") -> None:
        with self.lock:
            if guard in self.guards.get(guard.device, []):
                self.guards[guard.device].remove(guard)

    def next_order(self) -> int:
        self._order += 1
        return self._order

    def used(self, device: str) -> int:
        """KV bytes held on the device by running sequences (positions in use × bytes per position)."""
        with self.lock:
            return sum(g.used() for g in self.guards.get(device, []))

    def held_by(self, pid: int) -> int:
        """KV bytes the caches of process `pid` hold (allocated, on its device)."""
        with self.lock:
            return sum(g.used() for gs in self.guards.values() for g in gs if g.pid == pid)

    def swapped(self, device: str) -> int:
        with self.lock:
            return sum(s.nbytes for g in self.guards.get(device, []) for s in g.swapped)

    def check(self, device: str) -> None:
        used, budget = self.used(device), self.budget(device)
        for hook in self.check_hooks:
            hook(device, used, budget)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            devices = {
                dev: {"budget": self.budget(dev), "used": self.used(dev), "swapped": self.swapped(dev),
                      "running": sum(len(g.batch.running) for g in gs), "preempted": sum(len(g.swapped) for g in gs)}
                for dev, gs in self.guards.items()
            }
            return {"devices": devices, **self.stats.__dict__}


@dataclass(eq=False)
class _Victim:
    guard: "KVGuard"
    seq: Any
    joining: bool
    nice: int
    order: int


@dataclass(eq=False)
class KVGuard:
    """A BatchGenerator under the KV budget; the engine uses it exactly like the batch (add/remove/step/…)."""

    manager: KVManager
    batch: Any
    pid: int
    device: str
    nice: Callable[[], int]
    on_blocked: Callable[[], None] | None = None
    after_step: Callable[[], None] | None = None  # e.g. the pager unprotecting the pages this step used
    on_error: Callable[[list[Any], str], None] | None = None  # sequences whose step failed for lack of memory
    swapped: list[Swapped] = field(default_factory=list)
    held: list[Any] = field(default_factory=list)
    joined: dict[int, int] = field(default_factory=dict)  # id(seq) → arrival order
    preemptions: int = 0

    def __post_init__(self) -> None:
        self.bytes_per_pos = self.batch.cache.bytes_per_position

    # ---- the BatchGenerator interface ------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:  # cache, running, waiting, last_batch_size, steps, max_seq_len…
        return getattr(self.batch, name)

    def add(self, seq: Any) -> None:
        self.batch.add(seq)
        self.joined[id(seq)] = self.manager.next_order()

    def remove(self, seq: Any) -> None:
        with self.manager.lock:
            for s in list(self.swapped):
                if s.seq is seq:
                    self.swapped.remove(s)
            if seq in self.held:
                self.held.remove(seq)
            self.joined.pop(id(seq), None)
            self.batch.remove(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.batch.has_work or self.swapped or self.held)

    def used(self) -> int:
        """The bytes this batch's KV cache holds (what it allocated, not only the positions in use)."""
        return int(self.batch.cache.nbytes)

    def step(self) -> list[tuple[Any, str]]:
        """Resume what fits, preempt what must go, then run the batch's step."""
        m = self.manager
        with m.lock:
            ended = self._end_impossible()
            self._resume()
            self._make_room()
            if not self.batch.running and not self.batch.waiting:
                self.batch.last_batch_size = 0
                if self.on_blocked is not None and not ended:
                    self.on_blocked()
                return ended
            # grow the cache now, within what the budget leaves (the step's own growth would not know it)
            others = m.used(self.device) - self.used()
            self.batch.cache.reserve(*self._need(), max_bytes=m.budget(self.device) - others)
        decoding, joining = list(self.batch.running), self._joining()
        try:
            out = self.batch.step()
        except PagerError as e:  # a page could not come in (out of memory): this step's requests fail, not the process
            failed = self._abort(decoding, joining)
            if self.on_error is not None:
                self.on_error(failed, str(e))
            return ended + [(seq, "") for seq in failed]
        finally:
            if self.after_step is not None:
                self.after_step()
        for seq, _ in out:
            if seq.finished:
                self.joined.pop(id(seq), None)
        m.check(self.device)
        return ended + out

    def _abort(self, decoding: list[Any], joining: list[Any]) -> list[Any]:
        """Take the sequences of a failed step out of the batch (slots freed) and mark them finished 'error'."""
        cache = self.batch.cache
        for seq in [*decoding, *joining]:
            if seq in self.batch.running:
                self.batch.running.remove(seq)
            if seq in self.batch.waiting:
                self.batch.waiting.remove(seq)
            if seq.slot is not None:
                cache.free(seq.slot)
                seq.slot = None
            seq.finished = "error"
            self.joined.pop(id(seq), None)
        self.batch.compact()
        return [*decoding, *joining]

    # ---- preemption ------------------------------------------------------------------------------------------
    def _joining(self) -> list[Any]:
        return list(self.batch.waiting)[: self.batch.cache.free_slots]

    def _need(self, extra: int = 0, extra_positions: int = 0) -> tuple[int, int]:
        """(rows, positions) the cache needs for this step: a slot per running and joining sequence (and `extra`
        more), positions for one more token of the longest running one or the longest joining prompt."""
        cache, joining = self.batch.cache, self._joining()
        positions = max([extra_positions, *(cache.lengths[s.slot] + 1 for s in self.batch.running),
                         *(len(s.prompt_ids) for s in joining)])
        return cache.rows_with(len(joining) + extra), positions

    def _demand(self, extra: int = 0, extra_positions: int = 0) -> int:
        """KV bytes this step adds: what the cache must grow by (at the least) for `_need`."""
        cache = self.batch.cache
        return cache.nbytes_of(*cache.plan(*self._need(extra, extra_positions), max_bytes=0)) - cache.nbytes

    def _fits(self) -> bool:
        return self.manager.used(self.device) + self._demand() <= self.manager.budget(self.device)

    def _alone(self, positions: int) -> int:
        """KV bytes of one sequence of `positions` positions in a cache of its own (what it needs at the least)."""
        cache = self.batch.cache
        return cache.nbytes_of(*cache.fitted(1, positions, exact=True))

    def _end_impossible(self) -> list[tuple[Any, str]]:
        """Requests that alone outgrow the budget would wait forever: a running (or swapped) one ends as at a full
        context ('length'); a prompt that could never start is refused with one line naming the budget."""
        budget, cache = self.manager.budget(self.device), self.batch.cache
        ended, refused = [], []
        for seq in list(self.batch.running):
            if self._alone(cache.lengths[seq.slot] + 1) > budget:
                self.batch.running.remove(seq)
                cache.free(seq.slot)
                seq.slot = None
                ended.append(seq)
        for seq in [*self.batch.waiting, *self.held]:
            if self._alone(len(seq.prompt_ids)) > budget:
                (self.held if seq in self.held else self.batch.waiting).remove(seq)
                refused.append(seq)
        for s in list(self.swapped):
            if self._alone(s.length + 1) > budget:
                self.swapped.remove(s)
                ended.append(s.seq)
        if ended:
            self.batch.compact()
        self.manager.stats.too_long += len(ended) + len(refused)
        for seq in refused:  # it could never start: one line naming the budget, not a silent empty answer
            seq.finished = "error"
            if self.on_error is not None:
                need = self._alone(len(seq.prompt_ids))
                self.on_error([seq], f"a prompt of {len(seq.prompt_ids)} tokens needs {format_bytes(need)} of KV "
                              f"cache, more than the whole KV budget of {self.device} ({format_bytes(budget)}); "
                              "shorten it, or start the kernel with a larger --mem-budget kv=SIZE")
        return [(seq, seq.finish("length")) for seq in ended] + [(seq, "") for seq in refused]

    def _resume(self) -> None:
        """Bring swapped sequences (oldest first), then held ones, back while they fit."""
        budget = self.manager.budget(self.device)
        for s in sorted(self.swapped, key=lambda s: s.order):
            if not self.batch.cache.free_slots or \
                    self.manager.used(self.device) + self._demand(1, s.length + 1) > budget:
                break
            self._swap_in(s)
        # held joins go back to the front of the queue, oldest first; _make_room holds them again if still short
        self.batch.waiting.extendleft(self.held)
        self.held.clear()

    def _make_room(self) -> None:
        if not self._fits():  # the caches' spare capacity (kept between joins) goes back before anything is preempted
            for g in self.manager.guards.get(self.device, []):
                g.batch.cache.fit(slack=1.0)
        while not self._fits():
            victims = self._victims()
            if not victims:
                break
            v = victims[0]
            if v.joining:
                self.batch.waiting.remove(v.seq)
                self.held.append(v.seq)
                self.manager.stats.held += 1
            else:
                v.guard.swap_out(v.seq)

    def _victims(self) -> list[_Victim]:
        """Everything that could give way, best victim first: highest nice, then newest."""
        out = []
        for g in self.manager.guards.get(self.device, []):
            nice = g.nice()
            for seq in g.batch.running:
                out.append(_Victim(g, seq, False, nice, g.joined.get(id(seq), 0)))
        nice = self.nice()
        for seq in self._joining():
            out.append(_Victim(self, seq, True, nice, self.joined.get(id(seq), 0)))
        return sorted(out, key=lambda v: (v.nice, v.order), reverse=True)

    def swap_out(self, seq: Any) -> None:
        """Copy a running sequence's cache rows to host, free its slot and give the room back at once (the caller
        is making room under the budget)."""
        cache, slot = self.batch.cache, seq.slot
        n = cache.lengths[slot]
        k = [t[slot, :, :n].to("cpu", copy=True) for t in cache.k]
        v = [t[slot, :, :n].to("cpu", copy=True) for t in cache.v]
        self.batch.running.remove(seq)
        cache.free(slot)
        seq.slot = None
        s = Swapped(seq, n, k, v, self.joined.get(id(seq), 0))
        self.swapped.append(s)
        self.manager.stats.preemptions += 1
        self.preemptions += 1
        self.manager.stats.swapped_bytes += s.nbytes
        self.batch.compact()
        cache.fit(slack=1.0, exact=True)

    def _swap_in(self, s: Swapped) -> None:
        cache = self.batch.cache
        slot = cache.alloc()
        cache.reserve(slot + 1, s.length + 1)
        for t, h in zip(cache.k, s.k):
            t[slot, :, : s.length].copy_(h)
        for t, h in zip(cache.v, s.v):
            t[slot, :, : s.length].copy_(h)
        cache.lengths[slot] = s.length
        s.seq.slot = slot
        self.batch.running.append(s.seq)
        self.swapped.remove(s)
        self.manager.stats.resumes += 1

    def describe(self) -> str:
        return (f"pid {self.pid}: {len(self.batch.running)} running, {len(self.swapped)} preempted "
                f"({format_bytes(sum(s.nbytes for s in self.swapped))} on host)")
