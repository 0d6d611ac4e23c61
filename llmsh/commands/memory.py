"""Memory commands: `mem` (budgets and paging per process), `mlock`/`munlock`, `keepalive`, `pageout`.

They read and drive the pager service (`kernel.services["pager"]`, llmsh/kernel/pager.py). No torch here: page-ins
that `mlock` triggers run on a worker thread inside the pager.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any, Sequence

from llmsh.commands.registry import CommandError, Context, arg, command
from llmsh.tui.fmt import human_bytes, table

GROUP = "memory"


def _pager(ctx: Context) -> tuple[Any, Any]:
    """(pager, glue service); sets the pager up if the kernel did not list it as an extension."""
    services = ctx.kernel.services
    if "pager" not in services:
        from llmsh.kernel.pager import setup

        setup(ctx.kernel)
    service = services.get("pager_service")
    if service is not None:
        service.connect()
    return services["pager"], service


def _pid(ctx: Context, ref: str) -> int:
    pager, service = _pager(ctx)
    try:
        pid = service.resolve(ref) if service is not None else int(ref)
    except (LookupError, ValueError) as e:
        raise CommandError(str(e) if isinstance(e, LookupError) else f"no process {ref!r}; see 'ps'", ename="NoSuchProcess") from None
    if pid not in pager.procs:
        raise CommandError(f"process {ref} has no model under the pager (still loading, or failed); see 'ps'")
    return pid


def _complete_procs(ctx: Context, words: Sequence[str], prefix: str) -> list[str]:
    pager = ctx.kernel.services.get("pager")
    if pager is None or words:
        return []
    return [str(pid) for pid in pager.procs] + [p.name for p in pager.procs.values()]


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
            human_bytes(p["res_bytes"]), human_bytes(p["paged_bytes"]), f"{p['pages_resident']}/{p['pages']}",
            str(p["page_ins"]), str(p["page_outs"]), human_bytes(p["bytes_moved"]), _pct(p["hit_rate"]),
            "-" if p["keep_alive"] is None else f"{p['keep_alive']:g}s",
        ]
        for p in snap["procs"]
    ]
    if rows:
        headers = ["PID", "NAME", "DEVICE", "NI", "STATE", "RES", "PAGED", "PAGES", "IN", "OUT", "MOVED", "HIT", "KEEP"]
        lines.append(table(rows, headers, right=[0, 3, 5, 6, 7, 8, 9, 10, 11]))
    else:
        lines.append("no model processes")
    return "\n".join(lines)


@command(
    "mem",
    "memory budgets and paging: resident / paged-out bytes per process, page-ins/outs, hit rate",
    description="Each device's budget (--mem-budget) and what the pager has resident in it, then per process: "
    "resident and paged-out bytes, pages in, page-ins and page-outs, bytes moved, the page hit rate, keep_alive.",
    structured=True,
    group=GROUP,
)
async def mem_cmd(ctx: Context, args: argparse.Namespace) -> int:
    """`mem [--json]`."""
    pager, service = _pager(ctx)
    if service is not None:
        service.sync_rows()
    snap = pager.snapshot()
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
    from llmsh.kernel.pager import PagerError

    pager, service = _pager(ctx)
    pid = _pid(ctx, args.pid)
    try:
        await asyncio.to_thread(pager.mlock, pid)
    except PagerError as e:
        raise CommandError(str(e), ename="OutOfMemory") from None
    if service is not None:
        service.sync_rows()
    row = pager.proc_row(pid)
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
    pager, _ = _pager(ctx)
    pid = _pid(ctx, args.pid)
    pager.munlock(pid)
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
    from llmsh.kernel.pager import parse_duration

    try:
        seconds = parse_duration(args.duration)
    except ValueError as e:
        raise CommandError(str(e), status=2, ename="UsageError") from None
    pager, _ = _pager(ctx)
    pid = _pid(ctx, args.pid)
    pager.set_keep_alive(pid, seconds)
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
    pager, service = _pager(ctx)
    pid = _pid(ctx, args.pid)
    if pager.proc(pid).locked:
        raise CommandError(f"process {pid} is locked in memory; 'munlock {pid}' first")
    if service is not None and service._busy(pid):
        raise CommandError(f"process {pid} is generating; page it out when it is idle (or 'kill -STOP' it first)")
    freed = pager.page_out(pid)
    if service is not None:
        service.sync_rows()
    ctx.result({"pid": pid, "freed_bytes": freed}, f"pid {pid}: {human_bytes(freed)} paged out\n")
    return 0


def free_columns(kernel: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add the pager's BUDGET / PAGED-IN columns to `free` rows (devices the pager knows)."""
    pager = kernel.services.get("pager")
    if pager is None:
        return rows
    snap = pager.snapshot()["devices"]
    for r in rows:
        d = snap.get(str(r.get("device")))
        if d is not None:
            r["budget"], r["paged_in"] = d["budget"], d["used"]
    return rows


def _extend_free() -> None:
    """`free` shows the pager's budget and what it has paged in next to each device's totals."""
    from llmsh.commands import nodes

    for col in (("budget", "BUDGET"), ("paged_in", "PAGED-IN")):
        if col not in nodes.FREE_COLUMNS:
            nodes.FREE_COLUMNS.append(col)


_extend_free()
