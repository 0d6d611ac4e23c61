"""Signed sessions: a `jupyter_client.session.Session` factory and the inbound check every message goes through.

The kernel never trusts a frame it has not verified: `verify()` splits the routing identities off, lets
`Session.deserialize` check the HMAC-SHA256 signature and its replay history, and then checks the header shape
and that the header (msg_id, type, date) is new. Each failure carries a reason that the kernel counts (`kernel status`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from jupyter_client.session import DELIM, Session

from llmsh.protocol.connection import SIGNATURE_SCHEME

# Reasons a message is dropped; these are the keys of `counters.snapshot()["rejected"]`.
MALFORMED = "malformed"  # no delimiter, too few frames, bad JSON, header without msg_id/msg_type/session
UNSIGNED = "unsigned"  # empty signature frame while the kernel has a key
BAD_SIGNATURE = "bad_signature"  # HMAC does not match the frames (wrong key or tampered)
REPLAY = "replay"  # signature already seen, or the same header (msg_id, type, date) already seen
REASONS = (MALFORMED, UNSIGNED, BAD_SIGNATURE, REPLAY)


class Rejected(Exception):
    """A message that must be dropped; `.reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def make_session(key: str | bytes, username: str = "llmsh") -> Session:
    """A Session signing with hmac-sha256 under `key` (hex text from the connection file)."""
    kb = key.encode("ascii") if isinstance(key, str) else key
    return Session(key=kb, signature_scheme=SIGNATURE_SCHEME, username=username, check_pid=False)


class Verifier:
    """Checks inbound frame lists with one Session; remembers the last `history` headers to refuse replays."""

    def __init__(self, session: Session, history: int = 65536) -> None:
        self.session = session
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._history = history

    def verify(self, frames: list[bytes]) -> tuple[list[bytes], dict[str, Any]]:
        """Return (routing identities, message dict) or raise Rejected."""
        try:
            idx = frames.index(DELIM)
        except ValueError:
            raise Rejected(MALFORMED, "no <IDS|MSG> delimiter") from None
        idents, rest = frames[:idx], frames[idx + 1 :]
        if len(rest) < 5:
            raise Rejected(MALFORMED, f"{len(rest)} frames after the delimiter, need 5")
        if self.session.auth is not None:
            if not rest[0]:
                raise Rejected(UNSIGNED)
            if rest[0] in self.session.digest_history:
                raise Rejected(REPLAY, "signature seen before")
        try:
            msg = self.session.deserialize(rest, content=True)
        except ValueError as e:
            text = str(e)
            if text.startswith("Invalid Signature"):
                raise Rejected(BAD_SIGNATURE) from None
            if text.startswith("Duplicate Signature"):
                raise Rejected(REPLAY, "signature seen before") from None
            if text.startswith("Unsigned"):
                raise Rejected(UNSIGNED) from None
            raise Rejected(MALFORMED, text[:80]) from None
        except Exception as e:  # TypeError/KeyError/JSON errors from garbage that happens to be signed
            raise Rejected(MALFORMED, f"{type(e).__name__}: {str(e)[:80]}") from None
        header = msg.get("header")
        if not (
            isinstance(header, dict)
            and isinstance(header.get("msg_id"), str)
            and header["msg_id"]
            and isinstance(header.get("msg_type"), str)
            and isinstance(header.get("session", ""), str)
            and isinstance(msg.get("content"), dict)
            and isinstance(msg.get("parent_header"), dict)
        ):
            raise Rejected(MALFORMED, "header or content has the wrong shape")
        # jupyter_client numbers msg_ids per Session object, and a KernelManager and its client share the session
        # id, so a bare msg_id may legitimately repeat; the same msg_id with the same type and timestamp may not.
        msg_id = header["msg_id"]
        key = f"{msg_id}|{header['msg_type']}|{header.get('date')}"
        if key in self._seen:
            raise Rejected(REPLAY, f"msg_id {msg_id} seen before")
        self._seen[key] = None
        if len(self._seen) > self._history:
            self._seen.popitem(last=False)
        return [bytes(i) for i in idents], msg
