"""The front's own errors: one human line, an `ename` and a shell status; the command layer prints them as they are."""

from __future__ import annotations


class KernelError(Exception):
    """A request the front refuses or could not finish."""

    ename = "KernelError"
    status = 1

    def __init__(self, line: str, *, ename: str | None = None, status: int | None = None) -> None:
        super().__init__(line)
        if ename is not None:
            self.ename = ename
        if status is not None:
            self.status = status
