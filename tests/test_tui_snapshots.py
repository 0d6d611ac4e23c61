"""Snapshot tests of `llmsh top` at 80×24 and 120×40, fed fixed telemetry (no clocks, no kernel) so they are exact.

The payloads are built by the kernel's real `build_payload` over a scripted kernel-like object, so the screen is
checked against the telemetry schema the kernel really sends. Update with `pytest --snapshot-update` after a
deliberate layout change, and look at the SVGs.
"""

from __future__ import annotations

import asyncio
import types
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import pytest

from llmsh.kernel.telemetry import Traffic, build_payload
from llmsh.tui.app import TopApp
from llmsh.tui.source import Event

T0 = 1_790_000_000.0  # a fixed "now" for every payload


class ScriptedSource:
    """A Source that replays events, then stays quiet; `execute` records the lines and answers ok."""

    def __init__(self, events: list[Event], answer: tuple[bool, str] = (True, "")) -> None:
        self.script = events
        self.answer = answer
        self.sent: list[str] = []
        self.done = asyncio.Event()

    async def events(self) -> AsyncIterator[Event]:
        for ev in self.script:
            yield ev
        self.done.set()
        await asyncio.Event().wait()

    async def execute(self, code: str) -> tuple[bool, str]:
        self.sent.append(code)
        return self.answer

    async def close(self) -> None:
        pass


class FakeCounters:
    """Cumulative counters that grow by a fixed step per tick, plus recent messages."""

    def __init__(self) -> None:
        self.tick = 0
        self.recent: deque[dict[str, Any]] = deque(maxlen=200)

    def advance(self, now: float) -> None:
        self.tick += 1
        for i, (d, sock, typ, size) in enumerate(
            [("in", "shell", "execute_request", 310), ("out", "shell", "execute_reply", 420),
             ("out", "iopub", "stream", 180), ("out", "iopub", "status", 150)]
        ):
            self.recent.append({"t": now - 0.4 + i * 0.1, "dir": d, "socket": sock, "type": typ, "bytes": size,
                                "client": "c0ffee42deadbeef"})

    def snapshot(self) -> dict[str, Any]:
        n = self.tick
        return {
            "in": {"shell": {"execute_request": {"count": 2 * n, "bytes": 620 * n},
                             "kernel_info_request": {"count": 1, "bytes": 200}}},
            "out": {"shell": {"execute_reply": {"count": 2 * n, "bytes": 840 * n}},
                    "iopub": {"stream": {"count": 10 * n, "bytes": 1800 * n},
                              "status": {"count": 4 * n, "bytes": 600 * n},
                              "display_data": {"count": 2 * n, "bytes": 5000 * n}}},
            "rejected": {"bad_signature": 1},
            "clients": 2,
        }


PROCS = [
    {"pid": 1, "name": "gpt2", "path": "/m/gpt2", "state": "running", "nice": 0, "device": "cpu",
     "res_bytes": 510_000_000, "paged_bytes": 0, "reqs_active": 2, "reqs_queued": 1, "tok_s": 41.5,
     "tokens": 1234, "time_s": 75.0, "node": "node-a", "reason": ""},
    {"pid": 2, "name": "llama-tiny", "path": "/m/llama", "state": "stopped", "nice": 5, "device": "cuda:0",
     "res_bytes": 2_200_000_000, "paged_bytes": 300_000_000, "reqs_active": 0, "reqs_queued": 0, "tok_s": 0.0,
     "tokens": 90, "time_s": 12.0, "node": "node-a", "reason": ""},
    {"pid": 3, "name": "qwen", "path": "/m/qwen", "state": "ready", "nice": -2, "device": "cpu",
     "res_bytes": 90_000_000, "paged_bytes": 0, "reqs_active": 0, "reqs_queued": 0, "tok_s": 0.0,
     "tokens": 0, "time_s": 3.0, "node": "node-a", "reason": ""},
]


