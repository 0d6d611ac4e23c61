"""The interactive shell: one prompt-toolkit PromptSession with file history, kernel-side completion and
multi-line input, printing the kernel's streamed output as it arrives (also while the prompt is waiting, for
background jobs) thanks to `patch_stdout` + `prompt_async`.

Keys: Enter runs the line if the parser says it is complete, else starts a new line; Tab asks the kernel for
completions; Ctrl-C at the prompt clears it, while a command runs it sends `interrupt_request` (the foreground
command stops, jobs keep running); Ctrl-D (or `exit`) leaves. `chat PID|NAME` without a message opens a chat
sub-prompt (`llmsh/client/chat.py`).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncGenerator, Callable, Iterable
from pathlib import Path
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory
from prompt_toolkit.key_binding import KeyBindings
from prompt_toolkit.patch_stdout import patch_stdout

from llmsh import __version__, paths
from llmsh.client.bang import BangError, plan, run_plan
from llmsh.client.batch import exit_request
from llmsh.client.chat import chat_loop, chat_request
from llmsh.client.kernel_client import KernelClient, KernelGone
from llmsh.client.render import Printer, exit_code, reply_error
from llmsh.commands.parser import is_complete


class KernelCompleter(Completer):
    """Completes the word at the cursor by asking the kernel (complete_request)."""

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterable[Completion]:
        return []  # completion needs the kernel, which is asynchronous: see get_completions_async

    async def get_completions_async(self, document: Document, complete_event: CompleteEvent) -> AsyncGenerator[Completion, None]:
        try:
            if self.conn.lost:  # no completion from a kernel that is gone; the next command reconnects
                return
            reply = await self.conn.client.complete(document.text, document.cursor_position, timeout=2.0)
        except KernelGone:
            return
        start = int(reply.get("cursor_start", document.cursor_position))
        matches = [str(m) for m in reply.get("matches", [])]
        for match in matches:
            # A single complete word gets a trailing space, as in bash, so the next argument can follow at once;
            # a folder (ends with /) stays open for the rest of its path.
            text = match + " " if len(matches) == 1 and not match.endswith("/") else match
            yield Completion(text, start_position=start - document.cursor_position, display=match)


def _bindings() -> KeyBindings:
    kb = KeyBindings()

    @kb.add("enter")
    def _(event: Any) -> None:
        buf = event.current_buffer
        if is_complete(buf.text)[0] == "incomplete":
            buf.insert_text("\n")
        else:
            buf.validate_and_handle()

    return kb


def _chat_bindings() -> KeyBindings:
    kb = KeyBindings()

    @kb.add("c-c")
    def _(event: Any) -> None:  # Ctrl-C clears a typed line; at an empty chat prompt it leaves the chat
        buf = event.current_buffer
        if buf.text:
            buf.reset()
        else:
            event.app.exit(exception=KeyboardInterrupt(), style="class:aborting")

    return kb


def history_file() -> Path:
    """The shell's history, in the state dir (0600: it holds every prompt typed)."""
    return paths.private_file(paths.state_dir() / "history")


class _Exit(Exception):
    """`exit N` ran inside a longer line in the kernel: leave the shell with N."""

    def __init__(self, code: int) -> None:
        self.code = code


async def _settle_output() -> None:
    """Let patch_stdout's writer thread print what the command wrote before the next prompt is drawn (else the
    prompt shows, is erased and redrawn below the last output: a flicker, and a partial line glued to it)."""
    for stream in (sys.stdout, sys.stderr):
        pending = getattr(stream, "_flush_queue", None)  # prompt_toolkit's StdoutProxy
        if pending is None:
            continue
        stream.flush()
        for _ in range(100):  # at most ~0.5 s
            if pending.empty():
                break
            await asyncio.sleep(0.005)
    await asyncio.sleep(0.01)  # the thread took the last piece: give it time to write it


