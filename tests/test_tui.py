"""`llmsh top` driven with `App.run_test()` and `Pilot`: against real kernels (a real process stopped with `s`, renice,
TERM with confirmation, no kernel, kernel killed and restarted) and against scripted telemetry (selection, sorting,
filter, panels, unknown payloads)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from llmsh.tui.app import TopApp
from llmsh.tui.source import Event, KernelSource
from llmsh.tui.tables import MessageLog, ProcessTable
from llmsh.tui.widgets import Confirm, CpuBars, NoKernel, StatusLine
from tests.test_tui_snapshots import PROCS, ScriptedSource, live_events, payloads, settle

pytestmark = pytest.mark.slow


async def until(pilot: Any, cond: Callable[[], Any], timeout: float = 20.0, what: str = "") -> None:
    """Let the app run until `cond()` is true."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await pilot.pause(0.1)


def ps(kernel: Any) -> dict[int, dict[str, Any]]:
    return {row["pid"]: row for row in kernel.execute("ps --json")["data"] or []}


def status_text(app: TopApp) -> str:
    return str(app.query_one(StatusLine).render())


@pytest.fixture(scope="module")
def live(make_kernel: Any) -> Any:
    return make_kernel("--telemetry-hz", "4")


async def test_signals_on_a_real_process(live: Any, tiny_gpt2: Path) -> None:
    r = live.execute(f"load {tiny_gpt2}")
    assert r["status"] == "ok", r
    pid = max(ps(live))
    app = TopApp(KernelSource(str(live.connection_file)), utc=True)
    async with app.run_test(size=(80, 24)) as pilot:
        table = app.query_one(ProcessTable)
        await until(pilot, lambda: any(p["pid"] == pid and p["state"] == "ready" for p in app.state.procs),
                    what="the loaded process in telemetry")
        assert app.conn == "connected" and f"kernel {live.pid}@" in status_text(app)
        assert len(app.query_one(CpuBars).percpu) == psutil.cpu_count()
        await until(pilot, lambda: table.selected() is not None, what="a selected row")
        assert table.selected()["pid"] == pid

        await pilot.press("s")  # STOP: the process really stops
        await until(pilot, lambda: app.sent, what="the STOP reply")
        assert app.sent[-1] == (f"kill -STOP {pid}", True, "")
        assert ps(live)[pid]["state"] == "stopped"
        await until(pilot, lambda: table.selected() and table.selected()["state"] == "stopped", what="row shows stopped")

        await pilot.press("c")
        await until(pilot, lambda: len(app.sent) == 2, what="the CONT reply")
        assert app.sent[-1] == (f"kill -CONT {pid}", True, "") and ps(live)[pid]["state"] != "stopped"

        await pilot.press("plus")
        await until(pilot, lambda: len(app.sent) == 3, what="the renice reply")
        assert app.sent[-1][:2] == (f"renice 1 {pid}", True) and ps(live)[pid]["nice"] == 1

        await pilot.press("k")  # TERM asks first; n keeps the process
        await until(pilot, lambda: isinstance(app.screen, Confirm), what="the confirmation")
        await pilot.press("n")
        await pilot.pause(0.3)
        assert len(app.sent) == 3 and pid in ps(live)

        await pilot.press("k")
        await until(pilot, lambda: isinstance(app.screen, Confirm), what="the confirmation")
        await pilot.press("s")  # other keys while asking do nothing
        await pilot.press("y")
        await until(pilot, lambda: len(app.sent) == 4, what="the TERM reply")
        assert app.sent[-1] == (f"kill -TERM {pid}", True, "")
        deadline = time.monotonic() + 20
        while pid in ps(live) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert pid not in ps(live)
        await until(pilot, lambda: all(p["pid"] != pid for p in app.state.procs), what="the row to go")

        log = app.query_one(MessageLog)
        assert any(m["type"] == "execute_request" for m in log.entries)


async def test_keys_on_an_empty_table_do_nothing_harmful(kernel: Any) -> None:
    """The module's kernel has telemetry off: connected, no payloads, no rows."""
    app = TopApp(KernelSource(str(kernel.connection_file)), utc=True)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.conn == "connected", what="connection")
        for key in ("s", "c", "K", "k", "plus", "minus", "tab", "tab"):
            await pilot.press(key)
        await pilot.pause(0.2)
        assert app.sent == [] and not isinstance(app.screen, Confirm)
        assert app.is_running and "no telemetry yet" in status_text(app)


