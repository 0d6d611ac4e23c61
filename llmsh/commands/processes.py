"""Process commands: load, ps, run, chat, kill, nice, renice, threads, models — models as Unix processes.

Handlers are thin: they resolve a PID or name, turn arguments into calls on the kernel's process table, scheduler
and loader (`llmsh.kernel.process.setup` puts them in `kernel.services`), and turn every user-facing failure into one
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
from pathlib import Path
from typing import Any, Sequence

from llmsh.commands.registry import CommandError, Context, UsageError, arg, command
from llmsh.tui.fmt import duration, human_bytes, proc_cell, table

GROUP = "processes"
DEFAULT_TERM_GRACE = 30.0  # seconds TERM waits for in-flight requests before escalating to KILL


# ---- services and lookups -----------------------------------------------------------------------------------------


def _services(ctx: Context) -> tuple[Any, Any, Any]:
    """(procs, scheduler, loader), set up on first use if the kernel did not list the extension."""
    services = ctx.kernel.services
    if "loader" not in services:
        from llmsh.kernel.process import setup

        setup(ctx.kernel)
    return services["procs"], services["scheduler"], services["loader"]


def _resolve(ctx: Context, ref: str) -> Any:
    procs = _services(ctx)[0]
    try:
        return procs.resolve(ref)
    except LookupError as e:
        raise CommandError(str(e), ename="NoSuchProcess") from None


async def _until_loaded(proc: Any) -> None:
    from llmsh.kernel.process import ProcState

    while proc.state is ProcState.LOADING and not proc.gone.is_set():
        await asyncio.sleep(0.05)


def _complete_procs(ctx: Context, words: Sequence[str], prefix: str) -> list[str]:
    procs = ctx.kernel.services.get("procs")
    if procs is None:
        return []
    return [str(p.pid) for p in procs] + [p.name for p in procs]


def _complete_models(ctx: Context, words: Sequence[str], prefix: str) -> list[str]:
    from llmsh.kernel.loader import find_models

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
    arg("--ctx", type=int, metavar="TOKENS", help="KV cache length per request (default: the model's, at most 2048)"),
    arg("--quant", choices=("q8_0", "q4_0", "q4_k"), help="quantize a Hugging Face checkpoint's matrices at load "
        "(GGUF block formats; cached, so the next load is fast)"),
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
    procs, sched, loader = _services(ctx)
    source = args.model
    if hasattr(ctx, "path") and (source.startswith((".", "/", "~")) or os.sep in source):
        local = ctx.path(source)
        if local.exists() or source.startswith((".", "~", "/")):
            source = str(local)
    try:
        proc, fut = loader.start(source, name=args.name, device=args.device, dtype=args.dtype, nice=args.nice,
                                 max_batch=args.max_batch, ctx=args.ctx, quant=args.quant)
    except (ValueError, RuntimeError) as e:
        raise CommandError(str(e)) from None
    waiting = asyncio.wrap_future(fut)
    shown: tuple[int, str] | None = None
    progress = getattr(ctx, "progress", None)  # the shell draws a bar; stderr lines otherwise
    try:
        while not waiting.done():
            await asyncio.wait({waiting}, timeout=0.25)
            now = (int(proc.progress * 100), proc.progress_text)
            if now != shown and proc.progress_text and not waiting.done():
                label = f"load {proc.name} (pid {proc.pid}): {proc.progress_text}"
                if progress is not None:
                    progress(proc.progress, label)
                else:
                    ctx.warn(f"{label} {now[0]}%\n")
                shown = now
        waiting.result()
    except asyncio.CancelledError:  # Ctrl-C on a foreground load aborts it
        if not proc.gone.is_set() and proc.runtime is None:
            sched.kill(proc, reason="load interrupted")
        raise
    from llmsh.kernel.process import ProcState

    if proc.state is ProcState.FAILED:
        raise CommandError(proc.reason, ename="LoadError")
    if proc.gone.is_set():
        raise CommandError(f"{args.model}: process {proc.pid} was killed while loading", ename="Killed")
    ctx.result(proc.row(), f"{proc.pid}")
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

    entry = REGISTRY.get("load")
    load_args = entry.parse(args.cmd[1:])
    if "--nice" in args.cmd:
        raise UsageError("give the priority once: either 'nice -n N load …' or 'load --nice N'")
    load_args.nice = args.adjustment
    return await load_cmd(ctx, load_args)


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
    sched = _services(ctx)[1]
    rows, lines = [], []
    for ref in args.targets:
        proc = _resolve(ctx, ref)
        old = sched.renice(proc, args.priority)
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
    "allocated, like RSS; 'mem' shows the KV bytes in use) REQS (active+queued) TOK/S TOKENS TIME (compute time) "
    "NODE. A failed process is listed with its reason once, then reaped.",
    structured=True,
    group=GROUP,
)
async def ps_cmd(ctx: Context, args: argparse.Namespace) -> int:
    """`ps [-a] [--json]`."""
    procs, sched, _ = _services(ctx)
    rows = procs.snapshot(reap=True, include_exited=args.all)
    ctx.result(rows, format_ps(rows))
    return 0


# ---- run / chat -------------------------------------------------------------------------------------------------------

SAMPLING_ARGS = (
    arg("--max-tokens", type=int, metavar="N", help="tokens to generate at most"),
    arg("--temperature", type=float, metavar="T", help="0 = greedy"),
    arg("--top-p", type=float, metavar="P", help="nucleus sampling mass, 0 < P ≤ 1"),
    arg("--top-k", type=int, metavar="K", help="sample among the K most likely tokens (0 = all)"),
    arg("--seed", type=int, metavar="S", help="random seed of this request"),
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

    entry = REGISTRY.get(name)
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


def _sampling(proc: Any, args: argparse.Namespace) -> Any:
    from llmsh.runtime.sampling import SamplingParams

    overrides = {k: getattr(args, k) for k in _SAMPLING_KEYS if getattr(args, k, None) is not None}
    model = proc.runtime.model
    try:
        params = SamplingParams.from_config(getattr(model, "generation_config", {}) or {}, **overrides)
        params.validate()
    except (ValueError, TypeError) as e:
        raise CommandError(str(e).strip().splitlines()[0], status=2, ename="UsageError") from None
    return params


async def _ready_process(ctx: Context, ref: str) -> Any:
    from llmsh.kernel.process import ProcState

    proc = _resolve(ctx, ref)
    await _until_loaded(proc)
    if proc.state is ProcState.FAILED:
        raise CommandError(f"process {proc.pid} ({proc.name}) failed: {proc.reason}")
    if proc.gone.is_set() or proc.runtime is None:
        raise CommandError(f"process {proc.pid} ({proc.name}) has exited; see 'ps -a'")
    return proc


def _tokenizer(proc: Any) -> Any:
    """The process's tokenizer; a model folder without tokenizer.json loads, but cannot take text."""
    tok = proc.runtime.model.tokenizer
    if tok is None:
        raise CommandError(f"process {proc.pid} ({proc.name}) has no tokenizer.json in {proc.path}, so it cannot take "
                           "text prompts; add the model's tokenizer.json to that folder and load it again")
    return tok


