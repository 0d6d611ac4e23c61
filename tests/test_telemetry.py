"""Telemetry: the payload builder as a pure function, then the real thing received through jupyter_client from a
real kernel (`--telemetry-hz 4`), and the `nodes`, `free`, `top -n 1` commands through that kernel."""

from __future__ import annotations

import time
import types
from collections import deque
from queue import Empty
from typing import Any

import psutil
import pytest

from llmsh.drivers import Drivers
from llmsh.kernel.telemetry import MIME, SCHEMA, Traffic, build_payload
from llmsh.tui.model import valid


class Counters:
    """Counters shaped like the kernel's (contract A) whose numbers the test sets."""

    def __init__(self) -> None:
        self.table: dict[str, Any] = {"in": {}, "out": {}, "rejected": {}, "clients": 0}
        self.recent: deque[dict[str, Any]] = deque(maxlen=200)

    def set(self, direction: str, socket: str, msg_type: str, count: int, nbytes: int) -> None:
        self.table[direction].setdefault(socket, {})[msg_type] = {"count": count, "bytes": nbytes}

    def snapshot(self) -> dict[str, Any]:
        return self.table


def fake_kernel(**services: Any) -> Any:
    """A kernel-like object: `services` has the front's `table` and `cluster` (None unless given)."""
    return types.SimpleNamespace(pid=123, started_at=1000.0, args=types.SimpleNamespace(telemetry_hz=2.0),
                                 clients={"a": 1.0}, counters=Counters(),
                                 services=types.SimpleNamespace(**{"table": None, "cluster": None, **services}))


NODE = {"name": "n", "local": True, "drivers": ["cpu"], "cpu": {"count": 1, "percpu": [5.0], "percent": 5.0},
        "gpus": [], "torch": None, "memory": []}


def test_rates_are_deltas_between_ticks_summed_over_sockets() -> None:
    k = fake_kernel()
    tr = Traffic()
    k.counters.set("in", "shell", "execute_request", 10, 1000)
    k.counters.set("in", "control", "execute_request", 2, 200)
    first = tr.build(k.counters, now=100.0)
    assert all(r["msgs_s"] == 0 for r in first["rates"])  # no interval yet
    k.counters.set("in", "shell", "execute_request", 14, 1400)
    k.counters.set("out", "iopub", "stream", 5, 500)
    second = tr.build(k.counters, now=102.0)
    rates = {(r["dir"], r["type"]): r for r in second["rates"]}
    assert rates[("in", "execute_request")]["msgs_s"] == 2.0  # (14 + 2 - 12) / 2 s
    assert rates[("in", "execute_request")]["bytes_s"] == 200.0
    assert rates[("in", "execute_request")]["count"] == 16
    assert rates[("out", "stream")]["msgs_s"] == 2.5  # a new type counts from zero
    assert second["total"] == {"in_msgs_s": 2.0, "out_msgs_s": 2.5, "in_bytes_s": 200.0, "out_bytes_s": 250.0}


def test_recent_messages_are_sent_once_and_own_telemetry_is_left_out() -> None:
    k = fake_kernel()
    tr = Traffic()
    for i in range(3):
        k.counters.recent.append({"t": 1.0 + i, "dir": "in", "socket": "shell", "type": f"m{i}", "bytes": 9, "client": "c"})
    assert [m["type"] for m in tr.build(k.counters, now=10.0)["recent"]] == ["m0", "m1", "m2"]
    assert tr.build(k.counters, now=11.0)["recent"] == []
    k.counters.recent.append({"t": 5.0, "dir": "out", "socket": "iopub", "type": "display_data", "bytes": 9, "client": ""})
    tr.own.append(5.0)
    k.counters.recent.append({"t": 6.0, "dir": "out", "socket": "iopub", "type": "stream", "bytes": 9, "client": "c"})
    assert [m["type"] for m in tr.build(k.counters, now=12.0)["recent"]] == ["stream"]


