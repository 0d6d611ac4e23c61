"""The Kernel object in this process, on real sockets, with an executor that misbehaves on purpose: the kernel
survives any exception from a handler, publishes from other threads, and runs its start/shutdown hooks."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from jupyter_client.asynchronous import AsyncKernelClient

from llmsh.kernel.server import Kernel, default_args

EVENTS: list[str] = []


def setup(kernel: Kernel) -> None:
    """Start and shutdown hooks, as an embedding program would add them."""
    kernel.on_start.append(lambda k: EVENTS.append("start"))

    async def bye(k: Kernel) -> None:
        EVENTS.append("shutdown")

    kernel.on_shutdown.append(bye)


class MisbehavingExecutor:
    """Contract B's functions, where some inputs raise."""

    async def execute(self, kernel: Kernel, code: str, *, client: str, out: Any, cwd: str | None = None) -> Any:
        if code == "crash":
            raise RuntimeError("boom\nwith a second line")
        if code == "thread":
            await asyncio.to_thread(out.stream, "stdout", "from a thread\n")
            return SimpleNamespace(status="ok", exit_code=0, ename="", evalue="")
        out.stream("stdout", code + "\n")
        return SimpleNamespace(status="ok", exit_code=0, ename="", evalue="")

    def complete(self, kernel: Kernel, code: str, cursor_pos: int, **kw: Any) -> tuple[list[str], int, int]:
        raise KeyError("completion broke")

    def is_complete(self, code: str) -> tuple[str, str]:
        return "complete", ""


class _Kernel(Kernel):
    def _load_executor(self) -> None:
        self._executor = MisbehavingExecutor()


async def _collect(kc: AsyncKernelClient, msg_id: str) -> list[dict[str, Any]]:
    got = []
    while True:
        msg = await kc.get_iopub_msg(timeout=10)
        if msg["parent_header"].get("msg_id") == msg_id:
            got.append(msg)
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                return got


async def test_kernel_survives_handler_exceptions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    EVENTS.clear()
    cf = tmp_path / "kernel-inproc.json"
    kernel = _Kernel(default_args(telemetry_hz=0), cf)
    setup(kernel)
    serving = asyncio.create_task(kernel.serve())
    for _ in range(500):
        if cf.exists():
            break
        await asyncio.sleep(0.01)
    kc = AsyncKernelClient(connection_file=str(cf))
    kc.load_connection_file()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=10)
        assert EVENTS == ["start"] and kernel.services is not None  # services built once, hooks run at start

        reply = await kc.execute("crash", reply=True, timeout=10)
        c = reply["content"]
        assert c["status"] == "error" and c["ename"] == "RuntimeError" and c["llmsh_exit_code"] == 1
        assert c["evalue"] == "llmsh: internal error: boom with a second line"

        reply = await kc.complete("x", reply=True, timeout=10)
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyError"

        msg_id = kc.execute("thread")
        msgs = await _collect(kc, msg_id)
        assert {"name": "stdout", "text": "from a thread\n"} in [m["content"] for m in msgs if m["msg_type"] == "stream"]
        assert threading.active_count() >= 2  # the heartbeat thread

        reply = await kc.execute("still serving", reply=True, timeout=10)
        assert reply["content"]["status"] == "ok"
        assert kernel.history[-1] == "still serving"
        await kc.shutdown(reply=True, timeout=10)
    finally:
        kc.stop_channels()
    await asyncio.wait_for(serving, timeout=20)
    assert EVENTS == ["start", "shutdown"]
    assert not cf.exists()