def _encode(proc: Any, prompt: str, params: Any, special: bool = True) -> list[int]:
    """Prompt → ids, checked against the KV cache length; `special=False` for chat templates, which add BOS themselves."""
    ids = list(_tokenizer(proc).encode(prompt, add_special_tokens=special))
    limit = proc.runtime.max_seq_len
    if not ids:
        raise CommandError("the prompt is empty after tokenization; give some text")
    if len(ids) + int(params.max_tokens) > limit:
        raise CommandError(
            f"prompt of {len(ids)} tokens + --max-tokens {params.max_tokens} exceeds the context of {limit} tokens; "
            "shorten the prompt or lower --max-tokens"
        )
    return ids


async def _generate(
    ctx: Context, proc: Any, ids: list[int], params: Any, echo: bool = True, pieces: list[str] | None = None
) -> str:
    """Stream one request's pieces to the client (and into `pieces`); returns the whole text. One line on kill/failure."""
    from llmsh.kernel.process import StateError
    from llmsh.kernel.scheduler import BusyError, RequestError

    from llmsh.kernel.process import ProcState

    sched = _services(ctx)[1]
    pieces = [] if pieces is None else pieces
    if proc.state is ProcState.STOPPED:  # it queues silently otherwise, and the user sees a hung command
        name = getattr(ctx.command, "name", "run")
        ctx.warn(f"llmsh: {name}: process {proc.pid} ({proc.name}) is stopped; the request waits for "
                 f"'kill -CONT {proc.pid}' (Ctrl-C gives up)\n")
    try:
        async with contextlib.aclosing(sched.stream(proc, ids, params, ctx.client)) as stream:
            async for piece in stream:
                pieces.append(piece)
                if echo:
                    ctx.write(piece)
    except BusyError as e:
        raise CommandError(str(e), ename="Busy") from None
    except StateError as e:
        raise CommandError(str(e), ename="StateError") from None
    except RequestError as e:
        if echo and pieces and not pieces[-1].endswith("\n"):
            ctx.write("\n")
        raise CommandError(str(e), ename="Killed" if e.kind == "killed" else "RequestFailed") from None
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
    params = _sampling(proc, args)
    if ctx.stdin is not None:
        piped = "".join([piece async for piece in ctx.stdin])
        prompt = f"{prompt}\n\n{piped}" if prompt and piped else (prompt or piped)
    if not prompt.strip():
        raise UsageError("no prompt: give PROMPT or pipe text into run (a | run b)")
    ids = _encode(proc, prompt, params)
    json_out = bool(getattr(args, "json", False))
    t0 = time.perf_counter()
    text = await _generate(ctx, proc, ids, params, echo=not json_out)
    if json_out:
        ctx.result({"pid": proc.pid, "text": text, "prompt_tokens": len(ids), "seconds": round(time.perf_counter() - t0, 3)}, text)
    elif not text.endswith("\n"):
        ctx.write("\n")
    return 0


