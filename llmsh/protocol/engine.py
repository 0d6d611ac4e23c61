"""The front ↔ engine wire: typed, versioned JSON messages over a ZeroMQ DEALER (engine) / ROUTER (front) pair.

An engine may be a child process on this machine (an `ipc://` socket in the 0700 runtime dir) or, later, an actor on
another node, so nothing here is specific to one machine: every message is one JSON object with the protocol version
`v`, a `type` from `MESSAGES`, and the fields that type requires; no pickles, no live objects. A frame that is not
such a message is refused by `decode` with one line (and counted by whoever received it), never acted on.

Requests (front → engine) carry an `id`; the engine answers each with exactly one `reply` of the same id
(`ok` true with `data`, or false with `ename`/`error`/`kind`), after any number of `token` (generate) events.
Unsolicited engine events: `hello` (once per engine, on connect; again only from a new engine, e.g. one that Ray
restarted), `heartbeat` (one just before the hello, then every few seconds: the engine is alive, with its node's
load and budget), `progress`, `state` and `removed` of a process. Fields are only ever added, so a front and an
engine of the same version always agree; off the machine the frames travel inside CurveZMQ (the front's server key,
a client key it issued).
"""

from __future__ import annotations

import json
from typing import Any

VERSION = 1
MAX_FRAME = 64 << 20  # a prompt up to a model's context is far below this

# type → fields it must carry (beyond `v` and `type`)
MESSAGES: dict[str, tuple[str, ...]] = {
    # front → engine
    "load": ("id", "pid", "name", "path"),  # + device, dtype, nice, max_batch, ctx, keep_alive, locked
    "generate": ("id", "pid"),  # + prompt (text) | messages (chat), params, client
    "cancel": ("id",),  # the id of a generate
    "signal": ("id", "pid", "sig"),  # TERM KILL STOP CONT; + how, reason (KILL after TERM's grace)
    "renice": ("id", "pid", "nice"),
    "stats": ("id",),
    "mem": ("id",),
    "mlock": ("id", "pid"),
    "munlock": ("id", "pid"),
    "keepalive": ("id", "pid", "seconds"),
    "pageout": ("id", "pid"),
    "threads": ("id",),
    "split": ("id", "pid", "text", "tokens"),  # + overlap: a long text → chunks of at most `tokens` tokens
    "count": ("id", "pid", "texts"),  # token counts of texts, and the process's context
    "probe": ("id", "path"),  # + device: can this node read the checkpoint, its size, the device's budget and load
    "shutdown": ("id",),
    # engine → front
    "hello": ("node", "pid"),  # + devices, address
    "heartbeat": ("node", "pid"),  # + budget, procs, tok_s, queued, load (the node's driver sample, remote engines)
    "reply": ("id", "ok"),
    "token": ("id", "text"),
    "progress": ("pid", "progress", "text"),
    "state": ("pid", "state"),  # + reason, dtype, device
    "removed": ("pid", "how"),  # + reason
}
EVENTS = frozenset({"hello", "heartbeat", "reply", "token", "progress", "state", "removed"})
REQUESTS = frozenset(t for t in MESSAGES if t not in EVENTS)


class WireError(ValueError):
    """A frame that is not a valid message of this protocol version (one line saying what is wrong)."""


def encode(msg_type: str, **fields: Any) -> bytes:
    """One message as a frame; raises WireError for an unknown type or a missing field (a bug in the sender)."""
    required = MESSAGES.get(msg_type)
    if required is None:
        raise WireError(f"unknown message type {msg_type!r}")
    missing = [f for f in required if f not in fields]
    if missing:
        raise WireError(f"{msg_type}: missing {', '.join(missing)}")
    return json.dumps({"v": VERSION, "type": msg_type, **fields}, separators=(",", ":")).encode()


def decode(frame: bytes) -> dict[str, Any]:
    """A frame → the message dict, checked for version, type and required fields; WireError otherwise."""
    if len(frame) > MAX_FRAME:
        raise WireError(f"frame of {len(frame)} bytes is over the {MAX_FRAME} byte limit")
    try:
        msg = json.loads(frame)
    except (ValueError, UnicodeDecodeError) as e:
        raise WireError(f"not JSON: {e}") from None
    if not isinstance(msg, dict):
        raise WireError("not a JSON object")
    if msg.get("v") != VERSION:
        raise WireError(f"protocol version {msg.get('v')!r}, expected {VERSION}: the front and engine are different llmsh versions")
    required = MESSAGES.get(str(msg.get("type")))
    if required is None:
        raise WireError(f"unknown message type {msg.get('type')!r}")
    missing = [f for f in required if f not in msg]
    if missing:
        raise WireError(f"{msg['type']}: missing {', '.join(missing)}")
    return msg
