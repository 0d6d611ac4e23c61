"""The executor: runs a parsed command line in the kernel with Unix-shell semantics (contract B).

The kernel calls `execute` once per execute_request, as an asyncio task; an interrupt cancels that task, so every
wait in here is an `await` and cancellation is passed on to the running stages. Exit codes follow sh: the last
pipeline's status is the statement's, `&&`/`||` short-circuit on it, 0 ok, 1 error, 2 usage, 127 not found, 130
interrupted. A failing command's one-line message goes to stderr as soon as the next command starts; the last
failure of the line becomes the reply's `evalue` instead, so the client shows every error exactly once.

Pipes (the plumbing is `llmsh.commands.streams`): each stage of `a | b` runs as its own task; what `a` writes with
`ctx.write` is put on an asyncio queue that `b` reads as `ctx.stdin`, piece by piece; when `b` has finished, `a`'s
next write stops it (sh's SIGPIPE). A stage's `> FILE` replaces its stdout: the text goes to the client, which opens
and writes the file (the kernel does no file I/O for redirects). Background jobs (`cmd &`) run as tasks tracked in
`kernel.services.jobs` (see jobs.py) and keep writing through the Output of the request that started them. `exit N`
stops the rest of the line (reply ename "Exit", so the client leaves with N). Relative paths (`ctx.path`) resolve
against the client's working directory, which the shell sends in the execute_request's metadata as `cwd` (`> FILE` is
opened by the client).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmsh.commands import load_all
from llmsh.commands.core import ExitRequested
from llmsh.commands.parser import AndOr, ParseError, Pipeline, SimpleCommand, Statement, is_complete, parse, tokenize
from llmsh.commands.registry import REGISTRY, Command, CommandError, HelpRequested, UsageError
from llmsh.commands.streams import BrokenPipe, ClientSink, Output, Pipe, PipeReader, PipeSink, RedirectSink, Sink
from llmsh.kernel.errors import KernelError

__all__ = ["ExecResult", "Output", "ShellContext", "execute", "complete", "is_complete"]

log = logging.getLogger("llmsh.commands")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_INTERRUPTED = 0, 1, 2, 127, 130
PROGRESS_MIME = "application/vnd.llmsh.progress+json"  # drawn as a bar by llmsh/client/render.py
PARSE_IN_THREAD = 64 << 10  # lines at least this long are parsed off the kernel's event loop


@dataclass
class ExecResult:
    """The outcome of one execute: status "ok"|"error", sh-style exit code, and for errors a name and ONE line."""

    status: str
    exit_code: int
    ename: str = ""
    evalue: str = ""


@dataclass
class _Failure:
    """A failed command's exit code, error name and one-line message (`llmsh: cmd: …`)."""

    code: int
    ename: str
    message: str


# ---- the context a handler sees ----------------------------------------------------------------------------------


class ShellContext:
    """The `registry.Context` implementation: what one running command can see and do."""

    def __init__(
        self,
        kernel: Any,
        client: str,
        out: Output,
        *,
        sink: Sink | None = None,
        stdin: AsyncIterator[str] | None = None,
        cwd: str | None = None,
        command: Command | None = None,
        json_output: bool = False,
        args: Any = None,
    ) -> None:
        self.kernel = kernel
        self.client = client
        self.out = out
        self.stdin = stdin
        self.cwd = cwd or os.getcwd()
        self.command = command
        self._json = json_output
        self._args = args  # the parsed arguments: a handler may still add `--json` that followed a prompt
        self._sink = sink or ClientSink(out)

    @property
    def json(self) -> bool:
        """True when the command was given `--json`, wherever on its line (`run g hi --json`)."""
        return self._json or bool(getattr(self._args, "json", False))

    def write(self, text: str) -> None:
        """Stream text to stdout (or into the next pipe stage / the redirect file). No newline is added."""
        self._sink.write(text)

    def warn(self, text: str) -> None:
        """Stream text to the client's stderr."""
        if text:
            self.out.stream("stderr", text)

    def result(self, data: Any, text: str) -> None:
        """Structured output: shows `text`, or the JSON of `data` when the command was given `--json`."""
        if self.json:
            text = json.dumps(data, indent=2, default=str)
        self._sink.result(data, text)

    def progress(self, fraction: float, label: str = "") -> None:
        """Report progress of a long wait (0..1); the shell draws a bar on its terminal. Not part of stdout.

        Sent as display_data with PROGRESS_MIME when the kernel's Output has `display(bundle)`, else as a stderr line
        (callers should report only when the shown percentage changes)."""
        fraction = max(0.0, min(1.0, float(fraction)))
        display = getattr(self.out, "display", None)
        if display is not None:
            plain = f"{label} {fraction * 100:.0f}%".strip()
            display({PROGRESS_MIME: {"fraction": fraction, "label": label}, "text/plain": plain})
        else:
            self.warn(f"{label} {fraction * 100:3.0f}%\n".lstrip())

    def path(self, name: str) -> Path:
        """A user-given path resolved against the client's working directory (`~` expanded)."""
        p = Path(os.path.expanduser(name))
        return p if p.is_absolute() else Path(self.cwd) / p


