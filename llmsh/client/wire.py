"""The Jupyter wire format (protocol 5.3) for the shell client: build, sign, serialise and verify messages.

The kernel uses `jupyter_client.session.Session`; the client does not, because importing it costs about 200 ms
(traitlets, tornado, dateutil, zmq.asyncio via jupyter_client's package import) — most of the 300 ms budget of
`llmsh -c 'echo hi'`. The format is small: `[identities…, b"<IDS|MSG>", HMAC-SHA256 hex of the next four frames,
header, parent_header, metadata, content, buffers…]`. tests/test_client_wire.py checks that this module and
`Session` accept each other's messages byte for byte.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from typing import Any

DELIM = b"<IDS|MSG>"
PROTOCOL_VERSION = "5.3"


class WireError(ValueError):
    """A message that failed to verify or parse; the client drops it."""


def _utc_now() -> str:
    """ISO 8601 UTC time with microseconds (what Session writes), without importing datetime."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def _pack(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, default=str).encode("utf-8")


class Wire:
    """Signs and verifies messages for one client session (`session` is the id the kernel groups jobs by)."""

    def __init__(self, key: str | bytes, *, session: str | None = None, username: str | None = None) -> None:
        self.key = key.encode("ascii") if isinstance(key, str) else key
        self.session = session or os.urandom(16).hex()
        self.bsession = self.session.encode("ascii")
        self.username = username or os.environ.get("USER", "llmsh")
        self._count = 0

    def sign(self, parts: list[bytes]) -> bytes:
        """HMAC-SHA256 hex digest of header, parent, metadata, content (empty when the kernel has no key)."""
        if not self.key:
            return b""
        h = hmac.new(self.key, digestmod=hashlib.sha256)
        for p in parts:
            h.update(p)
        return h.hexdigest().encode("ascii")

    def msg(self, msg_type: str, content: dict[str, Any], *, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """A new message with a unique msg_id, this session and the current UTC time."""
        self._count += 1
        header = {
            "msg_id": f"{self.session}_{os.getpid()}_{self._count}",
            "msg_type": msg_type,
            "username": self.username,
            "session": self.session,
            "date": _utc_now(),
            "version": PROTOCOL_VERSION,
        }
        return {"header": header, "parent_header": {}, "metadata": metadata or {}, "content": content}

    def serialize(self, msg: dict[str, Any]) -> list[bytes]:
        """Frames to send on a DEALER socket: delimiter, signature, header, parent, metadata, content."""
        parts = [_pack(msg["header"]), _pack(msg["parent_header"]), _pack(msg["metadata"]), _pack(msg["content"])]
        return [DELIM, self.sign(parts), *parts]  # delimiter, HMAC, header, parent_header, metadata, content

    def deserialize(self, frames: list[bytes]) -> dict[str, Any]:
        """Verify and decode received frames (routing identities, if any, are skipped); raises WireError."""
        try:
            i = frames.index(DELIM)
        except ValueError:
            raise WireError("no delimiter") from None
        rest = frames[i + 1 :]
        if len(rest) < 5:
            raise WireError("too few frames")
        signature, parts = bytes(rest[0]), [bytes(p) for p in rest[1:5]]
        if self.key and not hmac.compare_digest(signature, self.sign(parts)):
            raise WireError("bad signature")
        try:
            header, parent, metadata, content = (json.loads(p) for p in parts)
        except ValueError as e:
            raise WireError(f"bad JSON: {e}") from None
        if not isinstance(header, dict) or not isinstance(parent, dict) or not isinstance(content, dict):
            raise WireError("wrong shape")
        return {
            "header": header,
            "parent_header": parent,
            "metadata": metadata,
            "content": content,
            "msg_type": header.get("msg_type", ""),
            "buffers": rest[5:],
        }
