"""How the shell shows what the kernel sends: streams as they arrive, results as text, errors as one red line.

`sys.stdout`/`sys.stderr` are looked up at each write, so the interactive shell's `patch_stdout` (which swaps them
for proxies that print above the prompt) is honoured.
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

RED, RESET = "\x1b[31m", "\x1b[0m"
PROGRESS_MIME = "application/vnd.llmsh.progress+json"


def _color(stream: TextIO) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Printer:
    """Renders iopub messages of this client session; `color=None` means colour only on a terminal."""

    def __init__(self, color: bool | None = None) -> None:
        self.color = color
        self._progress_shown = False

    def on_output(self, msg: dict[str, Any]) -> None:
        """Show one iopub message: `stream` text as is, `execute_result`/`display_data` as their text/plain."""
        kind, content = msg.get("msg_type"), msg.get("content", {})
        if kind == "stream":
            self._end_progress()
            stream = sys.stderr if content.get("name") == "stderr" else sys.stdout
            stream.write(str(content.get("text", "")))
            stream.flush()
        elif kind in ("execute_result", "display_data", "update_display_data"):
            data = content.get("data", {}) or {}
            if PROGRESS_MIME in data:
                self._progress(data[PROGRESS_MIME])
                return
            text = data.get("text/plain")
            if text:
                self._end_progress()
                sys.stdout.write(text if text.endswith("\n") else text + "\n")
                sys.stdout.flush()
        # `error` is not printed here: the reply carries the same line and is shown once by `error()`

    def _progress(self, p: dict[str, Any]) -> None:
        """A one-line progress bar on stderr, redrawn in place (only on a terminal)."""
        if not _color(sys.stderr):
            return
        frac = max(0.0, min(1.0, float(p.get("fraction", 0.0) or 0.0)))
        width = 30
        bar = "█" * int(frac * width) + "·" * (width - int(frac * width))
        sys.stderr.write(f"\r{p.get('label', '')} {bar} {frac * 100:5.1f}%\x1b[K")
        sys.stderr.flush()
        self._progress_shown = frac < 1.0
        if frac >= 1.0:
            sys.stderr.write("\n")

    def _end_progress(self) -> None:
        if self._progress_shown:
            sys.stderr.write("\n")
            self._progress_shown = False

    def error(self, line: str) -> None:
        """One error line on stderr, red on a terminal."""
        self._end_progress()
        color = _color(sys.stderr) if self.color is None else self.color
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
