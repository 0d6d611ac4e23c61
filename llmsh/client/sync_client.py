"""Blocking calls for batch mode (`llmsh -c`, `llmsh FILE`) over the one client implementation, the asyncio
`KernelClient`: each call runs to completion on a private event loop.

Ctrl-C (KeyboardInterrupt) while a command runs sends `interrupt_request` and keeps waiting for the (interrupted)
reply; a second Ctrl-C gives up waiting and re-raises.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from llmsh.client.kernel_client import KernelClient, KernelGone

__all__ = ["SyncKernelClient", "KernelGone"]

T = TypeVar("T")
OutputHandler = Callable[[dict[str, Any]], None]


class SyncKernelClient:
    """One client session with blocking calls: start, execute, complete, interrupt, heartbeat, close."""

    def __init__(self, info: dict[str, Any], *, on_output: OutputHandler | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.client: KernelClient = self._run(self._make(info, on_output))

    @staticmethod
    async def _make(info: dict[str, Any], on_output: OutputHandler | None) -> KernelClient:
        return KernelClient(info, on_output=on_output)  # its sockets belong to this loop

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` to completion on this client's loop (where `self.client`'s sockets live)."""
        return self.loop.run_until_complete(coro)

    _run = run

    @property
    def session(self) -> str:
        return self.client.session

    def start(self, timeout: float = 10.0) -> dict[str, Any]:
        """Wait until the kernel answers on shell and iopub (so no early output is lost)."""
        return self._run(self.client.start(timeout))

    def execute(self, code: str, *, store_history: bool = True, stdin: str | None = None) -> dict[str, Any]:
        """Run `code`, passing output to `on_output` as it arrives; returns the execute_reply content."""
        task = self.loop.create_task(self.client.execute(code, store_history=store_history, stdin=stdin))
        try:
            return self.loop.run_until_complete(task)
        except KeyboardInterrupt:
            self._run(self.client.interrupt())
            return self.loop.run_until_complete(task)

    def complete(self, code: str, cursor_pos: int, timeout: float = 2.0) -> dict[str, Any]:
        """The kernel's completions for `code` at `cursor_pos` (complete_reply content)."""
        return self._run(self.client.complete(code, cursor_pos, timeout))

    def interrupt(self, timeout: float = 2.0) -> None:
        """Cancel this session's foreground command in the kernel (background jobs keep running)."""
        self._run(self.client.interrupt(timeout))

    def heartbeat(self, timeout: float = 1.0) -> bool:
        """True if the kernel echoes a heartbeat ping within `timeout` seconds."""
        return self._run(self.client.heartbeat(timeout))

    def close(self) -> None:
        """Close the sockets and the loop."""
        try:
            self._run(self.client.close())
        finally:
            self.loop.close()
