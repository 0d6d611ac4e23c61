"""Process commands: load, ps, run, chat, kill, nice, renice, threads, models — models as Unix processes.

Handlers are thin: they resolve a PID or name, turn arguments into calls on the kernel's process table, scheduler
and loader (`llmsh.engine.process.setup` puts them in `kernel.services`), and turn every user-facing failure into one
`CommandError` line. Torch is never imported here; the kernel's loader imports it on the first `load`.

`chat` over the kernel protocol: the kernel never asks its clients for input (no stdin channel), so a conversation is
kept in the kernel per client session and process, and each `chat PID MESSAGE` is one turn (the reply streams back).
The interactive shell keeps one session, so its turns form one conversation; each `llmsh -c` is a new session.
`chat PID --reset` starts over, `--show` prints the conversation; it is forgotten when the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmsh.commands.registry import CommandError, Context, UsageError, arg, command
from llmsh.commands.values import seed_value
from llmsh.fmt import duration, human_bytes, proc_cell, table
from llmsh.kernel.errors import KernelError
from llmsh.kernel.front import MAX_CHATS
from llmsh.kernel.table import Entry
from llmsh.models import find_models, hf_cache_dir, model_dirs
from llmsh.procinfo import thread_rows
from llmsh.protocol.procs import ProcState, parse_signal

GROUP = "processes"
DEFAULT_TERM_GRACE = 30.0  # seconds TERM waits for in-flight requests before escalating to KILL


# ---- services and lookups -----------------------------------------------------------------------------------------


def _resolve(ctx: Context, ref: str) -> Entry:
    return ctx.kernel.services.procs.resolve(ref)


def _complete_procs(ctx: Context, words: Sequence[str], prefix: str) -> list[str]:
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
    arg("--max-batch", type=int, metavar="N", help="requests decoded together (KV cache slots), default 16"),
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
    completer=_complete_procs,
    group=GROUP,
)
async def renice_cmd(ctx: Context, args: argparse.Namespace) -> int:
    """`renice N PID…`."""
    _check_nice(args.priority)
    rows, lines = [], []
    for ref in args.targets:
        proc = _resolve(ctx, ref)
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


# ---- run / chat -------------------------------------------------------------------------------------------------------

SAMPLING_ARGS = (
    arg("--max-tokens", type=int, metavar="N", help="tokens to generate at most"),
    arg("--temperature", type=float, metavar="T", help="0 = greedy"),
    arg("--top-p", type=float, metavar="P", help="nucleus sampling mass, 0 < P ≤ 1"),
    arg("--top-k", type=int, metavar="K", help="sample among the K most likely tokens (0 = all)"),
    arg("--seed", type=seed_value, metavar="S", help="random seed of this request"),
    arg("--stop", action="append", metavar="TEXT", help="stop when this text appears (repeatable)"),
    arg("--repetition-penalty", type=float, metavar="R", help="> 1 discourages repeats"),
    arg("--ignore-eos", action="store_true", default=None, help="keep going past end-of-sequence (benchmarks)"),
)
_SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "repetition_penalty", "ignore_eos")


def _intermixed(name: str, args: argparse.Namespace) -> tuple[str, str]:
    """Options may follow the prompt (`run 3 hello --seed 1`): re-parse the remainder; returns (target, prompt).

    argparse cannot mix a PID positional, a free-form prompt and options in one pass, so the spec takes everything
    after the first positional as `words` and this second pass (`parse_intermixed_args`) sorts it out; `--` ends the
    options, for prompts that start with '-'.
    """
    from llmsh.commands.registry import REGISTRY, ArgumentParser

    entry = REGISTRY.require(name)
    p = ArgumentParser(prog=name, add_help=False)
    for a in entry.args:
        if a.flags[0].startswith("-"):
            p.add_argument(*a.flags, **{**a.options, "default": argparse.SUPPRESS})
    if entry.structured:
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    p.add_argument("words", nargs="*", metavar="PID|NAME PROMPT")  # shown in the usage of a bad option
    ns = p.parse_intermixed_args(args.words)
    for key, value in vars(ns).items():
        if key == "stop":
            value = [*(args.stop or []), *value]
        setattr(args, key, value)
    if not args.words:
        raise UsageError(f"which process? {name} PID|NAME [options] {'PROMPT' if name == 'run' else 'MESSAGE'}; see 'help {name}'")
    return args.words[0], " ".join(args.words[1:])


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling options given on the command line (the engine adds the model's generation_config defaults)."""
    return {k: getattr(args, k) for k in _SAMPLING_KEYS if getattr(args, k, None) is not None}


async def _ready_process(ctx: Context, ref: str) -> Entry:
    proc = _resolve(ctx, ref)
    await ctx.kernel.services.procs.ensure_loaded(proc)
    return proc


