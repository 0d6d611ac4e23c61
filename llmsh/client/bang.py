"""`!CMD`: system commands run by the client, as in IPython and ptpython, also on either side of a pipe.

`!ls -l` runs `ls -l` with /bin/sh here, in the client's directory, on its terminal. In a pipeline, leading `!`
stages run first and their output becomes the stdin of the kernel part (`!cat notes.txt | run g`), and trailing
`!` stages read what the kernel part prints as it streams (`run g "list ten colours" | !sort`). A line with `!`
runs statement by statement on the client, each kernel part as its own request, keeping `;`, `&&`, `||`; `&`
(a background job) with `!` and a `!` stage between two kernel stages are refused with one line.
"""

from __future__ import annotations

import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from llmsh.commands.parser import ParseError, Pipeline, SimpleCommand, parse

SHELL = "/bin/sh"


class BangError(ValueError):
    """A line whose `!` stages cannot be run; the message is one line."""


@dataclass
class Part:
    """One pipeline: system commands before the kernel part, the kernel part, system commands after it."""

    before: str | None
    kernel: str | None
    after: str | None


@dataclass
class Plan:
    """Statements of and-or lists: [(op, part)] with op "" for the first, "&&" or "||"."""

    statements: list[list[tuple[str, Part]]]


def _is_bang(cmd: SimpleCommand) -> bool:
    return cmd.name.startswith("!")


def _text(code: str, cmds: list[SimpleCommand], bang: bool) -> str:
    """The source of consecutive stages joined by pipes; for `!` stages without the `!` (sh runs them)."""
    texts = [code[c.start : c.end] for c in cmds]
    if bang:
        texts = [t[t.index("!") + 1 :] for t in texts]
    return " | ".join(texts)


def _part(code: str, pipe: Pipeline) -> Part:
    cmds = pipe.commands
    flags = [_is_bang(c) for c in cmds]
    lead = next((i for i, f in enumerate(flags) if not f), len(cmds))
    tail = len(cmds) - next((i for i, f in enumerate(reversed(flags)) if not f), len(cmds))
    if any(flags[lead:tail]):
        raise BangError("a '!' command can only start or end a pipeline, not sit between two llmsh commands")
    if lead == len(cmds):  # only system commands: one sh pipeline
        return Part(_text(code, cmds, True), None, None)
    return Part(
        _text(code, cmds[:lead], True) if lead else None,
        _text(code, cmds[lead:tail], False),
        _text(code, cmds[tail:], True) if tail < len(cmds) else None,
    )


def plan(code: str) -> Plan | None:
    """The plan of a line that has `!` commands, else None (the kernel runs the line as it is).
    Raises BangError for a line the client cannot run."""
    try:
        script = parse(code)
    except ParseError:
        return None  # the kernel reports the syntax error
    if not any(_is_bang(c) for s in script.statements for p in s.body.pipelines() for c in p.commands):
        return None
    out = []
    for stmt in script.statements:
        if stmt.background:
            raise BangError("a line with '!' commands cannot run in the background ('&'); run it in the foreground")
        body = stmt.body
        out.append([("", _part(code, body.first)), *((op, _part(code, p)) for op, p in body.rest)])
    return Plan(out)


# Runs one kernel part: (code, stdin text or None, where its stdout goes or None for the terminal) → exit code
KernelRun = Callable[[str, "str | None", "Callable[[str], None] | None"], Awaitable[int]]


async def run_plan(p: Plan, run_kernel: KernelRun) -> int:
    """Run the plan; returns the exit code of the last pipeline that ran."""
    status = 0
    for stmt in p.statements:
        for op, part in stmt:
            if op and (op == "&&") != (status == 0):
                continue
            status = await _run_part(part, run_kernel)
    return status


async def _run_part(part: Part, run_kernel: KernelRun) -> int:
    if part.kernel is None:  # `!cmd` alone: on the terminal
        return subprocess.run([SHELL, "-c", part.before or ""]).returncode
    stdin = None
    if part.before is not None:
        done = subprocess.run([SHELL, "-c", part.before], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        stdin = done.stdout.decode("utf-8", errors="replace")
    if part.after is None:
        return await run_kernel(part.kernel, stdin, None)
    reader = subprocess.Popen([SHELL, "-c", part.after], stdin=subprocess.PIPE)
    pipe = reader.stdin
    assert pipe is not None

    def feed(text: str) -> None:
        try:
            pipe.write(text.encode("utf-8"))
            pipe.flush()
        except (BrokenPipeError, ValueError):  # `| !head -1` left early: the rest is dropped, as sh's SIGPIPE
            pass

    try:
        await run_kernel(part.kernel, stdin, feed)
    finally:
        try:
            pipe.close()
        except BrokenPipeError:
            pass
        code = reader.wait()
    return code