MAX_CHATS = 256  # conversations kept in the kernel (oldest forgotten first); a process's go when it exits


def _chats(ctx: Context) -> dict[tuple[str, int], list[dict[str, str]]]:
    """(client session, pid) → messages; created once, with a table listener that forgets an exited process's chats."""
    services = ctx.kernel.services
    chats = services.get("chats")
    if chats is None:
        chats = services["chats"] = {}
        procs = _services(ctx)[0]

        def forget(proc: Any, event: str) -> None:
            if event == "removed":
                for key in [k for k in chats if k[1] == proc.pid]:
                    chats.pop(key, None)

        procs.listeners.append(forget)
    return chats


def _chat_prompt(proc: Any, history: list[dict[str, str]], message: str, params: Any) -> list[int]:
    """Token ids of the conversation + the new message through the chat template; the oldest turns are left out
    (the system message is kept) until it fits the context with room for --max-tokens."""
    tok = _tokenizer(proc)
    system = [m for m in history[:1] if m["role"] == "system"]
    turns = history[len(system):]
    while True:
        convo = [*system, *turns, {"role": "user", "content": message}]
        try:
            prompt = tok.apply_chat_template(convo, add_generation_prompt=True)
        except Exception as e:  # no template, or one that rejects the conversation (roles must alternate…)
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CommandError(f"{proc.name}: {why}") from None
        ids = list(tok.encode(prompt, add_special_tokens=False))  # the template already has BOS (transformers does the same)
        if len(ids) + int(params.max_tokens) <= proc.runtime.max_seq_len or not turns:
            return _encode(proc, prompt, params, special=False)
        turns = turns[2:]  # forget the oldest user/assistant exchange


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
    chats = _chats(ctx)
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
    params = _sampling(proc, args)
    ids = _chat_prompt(proc, history, message, params)
    reply: list[str] = []
    history.append({"role": "user", "content": message})
    try:
        text = await _generate(ctx, proc, ids, params, echo=not getattr(args, "json", False), pieces=reply)
    except asyncio.CancelledError:
        history.append({"role": "assistant", "content": "".join(reply).strip()})  # Ctrl-C ends the turn, not the chat
        raise
    except CommandError:
        history.pop()  # the turn did not happen
        raise
    history.append({"role": "assistant", "content": text.strip()})
    if getattr(args, "json", False):
        ctx.result({"pid": proc.pid, "reply": text, "turns": len(history) // 2}, text)
    elif not text.endswith("\n"):
        ctx.write("\n")
    return 0


# ---- kill -------------------------------------------------------------------------------------------------------------


async def _term_then_kill(procs: Any, sched: Any, proc: Any, grace: float) -> None:
    """TERM's escalation: if the process is still there after `grace` seconds, KILL it and record that."""
    from llmsh.kernel.process import ExitHow

    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and not proc.gone.is_set():
        await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
    if not proc.gone.is_set():
        sched.kill(proc, ExitHow.KILL_AFTER_TERM, f"killed after TERM grace of {grace:g}s")


def _spawn(ctx: Context, coro: Any, name: str) -> None:
    spawn = getattr(ctx.kernel, "spawn", None)
    if spawn is not None:
        spawn(coro, name)
    else:
        tasks = ctx.kernel.services.setdefault("proc_tasks", set())
        t = asyncio.ensure_future(coro)
        tasks.add(t)
        t.add_done_callback(tasks.discard)


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
    from llmsh.kernel.process import ExitHow, ProcState, StateError, parse_signal

    procs, sched, _ = _services(ctx)
    try:
        sig = parse_signal(args.sig or "TERM")
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.grace < 0:
        raise UsageError(f"--grace {args.grace:g}: give seconds ≥ 0")
    errors: list[str] = []
    rows: list[dict[str, Any]] = []
    waited: list[Any] = []
    for ref in args.targets:
        if ref.startswith("%"):
            from llmsh.commands.jobs import job_table

            jobs = job_table(ctx.kernel)
            try:
                job = jobs.get(ctx.client, ref, "kill")
            except CommandError as e:
                errors.append(str(e))
                continue
            if sig in ("STOP", "CONT"):  # a job cannot pause; cancelling it would surprise whoever asked to pause it
                errors.append(f"{sig}: {ref} is a shell job, which cannot be stopped or continued; "
                              f"send -{sig} to its model process (see 'ps'), or 'kill {ref}' to interrupt it")
                continue
            rows.append({"job": job.id, "signal": sig, "delivered": jobs.cancel(job)})
            continue
        try:
            proc = procs.resolve(ref)
        except LookupError as e:
            errors.append(str(e))
            continue
        try:
            if proc.state is ProcState.FAILED:
                procs.remove(proc, ExitHow.REAPED)
            elif sig == "STOP":
                sched.stop(proc)
                while proc.stepping:  # a step already running finishes; after that, not one more token
                    await asyncio.sleep(0.002)
            elif sig == "CONT":
                sched.cont(proc)
            elif sig == "TERM":
                sched.terminate(proc)
                if not proc.gone.is_set():
                    _spawn(ctx, _term_then_kill(procs, sched, proc, args.grace), f"term-grace pid {proc.pid}")
            else:
                sched.kill(proc)
        except StateError as e:
            errors.append(f"{sig}: {e}")
            continue
        rows.append({"pid": proc.pid, "name": proc.name, "signal": sig, "state": proc.state.value})
        waited.append(proc)
    if args.wait and sig in ("TERM", "KILL"):
        for proc in waited:
            while not proc.gone.is_set():
                await asyncio.sleep(0.05)
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


def _thread_comm(native_id: int) -> str:
    """The OS name of a thread started outside Python (ZeroMQ I/O, OpenMP workers…), from /proc (Linux)."""
    try:
        return Path(f"/proc/self/task/{native_id}/comm").read_text().strip() or "(native)"
    except OSError:
        return "(native)"


def _thread_state(native_id: int | None) -> str:
    """R/S/D… from /proc (Linux); '?' elsewhere."""
    if not native_id:
        return "?"
    try:
        stat = Path(f"/proc/self/task/{native_id}/stat").read_text()
        code = stat.rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"
    return {"R": "running", "S": "sleeping", "D": "disk-wait", "Z": "zombie", "T": "stopped", "I": "idle"}.get(code, code)


@command(
    "threads",
    "list the kernel's threads and pools: I/O loop, loader pool, engine per device",
    description="Each thread with its pool, state (from /proc), what it is doing and its CPU time (psutil).",
    structured=True,
    group=GROUP,
)
async def threads_cmd(ctx: Context, args: argparse.Namespace) -> int:
    """`threads`."""
    import psutil

    services = ctx.kernel.services
    cpu = {t.id: t.user_time + t.system_time for t in psutil.Process().threads()}
    known: dict[int, dict[str, Any]] = {}
    for svc in ("scheduler", "loader", "pager"):
        obj = services.get(svc)
        for info in (obj.threads() if obj is not None and hasattr(obj, "threads") else []):
            known[info["thread"].ident or 0] = info
    loop_thread = threading.main_thread()
    try:
        running = asyncio.get_running_loop()
        loop_thread = threading.current_thread()
        ntasks = len(asyncio.all_tasks(running))
    except RuntimeError:
        ntasks = 0
    rows = []
    for t in threading.enumerate():
        info = known.get(t.ident or 0)
        if t is loop_thread:
            pool, task = "io-loop", f"asyncio event loop, {ntasks} tasks"
        elif info is not None:
            pool, task = info["pool"], info["task"]
        elif t.name.startswith("llmsh-"):  # the kernel's other threads: heartbeat, the pager's prefetch…
            pool, task = t.name[len("llmsh-"):].split("-")[0].split("_")[0], ""
        else:
            pool, task = "other", ""
        rows.append({
            "name": t.name, "native_id": t.native_id, "pool": pool, "state": _thread_state(t.native_id),
            "task": task, "cpu_s": round(cpu.get(t.native_id or -1, 0.0), 3), "daemon": t.daemon,
        })
    known_ids = {r["native_id"] for r in rows}
    for tid, secs in cpu.items():  # native threads torch/OpenMP/ZeroMQ started outside Python
        if tid not in known_ids:
            rows.append({"name": _thread_comm(tid), "native_id": tid, "pool": "native", "state": _thread_state(tid),
                         "task": "", "cpu_s": round(secs, 3), "daemon": True})
    text = table(
        [[str(r["native_id"]), r["name"], r["pool"], r["state"], f"{r['cpu_s']:.2f}", r["task"]] for r in rows],
        ["TID", "NAME", "POOL", "STATE", "CPU(s)", "TASK"],
        [0, 4],
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
    from llmsh.kernel.loader import find_models, hf_cache_dir, model_dirs

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

