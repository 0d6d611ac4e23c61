"""The kernel speaks Jupyter 5.3: kernel_info, execute (status, stream, execute_result, error), complete, is_complete,
history; and it survives requests that make a handler raise."""

from __future__ import annotations

import json
from typing import Any

import zmq

from llmsh.protocol.connection import url
from llmsh.protocol.session import make_session


def _iopub_until_idle(kc: Any, msg_id: str, timeout: float = 10) -> list[dict[str, Any]]:
    msgs = []
    while True:
        msg = kc.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        msgs.append(msg)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return msgs


def test_kernel_info_reports_llmsh(kernel):
    kc = kernel.client()
    try:
        reply = kc.kernel_info(reply=True, timeout=10)
    finally:
        kc.stop_channels()
    c = reply["content"]
    assert c["language_info"]["name"] == "llmsh"
    assert c["protocol_version"] == "5.3"
    assert c["implementation"] == "llmsh"
    assert c["llmsh"]["pid"] == kernel.pid
    assert c["llmsh"]["ports"]["shell"] == json.loads(kernel.connection_file.read_text())["shell_port"]


def test_connection_file_is_private(kernel):
    assert kernel.connection_file.stat().st_mode & 0o777 == 0o600
    info = json.loads(kernel.connection_file.read_text())
    assert info["signature_scheme"] == "hmac-sha256" and len(bytes.fromhex(info["key"])) == 32


def test_execute_busy_stream_idle_with_parent(kernel):
    kc = kernel.client()
    try:
        msg_id = kc.execute("echo hi")
        reply = kc.get_shell_msg(timeout=10)
        msgs = _iopub_until_idle(kc, msg_id)
    finally:
        kc.stop_channels()
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["status"] == "ok" and reply["content"]["llmsh_exit_code"] == 0
    kinds = [m["msg_type"] for m in msgs]
    assert kinds[0] == "status" and msgs[0]["content"]["execution_state"] == "busy"
    assert "execute_input" in kinds
    streams = [m["content"] for m in msgs if m["msg_type"] == "stream"]
    assert streams == [{"name": "stdout", "text": "hi\n"}]


def test_execute_result_has_text_and_json(kernel):
    out = kernel.execute("uname")
    assert out["status"] == "ok"
    bundle = out["results"][-1]
    assert bundle["text/plain"].startswith("llmsh ")
    assert bundle["application/json"]["pid"] == kernel.pid


def test_unknown_command_is_one_line_error_and_kernel_keeps_serving(kernel):
    out = kernel.execute("nosuchcommand")
    assert out["status"] == "error"
    assert out["exit_code"] == 127
    assert "\n" not in out["reply"]["evalue"] and "command not found" in out["reply"]["evalue"]
    assert out["error"]["evalue"] == out["reply"]["evalue"]  # the iopub error a Jupyter frontend shows
    assert kernel.execute("echo still here")["stdout"] == "still here\n"


def test_complete_and_is_complete(kernel):
    kc = kernel.client()
    try:
        comp = kc.complete("ech", reply=True, timeout=10)["content"]
        kc.is_complete("echo 'unclosed")
        inc = kc.get_shell_msg(timeout=10)["content"]
        kc.is_complete("echo done")
        done = kc.get_shell_msg(timeout=10)["content"]
    finally:
        kc.stop_channels()
    assert "echo" in comp["matches"] and comp["cursor_start"] == 0 and comp["cursor_end"] == 3
    assert inc["status"] == "incomplete"
    assert done["status"] == "complete"


def test_history_request_sees_executed_lines(kernel):
    kernel.execute("echo for-history")
    kc = kernel.client()
    try:
        reply = kc.history(hist_access_type="tail", n=50, reply=True, timeout=10)["content"]
    finally:
        kc.stop_channels()
    assert "echo for-history" in [h[2] for h in reply["history"]]


def test_handler_exceptions_reply_error_and_kernel_survives(kernel):
    """Requests that make a handler raise get an error reply; the kernel keeps answering."""
    info = json.loads(kernel.connection_file.read_text())
    session = make_session(info["key"])
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(url(info, "shell"))
    try:
        bad = session.msg("history_request", {"hist_access_type": "tail", "n": "not a number"})
        sock.send_multipart(session.serialize(bad))
        assert sock.poll(10000)
        reply = session.deserialize(session.feed_identities(sock.recv_multipart())[1])
        assert reply["parent_header"]["msg_id"] == bad["header"]["msg_id"]
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "ValueError"
        odd = session.msg("execute_request", {"code": 42, "silent": False})
        sock.send_multipart(session.serialize(odd))
        assert sock.poll(10000)
        reply = session.deserialize(session.feed_identities(sock.recv_multipart())[1])
        assert reply["content"]["status"] == "ok"  # non-text code is treated as an empty line
        unknown = session.msg("frobnicate_request", {})
        sock.send_multipart(session.serialize(unknown))
        assert sock.poll(10000)
        reply = session.deserialize(session.feed_identities(sock.recv_multipart())[1])
        assert reply["msg_type"] == "frobnicate_reply" and reply["content"]["ename"] == "UnknownMessageType"
    finally:
        ctx.destroy(linger=0)
    assert kernel.execute("echo alive")["stdout"] == "alive\n"
