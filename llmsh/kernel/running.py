"""The commands running for clients (one per execute_request), with one owner.

The execute path adds and removes them; an interrupt_request, a client's disconnect, SIGINT and shutdown cancel them
through here, so the cause of a cancel is recorded on the command (its reply says "interrupted") and counted.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from llmsh.kernel.counters import Counters

log = logging.getLogger("llmsh.kernel")


@dataclass
class Foreground:
    """A running execute_request: its executor task and who asked for it."""

    task: asyncio.Future
    session: str
    fd: int
    msg_id: str
    cause: str | None = None  # set when we cancel it on purpose ("interrupt", "disconnect")


class Running:
    """The running commands by msg_id, and the client sessions that ever executed something."""

    def __init__(self, counters: Counters) -> None:
        self._counters = counters
        self._by_id: dict[str, Foreground] = {}
        self._executed_sessions: set[str] = set()

    def __len__(self) -> int:
        return len(self._by_id)

    def executed(self, session: str) -> None:
        """Remember that `session` sent an execute_request (its interrupts then target only its own commands)."""
        self._executed_sessions.add(session)

    def start(self, task: asyncio.Future, session: str, fd: int, msg_id: str) -> Foreground:
        """Track `task`, the executor's run of one execute_request."""
        fg = Foreground(task, session, fd, msg_id)
        self._by_id[msg_id] = fg
        return fg

    def finish(self, fg: Foreground) -> None:
        """Stop tracking a command that ended (however it ended)."""
        self._by_id.pop(fg.msg_id, None)

    def cancel(self, fg: Foreground, cause: str) -> None:
        """Cancel one command on purpose, once, recording and counting why."""
        if fg.cause is None and not fg.task.done():
            fg.cause = cause
            fg.task.cancel()
            self._counters.cancel(cause)
            log.info("cancelled %s (%s)", fg.msg_id, cause)

    def interrupt(self, session: str) -> None:
        """An interrupt_request from `session`: stop its commands."""
        targets = [fg for fg in self._by_id.values() if fg.session == session]
        if not targets and session not in self._executed_sessions:
            # A session that never executed anything (jupyter_client's KernelManager.interrupt_kernel uses its own)
            # means "interrupt the kernel": stop every foreground command, as SIGINT would.
            targets = list(self._by_id.values())
        for fg in targets:
            self.cancel(fg, "interrupt")

    def interrupt_all(self) -> None:
        """SIGINT: interrupt every running command."""
        for fg in list(self._by_id.values()):
            self.cancel(fg, "interrupt")

    def disconnected(self, fd: int) -> None:
        """The shell connection on `fd` closed: cancel the commands that arrived on it."""
        for fg in list(self._by_id.values()):
            if fg.fd == fd:
                self.cancel(fg, "disconnect")

    def cancel_all(self) -> None:
        """Shutdown: cancel everything without a cause, so the commands' tasks end with the kernel."""
        for fg in list(self._by_id.values()):
            fg.task.cancel()
