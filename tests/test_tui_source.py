"""The dashboard's live source on llmsh's own client: it connects to a real kernel, streams its telemetry, runs a
command, and notices when the kernel goes away."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from llmsh.tui.source import KernelSource


async def test_kernel_source_streams_telemetry_and_runs_commands(make_kernel: Callable[..., Any]) -> None:
    k = make_kernel("--telemetry-hz", "5")
    source = KernelSource(str(k.connection_file), retry_s=0.2, answer_s=2.0)
    events = source.events()
    try:
        first = await asyncio.wait_for(events.__anext__(), 30)
        assert first.kind == "connected" and first.data["implementation"] == "llmsh"
        tele = await asyncio.wait_for(events.__anext__(), 30)
        assert tele.kind == "telemetry" and tele.data["schema"].startswith("llmsh.telemetry/")
        assert await source.execute("echo hi") == (True, "")
        ok, line = await source.execute("kill 99")
        assert not ok and "no process with PID 99" in line
        k.stop()
        kinds = []
        while "disconnected" not in kinds:
            kinds.append((await asyncio.wait_for(events.__anext__(), 30)).kind)
    finally:
        await events.aclose()
