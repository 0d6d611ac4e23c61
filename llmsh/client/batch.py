"""Batch mode: run a script (`llmsh FILE`, `llmsh -c 'CMDS'`, or commands on stdin) through the kernel.

A script is cut into complete pieces with the parser's `is_complete` (a piece spans several lines when a quote,
a trailing `\\`, `&&`, `||` or `|` continues it) and each piece is one execute_request. Inside a piece the usual
shell rules apply (`a; b` runs b even if a fails); across pieces the script stops at the first failing one,
printing `llmsh: FILE:LINE: …`, unless --keep-going. The exit code is the last command's (with --keep-going, like `make -k`, that of the
last failing line if any failed), 130 after Ctrl-C.
Commands on stdin run as their lines arrive, so `producer | llmsh` works like a pipe into sh.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from llmsh.client.bang import BangError, Plan, plan, run_plan
from llmsh.client.render import Printer, exit_code, reply_error
from llmsh.client.sync_client import KernelGone, SyncKernelClient
from llmsh.commands.parser import ParseError, is_complete, parse, simple_argv


class Piece(NamedTuple):
    """A complete piece of a script and the line it starts on."""

    line: int
    code: str


def iter_pieces(lines: Iterable[str]) -> Iterator[Piece]:
    """Complete pieces from lines as they come (stdin is read as it arrives); blank and comment lines are dropped."""
    buf: list[str] = []
    start = 1
    for number, line in enumerate(lines, 1):
        if not buf:
            start = number
        buf.append(line.rstrip("\r\n"))
        code = "\n".join(buf)
        if is_complete(code)[0] == "incomplete":
            continue
        buf = []
        if not _is_empty(code):
            yield Piece(start, code)
    if buf:  # the script ends inside a quote or after `&&`: the kernel reports it as a syntax error
        yield Piece(start, "\n".join(buf))


def pieces(text: str) -> list[Piece]:
    """Cut a whole script into complete pieces."""
    return list(iter_pieces(text.splitlines()))


def _is_empty(code: str) -> bool:
    try:
        return not parse(code).statements
    except ParseError:
        return False


def exit_request(code: str) -> int | None | bool:
    """For a piece that is exactly `exit [N]` (or `quit`): N, or True for "the last status"; otherwise None."""
    words = simple_argv(code)
    if not words or words[0] not in ("exit", "quit"):
        return None
    argv = words[1:]
    if not argv:
        return True
    if len(argv) == 1 and argv[0].lstrip("-").isdigit():
        return int(argv[0]) & 0xFF
    return None  # a bad argument: let the kernel's `exit` report the usage error


def located(name: str, line: int, message: str) -> str:
    """`llmsh: FILE:LINE: what went wrong` from a reply's `llmsh: what went wrong`."""
    rest = message[len("llmsh: ") :] if message.startswith("llmsh: ") else message
    return f"llmsh: {name}:{line}: {rest}"


def _run_bang(client: SyncKernelClient, printer: Printer, bang: Plan) -> int:
    """Run a line with `!` commands: system commands here, each kernel part as one request."""

    async def run_kernel(code: str, stdin: str | None, to: Callable[[str], None] | None) -> int:
        printer.stdout_to = to
        try:
            reply = await client.client.execute(code, stdin=stdin)
        finally:
            printer.stdout_to = None
            printer.done()
        if reply.get("status") != "ok" and reply.get("ename") != "Exit":
            printer.error(reply_error(reply))
        return printer.status(exit_code(reply))

    return client.run(run_plan(bang, run_kernel))  # on the client's own loop, where its sockets live


def run_batch(info: dict, name: str, source: str | Iterable[str], *, keep_going: bool = False) -> int:
    """Run a script (text, or lines as they arrive) called `name` in messages against the kernel `info`; returns the exit code."""
    printer = Printer()
    client = SyncKernelClient(info, on_output=printer.on_output)
    status = 0
    failed = 0  # with --keep-going, the status of the last failing line: a script with errors never exits 0
    try:
        client.start()
        todo: Iterable[Piece] = pieces(source) if isinstance(source, str) else iter_pieces(source)
        single = isinstance(todo, list) and name == "-c" and len(todo) == 1
        for piece in todo:
            code = exit_request(piece.code)
            if code is not None:
                return status if code is True else int(code)
            try:
                bang = plan(piece.code)
            except BangError as e:
                printer.error(f"llmsh: {e}" if single else located(name, piece.line, f"llmsh: {e}"))
                bang, status = None, 2
                if not keep_going:
                    return status
                failed = status
                continue
            if bang is not None:  # `!cmd` on this side: the client runs the line (llmsh/client/bang.py)
                status = _run_bang(client, printer, bang)
                if status and (status == 130 or not keep_going):
                    return status
                failed = status or failed
                continue
            try:
                reply = client.execute(piece.code)
            finally:
                printer.done()  # a progress bar (load) leaves the terminal with its command
            status = printer.status(exit_code(reply))
            if reply.get("ename") == "Exit":  # `… && exit N` ran in the kernel: leave with N, no message
                return status
            if reply.get("status") != "ok":
                message = reply_error(reply)
                printer.error(message if single else located(name, piece.line, message))
                status = status or 1
            if status:  # an error reply, or a `> FILE` that failed here (its line is already shown)
                if status == 130 or not keep_going:
                    return status
                failed = status
        return status or failed
    except KernelGone as e:
        printer.error(f"llmsh: {e}")
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        printer.redirects.close()
        client.close()