async def test_no_kernel_says_how_to_start_one(tmp_path: Path) -> None:
    app = TopApp(KernelSource(str(tmp_path / "kernel-none.json"), retry_s=0.2))
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.conn == "no-kernel", what="no-kernel state")
        await pilot.pause()
        screen = app.query_one(NoKernel)
        assert screen.display and "llmsh kernel start" in str(screen.render())
        assert not app.query_one("#main").display or app.screen.has_class("-nokernel")
        await pilot.press("q")
    assert app.return_code in (0, None)


async def test_kernel_killed_then_back(make_kernel: Any) -> None:
    k = make_kernel("--telemetry-hz", "4")
    app = TopApp(KernelSource(str(k.connection_file), retry_s=0.2, answer_s=1.0), utc=True)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.state.received >= 1, what="first telemetry")
        k.proc.kill()
        k.proc.wait()
        await until(pilot, lambda: app.conn == "disconnected", timeout=15, what="disconnected")
        assert "disconnected, retrying" in status_text(app)
        again = subprocess.Popen(
            [sys.executable, "-m", "llmsh", "kernel", "start", "--foreground", "--connection-file",
             str(k.connection_file), "--telemetry-hz", "4"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=k.env,
        )
        try:
            await until(pilot, lambda: app.conn == "connected" and app.state.payload
                        and app.state.payload["kernel"]["pid"] == again.pid, timeout=30, what="reconnect")
            assert "live" in status_text(app)
        finally:
            again.terminate()
            try:
                again.wait(timeout=10)
            except subprocess.TimeoutExpired:
                again.kill()
                again.wait()


async def test_unknown_telemetry_is_ignored_and_counted() -> None:
    good = payloads(2)
    events = [Event("connected"), Event("telemetry", data={"schema": "someone-else/3", "x": 1}),
              Event("telemetry", data=good[0]), Event("telemetry", data=dict(good[1], procs="oops")),
              Event("telemetry", data=[1, 2, 3])]
    app = TopApp(ScriptedSource(events), utc=True)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        assert app.state.ignored == 3 and app.state.received == 1
        assert "ignored 3" in status_text(app)
        assert app.query_one(ProcessTable).row_count == len(PROCS)


async def test_selection_sorting_filter_and_panels() -> None:
    source = ScriptedSource(live_events(nodes=2))
    app = TopApp(source, utc=True)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        table = app.query_one(ProcessTable)
        assert [r["pid"] for r in table.visible_rows()] == [1, 2, 3]
        await pilot.press("down", "s", "K", "y")  # KILL asks first, like TERM
        await pilot.pause()
        assert source.sent == ["kill -STOP 2", "kill -KILL 2"]
        await pilot.press("minus")
        await pilot.pause()
        assert source.sent[-1] == "renice 4 2"  # nice 5 → 4

        await pilot.press("greater_than_sign")  # sort by the next column: NAME
        assert table.sort_key == "name" and [r["name"] for r in table.visible_rows()] == ["gpt2", "llama-tiny", "qwen"]
        await pilot.press("I")
        assert [r["name"] for r in table.visible_rows()] == ["qwen", "llama-tiny", "gpt2"]
        assert table.selected()["pid"] == 2  # the selection follows the process, not the row number

        await pilot.press("slash", "q", "w", "e")
        await pilot.pause()
        assert table.row_count == 1 and table.selected()["name"] == "qwen"
        await pilot.press("escape")
        await pilot.pause()
        assert table.row_count == 3 and app.is_running

        assert app.panel == "procs"
        await pilot.press("tab")
        assert app.panel == "traffic"
        await pilot.press("tab")
        assert app.panel == "nodes"  # two nodes: the nodes tab exists
        await pilot.press("tab")
        assert app.panel == "procs"


async def test_failed_action_is_reported() -> None:
    source = ScriptedSource(live_events(), answer=(False, "llmsh: kill: no process with PID 1; see 'ps'"))
    app = TopApp(source, utc=True)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("s")
        await until(pilot, lambda: app.sent, what="the reply")
        assert app.sent == [("kill -STOP 1", False, "llmsh: kill: no process with PID 1; see 'ps'")]
        assert app.is_running


async def test_message_log_follows_the_tail_when_shown() -> None:
    app = TopApp(ScriptedSource(live_events(n=20)), utc=True)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("tab")
        await pilot.pause(0.3)
        log = app.query_one(MessageLog)
        assert log.row_count == 80 and log.cursor_row == 79
        assert log.scroll_offset.y == log.max_scroll_y > 0  # the newest messages are on screen
