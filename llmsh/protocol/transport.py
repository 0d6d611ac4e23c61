"""Which ZeroMQ transport a new kernel binds: Jupyter's `ipc` in the private runtime dir by default on POSIX.

On TCP loopback any local account can connect, and subscribing to iopub needs no key: signing authenticates
messages, it does not hide them. An ipc socket in the 0700 runtime dir can only be reached by the user. `--ip ADDR`
still binds TCP (with CurveZMQ off loopback), for other machines and for platforms without ipc.
"""

from __future__ import annotations

import atexit
import os
import tempfile
from pathlib import Path
from typing import Any

from llmsh.protocol.connection import PORT_NAMES

MAX_IPC_PATH = 100  # sun_path is 108 bytes on Linux (104 on macOS): leave room for "-PORT"


def ipc_prefix(connection_file: Path) -> str:
    """The `ip` of an ipc kernel: a path prefix in the runtime dir; each channel is `PREFIX-N`.

    A socket path has at most ~100 bytes; when the runtime dir is too deep for that, the sockets go to a new
    0700 folder with a random name in the system's temp dir (mkdtemp: no other account can have made it first),
    removed when the kernel exits."""
    from llmsh import paths

    name = f"{Path(connection_file).stem}-ipc"
    prefix = str(paths.runtime_dir() / name)
    if len(prefix) + 6 <= MAX_IPC_PATH:
        return prefix
    folder = tempfile.mkdtemp(prefix="llmsh-", dir="/tmp" if os.path.isdir("/tmp") else None)
    atexit.register(_remove_empty, folder)
    prefix = os.path.join(folder, name)
    if len(prefix) + 6 > MAX_IPC_PATH:
        raise OSError(f"no folder with a path short enough for ipc sockets ({prefix}); bind TCP with --ip 127.0.0.1")
    return prefix


def _remove_empty(folder: str) -> None:
    try:
        os.rmdir(folder)  # the sockets were unlinked when they closed
    except OSError:
        pass


def choose_transport(ip: str | None, connection_file: Path) -> tuple[str, str]:
    """(transport, ip) for a kernel started with `--ip ip` (None: not given) writing `connection_file`."""
    if ip is None and os.name == "posix":
        return "ipc", ipc_prefix(connection_file)
    return "tcp", ip or "127.0.0.1"


def remove_ipc_files(info: dict[str, Any]) -> None:
    """Unlink the ipc socket files of a kernel that has closed its sockets (libzmq leaves them behind)."""
    if info.get("transport") != "ipc":
        return
    for name in PORT_NAMES:
        port = info.get(name)
        if isinstance(port, int):  # the heartbeat's ipc "port" may be 0
            try:
                os.unlink(f"{info['ip']}-{port}")
            except OSError:
                pass