# ---- running the AST ------------------------------------------------------------------------------------------------


def _one_line(message: str) -> str:
    """argparse puts the usage on a second line; the shell shows one line: `what is wrong; usage: …`."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    return "; ".join(lines) if lines else "failed"


class _Runner:
    """Runs statements for one request (or one background job) and remembers the last failure."""

    def __init__(self, kernel: Any, client: str, out: Output, cwd: str | None, *, job: bool = False) -> None:
        self.kernel = kernel
        self.client = client
        self.out = out
        self.cwd = cwd
        self.job = job  # a background job: `exit` does nothing there
        self.pending: _Failure | None = None  # the latest failure, shown on stderr unless it ends the line
        self.stdin_text: str | None = None  # text the client sent for the first command to read (`!cmd | …`)

    def flush(self) -> None:
        """Print the held failure message: a later command ran, so it is not the line's final result."""
        if self.pending is not None:
            self.out.stream("stderr", self.pending.message + "\n")
            self.pending = None

    async def statement(self, stmt: Statement) -> int:
        if stmt.background:
            self.flush()
            job = self.kernel.services.jobs.start(self.kernel, self.client, stmt.text, self._job_body(stmt.body), self.out)
            self.out.stream("stderr", f"[{job.id}] {stmt.text}\n")
            return EXIT_OK
        return await self.and_or(stmt.body)

    async def _job_body(self, body: AndOr) -> int:
        runner = _Runner(self.kernel, self.client, self.out, self.cwd, job=True)
        try:
            return await runner.and_or(body)
        finally:
            runner.flush()

    async def and_or(self, node: AndOr) -> int:
        code = await self.pipeline(node.first)
        for op, pipe in node.rest:
            if (op == "&&") == (code == 0):
                code = await self.pipeline(pipe)
        return code

    def _client_stdin(self) -> PipeReader | None:
        """The client's text as the stdin of the first command that runs (once), as if piped in."""
        if self.stdin_text is None:
            return None
        pipe = Pipe()
        pipe.queue.put_nowait(self.stdin_text)
        pipe.queue.put_nowait(None)
        self.stdin_text = None
        return PipeReader(pipe)

    async def pipeline(self, pipe: Pipeline) -> int:
        self.flush()
        first_stdin = self._client_stdin()
        if len(pipe.commands) == 1:
            failure_code, failure = await self.command(pipe.commands[0], None, first_stdin)
            self.pending = failure
            return failure_code
        pipes = [Pipe() for _ in pipe.commands[:-1]]
        tasks = []
        for i, cmd in enumerate(pipe.commands):
            stdin = PipeReader(pipes[i - 1]) if i > 0 else first_stdin
            sink = PipeSink(pipes[i]) if i < len(pipes) else None
            tasks.append(asyncio.ensure_future(self.command(cmd, sink, stdin)))
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        for _, failure in results[:-1]:  # failures of earlier stages are never the line's final result
            if failure is not None:
                self.out.stream("stderr", failure.message + "\n")
        code, self.pending = results[-1]
        return code

    async def command(
        self, cmd: SimpleCommand, sink: Sink | None, stdin: AsyncIterator[str] | None
    ) -> tuple[int, _Failure | None]:
        """Run one simple command; returns its exit code and, if it failed, the failure.

        Raises only CancelledError, and ExitRequested for a foreground `exit` (not in a pipe or job)."""
        sink_is_client = sink is None
        if sink is None:
            sink = ClientSink(self.out)
        name = cmd.name
        try:
            if cmd.redirect is not None:
                sink.close()  # a redirect replaces the pipe: the next stage sees end of input
                sink = RedirectSink(self.out, cmd.redirect.path, cmd.redirect.append)
            entry = REGISTRY.get(name)
            if entry is None:
                err = REGISTRY.not_found(name)
                return err.status, _Failure(err.status, err.ename, f"llmsh: {err}")
            try:
                args = entry.parse(cmd.argv[1:])
            except HelpRequested:
                sink.write(entry.help_text() + "\n")
                return EXIT_OK, None
            ctx = ShellContext(
                self.kernel,
                self.client,
                self.out,
                sink=sink,
                stdin=stdin,
                cwd=self.cwd,
                command=entry,
                args=args,
            )
            try:
                code = await entry.handler(ctx, args)
            except ExitRequested as e:
                if sink_is_client and stdin is None and not self.job:
                    raise
                code = e.code  # in a pipe or a job `exit` only sets the status, as in a sh subshell
                if not code:
                    return EXIT_OK, None
                return code, _Failure(code, "Exit", f"llmsh: exit {code}")
            code = EXIT_OK if code is None else int(code)
            if code:
                return code, _Failure(code, "ExitStatus", f"llmsh: {name}: exit status {code}")
            return EXIT_OK, None
        except BrokenPipe as e:  # the next stage has finished: stop quietly, as sh's SIGPIPE does
            return e.status, None
        except UsageError as e:
            return e.status, _Failure(e.status, e.ename, f"llmsh: {name}: {_one_line(str(e))}")
        except (CommandError, KernelError) as e:  # the kernel's own errors are already one human line
            return e.status, _Failure(e.status, e.ename, f"llmsh: {name}: {_one_line(str(e))}")
        except (asyncio.CancelledError, ExitRequested):
            raise
        except Exception as e:  # a bug in a handler must never take the kernel down
            log.exception("command %r failed with an unexpected exception", cmd.argv)
            detail = _one_line(f"{type(e).__name__}: {e}")
            msg = f"llmsh: {name}: internal error: {detail} (details in the kernel log)"
            return EXIT_ERROR, _Failure(EXIT_ERROR, "InternalError", msg)
        finally:
            sink.close()
            if isinstance(stdin, PipeReader):
                stdin.close()  # the left stage may still be writing: its next write stops it