def test_payload_from_services_and_a_broken_service() -> None:
    rows = [{"pid": 1, "name": "m", "state": "ready", "path": __import__("pathlib").Path("/x")}]
    k = fake_kernel(table=types.SimpleNamespace(snapshot=lambda: rows, scheduler_stats={}),
                    cluster=types.SimpleNamespace(node_loads=lambda: 1 / 0))
    p = build_payload(k, NODE, Traffic(), seq=7, now=1010.0, interval_s=0.5, tick_ms=0.3)
    assert p["schema"] == SCHEMA and p["seq"] == 7 and p["interval_s"] == 0.5
    assert p["kernel"] == {"pid": 123, "started_at": 1000.0, "uptime_s": 10.0, "node": "n", "clients": 1,
                           "telemetry_hz": 2.0, "tick_ms": 0.3}
    assert p["procs"] == [{"pid": 1, "name": "m", "state": "ready", "path": "/x"}]  # made JSON-able
    assert p["scheduler"] == {} and p["errors"] == ["cluster: ZeroDivisionError: division by zero"]
    assert p["nodes"] == [NODE]
    assert valid(p)


def test_payload_without_services_has_empty_table() -> None:
    p = build_payload(fake_kernel(), Drivers().sample(), Traffic(), seq=1, now=1001.0, interval_s=0.5, tick_ms=0.0)
    assert p["procs"] == [] and p["scheduler"] == {} and p["errors"] == []
    assert valid(p)


def test_valid_rejects_unknown_shapes() -> None:
    good = build_payload(fake_kernel(), NODE, Traffic(), seq=1, now=1001.0, interval_s=0.5, tick_ms=0.0)
    assert valid(good)
    for bad in (None, [], {"schema": "other/1"}, dict(good, schema="llmsh.telemetry/2"), dict(good, procs="x"),
                dict(good, nodes=[]), dict(good, nodes=[{"cpu": 3}]), dict(good, traffic={"rates": [1]})):
        assert not valid(bad)


