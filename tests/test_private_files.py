"""Only the user reads the traffic and the files (issue 14): ipc sockets in the 0700 runtime dir by default, TCP with
`--ip`, an unsafe XDG_RUNTIME_DIR is one clear error, history and logs are 0600 in 0700 folders, logs are pruned."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llmsh import paths
from llmsh.protocol.connection import read_connection_file

pytestmark = pytest.mark.skipif(os.name != "posix", reason="ipc sockets and modes are POSIX")


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_default_transport_is_ipc_in_the_private_runtime_dir(kernel: Any) -> None:
    info = read_connection_file(kernel.connection_file)
    assert info["transport"] == "ipc"
    prefix = Path(info["ip"])
    assert prefix.parent == paths.runtime_dir() and mode(prefix.parent) == 0o700
    for channel in ("shell", "iopub", "hb"):
        sock = Path(f"{prefix}-{info[channel + '_port']}")
        assert stat.S_ISSOCK(sock.stat().st_mode)
    assert kernel.execute("echo over ipc")["stdout"] == "over ipc\n"  # jupyter_client speaks ipc


def test_jupyter_console_existing_works_over_ipc(kernel: Any) -> None:
    jupyter = Path(sys.executable).with_name("jupyter")
    if not jupyter.exists():
        pytest.skip("jupyter console is not installed")
    r = subprocess.run(
        [str(jupyter), "console", "--existing", str(kernel.connection_file), "--simple-prompt"],
        input="echo from-console\n", capture_output=True, text=True, env=kernel.env, timeout=60,
    )
    assert "from-console" in r.stdout, r.stderr[-2000:]


def test_ipc_socket_files_go_with_the_kernel(make_kernel: Any) -> None:
    k = make_kernel()
    info = read_connection_file(k.connection_file)
    socks = [Path(f"{info['ip']}-{info[c + '_port']}") for c in ("shell", "control", "stdin", "iopub", "hb")]
    assert all(p.exists() for p in socks)
    k.stop()
    assert [p.name for p in socks if p.exists()] == []


def test_ip_keeps_tcp(make_kernel: Any) -> None:
    k = make_kernel("--ip", "127.0.0.1")
    info = read_connection_file(k.connection_file)
    assert (info["transport"], info["ip"]) == ("tcp", "127.0.0.1")
    assert k.execute("echo over tcp")["stdout"] == "over tcp\n"


def test_unsafe_runtime_dir_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    loose = tmp_path / "run"
    loose.mkdir()
    os.chmod(loose, 0o755)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(loose)}
    r = subprocess.run([sys.executable, "-m", "llmsh", "-c", "echo hi"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (
        f"llmsh: XDG_RUNTIME_DIR={loose} is not private (owner uid {os.getuid()}, mode 755); "
        f"it must be yours with mode 700: 'chmod 700 {loose}', or unset XDG_RUNTIME_DIR\n"
    )
    assert list(loose.iterdir()) == []  # nothing was written there


def test_history_and_logs_are_private(kernel: Any) -> None:
    from llmsh.client.repl import history_file
    from llmsh.kernel.lifecycle import log_file

    assert mode(history_file()) == 0o600 and mode(paths.state_dir()) == 0o700
    log = log_file(kernel.connection_file)
    assert mode(log) == 0o600 and mode(log.parent) == 0o700


def test_old_logs_are_pruned(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))  # not the running test kernels' logs
    folder = paths.logs_dir()
    for i in range(8):
        p = folder / f"kernel-old{i}.log"
        p.write_text("x")
        os.utime(p, (1000 + i, 1000 + i))
    paths.prune_logs(keep=3)
    assert sorted(p.name for p in folder.iterdir()) == ["kernel-old5.log", "kernel-old6.log", "kernel-old7.log"]
