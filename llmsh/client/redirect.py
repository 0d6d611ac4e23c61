"""The client's half of `> FILE` / `>> FILE`: open the file here, in this process's working directory, and write
what the kernel sends for it (see llmsh/protocol/redirect.py).

One open file per redirect id; every piece is flushed at once, so a full disk (`/dev/full`) or a closed FIFO shows
as an error of the command that wrote it, in one line: `llmsh: PATH: No space left on device`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import IO, Any

from llmsh.protocol.redirect import CLOSE, OPEN, WRITE


class RedirectFiles:
    """The files that `> FILE` redirects of this client have open; `report(line)` shows an error line."""

    def __init__(self, report: Callable[[str], None]) -> None:
        self.report = report
        self.failed = False  # set on an error; the caller turns it into a failing status and clears it
        self._open: dict[str, IO[str]] = {}
        self._broken: set[str] = set()  # ids whose file failed: later pieces are dropped without another line

    def handle(self, payload: dict[str, Any]) -> None:
        """Apply one redirect event (open / write / close)."""
        rid, path, op = str(payload.get("id", "")), str(payload.get("path", "")), payload.get("op")
        if rid in self._broken:
            if op == CLOSE:
                self._broken.discard(rid)
            return
        try:
            if op == OPEN:
                self._open[rid] = open(os.path.expanduser(path), "a" if payload.get("append") else "w", encoding="utf-8")
            elif op == WRITE and rid in self._open:
                fh = self._open[rid]
                fh.write(str(payload.get("text", "")))
                fh.flush()
            elif op == CLOSE and rid in self._open:
                self._open.pop(rid).close()
        except OSError as e:
            self._fail(rid, path, e)

    def _fail(self, rid: str, path: str, e: OSError) -> None:
        fh = self._open.pop(rid, None)
        if fh is not None:
            try:
                fh.close()
            except OSError:
                pass  # the same error again (a full disk refuses the buffered rest too)
        self._broken.add(rid)
        self.failed = True
        self.report(f"llmsh: {path}: {e.strerror or e}")

    def take_failure(self) -> bool:
        """True once after a redirect failed (the command's status becomes 1)."""
        failed, self.failed = self.failed, False
        return failed

    def close(self) -> None:
        """Close every file still open (the client is leaving)."""
        for rid in list(self._open):
            try:
                self._open.pop(rid).close()
            except OSError:
                pass