async def execute(kernel: Any, code: str, *, client: str, out: Output, cwd: str | None = None) -> ExecResult:
    """Run one command line (any number of statements) for `client`; output goes to `out`. Cancellation propagates."""
    load_all()
    try:  # a long line is parsed in a thread: other clients' requests go on meanwhile
        script = parse(code) if len(code) < PARSE_IN_THREAD else await asyncio.to_thread(parse, code)
    except ParseError as e:
        return ExecResult("error", EXIT_USAGE, "SyntaxError", f"llmsh: {e}")
    runner = _Runner(kernel, client, out, cwd or _client_cwd(out))
    runner.stdin_text = _client_metadata(out, "llmsh_stdin", str)
    status = EXIT_OK
    try:
        for stmt in script.statements:
            status = await runner.statement(stmt)
    except asyncio.CancelledError:
        runner.flush()
        raise
    except ExitRequested as e:  # the rest of the line is skipped; the client leaves with this code
        runner.flush()
        if e.code == 0:
            return ExecResult("ok", EXIT_OK)
        return ExecResult("error", e.code, "Exit", f"llmsh: exit {e.code}")
    if status == EXIT_OK:
        runner.flush()
        return ExecResult("ok", EXIT_OK)
    failure = runner.pending or _Failure(status, "ExitStatus", f"llmsh: exit status {status}")
    return ExecResult("error", status, failure.ename, failure.message)


