"""Process commands: load, ps, kill, nice, renice, threads, models — models as Unix processes (`run` and `chat`,
which generate on them, are in `llmsh.commands.generation`).

Handlers are thin: they resolve a PID or name, turn arguments into calls on the kernel's process table, scheduler
and loader (`llmsh.engine.process.setup` puts them in `kernel.services`), and turn every user-facing failure into one
`CommandError` line. Torch is never imported here; the kernel's loader imports it on the first `load`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmsh.commands.registry import CommandError, Context, UsageError, arg, command
from llmsh.fmt import duration, human_bytes, proc_cell, table
from llmsh.kernel.errors import KernelError
from llmsh.kernel.table import Entry
from llmsh.models import find_models, hf_cache_dir, model_dirs
from llmsh.procinfo import thread_rows
from llmsh.protocol.procs import ProcState, parse_signal

GROUP = "processes"
DEFAULT_TERM_GRACE = 30.0  # seconds TERM waits for in-flight requests before escalating to KILL


# ---- services and lookups -----------------------------------------------------------------------------------------


def resolve(ctx: Context, ref: str) -> Entry:
    """The process a PID or name refers to (a KernelError line if none)."""
    return ctx.kernel.services.procs.resolve(ref)


def complete_procs(ctx: Context, words: Sequence[str], prefix: str) -> list[str]:
    """Completion of a process argument: every PID and name."""
    table = ctx.kernel.services.table
    return [str(e.pid) for e in table] + [e.name for e in table]


def _complete_models(ctx: Context, words: Sequence[str], prefix: str) -> list[str]:
    if words:
        return []
    names = [m["name"] for m in find_models()]
    base = Path(getattr(ctx, "cwd", None) or os.getcwd())
    head, _, tail = prefix.rpartition("/")
    folder = Path(os.path.expanduser(head + "/" if head else "."))
    if not folder.is_absolute():
        folder = base / folder
    try:
        entries = sorted(e for e in os.listdir(folder) if e.startswith(tail) and (folder / e).is_dir())
    except OSError:
        entries = []
    paths = [(head + "/" if head else "") + e + "/" for e in entries]
    return names + paths


# ---- load / nice ------------------------------------------------------------------------------------------------------


def _nice_value(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a nice value; give an integer from -20 to 19") from None
    return n


LOAD_ARGS = (
    arg("model", metavar="PATH|NAME", help="a Hugging Face-format folder, a .gguf file, ollama:NAME[:TAG], or a "
        "name from 'models'"),
    arg("--name", help="process name (default: the folder name)"),
    arg("--device", default="cpu", help="device to run on: cpu, cuda, cuda:1 … (default cpu)"),
    arg("--dtype", help="weights dtype: float32, bfloat16, float16 (default: the checkpoint's)"),
    arg("--nice", type=_nice_value, default=0, metavar="N", help="priority -20 (most) .. 19 (least), default 0"),
    arg("--max-batch", type=int, metavar="N", help="requests decoded together (KV cache slots), default 64"),
    arg("--ctx", type=int, metavar="TOKENS", help="the context: KV cache positions per request, prompt and output together (default: the model's own, "
        "from its config; may only lower it, like Ollama's num_ctx)"),
    arg("--quant", choices=("q8_0", "q4_0", "q4_k"), help="quantize a Hugging Face checkpoint's matrices at load "
        "(GGUF block formats; cached, so the next load is fast)"),
    arg("--node", metavar="NODE", help="the node to load it on (default: placed by free budget and load; see 'nodes')"),
    arg("--replicas", type=int, default=1, metavar="N", help="load N processes of the model (NAME, NAME-2, …), each "
        "placed on its own"),
)


def _check_nice(n: int, what: str = "nice") -> None:
    if not -20 <= n <= 19:
        raise CommandError(f"{what} value {n} is out of range; use -20 (highest priority) .. 19 (lowest)")


@command(
    "load",
    "load a model as a process; prints its PID",
    *LOAD_ARGS,
    description="Loads on the kernel's loader pool; shows progress on stderr and prints the PID when the model is "
    "ready. 'load … &' returns at once as a job. A load that fails leaves a 'failed' entry in ps with the reason.",
    structured=True,
    completer=_complete_models,
    group=GROUP,
)
async def load_cmd(ctx: Context, args: argparse.Namespace) -> int:
    """`load PATH|NAME [--name N] [--device D] [--dtype T] [--nice N]`."""
    _check_nice(args.nice)
    source = args.model
    if hasattr(ctx, "path") and (source.startswith((".", "/", "~")) or os.sep in source):
        local = ctx.path(source)
        if local.exists() or source.startswith((".", "~", "/")):
            source = str(local)
    shown: list[tuple[int, str]] = []
    progress = getattr(ctx, "progress", None)  # the shell draws a bar; stderr lines otherwise

    def on_progress(entry: Entry) -> None:
        now = (int(entry.progress * 100), entry.progress_text)
        if entry.progress_text and (not shown or now != shown[-1]):
            label = f"load {entry.name} (pid {entry.pid}): {entry.progress_text}"
            if progress is not None:
                progress(entry.progress, label)
            else:
                ctx.warn(f"{label} {now[0]}%\n")
            shown.append(now)

    replicas = int(getattr(args, "replicas", 1) or 1)
    if replicas < 1:
        raise UsageError(f"--replicas {replicas}: give a number ≥ 1")
    procs = ctx.kernel.services.procs
    names: list[str | None] = [None] * replicas if args.name is None else \
        [args.name if i == 0 else f"{args.name}-{i + 1}" for i in range(replicas)]  # None: the table names them

    async def one(name: str | None) -> Entry:
        return await procs.load(source, name=name, device=args.device, dtype=args.dtype, nice=args.nice,
                                max_batch=args.max_batch, ctx=args.ctx, quant=args.quant, on_progress=on_progress,
                                node=getattr(args, "node", None))

    if replicas == 1:
        entry = await one(names[0])
        ctx.result(entry.row(), f"{entry.pid}")
        return 0
    results = await asyncio.gather(*(one(n) for n in names), return_exceptions=True)
    entries = [r for r in results if isinstance(r, Entry)]
    if entries:
        ctx.result([e.row() for e in entries], "\n".join(str(e.pid) for e in entries))
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        if not isinstance(errors[0], (KernelError, CommandError)):
            raise errors[0]
        raise CommandError(f"{len(errors)} of {replicas} replicas did not load: {errors[0]}")
    return 0


@command(
    "nice",
    "run 'load' with a nice value: nice -n N load PATH …",
    arg("-n", "--adjustment", type=_nice_value, default=10, metavar="N", help="nice value -20..19 (default 10)"),
    arg("cmd", nargs=argparse.REMAINDER, metavar="load …", help="the load command line"),
    description="Processes get their priority when they are created, so nice applies to 'load'; "
    "use 'renice N PID' for a running process.",
    group=GROUP,
)
async def nice_cmd(ctx: Context, args: argparse.Namespace) -> int:
    """`nice -n N load …`."""
    _check_nice(args.adjustment)
    if not args.cmd:
        ctx.write("0\n")  # like nice(1) without a command: the shell's own niceness
        return 0
    if args.cmd[0] != "load":
        raise UsageError(f"nice only applies to 'load' (got '{args.cmd[0]}'); use 'renice N PID' for a running process")
    from llmsh.commands.registry import REGISTRY

    load_args = REGISTRY.require("load").parse(args.cmd[1:])
    if "--nice" in args.cmd:
        raise UsageError("give the priority once: either 'nice -n N load …' or 'load --nice N'")
    load_args.nice = args.adjustment
    return int(await load_cmd(ctx, load_args) or 0)


@command(
    "renice",
    "change the nice value of running processes",
    arg("priority", type=_nice_value, metavar="N", help="new nice value -20..19"),
    arg("targets", nargs="+", metavar="PID|NAME", help="processes"),
    structured=True,
    completer=complete_procs,
    group=GROUP,
)
async def renice_cmd(ctx: Context, args: argparse.Namespace) -> int:
    """`renice N PID…`."""
    _check_nice(args.priority)
    rows, lines = [], []
    for ref in args.targets:
        proc = resolve(ctx, ref)
        old = await ctx.kernel.services.procs.renice(proc, args.priority)
        rows.append({"pid": proc.pid, "old": old, "new": args.priority})
        lines.append(f"{proc.pid} ({proc.name}): old priority {old}, new priority {args.priority}")
    ctx.result(rows, "\n".join(lines))
    return 0


# ---- ps ---------------------------------------------------------------------------------------------------------------

PS_COLUMNS = (
    ("pid", "PID", True), ("name", "NAME", False), ("state", "STATE", False), ("nice", "NI", True),
    ("device", "DEVICE", False), ("res_bytes", "RES", True), ("reqs", "REQS", True), ("tok_s", "TOK/S", True),
    ("tokens", "TOKENS", True), ("time_s", "TIME", True), ("node", "NODE", False),
)  # fmt: skip


def _ps_time(row: dict[str, Any]) -> str:
    """Compute time: seconds with centiseconds below a minute (model steps are short), else H:MM:SS."""
    t = float(row.get("time_s") or 0.0)
    return f"{t:.2f}s" if t < 60 else duration(t)


def format_ps(rows: list[dict[str, Any]]) -> str:
    """The `ps` table, then one line per failed or exited process with its reason."""
    cells = []
    for r in rows:
        line = [_ps_time(r) if key == "time_s" else proc_cell(r, key) for key, _, _ in PS_COLUMNS]
        if r.get("state") == "loading":
            line[2] = f"loading {r.get('progress', 0) * 100:.0f}%"
        cells.append(line)
    out = table(cells, [h for _, h, _ in PS_COLUMNS], [i for i, c in enumerate(PS_COLUMNS) if c[2]])
    notes = [f"{r['pid']}: {r['state']}" + (f" ({r['exit']})" if r.get("exit") else "") + f": {r['reason']}"
             for r in rows if r.get("reason") and r.get("state") in ("failed", "exited", "exiting")]
    return "\n".join([out, *notes])


@command(
    "ps",
    "list model processes",
    arg("-a", "--all", action="store_true", help="also list processes that have exited, with how they ended"),
    description="Columns: PID NAME STATE NI DEVICE RES (resident bytes: weights in memory plus the KV cache it has "
    "allocated, like RSS; the same figure as RES in 'mem', which shows the KV cache alone as KV) REQS "
    "(active+queued) TOK/S TOKENS TIME (compute time) NODE. --json rows also have ctx (the context: positions of KV "
    "cache per request). A failed process is listed with its reason once, then reaped.",
    structured=True,
    group=GROUP,
)
async def ps_cmd(ctx: Context, args: argparse.Namespace) -> int:
    """`ps [-a] [--json]`."""
    services = ctx.kernel.services
    await services.procs.refresh()
    rows = services.table.snapshot(include_exited=args.all)
    text = format_ps(rows)
    maps = services.maps.running.values() if services.maps is not None else ()
    for job in maps:  # a map job is a group of requests of its process: one line each under the table
        p = job.progress()
        eta = f", ETA {p['eta_s']:.0f}s" if p["eta_s"] is not None else ""
        text += (f"\nmap {p['job']} on pid {p['pid']}: {p['done']}/{p['total']} lines, {p['tok_s']:.1f} tok/s{eta}"
                 f"{' (stopped)' if p['state'] == 'stopped' else ''}")
    ctx.result(rows, text)
    for entry in [e for e in services.table if e.state is ProcState.FAILED]:  # shown once, then reaped
        await services.procs.signal(entry, "KILL")
    return 0


# ---- kill -------------------------------------------------------------------------------------------------------------


@command(
    "kill",
    "send a signal to model processes: -TERM (default) -KILL -STOP -CONT",
    arg("-s", "--signal", dest="sig", metavar="SIG", help="signal name or number: TERM KILL STOP CONT 15 9 19 18"),
    arg("-TERM", "-15", dest="sig", action="store_const", const="TERM", help="finish in-flight requests, then unload"),
    arg("-KILL", "-9", dest="sig", action="store_const", const="KILL", help="abort now and free the memory"),
    arg("-STOP", dest="sig", action="store_const", const="STOP", help="pause generation, keeping every KV cache"),
    arg("-CONT", dest="sig", action="store_const", const="CONT", help="resume a stopped process"),
    arg("--grace", type=float, default=DEFAULT_TERM_GRACE, metavar="SECS",
        help=f"TERM: seconds to finish before escalating to KILL (default {DEFAULT_TERM_GRACE:g})"),
    arg("--wait", action="store_true", help="TERM/KILL: wait until the processes are gone and say how they ended"),
    arg("targets", nargs="+", metavar="PID|NAME|%JOB", help="processes (or shell jobs %%N)"),
    description="TERM finishes the requests in flight, refuses new ones, then unloads (escalating to KILL after "
    "--grace seconds); KILL aborts at once (waiting clients get a 'killed' error); STOP/CONT pause and resume "
    "exactly. A failed process is reaped by any signal. %N interrupts a shell job.",
    structured=True,
    completer=complete_procs,
    group=GROUP,
)
async def kill_cmd(ctx: Context, args: argparse.Namespace) -> int:
    """`kill [-TERM|-KILL|-STOP|-CONT|-s SIG|-9|-15] PID…`."""
    services = ctx.kernel.services
    try:
        sig = parse_signal(args.sig or "TERM")
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.grace < 0:
        raise UsageError(f"--grace {args.grace:g}: give seconds ≥ 0")
    errors: list[str] = []
    rows: list[dict[str, Any]] = []
    waited: list[Entry] = []
    procs: list[Entry] = []
    for ref in args.targets:
        if ref.startswith("%"):
            jobs = services.jobs
            try:
                job = jobs.get(ctx.client, ref, "kill")
            except KernelError as e:
                errors.append(str(e))
                continue
            if sig in ("STOP", "CONT") and job.control is not None:  # a map job pauses its dispatch of new lines
                (job.control.pause if sig == "STOP" else job.control.resume)()
                rows.append({"job": job.id, "signal": sig, "delivered": True})
                continue
            if sig in ("STOP", "CONT"):  # a job cannot pause; cancelling it would surprise whoever asked to pause it
                errors.append(f"{sig}: {ref} is a shell job, which cannot be stopped or continued; "
                              f"send -{sig} to its model process (see 'ps'), or 'kill {ref}' to interrupt it")
                continue
            rows.append({"job": job.id, "signal": sig, "delivered": jobs.cancel(job)})
            continue
        try:
            procs.append(services.procs.resolve(ref))
        except KernelError as e:
            errors.append(str(e))
    # the processes get the signal together, as kill(1) delivers it to each PID at once: one engine round trip
    # for all of them rather than one each (`kill -CONT a b` resumes both within the same moment)
    states = await asyncio.gather(*(services.procs.signal(p, sig, grace=args.grace) for p in procs),
                                  return_exceptions=True)
    for proc, state in zip(procs, states):
        if isinstance(state, KernelError):
            errors.append(str(state))
            continue
        if isinstance(state, BaseException):
            raise state
        rows.append({"pid": proc.pid, "name": proc.name, "signal": sig, "state": state})
        waited.append(proc)
    if args.wait and sig in ("TERM", "KILL"):
        for proc in waited:
            await services.procs.wait_gone(proc)
        for row, proc in zip([r for r in rows if "pid" in r], waited):
            row["state"] = "exited"
            row["exit"] = proc.exit_how.value if proc.exit_how else None
        text = "\n".join(f"{r['pid']} ({r['name']}): exited ({r['exit']})" for r in rows if "pid" in r)
        ctx.result(rows, text)
    elif getattr(args, "json", False):
        ctx.result(rows, "")
    if errors:
        raise CommandError(errors[0] if len(errors) == 1 else "; ".join(errors), ename="KillError")
    return 0


# ---- threads / models -------------------------------------------------------------------------------------------------


@command(
    "threads",
    "list the kernel's threads and pools: I/O loop, loader pool, engine per device",
    description="Each thread with its pool, state (from /proc), what it is doing and its CPU time (psutil).",
    structured=True,
    group=GROUP,
)
async def threads_cmd(ctx: Context, args: argparse.Namespace) -> int:
    """`threads`: the front's threads (event loop, journal, heartbeat), then each engine's (devices, loaders…)."""
    front = [dict(r, process=f"front {os.getpid()}") for r in thread_rows({}, loop_thread=threading.current_thread())]
    rows = front + await ctx.kernel.services.procs.threads()
    text = table(
        [[str(r["native_id"]), r["process"], r["name"], r["pool"], r["state"], f"{r['cpu_s']:.2f}", r["task"]] for r in rows],
        ["TID", "PROCESS", "NAME", "POOL", "STATE", "CPU(s)", "TASK"],
        [0, 5],
    )
    ctx.result(rows, text)
    return 0


@command(
    "models",
    "list the models that 'load' can find: configured model dirs, Ollama's store and the Hugging Face cache",
    description="Folders with a config.json and .gguf files under LLMSH_MODEL_PATH (os.pathsep-separated) and "
    "config.toml's model_dirs = [...], the models in Ollama's store (OLLAMA_MODELS, else ~/.ollama/models; load "
    "them as ollama:NAME[:TAG]), then the local Hugging Face hub cache (HF_HOME). Nothing is downloaded.",
    structured=True,
    group=GROUP,
)
async def models_cmd(ctx: Context, args: argparse.Namespace) -> int:
    """`models`."""
    found = await asyncio.to_thread(find_models)
    if not found:
        dirs = ", ".join(str(d) for d in model_dirs()) or "none configured"
        ctx.result([], f"no models found (model dirs: {dirs}; HF cache: {hf_cache_dir()}); "
                       "set LLMSH_MODEL_PATH or model_dirs in config.toml, or 'load PATH'")
        return 0
    text = table(
        [[m["name"], m["arch"] or "-", human_bytes(m["bytes"]), m["source"], m["path"]] for m in found],
        ["NAME", "ARCH", "SIZE", "SOURCE", "PATH"],
        [2],
    )
    ctx.result(found, text)
    return 0

