"""Bad input on the wire: wrong or missing signatures, replays and garbage frames are dropped, counted by reason,
never executed, and the kernel keeps serving. Raw ZeroMQ sockets, so nothing fixes the frames up for us."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from jupyter_client.session import DELIM

from llmsh.protocol.connection import url
from llmsh.protocol.session import make_session


class Raw:
    """A DEALER on the kernel's shell socket with a correctly keyed Session (for the good messages)."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.info = json.loads(kernel.connection_file.read_text())
        self.session = make_session(self.info["key"])
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(url(self.info, "shell"))

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def replies(self, until_msg_id: str, timeout: float = 15) -> list[dict[str, Any]]:
        """Every reply received up to and including the one answering `until_msg_id`."""
        got = []
        while True:
            assert self.sock.poll(int(timeout * 1000)), "the kernel stopped answering"
            frames = self.sock.recv_multipart()
            msg = self.session.deserialize(self.session.feed_identities(frames)[1])
            got.append(msg)
            if msg["parent_header"].get("msg_id") == until_msg_id:
                return got

    def barrier(self) -> list[dict[str, Any]]:
        """Send a good kernel_info_request and return everything that came back before its reply.

        Messages from one DEALER are handled in order, so once this is answered every earlier frame was handled."""
        msg = self.session.msg("kernel_info_request", {})
        self.send(self.session.serialize(msg))
        return self.replies(msg["header"]["msg_id"])

    def rejected(self) -> dict[str, int]:
        return self.barrier()[-1]["content"]["llmsh"]["counters"]["rejected"]

    def close(self) -> None:
        self.ctx.destroy(linger=0)


@pytest.fixture
def raw(kernel: Any) -> Iterator[Raw]:
    r = Raw(kernel)
    yield r
    r.close()


def _execute(session: Any, code: str) -> dict[str, Any]:
    return session.msg("execute_request", {"code": code, "silent": False, "store_history": True})


def _history(kernel: Any) -> str:
    return kernel.execute("history")["stdout"]


def test_wrong_signature_is_dropped_counted_never_run(kernel, raw):
    before = raw.rejected().get("bad_signature", 0)
    intruder = make_session(uuid.uuid4().hex)  # a different key
    mark = f"echo BADSIG-{uuid.uuid4().hex[:8]}"
    raw.send(intruder.serialize(_execute(intruder, mark)))
    replies = raw.barrier()
    assert [r["msg_type"] for r in replies] == ["kernel_info_reply"]  # nothing answered the forged request
    assert replies[-1]["content"]["llmsh"]["counters"]["rejected"]["bad_signature"] == before + 1
    assert mark not in _history(kernel)


def test_tampered_content_is_dropped(raw):
    before = raw.rejected().get("bad_signature", 0)
    frames = raw.session.serialize(_execute(raw.session, "echo fine"))
    frames[-1] = json.dumps({"code": "echo TAMPERED", "silent": False}).encode()
    raw.send(frames)
    assert raw.rejected()["bad_signature"] == before + 1


def test_missing_signature_is_dropped(kernel, raw):
    before = raw.rejected().get("unsigned", 0)
    mark = f"echo UNSIGNED-{uuid.uuid4().hex[:8]}"
    frames = raw.session.serialize(_execute(raw.session, mark))
    frames[frames.index(DELIM) + 1] = b""
    raw.send(frames)
    assert raw.rejected()["unsigned"] == before + 1
    assert mark not in _history(kernel)


def test_replayed_message_is_dropped(raw):
    before = raw.rejected().get("replay", 0)
    msg = _execute(raw.session, "echo once")
    frames = raw.session.serialize(msg)
    raw.send(frames)
    first = raw.replies(msg["header"]["msg_id"])
    assert first[-1]["content"]["status"] == "ok"
    raw.send(frames)  # byte-for-byte replay: same signature
    replies = raw.barrier()
    assert [r["msg_type"] for r in replies] == ["kernel_info_reply"]
    assert replies[-1]["content"]["llmsh"]["counters"]["rejected"]["replay"] == before + 1


def test_replayed_msg_id_with_fresh_signature_is_dropped(raw):
    before = raw.rejected().get("replay", 0)
    msg = _execute(raw.session, "echo first")
    raw.send(raw.session.serialize(msg))
    raw.replies(msg["header"]["msg_id"])
    msg["content"] = {"code": "echo second", "silent": False}  # same header (msg_id), new content, re-signed
    raw.send(raw.session.serialize(msg))
    replies = raw.barrier()
    assert [r["msg_type"] for r in replies] == ["kernel_info_reply"]
    assert replies[-1]["content"]["llmsh"]["counters"]["rejected"]["replay"] == before + 1


@pytest.mark.parametrize(
    "make_frames",
    [
        lambda s: [b"garbage"],
        lambda s: [b"\x00\xff" * 40, b"more garbage"],
        lambda s: [DELIM, b"sig", b"{}"],
        lambda s: [DELIM, s.sign([b"not json", b"{}", b"{}", b"{}"]), b"not json", b"{}", b"{}", b"{}"],
        lambda s: [DELIM, s.sign([b'{"msg_id": "x"}', b"{}", b"{}", b"{}"]), b'{"msg_id": "x"}', b"{}", b"{}", b"{}"],
        lambda s: [DELIM, s.sign([b"[1, 2]", b"{}", b"{}", b"[]"]), b"[1, 2]", b"{}", b"{}", b"[]"],
    ],
    ids=["one-frame", "binary", "too-few-frames", "signed-non-json", "signed-header-without-type", "signed-wrong-shapes"],
)
def test_garbage_frames_are_dropped(raw, make_frames):
    before = raw.rejected().get("malformed", 0)
    raw.send(make_frames(raw.session))
    replies = raw.barrier()
    assert [r["msg_type"] for r in replies] == ["kernel_info_reply"]
    assert replies[-1]["content"]["llmsh"]["counters"]["rejected"]["malformed"] == before + 1


def test_rejections_show_in_kernel_status(kernel, raw):
    intruder = make_session(uuid.uuid4().hex)
    raw.send(intruder.serialize(intruder.msg("kernel_info_request", {})))
    raw.barrier()
    res = kernel.llmsh("kernel", "status")
    assert res.returncode == 0, res.stderr
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("rejected"))
    assert "bad_signature" in line
    st = json.loads(kernel.llmsh("kernel", "status", "--json").stdout)
    assert st["counters"]["rejected"]["bad_signature"] >= 1
    assert st["pid"] == kernel.pid and st["counters"]["clients"] >= 1
