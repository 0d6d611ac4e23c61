"""The kernel's connection info, and binding its ZeroMQ sockets (shell, control, stdin, iopub) from it.

Kept apart from `llmsh.kernel.server` because the options every socket needs (ZMTP pings, a frame size cap, CurveZMQ
on non-loopback TCP) and the three ways to pick an address (ipc path, a port given in the connection file, a random
port) are one concern, and the server's loop does not need to read them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from llmsh.protocol.connection import (
    SIGNATURE_SCHEME,
    curve_keypair,
    is_loopback,
    new_key,
    read_connection_file,
    url,
    uses_curve,
)
from llmsh.protocol.transport import choose_transport

MAX_FRAME_BYTES = 64 << 20  # no request needs more; a bigger frame is an attack or a bug
KINDS = {"shell": zmq.ROUTER, "control": zmq.ROUTER, "stdin": zmq.ROUTER, "iopub": zmq.PUB}


def _free_ipc_port(ip: str) -> int:
    port = 1
    while os.path.exists(f"{ip}-{port}"):
        port += 1
    return port


def connection_info(connection_file: Path, ip: str | None) -> tuple[dict[str, Any], bool]:
    """The info to bind with, and whether this kernel owns (created) it: read from `connection_file` when it exists
    (a kernel manager chose the ports), else a new key on the transport `choose_transport` picks for `ip`. Curve keys
    are added when the kernel would listen on TCP off the loopback."""
    owns = False
    if connection_file.exists():
        info = read_connection_file(connection_file)
    else:
        owns = True
        transport, chosen = choose_transport(ip, connection_file)
        info = {
            "ip": chosen,
            "transport": transport,
            "key": new_key(),
            "signature_scheme": SIGNATURE_SCHEME,
            "kernel_name": "llmsh",
        }
    if owns or not info.get("kernel_name"):
        info["kernel_name"] = "llmsh"
    if not uses_curve(info) and not is_loopback(info["ip"]) and info.get("transport", "tcp") == "tcp":
        info["curve_publickey"], info["curve_secretkey"] = curve_keypair()
    return info, owns


def bind_sockets(ctx: zmq.asyncio.Context, info: dict[str, Any], secret: bytes | None,
                 into: dict[str, zmq.asyncio.Socket]) -> None:
    """Create and bind one socket per channel into `into`, writing each chosen port into `info`.

    Sockets go into `into` as they are made, so that a failure part-way leaves the caller holding every socket it
    must close."""
    ip, transport = info["ip"], info.get("transport", "tcp")
    for channel, kind in KINDS.items():
        sock = into[channel] = ctx.socket(kind)
        sock.linger = 1000
        if kind == zmq.ROUTER:  # ZMTP pings: a peer that vanished without closing TCP still gets disconnected
            sock.setsockopt(zmq.HEARTBEAT_IVL, 5000)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 20000)
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)  # libzmq drops the peer rather than buffer more
        if secret:
            sock.curve_server = True
            sock.curve_secretkey = secret
        port = int(info.get(f"{channel}_port") or 0)
        if transport == "ipc":
            port = port or _free_ipc_port(ip)
            sock.bind(f"ipc://{ip}-{port}")
        elif port:
            sock.bind(url({**info, f"{channel}_port": port}, channel))
        else:
            port = sock.bind_to_random_port(f"tcp://[{ip}]" if ":" in ip else f"tcp://{ip}")
        info[f"{channel}_port"] = port