async def _generate(ctx: Context, proc: Entry, params: dict[str, Any], *, prompt: str | None = None,
                    messages: list[dict[str, str]] | None = None, echo: bool = True,
                    pieces: list[str] | None = None, result: dict[str, Any] | None = None) -> str:
    """Stream one request's pieces to the client (and into `pieces`); returns the whole text. One line on kill/failure."""
    pieces = [] if pieces is None else pieces
    result = {} if result is None else result
    if proc.state is ProcState.STOPPED:  # it queues silently otherwise, and the user sees a hung command
        name = "chat" if messages is not None else "run"
        ctx.warn(f"llmsh: {name}: process {proc.pid} ({proc.name}) is stopped; the request waits for "
                 f"'kill -CONT {proc.pid}' (Ctrl-C gives up)\n")
    stream = ctx.kernel.services.procs.generate(proc, prompt=prompt, messages=messages, params=params,
                                                client=ctx.client, result=result)
    try:
        async with contextlib.aclosing(stream) as pieces_in:
            async for piece in pieces_in:
                pieces.append(piece)
                if echo:
                    ctx.write(piece)
    except KernelError:
        if echo and pieces and not pieces[-1].endswith("\n"):
            ctx.write("\n")
        raise
    return "".join(pieces)


@command(
    "run",
    "generate from a prompt on a model process, streaming the tokens",
    *SAMPLING_ARGS,
    arg("words", nargs=argparse.REMAINDER, metavar="PID|NAME PROMPT", help="the process, then the prompt; piped text (a | run b) is appended"),
    description="run PID|NAME [options] PROMPT — options may also follow the prompt; '--' ends them. "
    "Streams the text as it is generated. With a pipe, the left side's output becomes (the end of) the "
    "prompt: run a \"write a question\" | run b. Sampling defaults come from the model's generation_config.",
    structured=True,
    completer=_complete_procs,
    group=GROUP,
)
async def run_cmd(ctx: Context, args: argparse.Namespace) -> int:
    """`run PID|NAME [sampling options] PROMPT`."""
    target, prompt = _intermixed("run", args)
    proc = await _ready_process(ctx, target)
    params = _sampling(args)
    if ctx.stdin is not None:
        piped = "".join([piece async for piece in ctx.stdin])
        prompt = f"{prompt}\n\n{piped}" if prompt and piped else (prompt or piped)
    if not prompt.strip():
        raise UsageError("no prompt: give PROMPT or pipe text into run (a | run b)")
    json_out = bool(getattr(args, "json", False))
    t0 = time.perf_counter()
    result: dict[str, Any] = {}
    text = await _generate(ctx, proc, params, prompt=prompt, echo=not json_out, result=result)
    if json_out:
        ctx.result({"pid": proc.pid, "text": text, "prompt_tokens": result.get("prompt_tokens"),
                    "seconds": round(time.perf_counter() - t0, 3)}, text)
    elif not text.endswith("\n"):
        ctx.write("\n")
    return 0


@command(
    "chat",
    "one turn of a multi-turn conversation with a model process (kept per shell session)",
    arg("--system", metavar="TEXT", help="set the system message (starts a new conversation)"),
    arg("--reset", action="store_true", help="forget this session's conversation with the process"),
    arg("--show", action="store_true", help="print the conversation so far"),
    *SAMPLING_ARGS,
    arg("words", nargs=argparse.REMAINDER, metavar="PID|NAME MESSAGE", help="the process, then your message; piped text is appended"),
    description="chat PID|NAME [options] MESSAGE. Each 'chat PID MESSAGE' is one turn: the message joins this shell session's conversation with the "
    "process, is formatted with the model's chat template, and the reply streams back. Ctrl-C ends the turn (the "
    "partial reply is kept), not the conversation.",
    structured=True,
    completer=_complete_procs,
    group=GROUP,
)
async def chat_cmd(ctx: Context, args: argparse.Namespace) -> int:
    """`chat PID|NAME [--system T] [--reset] [--show] MESSAGE…`."""
    target, message = _intermixed("chat", args)
    proc = await _ready_process(ctx, target)
    key = (ctx.client, proc.pid)
    chats = ctx.kernel.services.chats
    if args.reset or args.system is not None:
        chats.pop(key, None)
    if key not in chats and len(chats) >= MAX_CHATS:
        chats.pop(next(iter(chats)))  # the oldest conversation
    history = chats.setdefault(key, [])
    if args.system is not None:
        history.append({"role": "system", "content": args.system})
    if ctx.stdin is not None:
        piped = "".join([piece async for piece in ctx.stdin])
        message = f"{message}\n\n{piped}" if message and piped else (message or piped)
    if args.show or not message.strip():
        if not message.strip() and not (args.show or args.reset or args.system is not None):
            raise UsageError("no message: chat PID MESSAGE (or --show, --reset)")
        ctx.result(list(history), "\n".join(f"{m['role']}: {m['content']}" for m in history))
        return 0
    params = _sampling(args)
    reply: list[str] = []
    history.append({"role": "user", "content": message})
    try:
        text = await _generate(ctx, proc, params, messages=list(history), echo=not getattr(args, "json", False),
                               pieces=reply)
    except asyncio.CancelledError:
        history.append({"role": "assistant", "content": "".join(reply).strip()})  # Ctrl-C ends the turn, not the chat
        raise
    except (CommandError, KernelError):
        history.pop()  # the turn did not happen
        raise
    history.append({"role": "assistant", "content": text.strip()})
    if getattr(args, "json", False):
        ctx.result({"pid": proc.pid, "reply": text, "turns": len(history) // 2}, text)
    elif not text.endswith("\n"):
        ctx.write("\n")
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
    completer=_complete_procs,
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
            proc = services.procs.resolve(ref)
            state = await services.procs.signal(proc, sig, grace=args.grace)
        except KernelError as e:
            errors.append(str(e))
            continue
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

