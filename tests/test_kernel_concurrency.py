"""Requests run concurrently; interrupt stops only the asking client's foreground command; a client that vanishes
mid-command has that command cancelled (not leaked)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from queue import Empty
from typing import Any

import pytest
import zmq

from llmsh.protocol.connection import url
from llmsh.protocol.session import make_session


def _wait_for(kernel: Any, cond: Callable[[dict[str, Any]], bool], timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info = kernel.kernel_info()
        if cond(info):
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met; kernel reports {info}")
        time.sleep(0.05)


def _reply_for(kc: Any, msg_id: str, timeout: float = 20) -> dict[str, Any]:
    while True:
        msg = kc.get_shell_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") == msg_id:
            return msg


def _interrupt(kc: Any) -> dict[str, Any]:
    msg = kc.session.msg("interrupt_request", {})
    kc.control_channel.send(msg)
    while True:
        reply = kc.get_control_msg(timeout=20)
        if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
            return reply


@pytest.fixture
def two_clients(kernel):
    a, b = kernel.client(), kernel.client()
    yield a, b
    a.stop_channels()
    b.stop_channels()


def test_long_command_does_not_delay_short_one(kernel, two_clients):
    a, b = two_clients
    base = kernel.kernel_info()["running"]
    slow = a.execute("sleep 60")
    _wait_for(kernel, lambda i: i["running"] == base + 1)
    quick = b.execute("echo quick")
    reply = _reply_for(b, quick)
    assert reply["content"]["status"] == "ok"
    with pytest.raises(Empty):  # the slow one is still running after the quick one finished
        a.get_shell_msg(timeout=0.01)
    assert kernel.kernel_info()["running"] == base + 1
    assert _interrupt(a)["content"]["status"] == "ok"
    done = _reply_for(a, slow)["content"]
    assert (done["status"], done["ename"], done["evalue"], done["llmsh_exit_code"]) == ("error", "KeyboardInterrupt", "interrupted", 130)


def test_interrupt_cancels_only_the_asking_client(kernel, two_clients):
    a, b = two_clients
    base = kernel.kernel_info()
    ma, mb = a.execute("sleep 60"), b.execute("sleep 60")
    _wait_for(kernel, lambda i: i["running"] == base["running"] + 2)
    _interrupt(a)
    assert _reply_for(a, ma)["content"]["ename"] == "KeyboardInterrupt"
    info = _wait_for(kernel, lambda i: i["running"] == base["running"] + 1)
    assert info["counters"]["cancelled"]["interrupt"] == base["counters"]["cancelled"].get("interrupt", 0) + 1
    with pytest.raises(Empty):
        b.get_shell_msg(timeout=0.01)
    _interrupt(b)
    assert _reply_for(b, mb)["content"]["ename"] == "KeyboardInterrupt"


def test_interrupt_leaves_background_jobs_running(kernel, two_clients):
    a, _ = two_clients
    started = _reply_for(a, a.execute("sleep 60 &"))["content"]
    assert started["status"] == "ok"
    fg = a.execute("sleep 60")
    _wait_for(kernel, lambda i: i["running"] >= 1)
    _interrupt(a)
    assert _reply_for(a, fg)["content"]["ename"] == "KeyboardInterrupt"
    # the job table is per client session: ask as client `a`
    jobs_id = a.execute("jobs --json")
    results = []
    while True:
        msg = a.get_iopub_msg(timeout=20)
        if msg["parent_header"].get("msg_id") == jobs_id and msg["msg_type"] == "execute_result":
            results.append(msg["content"]["data"]["application/json"])
        if msg["parent_header"].get("msg_id") == jobs_id and msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    assert results and any("sleep 60" in json.dumps(job) for job in results[-1])


def test_client_disconnect_cancels_its_command(kernel):
    info = json.loads(kernel.connection_file.read_text())
    session = make_session(info["key"])
    before = kernel.kernel_info()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.identity = session.bsession
    sock.connect(url(info, "shell"))
    sock.send_multipart(session.serialize(session.msg("execute_request", {"code": "sleep 60", "silent": False})))
    _wait_for(kernel, lambda i: i["running"] == before["running"] + 1)
    ctx.destroy(linger=0)  # the client vanishes mid-command
    after = _wait_for(kernel, lambda i: i["running"] == before["running"])
    assert after["counters"]["cancelled"]["disconnect"] == before["counters"]["cancelled"].get("disconnect", 0) + 1
    # a new client (which may get the same fd number on the kernel side) is not affected
    assert kernel.execute("sleep 0.2; echo after")["stdout"] == "after\n"


def test_killed_llmsh_client_does_not_leak_its_command(kernel):
    """End to end: the real `llmsh -c 'sleep 60'` process is killed; the kernel cancels its sleep."""
    import subprocess
    import sys

    before = kernel.kernel_info()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmsh", "--kernel", str(kernel.connection_file), "-c", "sleep 60"],
        env=kernel.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(kernel, lambda i: i["running"] == before["running"] + 1, timeout=30)
    finally:
        proc.kill()
        proc.wait()
    after = _wait_for(kernel, lambda i: i["running"] == before["running"])
    assert after["counters"]["cancelled"]["disconnect"] == before["counters"]["cancelled"].get("disconnect", 0) + 1


def test_sigint_interrupts_foreground_commands_and_kernel_lives(kernel, two_clients):
    """Jupyter's signal-style interrupt: SIGINT cancels what runs in the foreground; the kernel keeps serving."""
    import os
    import signal

    a, _ = two_clients
    base = kernel.kernel_info()["running"]
    msg_id = a.execute("sleep 60")
    _wait_for(kernel, lambda i: i["running"] == base + 1)
    os.kill(kernel.pid, signal.SIGINT)
    assert _reply_for(a, msg_id)["content"]["ename"] == "KeyboardInterrupt"
    assert kernel.alive() and kernel.execute("echo alive")["stdout"] == "alive\n"


def test_clients_that_leave_are_no_longer_counted_as_connected(kernel):
    before = kernel.kernel_info()["counters"]
    for _ in range(3):
        assert kernel.llmsh("-c", "echo hi").returncode == 0  # each run is a new client session that then leaves
    deadline = time.monotonic() + 10
    while True:  # the disconnects arrive through the socket monitor, asynchronously
        now = kernel.kernel_info()["counters"]
        if now["clients"] <= before["clients"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert now["clients_seen"] >= before["clients_seen"] + 3
    assert now["clients"] <= before["clients"]
    status = kernel.llmsh("kernel", "status")
    line = next(ln for ln in status.stdout.splitlines() if ln.startswith("clients"))
    connected, seen = (int(w) for w in re.findall(r"(\d+) (?:connected|seen)", line))
    assert seen >= now["clients_seen"] and connected <= now["clients"] + 1  # + the status command's own client
