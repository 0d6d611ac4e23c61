"""Where a pipeline stage's output goes and where its input comes from: the client (`ClientSink`), the next stage
through a `Pipe` (`PipeSink` → `PipeReader`, with sh's SIGPIPE as `BrokenPipe`), or a file the client writes
(`RedirectSink`). The executor (`llmsh.commands.executor`) wires these up per pipeline; a command only sees them
as `ctx.write` and `ctx.stdin`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

from llmsh.commands.registry import CommandError
from llmsh.protocol.redirect import CLOSE, OPEN, WRITE, redirect_bundle


class Output(Protocol):
    """Where a request's output goes; implemented by the kernel per execute_request. Must stay usable after
    `execute` returns, because background jobs keep writing through it."""

    def stream(self, name: str, text: str) -> None:
        """name "stdout"/"stderr" → iopub `stream`."""

    def result(self, data: Any, text: str) -> None:
        """→ iopub `execute_result` with text/plain and application/json."""


class Sink:
    """The stdout of one pipeline stage: the client, the next stage's stdin, or a file."""

    def write(self, text: str) -> None:
        raise NotImplementedError

    def result(self, data: Any, text: str) -> None:
        if text:
            self.write(text if text.endswith("\n") else text + "\n")

    def close(self) -> None:
        """Called once when the stage ends (also on error and cancellation)."""


class ClientSink(Sink):
    """The client's stdout (the request's iopub stream and results)."""

    def __init__(self, out: Output) -> None:
        self.out = out

    def write(self, text: str) -> None:
        if text:
            self.out.stream("stdout", text)

    def result(self, data: Any, text: str) -> None:
        self.out.result(data, text)


class Pipe:
    """The connection between two stages: a queue of text pieces (None ends it) and whether the reader has left."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.reader_gone = False


class BrokenPipe(CommandError):
    """Raised by `ctx.write` when the next stage of the pipe has finished: the writer stops quietly (sh's SIGPIPE)."""

    def __init__(self) -> None:
        super().__init__("broken pipe", status=141, ename="BrokenPipe")


class PipeSink(Sink):
    """The left side of a pipe: text goes to the queue the next stage reads."""

    def __init__(self, pipe: Pipe) -> None:
        self.pipe = pipe

    def write(self, text: str) -> None:
        if self.pipe.reader_gone:
            raise BrokenPipe()
        if text:
            self.pipe.queue.put_nowait(text)

    def result(self, data: Any, text: str) -> None:
        if not self.pipe.reader_gone:  # a structured result at the very end is not worth an error
            super().result(data, text)

    def close(self) -> None:
        self.pipe.queue.put_nowait(None)  # end of stream for the reader


class RedirectSink(Sink):
    """`> FILE`: the text goes to the client, which writes the file in its own directory (llmsh/protocol/redirect.py);
    the kernel opens no file, so a FIFO without a reader or a slow disk never stalls its loop."""

    def __init__(self, out: Output, path: str, append: bool) -> None:
        display = getattr(out, "display", None)
        if display is None:
            raise CommandError("output redirection needs a client that writes files (the llmsh shell)")
        self.display = display
        self.path, self.append = path, append
        self.rid = uuid.uuid4().hex
        self._send(OPEN)

    def _send(self, op: str, text: str = "") -> None:
        self.display(redirect_bundle(self.rid, self.path, self.append, op, text))

    def write(self, text: str) -> None:
        if text:
            self._send(WRITE, text)

    def close(self) -> None:
        self._send(CLOSE)


class PipeReader:
    """`ctx.stdin` of a pipe's right-hand stage: an async iterator of text pieces, ending when the left stage ends."""

    def __init__(self, pipe: Pipe) -> None:
        self._pipe = pipe
        self._done = False

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        if self._done:
            raise StopAsyncIteration
        item = await self._pipe.queue.get()
        if item is None:
            self._done = True
            raise StopAsyncIteration
        return item

    async def read(self) -> str:
        """All remaining text, once the left stage has finished."""
        return "".join([piece async for piece in self])

    def close(self) -> None:
        """The reading stage ended: the writer's next `ctx.write` raises BrokenPipe."""
        self._done = True
        self._pipe.reader_gone = True
