"""`dmesg`: the kernel's event log (loads, exits with their cause, signals, engine crashes, restores), kept in the
journal so it survives the kernel itself; `-f` follows new events as they happen."""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from llmsh.commands.registry import CommandError, Context, arg, command


def format_event(ev: dict[str, Any]) -> str:
    """`[14:02:11] engine-crash: engine exited: SIGBUS while running pid 3 (gpt2)`."""
    stamp = time.strftime("%H:%M:%S", time.localtime(ev["t"]))
    return f"[{stamp}] {ev['kind']}: {ev['text']}"


@command(
    "dmesg",
    "the kernel's event log: loads, exits and their causes, signals, engine crashes, restores",
    arg("-n", "--lines", type=int, default=None, metavar="N", help="only the last N events"),
    arg("-f", "--follow", action="store_true", help="keep printing new events as they happen (Ctrl-C stops)"),
    description="Events are kept in the kernel's journal (SQLite, user_state_dir), so they outlive a crash of the "
    "kernel; the oldest are dropped after 10000.",
    structured=True,
    group="kernel",
)
async def dmesg_cmd(ctx: Context, args: argparse.Namespace) -> int:
    """`dmesg [-n N] [-f] [--json]`."""
    journal = ctx.kernel.services.journal
    if journal is None:
        raise CommandError("this kernel has no journal (another kernel holds it); see 'llmsh kernel list'")
    if args.lines is not None and args.lines < 0:
        raise CommandError(f"-n {args.lines}: give a number ≥ 0", status=2, ename="UsageError")
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def listener(ev: dict[str, Any]) -> None:  # on the journal's writer thread
        loop.call_soon_threadsafe(queue.put_nowait, ev)

    if args.follow:
        journal.listeners.append(listener)
    try:
        events = await asyncio.wrap_future(journal.events(args.lines))
        if getattr(args, "json", False) and not args.follow:
            ctx.result(events, "\n".join(format_event(e) for e in events))
            return 0
        for ev in events:
            ctx.write(format_event(ev) + "\n")
        last = events[-1]["seq"] if events else 0
        while args.follow:
            ev = await queue.get()
            if ev["seq"] > last:
                ctx.write(format_event(ev) + "\n")
                last = ev["seq"]
    finally:
        if args.follow:
            journal.listeners.remove(listener)
    return 0
