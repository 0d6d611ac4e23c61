"""`llmsh kernel start|stop|status|list|install`: daemon start, stop escalation, stale files, start failures,
CurveZMQ off loopback, and no torch at kernel start."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmsh.kernel import lifecycle
from llmsh.kernel.lifecycle import KernelStartError, StopOutcome
from llmsh.protocol.connection import new_key, write_connection_file
from tests.fixtures_kernel import kernel_env


def _cli(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmsh", *argv], capture_output=True, text=True, env=kernel_env(), timeout=timeout)


def _wait_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while lifecycle.pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _fake_kernel_file(tmp_path: Path, proc: subprocess.Popen) -> Path:
    """A connection file naming `proc` as its kernel, on ports where nobody listens."""
    import psutil

    ports = _free_ports(5)
    info = {"ip": "127.0.0.1", "transport": "tcp", "key": new_key(), "signature_scheme": "hmac-sha256", "kernel_name": "llmsh"}
    info.update({f"{c}_port": p for c, p in zip(("shell", "control", "stdin", "iopub", "hb"), ports)})
    info.update(pid=proc.pid, started_at=psutil.Process(proc.pid).create_time() + 0.1)
    return write_connection_file(tmp_path / "kernel-fake.json", info)


def test_daemon_start_status_list_stop():
    res = _cli("kernel", "start")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1
    path = Path(lines[0])
    try:
        assert path.exists() and path.stat().st_mode & 0o777 == 0o600
        info = json.loads(path.read_text())
        st = _cli("kernel", "status", "--kernel", str(path))
        assert st.returncode == 0, st.stderr
        assert f"pid       {info['pid']}" in st.stdout and f"shell {info['shell_port']}" in st.stdout
        assert "rejected  0" in st.stdout
        assert str(path) in _cli("kernel", "list").stdout
        assert lifecycle.log_file(path).exists()
    finally:
        stop = _cli("kernel", "stop", "--kernel", str(path))
    assert stop.returncode == 0, stop.stderr
    assert "shutdown_request" in stop.stdout
    assert not path.exists()
    assert _wait_gone(info["pid"])
    assert str(path) not in _cli("kernel", "list").stdout


def test_shutdown_request_exits_cleanly_and_removes_file(make_kernel):
    k = make_kernel()
    kc = k.client()
    try:
        reply = kc.shutdown(reply=True, timeout=10)
    finally:
        kc.stop_channels()
    assert reply["content"]["status"] == "ok"
    assert k.proc.wait(timeout=20) == 0
    assert not k.connection_file.exists()


def test_stop_escalates_to_sigterm_when_shutdown_request_is_ignored(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path = _fake_kernel_file(tmp_path, proc)
        assert lifecycle.stop_kernel(path, polite_timeout=0.3, term_timeout=10) is StopOutcome.SIGTERM
        assert proc.wait(timeout=10) == -signal.SIGTERM
        assert not path.exists()
    finally:
        proc.kill()
        proc.wait()


def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(tmp_path):
    code = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        path = _fake_kernel_file(tmp_path, proc)
        assert lifecycle.stop_kernel(path, polite_timeout=0.3, term_timeout=0.5) is StopOutcome.SIGKILL
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()


def test_stale_connection_file_is_detected_and_removed():
    path = lifecycle.start_kernel_daemon(timeout=30)
    pid = json.loads(path.read_text())["pid"]
    assert lifecycle.find_kernel(str(path)) == path
    os.kill(pid, signal.SIGKILL)
    assert _wait_gone(pid)
    assert path.exists()  # the dead kernel could not clean up
    assert lifecycle.find_kernel() != path
    assert not path.exists()


def test_bad_connection_file_is_one_line_error(tmp_path):
    bad = tmp_path / "kernel-bad.json"
    bad.write_text("{not json")
    res = _cli("kernel", "start", "--foreground", "--connection-file", str(bad))
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("llmsh: kernel: cannot read connection file")


def test_port_in_use_makes_start_fail_with_one_line(tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        ports = _free_ports(4)
        info = {"ip": "127.0.0.1", "transport": "tcp", "key": new_key(), "signature_scheme": "hmac-sha256"}
        info.update(shell_port=holder.getsockname()[1], control_port=ports[0], stdin_port=ports[1], iopub_port=ports[2], hb_port=ports[3])
        path = write_connection_file(tmp_path / "kernel-jupyter.json", info)
        with pytest.raises(KernelStartError) as err:
            lifecycle.start_kernel_daemon(str(path), timeout=30)
    finally:
        holder.close()
    assert "\n" not in str(err.value) and "Address already in use" in str(err.value)


def test_stop_and_status_without_kernel_say_so():
    res = _cli("kernel", "status", "--kernel", "/nonexistent/kernel-x.json")
    assert res.returncode == 1 and res.stderr.strip().startswith("llmsh: kernel: no running kernel")
    assert "\n" not in res.stderr.strip()


def test_install_kernelspec_under_prefix(tmp_path):
    res = _cli("kernel", "install", "--prefix", str(tmp_path))
    assert res.returncode == 0, res.stderr
    spec = json.loads((tmp_path / "share/jupyter/kernels/llmsh/kernel.json").read_text())
    assert spec["argv"] == [sys.executable, "-m", "llmsh", "kernel", "start", "--foreground", "--connection-file", "{connection_file}"]
    assert spec["language"] == "llmsh" and spec["interrupt_mode"] == "message"


def test_kernel_start_does_not_import_torch(kernel):
    assert kernel.execute("echo hi; help")["status"] == "ok"
    assert kernel.kernel_info()["torch_loaded"] is False


def test_non_loopback_bind_uses_curve(make_kernel):
    import zmq

    from llmsh.protocol.connection import url
    from llmsh.protocol.request import heartbeat
    from llmsh.protocol.session import make_session

    k = make_kernel("--ip", "0.0.0.0")
    info = json.loads(k.connection_file.read_text())
    assert info["curve_publickey"] and info["curve_secretkey"]
    assert k.execute("echo encrypted")["stdout"] == "encrypted\n"  # jupyter_client reads the curve keys
    assert heartbeat(info, 5)
    ctx = zmq.Context()
    try:  # a client without the server key cannot even complete the handshake
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(url(info, "shell"))
        session = make_session(info["key"])
        try:  # once the failed handshake has dropped the pipe, a DEALER has no peer and a blocking send would hang
            sock.send_multipart(session.serialize(session.msg("kernel_info_request", {})), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass
        assert not sock.poll(1000)
    finally:
        ctx.destroy(linger=0)


def test_stopped_kernel_is_skipped_but_its_file_kept(make_kernel):
    k = make_kernel()
    os.kill(k.pid, signal.SIGSTOP)
    try:
        assert lifecycle.find_kernel(str(k.connection_file)) is None  # no heartbeat: not usable
        assert k.connection_file.exists()  # but its process lives: not stale
    finally:
        os.kill(k.pid, signal.SIGCONT)
    assert lifecycle.find_kernel(str(k.connection_file)) == k.connection_file


def test_daemon_start_failure_is_one_line():
    res = _cli("kernel", "start", "--ip", "192.0.2.1")  # TEST-NET address: no interface has it, so bind fails
    assert res.returncode == 1
    err = res.stderr.strip()
    assert "\n" not in err and err.startswith("llmsh: kernel: the kernel exited with status 1 while starting: cannot start:")
    assert "192.0.2.1" in err
    assert res.stdout == ""


def test_bad_budget_is_a_usage_error_before_daemonising():
    res = _cli("kernel", "start", "--mem-budget", "cpu=lots")
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("llmsh kernel start: error: argument --mem-budget: bad size 'lots'") and "GiB" in last
    assert res.stdout == ""
