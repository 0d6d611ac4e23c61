"""Core shell commands: help, echo, sleep, history, uname/kernel, exit, and the job commands jobs, fg, bg, wait.

Everything here is cheap and torch-free; `uname` reports whether torch is loaded by looking at `sys.modules`, never
by importing it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

import llmsh
from llmsh.commands.registry import REGISTRY, CommandError, Context, arg, command
from llmsh.units import parse_duration

# ---- help -----------------------------------------------------------------------------------------------------------


def _complete_command_names(ctx: Context, words: Sequence[str], prefix: str) -> list[str]:
    return [n for n in REGISTRY.names() if n.startswith(prefix)] if not words else []


@command(
    "help",
    "list the commands, or show one command's help",
    arg("name", nargs="?", metavar="CMD", help="the command to explain"),
    structured=True,
    completer=_complete_command_names,
    description="Without CMD, list every command with a one-line summary; 'help CMD' (or 'CMD --help') explains one.",
)
async def help_(ctx: Context, args: argparse.Namespace) -> None:
    if args.name:
        entry = REGISTRY.get(args.name)
        if entry is None:
            raise REGISTRY.not_found(args.name)
        data = {"name": entry.name, "summary": entry.summary, "usage": entry.usage(), "aliases": list(entry.aliases)}
        ctx.result(data, entry.help_text())
        return
    groups: dict[str, list[Any]] = {}
    for entry in REGISTRY.commands.values():
        groups.setdefault(entry.group, []).append(entry)
    width = max((len(n) for n in REGISTRY.commands), default=8) + 2
    lines: list[str] = []
    rows = []
    for group in sorted(groups, key=lambda g: (g != "core", g)):
        lines.append(f"{group}:")
        for entry in sorted(groups[group], key=lambda e: e.name):
            alias = f" (also: {', '.join(entry.aliases)})" if entry.aliases else ""
            lines.append(f"  {entry.name:<{width}}{entry.summary}{alias}")
            rows.append({"name": entry.name, "group": group, "summary": entry.summary, "aliases": list(entry.aliases)})
    lines.append("Type 'help CMD' or 'CMD --help' for details. Combine commands with ; && || | & and > FILE.")
    ctx.result(rows, "\n".join(lines))


# ---- echo, sleep ----------------------------------------------------------------------------------------------------


@command(
    "echo",
    "print the arguments",
    arg("-n", action="store_true", help="do not print the trailing newline"),
    arg("words", nargs=argparse.REMAINDER, help="text to print"),
)
async def echo(ctx: Context, args: argparse.Namespace) -> None:
    ctx.write(" ".join(args.words) + ("" if args.n else "\n"))




def duration(text: str) -> float:
    """Parse `5`, `0.5`, `2s`, `1m`, `1h`, `1d` into seconds (argparse `type=`); `llmsh.units` does the parsing."""
    try:
        seconds = parse_duration(text)
    except ValueError:
        seconds = None
    if seconds is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; give seconds like 5, 0.5 or 2m")
    return seconds


@command(
    "sleep",
    "wait N seconds (interruptible with Ctrl-C)",
    arg("seconds", type=duration, metavar="N", help="seconds to wait; suffix s, m, h or d allowed"),
)
async def sleep(ctx: Context, args: argparse.Namespace) -> None:
    await asyncio.sleep(args.seconds)


# ---- history, uname/kernel, exit ------------------------------------------------------------------------------------


@command(
    "history",
    "show the command lines the kernel has run (all clients)",
    arg("-n", "--lines", type=int, metavar="N", help="only the last N lines"),
    structured=True,
)
async def history(ctx: Context, args: argparse.Namespace) -> None:
    lines = list(getattr(ctx.kernel, "history", []))
    first = 0
    if args.lines is not None:
        if args.lines < 0:
            raise CommandError("-n needs a number ≥ 0", status=2, ename="UsageError")
        first = max(0, len(lines) - args.lines)
    rows = [{"n": i + 1, "line": line} for i, line in enumerate(lines) if i >= first]
    width = len(str(len(lines))) if lines else 1
    ctx.result(rows, "\n".join(f"{r['n']:>{width}}  {r['line']}" for r in rows))


def _uptime(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d" if d else "") + (f"{h}h" if d or h else "") + (f"{m}m" if d or h or m else "") + f"{s}s"


def kernel_info(kernel: Any) -> dict[str, Any]:
    """What `uname`/`kernel` report; torch's state comes from sys.modules (importing it here would load it)."""
    torch = sys.modules.get("torch")
    started = float(getattr(kernel, "started_at", time.time()))
    clients = getattr(kernel, "clients", {}) or {}
    conn = getattr(kernel, "connection_file", None)
    return {
        "name": "llmsh",
        "version": llmsh.__version__,
        "pid": int(getattr(kernel, "pid", os.getpid())),
        "started_at": started,
        "uptime_s": round(time.time() - started, 3),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "torch": getattr(torch, "__version__", "loaded") if torch is not None else None,
        "platform": f"{platform.system()} {platform.machine()}",
        "hostname": socket.gethostname(),
        "connection_file": str(conn) if conn else None,
        "clients": len(clients),
    }


@command(
    "uname",
    "one line about the kernel: version, pid, uptime, python, torch",
    arg("-a", "--all", action="store_true", help="every field, one per line (same as 'kernel')"),
    structured=True,
)
async def uname(ctx: Context, args: argparse.Namespace) -> None:
    info = kernel_info(ctx.kernel)
    if args.all:
        ctx.result(info, _info_table(info))
        return
    torch = f"torch {info['torch']}" if info["torch"] else "torch not loaded"
    text = (
        f"llmsh {info['version']} pid {info['pid']} up {_uptime(info['uptime_s'])} "
        f"python {info['python']} {torch} {info['platform']}"
    )
    ctx.result(info, text)


