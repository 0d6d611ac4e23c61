"""The shell client's light wire signer speaks exactly jupyter_client's Session format, both ways."""

from __future__ import annotations

import secrets

import pytest
from jupyter_client.session import Session

from llmsh.client.wire import Wire, WireError


@pytest.fixture
def key() -> str:
    return secrets.token_hex(32)


def test_session_accepts_wire_messages(key: str) -> None:
    wire = Wire(key)
    session = Session(key=key.encode(), signature_scheme="hmac-sha256", check_pid=False)
    msg = wire.msg("execute_request", {"code": "echo 'ünï'", "silent": False}, metadata={"cwd": "/tmp"})
    frames = wire.serialize(msg)
    _, rest = session.feed_identities([b"client-id", *frames])
    got = session.deserialize(rest)
    assert got["header"]["msg_id"] == msg["header"]["msg_id"] and got["msg_type"] == "execute_request"
    assert got["header"]["session"] == wire.session and got["header"]["version"] == "5.3"
    assert got["content"] == {"code": "echo 'ünï'", "silent": False} and got["metadata"] == {"cwd": "/tmp"}


def test_wire_accepts_session_messages_and_rejects_tampering(key: str) -> None:
    wire = Wire(key)
    session = Session(key=key.encode(), signature_scheme="hmac-sha256", check_pid=False)
    parent = wire.msg("execute_request", {"code": "x"})
    reply = session.msg("execute_reply", {"status": "ok", "llmsh_exit_code": 0}, parent=parent)
    frames = session.serialize(reply, ident=[b"identity"])
    got = wire.deserialize(frames)
    assert got["msg_type"] == "execute_reply" and got["content"]["llmsh_exit_code"] == 0
    assert got["parent_header"]["msg_id"] == parent["header"]["msg_id"]
    tampered = list(frames)
    tampered[-1] = b'{"status": "error"}'
    with pytest.raises(WireError, match="bad signature"):
        wire.deserialize(tampered)
    with pytest.raises(WireError):
        Wire("00" * 32).deserialize(frames)  # another kernel's key
    with pytest.raises(WireError, match="no delimiter"):
        wire.deserialize([b"garbage"])


def test_msg_ids_are_unique(key: str) -> None:
    wire = Wire(key)
    ids = {wire.msg("kernel_info_request", {})["header"]["msg_id"] for _ in range(100)}
    assert len(ids) == 100