async def _run_line(client: KernelClient, printer: Printer, code: str, stdin: str | None = None) -> int:
    """Execute one line in the foreground; Ctrl-C meanwhile interrupts it."""
    loop = asyncio.get_running_loop()
    interrupted = False

    def on_sigint() -> None:
        nonlocal interrupted
        interrupted = True
        asyncio.ensure_future(client.interrupt())

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    printer.prompting(False)
    try:
        reply = await client.execute(code, stdin=stdin)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        printer.done()
        await _settle_output()
        printer.prompting(True)
    if reply.get("ename") == "Exit":
        raise _Exit(exit_code(reply))
    if reply.get("status") != "ok":
        if interrupted:
            print()  # the terminal echoed ^C without a newline
        printer.error(reply_error(reply))
    return printer.status(exit_code(reply))


class _Connection:
    """The shell's kernel client; when the kernel goes away, the next command reconnects (starting one if needed)."""

    def __init__(self, info: dict[str, Any], printer: Printer,
                 reconnect: Callable[[], dict[str, Any] | None] | None) -> None:
        self.printer = printer
        self.reconnect = reconnect
        self.client = KernelClient(info, on_output=printer.on_output)
        self.lost = False

    async def lose(self, why: object) -> None:
        """Say what happened once; the next command reconnects."""
        self.printer.error(f"llmsh: the kernel went away ({why}); the next command reconnects, starting a kernel if needed")
        self.lost = True
        await self.client.close()

    async def ready(self) -> KernelClient:
        if self.lost:
            info = await asyncio.to_thread(self.reconnect) if self.reconnect is not None else None
            if info is None:
                raise KernelGone("no kernel to reconnect to")
            self.client = KernelClient(info, on_output=self.printer.on_output)
            await self.client.start()
            self.lost = False
        return self.client


async def run_repl(info: dict[str, Any], reconnect: Callable[[], dict[str, Any] | None] | None = None) -> int:
    """The interactive loop; returns the exit code (the last command's, or `exit N`)."""
    printer = Printer()
    conn = _Connection(info, printer, reconnect)
    client = conn.client
    status = 0
    try:
        await client.start()
        session: PromptSession[str] = PromptSession(
            history=FileHistory(str(history_file())),
            completer=KernelCompleter(conn),
            complete_while_typing=False,
            key_bindings=_bindings(),
            multiline=True,
            prompt_continuation=lambda width, line, wrap: "> ".rjust(width),
        )
        chat_session: PromptSession[str] = PromptSession(
            history=FileHistory(str(paths.private_file(history_file().with_name("chat_history")))), key_bindings=_chat_bindings()
        )

        async def run(code: str) -> int:
            try:
                return await _run_line(await conn.ready(), printer, code)
            except KernelGone as e:
                await conn.lose(e)
                return 1

        async def run_routed(code: str, stdin: str | None, to: Callable[[str], None] | None) -> int:
            printer.stdout_to = to  # `… | !cmd`: the kernel part's output goes to that command
            try:
                return await _run_line(client, printer, code, stdin)
            finally:
                printer.stdout_to = None

        with patch_stdout(raw=True):
            print(f"llmsh {__version__} — kernel pid {info.get('pid', '?')}. 'help' lists the commands; Ctrl-D leaves.")
            printer.prompting(True)  # from here on, output not of a foreground command comes in whole lines
            while True:
                try:
                    text = await session.prompt_async("llmsh> " if status == 0 else f"llmsh [{status}]> ")
                except KeyboardInterrupt:
                    continue
                except EOFError:
                    break
                if not text.strip():
                    continue
                code = exit_request(text)
                if code is not None:
                    return status if code is True else int(code)
                try:
                    bang = plan(text)
                except BangError as e:
                    printer.error(f"llmsh: {e}")
                    status = 2
                    continue
                if bang is not None:  # `!cmd`: run here, each kernel part as its own request
                    status = await run_plan(bang, run_routed)
                    continue
                spec = chat_request(text)
                if spec is not None:
                    status = await chat_loop(spec, chat_session.prompt_async, run, print)
                    continue
                status = await run(text)
    except _Exit as e:
        return e.code
    except KernelGone as e:
        printer.error(f"llmsh: {e}")
        return 1
    finally:
        await conn.client.close()
    return status