def _info_table(info: dict[str, Any]) -> str:
    shown = dict(info)
    shown["uptime_s"] = _uptime(info["uptime_s"])
    shown["started_at"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started_at"]))
    shown["torch"] = info["torch"] or "not loaded"
    names = {"uptime_s": "uptime", "started_at": "started"}
    return "\n".join(f"{names.get(k, k):<16}{v}" for k, v in shown.items())


@command("kernel", "the kernel's version, pid, uptime, python, torch, connection file and clients", structured=True)
async def kernel_(ctx: Context, args: argparse.Namespace) -> None:
    info = kernel_info(ctx.kernel)
    ctx.result(info, _info_table(info))


class ExitRequested(Exception):
    """`exit N` in the kernel: the executor stops the rest of the line and reports exit code N (ename "Exit")."""

    def __init__(self, code: int) -> None:
        super().__init__(f"exit {code}")
        self.code = code


@command(
    "exit",
    "leave the shell with exit code N (default: the last command's); in a script, stop it",
    arg("code", nargs="?", type=int, metavar="N", help="exit code 0..255"),
    aliases=("quit",),
    description="The shell handles a lone 'exit' itself. Inside a longer line ('build && exit 3') the kernel stops "
    "the rest of the line and the shell leaves with N; in a pipe or a background job it does nothing.",
)
async def exit_(ctx: Context, args: argparse.Namespace) -> int:
    raise ExitRequested(int(args.code or 0) & 0xFF)


# ---- jobs -----------------------------------------------------------------------------------------------------------


def _complete_jobs(ctx: Context, words: Sequence[str], prefix: str) -> list[str]:
    return [f"%{j.id}" for j in ctx.kernel.services.jobs.list(ctx.client)]


@command(
    "jobs",
    "list this shell session's background jobs (started with 'CMD &')",
    structured=True,
    group="jobs",
)
async def jobs(ctx: Context, args: argparse.Namespace) -> None:
    table = ctx.kernel.services.jobs
    listed = table.list(ctx.client)
    lines = []
    for i, job in enumerate(listed):
        mark = "+" if i == len(listed) - 1 else ("-" if i == len(listed) - 2 else " ")
        progress = ""
        if job.control is not None and not job.done:
            p = job.control.progress()
            eta = f", ETA {p['eta_s']:.0f}s" if p.get("eta_s") is not None else ""
            progress = f"  ({p['done']}/{p['total']}, {p['tok_s']:.1f} tok/s{eta}{', stopped' if p['state'] == 'stopped' else ''})"
        lines.append(f"[{job.id}]{mark}  {job.status():<12}{job.text}{' &' if not job.done else ''}{progress}")
    ctx.result([j.to_dict() for j in listed], "\n".join(lines))
    for job in listed:
        if job.done:
            table.forget(job)


@command(
    "fg",
    "bring a job to the foreground and wait for it (Ctrl-C then stops it)",
    arg("job", nargs="?", metavar="%N", help="job number (default: the latest)"),
    completer=_complete_jobs,
    group="jobs",
)
async def fg(ctx: Context, args: argparse.Namespace) -> int:
    table = ctx.kernel.services.jobs
    job = table.get(ctx.client, args.job, "fg")
    if job.done:
        table.forget(job)
        raise CommandError(f"job {job.id} has already finished ({job.status().lower()})")
    ctx.write(job.text + "\n")
    return await table.foreground(job)


@command(
    "bg",
    "keep a job running in the background (jobs never stop, so this confirms it is running)",
    arg("job", nargs="?", metavar="%N", help="job number (default: the latest)"),
    completer=_complete_jobs,
    group="jobs",
)
async def bg(ctx: Context, args: argparse.Namespace) -> None:
    table = ctx.kernel.services.jobs
    job = table.get(ctx.client, args.job, "bg")
    if job.done:
        raise CommandError(f"job {job.id} has already finished ({job.status().lower()})")
    job.foreground = False
    ctx.write(f"[{job.id}]+ {job.text} &\n")


@command(
    "wait",
    "wait for background jobs (all, or %N) or a model process (PID); Ctrl-C stops the waiting only",
    arg("target", nargs="*", metavar="%N|PID", help="jobs (%N) or process ids; default: every running job"),
    completer=_complete_jobs,
    group="jobs",
)
async def wait(ctx: Context, args: argparse.Namespace) -> int:
    table = ctx.kernel.services.jobs
    if not args.target:  # like sh: every job is then reaped, so 'jobs' no longer lists them
        await table.wait(table.running(ctx.client))
        for job in table.list(ctx.client):
            if job.done:
                table.forget(job)
        return 0
    code = 0
    for target in args.target:
        if target.startswith("%"):
            job = table.get(ctx.client, target, "wait")
            await table.wait([job])
            table.forget(job)
            code = job.exit_code if job.exit_code is not None else 1
        elif target.isdigit():
            code = await _wait_pid(ctx, int(target))
        else:
            raise CommandError(f"{target}: not a job (%N) or a process id", status=2, ename="UsageError")
    return code


async def _wait_pid(ctx: Context, pid: int) -> int:
    """Wait until model process `pid` has settled (loaded and idle, failed, or exited); its shell status."""
    try:
        return await ctx.kernel.services.procs.wait(pid)
    except LookupError as e:
        raise CommandError(str(e), status=127, ename="NoSuchProcess") from None
