"""How the shell shows what the kernel sends: streams as they arrive, results as text, errors as one red line.

On a terminal, control characters in what the kernel sends are shown as `^[`-style text (`sanitize`); into a file
or a pipe the bytes go unchanged. `sys.stdout`/`sys.stderr` are looked up at each write, so the interactive shell's
`patch_stdout` (which swaps them for proxies that print above the prompt) is honoured. `> FILE` redirects are
written here (llmsh/client/redirect.py), and `… | !cmd` sends stdout to that command (`stdout_to`).

Progress (display_data with PROGRESS_MIME, e.g. `load`) is drawn with rich.progress on stderr, only when stderr is a
terminal; rich is imported on the first progress message, never on the fast path of `llmsh -c`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

from llmsh.client.redirect import RedirectFiles
from llmsh.protocol.redirect import REDIRECT_MIME

RED, RESET = "\x1b[31m", "\x1b[0m"
PROGRESS_MIME = "application/vnd.llmsh.progress+json"

# Control characters other than newline and tab, shown as `^[`-style text on a terminal: a model's (or another
# client's) output must not retitle the terminal, move the cursor or rewrite lines with escape sequences.
_CONTROLS = {c: f"^{chr(c + 64)}" for c in range(32) if chr(c) not in "\n\t"}
_CONTROLS.update({0x7F: "^?", **{c: f"<{c:02x}>" for c in range(0x80, 0xA0)}})  # DEL and the C1 set (0x9b is CSI)


def sanitize(text: str) -> str:
    """`text` with terminal control characters made visible (what a terminal is sent; files get the raw text)."""
    return text.translate(_CONTROLS)


def _for(stream: TextIO, text: str) -> str:
    return sanitize(text) if _isatty(stream) else text


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _color(stream: TextIO) -> bool:
    return not os.environ.get("NO_COLOR") and _isatty(stream)


class _Bar:
    """One rich progress bar on stderr, redrawn on each update (no refresh thread), removed when done."""

    def __init__(self, label: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

        console = Console(file=sys.stderr, force_terminal=True, no_color=bool(os.environ.get("NO_COLOR")))
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
            console=console, auto_refresh=False, transient=True, redirect_stdout=False, redirect_stderr=False,
        )
        self.task = self.progress.add_task(label, total=1.0)
        self.progress.start()

    def update(self, fraction: float, label: str) -> None:
        """Show `fraction` (0..1) with `label`."""
        self.progress.update(self.task, completed=fraction, description=label)
        self.progress.refresh()

    def close(self) -> None:
        """Remove the bar from the terminal."""
        self.progress.stop()


class Printer:
    """Renders iopub messages of this client session; `color=None` means colour only on a terminal."""

    def __init__(self, color: bool | None = None) -> None:
        self.color = color
        self._bar: _Bar | None = None
        self.redirects = RedirectFiles(self.error)  # `> FILE` is written here, in the client's directory
        # While the interactive prompt is up (no foreground command), a background job's half lines are held until
        # their newline: printed at once, each would land on the prompt's line and the prompt be redrawn after it.
        self.at_prompt = False
        self._partial: dict[str, str] = {"stdout": "", "stderr": ""}
        self.stdout_to: Callable[[str], None] | None = None  # `… | !cmd`: stdout text goes to that command instead

    def on_output(self, msg: dict[str, Any]) -> None:
        """Show one iopub message: `stream` text as is, `execute_result`/`display_data` as their text/plain."""
        kind, content = msg.get("msg_type"), msg.get("content", {})
        if kind == "stream":
            self._end_progress()
            name = "stderr" if content.get("name") == "stderr" else "stdout"
            if name == "stdout" and self.stdout_to is not None:
                self.stdout_to(str(content.get("text", "")))
                return
            text = self._partial[name] + str(content.get("text", ""))
            if self.at_prompt:
                cut = text.rfind("\n") + 1
                text, self._partial[name] = text[:cut], text[cut:]
            else:
                self._partial[name] = ""
            if text:
                stream = sys.stderr if name == "stderr" else sys.stdout
                stream.write(_for(stream, text))
                stream.flush()
        elif kind in ("execute_result", "display_data", "update_display_data"):
            data = content.get("data", {}) or {}
            if PROGRESS_MIME in data:
                self._progress(data[PROGRESS_MIME])
                return
            if REDIRECT_MIME in data:
                self.redirects.handle(data[REDIRECT_MIME])
                return
            plain = data.get("text/plain")
            if plain and kind == "execute_result" and self.stdout_to is not None:
                self.stdout_to(plain if plain.endswith("\n") else plain + "\n")
                return
            if plain:
                self._end_progress()
                sys.stdout.write(_for(sys.stdout, plain if plain.endswith("\n") else plain + "\n"))
                sys.stdout.flush()
        # `error` is not printed here: the reply carries the same line and is shown once by `error()`

    def _progress(self, p: dict[str, Any]) -> None:
        """Draw or advance the progress bar (only when stderr is a terminal); it goes away at 100 %."""
        if not _isatty(sys.stderr):
            return
        frac = max(0.0, min(1.0, float(p.get("fraction", 0.0) or 0.0)))
        label = str(p.get("label", ""))
        if self._bar is None:
            if frac >= 1.0:
                return
            self._bar = _Bar(label)
        self._bar.update(frac, label)
        if frac >= 1.0:
            self._end_progress()

    def _end_progress(self) -> None:
        if self._bar is not None:
            bar, self._bar = self._bar, None
            bar.close()

    def done(self) -> None:
        """A command finished: take any progress bar it left off the terminal."""
        self._end_progress()

    def prompting(self, up: bool) -> None:
        """The interactive prompt is shown (True) or a foreground command starts (False: held half lines are
        printed first, ended with a newline so the command's output starts on its own line)."""
        self.at_prompt = up
        if not up:
            for name, stream in (("stdout", sys.stdout), ("stderr", sys.stderr)):
                if self._partial[name]:
                    stream.write(_for(stream, self._partial[name] + "\n"))
                    stream.flush()
                    self._partial[name] = ""

    def status(self, code: int) -> int:
        """The exit code of a finished command: 1 instead of 0 when one of its `> FILE` redirects failed here."""
        return 1 if self.redirects.take_failure() and code == 0 else code

    def error(self, line: str) -> None:
        """One error line on stderr, red on a terminal."""
        self._end_progress()
        color = _color(sys.stderr) if self.color is None else self.color
        line = _for(sys.stderr, line)  # the kernel's error lines quote user and model text
        sys.stderr.write(f"{RED}{line}{RESET}\n" if color else f"{line}\n")
        sys.stderr.flush()


def reply_error(reply: dict[str, Any]) -> str:
    """The one-line message of a failed execute_reply (`llmsh: …`)."""
    evalue = str(reply.get("evalue") or "").strip()
    if reply.get("ename") == "KeyboardInterrupt":
        return "llmsh: interrupted"
    if not evalue:
        return f"llmsh: {reply.get('ename') or 'error'}"
    first = evalue.splitlines()[0]
    return first if first.startswith("llmsh:") else f"llmsh: {first}"


def exit_code(reply: dict[str, Any]) -> int:
    """The sh-style exit code of an execute_reply: llmsh_exit_code, else 0 for ok and 1 for error."""
    code = reply.get("llmsh_exit_code")
    if isinstance(code, int):
        return code
    return 0 if reply.get("status") == "ok" else 1