def node_load(i: int, name: str = "node-a") -> dict[str, Any]:
    """A fixed node sample (4 cores, one GPU) varying with the tick index."""
    percpu = [(17.0 * i + 23 * c) % 100 for c in range(4)]
    return {
        "name": name, "local": name == "node-a", "drivers": ["cpu", "nvidia"],
        "cpu": {"count": 4, "percent": sum(percpu) / 4, "percpu": percpu, "load": [0.5, 0.4, 0.3],
                "mem": {"total": 16 * 2**30, "used": 5 * 2**30, "available": 11 * 2**30},
                "swap": {"total": 2 * 2**30, "used": 2**28},
                "proc": {"pid": 4242, "rss": 300 * 2**20, "threads": 9, "cpu_percent": 1.5}},
        "gpus": [{"index": 0, "device": "cuda:0", "name": "NVIDIA H100", "util": (13 * i) % 100,
                  "mem_used": 20 * 2**30, "mem_total": 80 * 2**30, "temp_c": 41, "power_w": 120.0,
                  "power_limit_w": 700.0, "procs": [{"pid": 4242, "mem": 2**30}]}],
        "torch": None,
        "memory": [{"device": "cpu", "kind": "host", "total": 16 * 2**30, "used": 5 * 2**30, "free": 11 * 2**30}],
    }


def payloads(n: int = 8, procs: list[dict[str, Any]] | None = None, nodes: int = 1) -> list[dict[str, Any]]:
    """`n` consecutive telemetry payloads from the real builder, half a second apart."""
    counters = FakeCounters()
    rows = PROCS if procs is None else procs
    sched = {"devices": {"cpu": {"steps": 10, "last_batch": 2, "mean_batch": 1.5, "queue": 1, "tok_s": 41.5}}}
    extra = [node_load(3, f"node-{c}") for c in "bcd"[: nodes - 1]]
    services = types.SimpleNamespace(table=types.SimpleNamespace(snapshot=lambda: rows, scheduler_stats=sched),
                                     cluster=types.SimpleNamespace(node_loads=lambda: extra))
    kernel = types.SimpleNamespace(pid=4242, started_at=T0 - 3725, args=types.SimpleNamespace(telemetry_hz=2.0),
                                   clients={"a": 1, "b": 2}, counters=counters, services=services)
    traffic = Traffic()
    out = []
    for i in range(n):
        now = T0 + 0.5 * i
        counters.advance(now)
        out.append(build_payload(kernel, node_load(i), traffic, seq=i + 1, now=now, interval_s=0.5, tick_ms=0.4))
    return out


def scripted_app(events: list[Event]) -> TopApp:
    return TopApp(ScriptedSource(events), utc=True, where="/run/llmsh/kernel-test.json")


def live_events(**kw: Any) -> list[Event]:
    return [Event("connected", data={}, text="/run/llmsh/kernel-test.json"),
            *(Event("telemetry", data=p) for p in payloads(**kw))]


async def settle(pilot: Any) -> None:
    """Wait until the scripted source has been consumed and the screen has caught up."""
    await pilot.app.source.done.wait()
    await pilot.pause()
    await pilot.pause()


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
def test_snapshot_live(snap_compare: Any, size: tuple[int, int]) -> None:
    assert snap_compare(scripted_app(live_events()), terminal_size=size, run_before=settle)


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
def test_snapshot_traffic_panel(snap_compare: Any, size: tuple[int, int]) -> None:
    assert snap_compare(scripted_app(live_events()), terminal_size=size, run_before=settle, press=["tab"])


def test_snapshot_no_kernel(snap_compare: Any) -> None:
    app = TopApp(ScriptedSource([Event("no-kernel")]), utc=True)
    assert snap_compare(app, terminal_size=(80, 24), run_before=settle)


def test_snapshot_disconnected(snap_compare: Any) -> None:
    events = [*live_events(n=3), Event("disconnected", text="/run/llmsh/kernel-test.json")]
    assert snap_compare(scripted_app(events), terminal_size=(80, 24), run_before=settle)


def test_snapshot_nodes_tab(snap_compare: Any) -> None:
    assert snap_compare(scripted_app(live_events(nodes=3)), terminal_size=(120, 40), run_before=settle,
                        press=["tab", "tab"])


def test_snapshot_confirm_term(snap_compare: Any) -> None:
    assert snap_compare(scripted_app(live_events()), terminal_size=(80, 24), run_before=settle, press=["k"])