def _telemetry(kc: Any, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The next `n` telemetry payloads seen on iopub."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            msg = kc.get_iopub_msg(timeout=left)
        except Empty:
            break
        if msg["msg_type"] == "display_data" and MIME in msg["content"]["data"]:
            out.append(msg["content"]["data"][MIME])
    return out


@pytest.fixture(scope="module")
def live(make_kernel: Any) -> Any:
    return make_kernel("--telemetry-hz", "4")


def test_real_kernel_publishes_telemetry(live: Any) -> None:
    kc = live.client()
    try:
        got = _telemetry(kc, 3)
        assert len(got) == 3, "no telemetry within 10 s"
        assert all(valid(p) for p in got)
        assert [p["seq"] for p in got] == sorted(p["seq"] for p in got)
        p = got[-1]
        assert p["kernel"]["pid"] == live.pid and p["kernel"]["telemetry_hz"] == 4.0
        assert p["interval_s"] == pytest.approx(0.25)
        node = p["nodes"][0]
        assert node["local"] and node["cpu"]["count"] == psutil.cpu_count()
        assert node["cpu"]["proc"]["pid"] == live.pid  # the kernel's own RSS and threads
        assert node["cpu"]["proc"]["rss"] == pytest.approx(psutil.Process(live.pid).memory_info().rss, rel=0.5)
        assert node["cpu"]["proc"]["threads"] >= 1
        assert p["procs"] == [] and "torch" not in node["drivers"]

        kc.execute("echo telemetry-probe")
        seen_exec, rates_ok = False, False
        for q in _telemetry(kc, 20):
            seen_exec |= any(m["type"] == "execute_request" and m["dir"] == "in" for m in q["traffic"]["recent"])
            count = q["traffic"]["in"].get("shell", {}).get("execute_request", {}).get("count", 0)
            rates_ok |= count >= 1 and any(r["type"] == "execute_request" and r["msgs_s"] > 0 for r in q["traffic"]["rates"])
            assert not any(m["type"] == "display_data" for m in q["traffic"]["recent"])  # own messages not logged
            if seen_exec and rates_ok:
                break
        assert seen_exec and rates_ok
    finally:
        kc.stop_channels()


def test_rate_is_capped_so_jupyter_clients_still_connect(make_kernel: Any) -> None:
    """At 5 Hz or more jupyter_client's wait_for_ready would never see 0.2 s of quiet iopub and hang."""
    fast = make_kernel("--telemetry-hz", "50")
    kc = fast.client(timeout=20)  # wait_for_ready returns
    try:
        p = _telemetry(kc, 1)[0]
        assert p["interval_s"] == pytest.approx(0.25) and p["kernel"]["telemetry_hz"] == 4.0
    finally:
        kc.stop_channels()
        fast.stop()


def test_telemetry_off_publishes_nothing(kernel: Any) -> None:
    kc = kernel.client()
    try:
        assert _telemetry(kc, 1, timeout=1.5) == []
    finally:
        kc.stop_channels()


def test_nodes_free_top_commands(kernel: Any) -> None:
    r = kernel.execute("nodes")
    assert r["status"] == "ok"
    assert f"kernel pid {kernel.pid}" in r["stdout"] + str(r["results"])
    text = kernel.execute("free")
    assert text["status"] == "ok"
    shown = text["stdout"] + "".join(b.get("text/plain", "") for b in text["results"])
    assert "DEVICE" in shown and "cpu" in shown

    rows = kernel.execute("free --json")["data"]
    cpu = next(r for r in rows if r["device"] == "cpu")
    assert cpu["total"] == psutil.virtual_memory().total and cpu["used"] + cpu["free"] == cpu["total"]

    top = kernel.execute("top -n 1")
    shown = top["stdout"] + "".join(b.get("text/plain", "") for b in top["results"])
    assert top["status"] == "ok" and "load average" in shown and "PID" in shown and f"kernel pid {kernel.pid}" in shown
    snap = kernel.execute("top -n 1 --json")["data"]
    assert valid(snap) and snap["kernel"]["pid"] == kernel.pid


def test_top_bad_input_is_one_line(kernel: Any) -> None:
    r = kernel.execute("top -n 0")
    assert r["status"] == "error" and r["exit_code"] == 1
    assert "\n" not in r["reply"]["evalue"].strip() and "at least 1" in r["reply"]["evalue"]
    assert kernel.execute("nodes")["status"] == "ok"  # the kernel keeps going


def test_text_of_nodes_free_top_with_gpus_and_several_nodes() -> None:
    """The formatting of the node commands over a fixed payload with a GPU, swap, processes and three nodes."""
    from llmsh.commands.nodes import format_free, format_nodes, format_top, free_rows
    from tests.test_tui_snapshots import payloads

    p = payloads(3, nodes=3)[-1]
    nodes = format_nodes(p)
    assert "node-a (local, kernel pid 4242; drivers: cpu, nvidia)" in nodes and "node-c (remote" in nodes
    assert "cuda:0   NVIDIA H100  util 26%  mem 20.0G / 80.0G  41°C  120W  procs 4242:1.0G" in nodes

    rows = free_rows(p)
    assert [(r["node"], r["device"]) for r in rows][:2] == [("node-a", "cpu"), ("node-a", "swap")]
    text = format_free(rows)
    assert text.splitlines()[0].split() == ["NODE", "DEVICE", "KIND", "TOTAL", "USED", "FREE"]
    assert "swap" in text and "256.0M" in text
    assert format_free(rows[:1], raw=True).splitlines()[1].split()[2] == str(16 * 2**30)  # one node: no NODE column

    top = format_top(p)
    assert "up 1:02:06" in top and "%Cpu" in top and "Procs: 3 total, 1 ready, 1 running, 1 stopped" in top
    assert "sched cpu: 41.5 tok/s, batch 2 (mean 1.5), queue 1" in top
    assert top.splitlines()[-3].split()[:3] == ["1", "gpt2", "running"]
