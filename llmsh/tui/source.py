"""Where the dashboard's data comes from: a live kernel over llmsh's own client, found, watched and re-found.

`KernelSource.events()` is an endless async stream of `Event`s: `no-kernel` while none answers, `connected`, then
`telemetry` payloads, `disconnected` when the kernel stops answering (its heartbeat-checked connection file is looked
up again every `retry_s`, so a restarted kernel — new ports, new key — is picked up by itself). `execute()` sends one
command line (`kill -STOP 3`) as an execute_request and returns the kernel's verdict. The app only sees this small
interface, so tests can hand it a scripted source instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from llmsh.client.kernel_client import KernelClient, KernelGone
from llmsh.protocol.connection import ConnectionFileError, read_connection_file
from llmsh.tui.model import MIME


@dataclass
class Event:
    """One thing that happened to the connection: kind ∈ no-kernel, connected, telemetry, disconnected."""

    kind: str
    data: Any = None
    text: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


class Source(Protocol):
    """What the dashboard needs from a kernel connection."""

    def events(self) -> AsyncIterator[Event]:
        """Connection events and telemetry payloads, forever."""

    async def execute(self, code: str) -> tuple[bool, str]:
        """Run one command line; (ok, message) with the kernel's one-line error when not ok."""

    async def close(self) -> None:
        """Stop the channels."""


def find_connection(connection_file: str | None) -> Path | None:
    """A live kernel's connection file (the given one, or the newest running), or None."""
    try:
        from llmsh.kernel.lifecycle import find_kernel
    except ImportError:  # lifecycle not available: accept an existing file, heartbeat is checked on connect
        from llmsh.paths import runtime_dir

        if connection_file:
            p = Path(connection_file)
            return p if p.exists() else None
        files = sorted(runtime_dir().glob("*.json"), key=lambda p: p.stat().st_mtime)
        return files[-1] if files else None
    return find_kernel(connection_file)


class KernelSource:
    """A connection to the llmsh kernel (llmsh's own `KernelClient`) that survives the kernel going away and coming
    back."""

    def __init__(self, connection_file: str | None = None, *, retry_s: float = 1.0, answer_s: float = 2.0) -> None:
        self.connection_file = connection_file
        self.retry_s = retry_s
        self.answer_s = answer_s  # how long a kernel may take to answer kernel_info before it counts as gone
        self.client: KernelClient | None = None
        self.path: Path | None = None
        self._broadcast: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def _connect(self, path: Path) -> tuple[KernelClient, dict[str, Any]] | None:
        """Open the kernel's sockets at `path` and check it answers; None if it does not."""
        try:
            info = read_connection_file(path)
            client = KernelClient(info, on_broadcast=self._broadcast.put_nowait)
        except (OSError, ValueError, KeyError, ConnectionFileError):
            return None
        try:
            return client, await client.start(self.answer_s)
        except (KernelGone, OSError):
            await client.close()
            return None

    async def events(self) -> AsyncIterator[Event]:
        """Find, connect, stream telemetry, notice silence, reconnect — forever (cancel to stop)."""
        was_connected = False
        try:
            while True:
                path = await asyncio.to_thread(find_connection, self.connection_file)
                got = await self._connect(path) if path is not None else None
                if got is None:
                    kind = "disconnected" if was_connected else "no-kernel"
                    yield Event(kind, text=str(self.connection_file or ""))
                    await asyncio.sleep(self.retry_s)
                    continue
                self.client, info = got
                self.path = path
                was_connected = True
                yield Event("connected", data=info, text=str(path))
                async for ev in self._watch(self.client):
                    yield ev
                await self.close()
                yield Event("disconnected", text=str(path))
        finally:
            await self.close()

    async def _watch(self, client: KernelClient) -> AsyncIterator[Event]:
        """Telemetry from iopub until the kernel stops answering."""
        silence = self.answer_s
        while True:
            try:
                msg = await asyncio.wait_for(self._broadcast.get(), silence)
            except TimeoutError:
                # quiet iopub: telemetry may be off, or the kernel may be gone — ask it
                try:
                    await client.kernel_info(self.answer_s)
                except KernelGone:
                    return
                continue
            if msg.get("msg_type") != "display_data":
                continue
            data = (msg.get("content") or {}).get("data") or {}
            if MIME in data:
                payload = data[MIME]
                if isinstance(payload, dict) and isinstance(payload.get("interval_s"), (int, float)):
                    silence = max(1.0, 3 * float(payload["interval_s"]))
                yield Event("telemetry", data=payload)

    async def execute(self, code: str) -> tuple[bool, str]:
        """Send `code` as an execute_request; (ok, error line)."""
        client = self.client
        if client is None:
            return False, "not connected to a kernel"
        try:
            content = await asyncio.wait_for(client.execute(code, store_history=False), 10.0)
        except (TimeoutError, KernelGone):
            return False, f"no answer from the kernel to {code!r}"
        if content.get("status") == "ok":
            return True, ""
        return False, str(content.get("evalue") or content.get("ename") or "failed")

    async def close(self) -> None:
        """Close the current connection."""
        client, self.client = self.client, None
        if client is not None:
            try:
                await client.close()
            except Exception:  # closing a half-dead connection must not raise into the UI
                pass
