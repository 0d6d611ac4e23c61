"""The pager's books: each device's byte budget and the bytes counted against it, the page-traffic counters, and the
rows and messages that report them (`mem`, `ps`, `free`, the error when a page cannot fit).

`Ledger` owns these numbers; `llmsh.engine.paging.core.Pager` changes them under its lock through the methods here,
and `check_hooks` let tests verify the budget at every change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from llmsh.engine.paging.budget import default_budget, format_bytes, normalize_device
from llmsh.engine.paging.states import IN, STAGED
from llmsh.engine.paging.table import HOST, Entry, Proc, Stats

log = logging.getLogger("llmsh.pager")


class Ledger:
    """Budgets and use per device, and the pager-wide counters (each process keeps its own `Stats` too)."""

    def __init__(self, budgets: dict[str, int] | None = None) -> None:
        self._budgets: dict[str, int] = {normalize_device(k): int(v) for k, v in (budgets or {}).items()}
        self.used: dict[str, int] = {}
        self.totals = Stats()
        self.check_hooks: list[Callable[[str, int, int], None]] = []

    # ---- budgets -------------------------------------------------------------------------------------------
    def budget(self, device: str) -> int:
        """The byte budget of a device (its default is computed once, on first use)."""
        device = normalize_device(device)
        if device not in self._budgets:
            self._budgets[device] = default_budget(device)
        return self._budgets[device]

    def set_budget(self, device: str, nbytes: int) -> None:
        """Record a new budget (the pager evicts down to it)."""
        self._budgets[normalize_device(device)] = int(nbytes)

    def known_budgets(self) -> dict[str, int]:
        """Every budget known so far."""
        return dict(self._budgets)

    def free(self, device: str) -> int:
        """Bytes of the budget not counted as used."""
        device = normalize_device(device)
        return self.budget(device) - self.used.get(device, 0)

    # ---- use -----------------------------------------------------------------------------------------------
    def charge(self, device: str, nbytes: int) -> None:
        """Count `nbytes` more as used on `device`."""
        self.used[device] = self.used.get(device, 0) + nbytes

    def credit(self, device: str, nbytes: int) -> None:
        """Count `nbytes` fewer as used on `device`."""
        self.used[device] -= nbytes

    def check(self, device: str) -> None:
        """Run the check hooks on `device`'s use, and log loudly if it is over budget."""
        used = self.used.get(device, 0)
        budget = self.budget(device)
        for hook in self.check_hooks:
            hook(device, used, budget)
        if used > budget:
            log.error("pager over budget on %s: %d > %d", device, used, budget)

    # ---- counters ------------------------------------------------------------------------------------------
    def hit(self, proc: Proc) -> None:
        """A page access found the page ready."""
        proc.stats.hits += 1
        self.totals.hits += 1

    def miss(self, proc: Proc) -> None:
        """A page access had to wait for the page."""
        proc.stats.misses += 1
        self.totals.misses += 1

    def paged_in(self, e: Entry, prefetched: bool = False) -> None:
        """A page was read in (by the prefetch thread if `prefetched`)."""
        for s in (e.proc.stats, self.totals):
            s.page_ins += 1
            s.bytes_in += e.nbytes
            s.prefetched += int(prefetched)

    def paged_out(self, e: Entry) -> None:
        """A page left its device."""
        for s in (e.proc.stats, self.totals):
            s.page_outs += 1
            s.bytes_out += e.nbytes

    def recycled(self, proc: Proc) -> None:
        """A page-in refilled an evicted page's buffers."""
        proc.stats.recycled += 1
        self.totals.recycled += 1

    def stalled(self, proc: Proc, dt: float) -> None:
        """The engine waited `dt` seconds for a page of `proc`."""
        proc.stats.stall_s += dt
        self.totals.stall_s += dt

    # ---- reports -------------------------------------------------------------------------------------------
    def no_room_message(self, procs: Iterable[Proc], device: str, need: int, what: str) -> str:
        """The one-line error when `need` bytes cannot be freed on `device`: what holds the memory, what to do."""
        holders = []
        for p in sorted(procs, key=lambda p: -p.resident_bytes):
            if p.device == device and p.resident_bytes:
                holders.append(f"pid {p.pid} {p.name} {format_bytes(p.resident_bytes)}{' (mlocked)' if p.locked else ''}")
            elif device == HOST and p.host_bytes:
                holders.append(f"pid {p.pid} {p.name} {format_bytes(p.host_bytes)} host copies")
        held = "; held by " + ", ".join(holders) if holders else ""
        return (
            f"{what} needs {format_bytes(need)} on {device} but only {format_bytes(max(0, self.free(device)))} of the "
            f"{format_bytes(self.budget(device))} budget can be freed{held}; munlock or kill a process, or raise --mem-budget"
        )


def proc_row(p: Proc, kv: int) -> dict[str, Any]:
    """Memory facts of one process (for `mem`, `ps`, `free`), given the KV cache bytes it holds."""
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
