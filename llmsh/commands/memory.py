"""Memory commands: `mem` (budgets and paging per process), `mlock`/`munlock`, `keepalive`, `pageout`.

They ask the engine's pager (llmsh/engine/pager.py) through `kernel.services.procs.memory`. No torch here.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from llmsh.commands.processes import complete_procs
from llmsh.commands.registry import CommandError, Context, arg, command
from llmsh.fmt import human_bytes, table
from llmsh.kernel.table import Entry
from llmsh.units import parse_duration

GROUP = "memory"


def _entry(ctx: Context, ref: str) -> Entry:
    return ctx.kernel.services.procs.resolve(ref)


def _complete_procs(ctx: Context, words: Sequence[str], prefix: str) -> list[str]:
    """Every PID and name for the first argument (the process); nothing after it (keepalive's DURATION)."""
    return [] if words else complete_procs(ctx, words, prefix)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_mem(snap: dict[str, Any]) -> str:
    """The text of `mem`: one line per device budget, then one row per process."""
    lines = []
    for dev, d in snap["devices"].items():
        kind = "kv cache" if dev.startswith("kv:") else "weights"
        lines.append(
            f"{dev:<10} {kind:<8} budget {human_bytes(d['budget']):>10}  used {human_bytes(d['used']):>10}  "
            f"free {human_bytes(d['free']):>10}"
        )
    t = snap["totals"]
    lines.append(
        f"page-ins {t['page_ins']}  page-outs {t['page_outs']}  moved {human_bytes(t['bytes_moved'])}  "
        f"hit rate {_pct(t['hit_rate'])}  prefetched {t['prefetched']}  recycled {t.get('recycled', 0)}"
    )
    kv = snap.get("kv") or {}
    if kv.get("preemptions") or kv.get("too_long"):
        lines.append(
            f"kv cache: {kv['preemptions']} requests preempted to host ({human_bytes(kv['swapped_bytes'])}), "
            f"{kv['resumes']} resumed, {kv['too_long']} ended for outgrowing the budget"
        )
    rows = [
        [
            str(p["pid"]), p["name"], p["device"], str(p["nice"]), p["state"] + (" (mlock)" if p["locked"] else ""),
            human_bytes(p["res_bytes"]), human_bytes(p.get("kv_bytes", 0)), human_bytes(p["paged_bytes"]),
            f"{p['pages_resident']}/{p['pages']}",
            str(p["page_ins"]), str(p["page_outs"]), human_bytes(p["bytes_moved"]), _pct(p["hit_rate"]),
            "-" if p["keep_alive"] is None else f"{p['keep_alive']:g}s",
        ]
        for p in snap["procs"]
    ]
    if rows:
        headers = ["PID", "NAME", "DEVICE", "NI", "STATE", "RES", "KV", "PAGED", "PAGES", "IN", "OUT", "MOVED", "HIT",
                   "KEEP"]
        lines.append(table(rows, headers, right=[0, 3, 5, 6, 7, 8, 9, 10, 11, 12]))
    else:
        lines.append("no model processes")
    return "\n".join(lines)


@command(
    "mem",
    "memory budgets and paging: resident / paged-out bytes per process, page-ins/outs, hit rate",
    description="Each device's budget (--mem-budget) and what is resident in it: weights (cpu, cuda:N) and the KV "
    "caches the processes have allocated (kv:DEVICE; caches grow with their requests and shrink when they end). Then "
    "per process: RES (its weights in memory plus its KV cache, the same figure as ps), KV (the KV cache alone), "
    "PAGED (weights paged out), pages in, page-ins and page-outs, bytes moved, the page hit rate, keep_alive.",
    structured=True,
    group=GROUP,
)
async def mem_cmd(ctx: Context, args: argparse.Namespace) -> int:
    """`mem [--json]`."""
    snap = await ctx.kernel.services.procs.memory("mem")
    if snap is None:  # no engine yet: nothing is loaded
        snap = {"devices": {}, "totals": {"page_ins": 0, "page_outs": 0, "bytes_moved": 0, "hit_rate": None,
                                          "prefetched": 0, "recycled": 0}, "procs": [], "kv": {}}
    ctx.result(snap, format_mem(snap) + "\n")
    return 0


@command(
    "mlock",
    "pin a process's weights resident: they are paged in now and never evicted",
    arg("pid", metavar="PID|NAME", help="the process"),
    description="Pages every layer of the process in (paging out others as needed) and keeps them there until "
    "'munlock'. Fails if the locked processes would not fit in the device's budget.",
    completer=_complete_procs,
    structured=True,
    group=GROUP,
)
async def mlock_cmd(ctx: Context, args: argparse.Namespace) -> int:
    """`mlock PID`."""
    entry = _entry(ctx, args.pid)
    pid = entry.pid
    row = await ctx.kernel.services.procs.memory("mlock", entry)
    ctx.result({"pid": pid, "name": row["name"], "locked": True, "res_bytes": row["res_bytes"]},
               f"pid {pid} ({row['name']}) locked: {human_bytes(row['res_bytes'])} resident\n")
    return 0


@command(
    "munlock",
    "let a locked process's weights be paged out again",
    arg("pid", metavar="PID|NAME", help="the process"),
    completer=_complete_procs,
    structured=True,
    group=GROUP,
)
async def munlock_cmd(ctx: Context, args: argparse.Namespace) -> int:
    """`munlock PID`."""
    entry = _entry(ctx, args.pid)
    pid = entry.pid
    await ctx.kernel.services.procs.memory("munlock", entry)
    ctx.result({"pid": pid, "locked": False}, f"pid {pid} unlocked\n")
    return 0


@command(
    "keepalive",
    "release a process's weights after it has been idle this long (like Ollama's keep_alive)",
    arg("pid", metavar="PID|NAME", help="the process"),
    arg("duration", metavar="DURATION", help="30s, 5m, 1h; 0 releases as soon as it is idle; 'forever' keeps it"),
    description="An idle process past its keep_alive has all its pages released: it stays in 'ps' as paged-out "
    "and its weights come back from disk on its next request.",
    completer=_complete_procs,
    structured=True,
    group=GROUP,
)
async def keepalive_cmd(ctx: Context, args: argparse.Namespace) -> int:
    """`keepalive PID DURATION`."""
    try:
        seconds = parse_duration(args.duration)
    except ValueError as e:
        raise CommandError(str(e), status=2, ename="UsageError") from None
    entry = _entry(ctx, args.pid)
    pid = entry.pid
    await ctx.kernel.services.procs.memory("keepalive", entry, seconds=seconds)
    ctx.result({"pid": pid, "keep_alive_s": seconds},
               f"pid {pid} keep_alive {'forever' if seconds is None else f'{seconds:g}s'}\n")
    return 0


@command(
    "pageout",
    "release every page of an idle process now (it comes back on its next request)",
    arg("pid", metavar="PID|NAME", help="the process"),
    completer=_complete_procs,
    structured=True,
    group=GROUP,
)
async def pageout_cmd(ctx: Context, args: argparse.Namespace) -> int:
    """`pageout PID`."""
    entry = _entry(ctx, args.pid)
    pid = entry.pid
    freed = (await ctx.kernel.services.procs.memory("pageout", entry))["freed_bytes"]
    ctx.result({"pid": pid, "freed_bytes": freed}, f"pid {pid}: {human_bytes(freed)} paged out\n")
    return 0


async def free_columns(kernel: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add the pager's BUDGET / PAGED-IN columns to `free` rows (devices the pager knows)."""
    snap = await kernel.services.procs.memory("mem")
    devices = (snap or {}).get("devices", {})
    for r in rows:
        d = devices.get(str(r.get("device")))
        if d is not None:
            r["budget"], r["paged_in"] = d["budget"], d["used"]
    return rows
