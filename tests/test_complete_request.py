"""A signed complete_request always gets a reply (issue 14): an out-of-range cursor_pos or a non-string code is an
error reply naming the field; a good one still completes. Raw signed requests to a real kernel."""

from __future__ import annotations

from typing import Any

import pytest

from llmsh.protocol.connection import read_connection_file
from llmsh.protocol.request import request


@pytest.mark.parametrize(
    ("content", "says"),
    [({"code": "ec", "cursor_pos": 99}, "cursor_pos 99 is not a position in the code (0..2)"),
     ({"code": "ec", "cursor_pos": -1}, "cursor_pos -1 is not"),
     ({"code": "ec", "cursor_pos": True}, "cursor_pos True is not"),
     ({"code": "ec", "cursor_pos": "1"}, "cursor_pos '1' is not"),
     ({"code": None, "cursor_pos": 0}, "code must be a string, not NoneType")],
)
def test_bad_complete_request_gets_an_error_reply(kernel: Any, content: dict, says: str) -> None:
    reply = request(read_connection_file(kernel.connection_file), "complete_request", content, channel="shell", timeout=5)
    assert reply is not None and reply["msg_type"] == "complete_reply"
    assert reply["content"]["status"] == "error" and says in reply["content"]["evalue"]


def test_good_complete_request_completes(kernel: Any) -> None:
    reply = request(read_connection_file(kernel.connection_file), "complete_request", {"code": "ec", "cursor_pos": 2},
                    channel="shell", timeout=5)
    assert reply is not None and reply["content"]["status"] == "ok" and "echo" in reply["content"]["matches"]
