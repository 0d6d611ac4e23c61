"""Generation commands: `run` (one prompt, streamed) and `chat` (one turn of a conversation), with the sampling
options they share (`mapreduce` uses them too). Kept apart from the process commands because these stream a
request's text to the client, while those manage the processes themselves.

`chat` over the kernel protocol: the kernel never asks its clients for input (no stdin channel), so a conversation is
kept in the kernel per client session and process, and each `chat PID MESSAGE` is one turn (the reply streams back).
The interactive shell keeps one session, so its turns form one conversation; each `llmsh -c` is a new session.
`chat PID --reset` starts over, `--show` prints the conversation; it is forgotten when the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import time
from typing import Any

from llmsh.commands.processes import GROUP, complete_procs, resolve
from llmsh.commands.registry import CommandError, Context, UsageError, arg, command
from llmsh.commands.values import seed_value
from llmsh.kernel.errors import KernelError
from llmsh.kernel.front import MAX_CHATS
from llmsh.kernel.table import Entry
from llmsh.protocol.procs import ProcState

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


@functools.cache
def _intermixed_parser(name: str) -> argparse.ArgumentParser:
    """The second-pass parser of `name`: its options (defaults suppressed, so only given ones are set) and `words`.
    Built once per command: the registry does not change after import."""
    from llmsh.commands.registry import REGISTRY, ArgumentParser

    entry = REGISTRY.require(name)
    p = ArgumentParser(prog=name, add_help=False)
    for a in entry.args:
        if a.flags[0].startswith("-"):
            p.add_argument(*a.flags, **{**a.options, "default": argparse.SUPPRESS})
    if entry.structured:
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    p.add_argument("words", nargs="*", metavar="PID|NAME PROMPT")  # shown in the usage of a bad option
    return p


def intermixed(name: str, args: argparse.Namespace) -> tuple[str, str]:
    """Options may follow the prompt (`run 3 hello --seed 1`): re-parse the remainder; returns (target, prompt).

    argparse cannot mix a PID positional, a free-form prompt and options in one pass, so the spec takes everything
    after the first positional as `words` and this second pass (`parse_intermixed_args`) sorts it out; `--` ends the
    options, for prompts that start with '-'.
    """
    ns = _intermixed_parser(name).parse_intermixed_args(args.words)
    for key, value in vars(ns).items():
        if key == "stop":
            value = [*(args.stop or []), *value]
        setattr(args, key, value)
    if not args.words:
        raise UsageError(f"which process? {name} PID|NAME [options] {'PROMPT' if name == 'run' else 'MESSAGE'}; see 'help {name}'")
    return args.words[0], " ".join(args.words[1:])


def sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling options given on the command line (the engine adds the model's generation_config defaults)."""
    return {k: getattr(args, k) for k in _SAMPLING_KEYS if getattr(args, k, None) is not None}


async def _ready_process(ctx: Context, ref: str) -> Entry:
    proc = resolve(ctx, ref)
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
    completer=complete_procs,
    group=GROUP,
)
async def run_cmd(ctx: Context, args: argparse.Namespace) -> int:
    """`run PID|NAME [sampling options] PROMPT`."""
    target, prompt = intermixed("run", args)
    proc = await _ready_process(ctx, target)
    params = sampling(args)
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
    completer=complete_procs,
    group=GROUP,
)
async def chat_cmd(ctx: Context, args: argparse.Namespace) -> int:
    """`chat PID|NAME [--system T] [--reset] [--show] MESSAGE…`."""
    target, message = intermixed("chat", args)
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
    params = sampling(args)
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