def _client_metadata(out: Output, key: str, kind: type) -> Any:
    """A field of the execute_request's metadata (the request the Output answers: its `parent`), if of `kind`."""
    parent = getattr(out, "parent", None)
    meta = parent.get("metadata") if isinstance(parent, dict) else None
    value = meta.get(key) if isinstance(meta, dict) else None
    return value if isinstance(value, kind) else None


def _client_cwd(out: Output) -> str | None:
    """The shell client sends its working directory in the execute_request's metadata (`cwd`); when the kernel
    does not pass it to `execute`, take it from the request the Output answers."""
    cwd = _client_metadata(out, "cwd", str)
    return cwd if cwd and os.path.isabs(cwd) and os.path.isdir(cwd) else None


# ---- completion -----------------------------------------------------------------------------------------------------

_COMMAND_POSITION_OPS = {";", "&", "\n", "&&", "||", "|"}


def complete(kernel: Any, code: str, cursor_pos: int, *, client: str = "", cwd: str | None = None) -> tuple[list[str], int, int]:
    """Completions for the word before `cursor_pos`: command names, flags, or the command's own completer."""
    load_all()
    before = code[:cursor_pos]
    try:
        tokens = tokenize(before, partial=True)
    except ParseError:
        return [], cursor_pos, cursor_pos
    at_word = bool(tokens) and tokens[-1].kind == "word" and tokens[-1].end == len(before)
    if at_word:
        prefix, start = tokens[-1].value, tokens[-1].start
        tokens = tokens[:-1]
    else:
        prefix, start = "", cursor_pos
    # the words of the simple command the cursor is in
    words: list[str] = []
    for tok in reversed(tokens):
        if tok.kind == "op" and tok.value in _COMMAND_POSITION_OPS:
            break
        words.insert(0, tok.value)
    if tokens and tokens[-1].kind == "op" and tokens[-1].value in (">", ">>"):
        return [shlex.quote(m) for m in _complete_path(prefix, cwd)], start, cursor_pos
    if not words:
        names = [n for n in REGISTRY.names() if n.startswith(prefix)]
        return names, start, cursor_pos
    entry = REGISTRY.get(words[0])
    if entry is None:
        return [], start, cursor_pos
    if prefix.startswith("-"):
        return sorted(f for f in entry.flags() if f.startswith(prefix)), start, cursor_pos
    if entry.completer is None:
        return [], start, cursor_pos
    ctx = ShellContext(kernel, client, _NullOutput(), cwd=cwd, command=entry)
    try:
        matches = entry.completer(ctx, words[1:], prefix)
    except Exception:
        log.exception("completer of %r failed", entry.name)
        return [], start, cursor_pos
    return [shlex.quote(m) for m in matches if m.startswith(prefix)], start, cursor_pos  # 'my model' stays one word


def _complete_path(prefix: str, cwd: str | None) -> list[str]:
    head, tail = prefix[: len(prefix) - len(prefix.rpartition("/")[2])], prefix.rpartition("/")[2]
    folder = Path(os.path.expanduser(head or "."))
    if not folder.is_absolute():
        folder = Path(cwd or os.getcwd()) / folder
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    return [
        head + n + ("/" if (folder / n).is_dir() else "")
        for n in names
        if n.startswith(tail) and (tail.startswith(".") or not n.startswith("."))
    ]


class _NullOutput:
    def stream(self, name: str, text: str) -> None:
        pass

    def result(self, data: Any, text: str) -> None:
        pass


def help_text(word: str) -> str | None:
    """The help of command `word` (Jupyter's inspect_request), or None if there is no such command."""
    load_all()
    cmd = REGISTRY.get(word)
    return cmd.help_text() if cmd is not None else None
