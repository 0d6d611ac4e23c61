"""One-shot synchronous requests to a kernel: a heartbeat ping and a single signed request/reply.

`llmsh kernel status|stop|list` and stale-file detection use these; they need neither a full
`jupyter_client` client nor an event loop, so they stay fast.
"""

from __future__ import annotations

import time
from typing import Any

import zmq

from llmsh.protocol.connection import url, uses_curve


def client_socket(ctx: zmq.Context, kind: int, info: dict[str, Any]) -> zmq.Socket:
    """A client-side socket for the kernel `info` (linger 0; CurveZMQ with a fresh keypair when the kernel uses it)."""
    sock = ctx.socket(kind)
    sock.linger = 0
    if uses_curve(info):
        public, secret = zmq.curve_keypair()
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.curve_serverkey = info["curve_publickey"].encode("ascii")
    return sock


def heartbeat(info: dict[str, Any], timeout: float = 1.0) -> bool:
    """True if the kernel's heartbeat echoes a ping within `timeout` seconds."""
    ctx = zmq.Context()
    try:
        sock = client_socket(ctx, zmq.REQ, info)
        sock.connect(url(info, "hb"))
        payload = b"ping-%d" % time.monotonic_ns()
        sock.send(payload)
        if not sock.poll(int(timeout * 1000)):
            return False
        return sock.recv() == payload
    except zmq.ZMQError:
        return False
    finally:
        ctx.destroy(linger=0)


def request(
    info: dict[str, Any], msg_type: str, content: dict[str, Any] | None = None, *, channel: str = "control", timeout: float = 5.0
) -> dict[str, Any] | None:
    """Send one signed request on `channel` and return the matching reply message, or None on timeout."""
    from llmsh.protocol.session import make_session

    session = make_session(info.get("key", ""), username="llmsh-cli")
    ctx = zmq.Context()
    try:
        sock = client_socket(ctx, zmq.DEALER, info)
        sock.identity = session.bsession
        sock.connect(url(info, channel))
        msg = session.msg(msg_type, content or {})
        sock.send_multipart(session.serialize(msg))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not sock.poll(int(left * 1000) + 1):
                return None
            frames = sock.recv_multipart()
            try:
                _, rest = session.feed_identities(frames)
                reply = session.deserialize(rest)
            except Exception:
                continue
            if reply.get("parent_header", {}).get("msg_id") == msg["header"]["msg_id"]:
                return reply
        return None
    finally:
        ctx.destroy(linger=0)
