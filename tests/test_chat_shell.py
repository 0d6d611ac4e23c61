"""Interactive chat in the real shell (pexpect pty) against a real kernel and a tiny Llama with a chat template:
`chat NAME` opens a sub-prompt whose lines are turns of one conversation; Ctrl-C during a reply ends that turn
only; Ctrl-C at the empty sub-prompt, Ctrl-D and /exit leave; /reset forgets. Batch mode needs a MESSAGE."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pexpect
import pytest

from llmsh.client.chat import chat_request, quote
from llmsh.commands.parser import parse
from tests.test_shell import PROMPT, spawn

OPTS = "--max-tokens 4 --temperature 0 --ignore-eos"
CHAT_PROMPT = "talker>"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_chat_request_parsing() -> None:
    spec = chat_request("chat --system 'be brief' talker --max-tokens 4 --temperature=0 --ignore-eos")
    assert spec is not None and spec.target == "talker"
    assert spec.open_options == ["--system", "be brief"]
    assert spec.turn_options == ["--max-tokens", "4", "--temperature=0", "--ignore-eos"]
    line = "it's a | b; $HOME > x"
    argv = parse(spec.turn(line)).statements[0].body.first.commands[0].argv
    assert argv == ["chat", "--max-tokens", "4", "--temperature=0", "--ignore-eos", "talker", "--", line]
    for text in ("chat talker hi", "chat talker --show", "chat", "chat talker &", "chat talker | cat", "chat --help", "run talker"):
        assert chat_request(text) is None or text == "chat talker --show", text
    assert quote("a'b") == "'a'\\''b'"


def _pid(kernel: Any, name: str) -> int | None:
    rows = kernel.execute("ps --json")["data"]
    return next((int(r["pid"]) for r in rows if r["name"] == name), None)


@pytest.fixture(scope="module")
def talker(kernel: Any, tiny_llama: Path) -> str:
    if _pid(kernel, "talker") is None:
        r = kernel.execute(f"load {tiny_llama} --name talker")
        assert r["status"] == "ok", r
    return "talker"


def _send(shell: Any, text: str) -> None:
    """Type a line at the chat prompt and wait until the prompt has accepted it (Enter's newline after it)."""
    shell.sendline(text)
    shell.expect(re.escape(text) + r"(\x1b\[[0-9;?]*[A-Za-z])*\r+\n")


def _turn(shell: Any, text: str) -> str:
    """Send one chat line; return what was printed up to the next chat prompt (the echo of the line removed)."""
    _send(shell, text)
    shell.expect_exact(CHAT_PROMPT, timeout=30)
    return ANSI.sub("", shell.before).replace("\r", "")


def test_chat_sub_prompt(kernel: Any, talker: str) -> None:
    shell = spawn(kernel)
    try:
        shell.sendline(f"chat {talker} {OPTS}")
        shell.expect_exact("Ctrl-C stops a reply")  # the help line
        shell.expect_exact(CHAT_PROMPT)
        first = _turn(shell, "hello there")
        # the same turn from a fresh session (a new conversation) gives the same greedy reply
        alone = kernel.execute(f"chat talker {OPTS} -- 'hello there'")
        assert alone["status"] == "ok", alone
        assert alone["stdout"].strip() and alone["stdout"].strip() in first
        kernel.execute("chat talker --reset")  # that was this helper client's conversation, not the shell's
        _turn(shell, "it's a | b")  # quotes and shell syntax reach the model as typed
        # Ctrl-C mid-reply: the process is STOPped so the turn is certainly still waiting when ^C arrives
        pid = _pid(kernel, talker)
        assert kernel.execute(f"kill -STOP {pid}")["status"] == "ok"
        _send(shell, "third message")
        shell.send("\x03")
        shell.expect_exact("llmsh: interrupted", timeout=10)
        shell.expect_exact(CHAT_PROMPT)  # the chat goes on
        assert kernel.execute(f"kill -CONT {pid}")["status"] == "ok"
        _turn(shell, "fourth")
        shown = _turn(shell, "/show")
        users = re.findall(r"^user: (.*)$", shown, re.M)
        assert users == ["hello there", "it's a | b", "third message", "fourth"], shown
        shell.send("\x04")  # Ctrl-D leaves the chat, not the shell
        shell.expect_exact("(chat ended)")
        shell.expect(PROMPT)
        shell.sendline("echo back")
        shell.expect_exact("back\r\n")
        shell.expect(PROMPT)
        # reopening continues the same conversation; /reset forgets it; Ctrl-C with text clears the line,
        # at an empty chat prompt it leaves
        shell.sendline(f"chat {talker}")
        shell.expect_exact("user: fourth")
        shell.expect_exact(CHAT_PROMPT)
        assert "user:" not in _turn(shell, "/reset")
        assert "user:" not in _turn(shell, "/show")
        shell.send("half typed")
        shell.send("\x03")  # clears the line (were it sent, "half typed/exit" would be a turn and the chat would go on)
        shell.sendline("/exit")
        shell.expect_exact("(chat ended)")
        shell.expect(PROMPT)
        shell.sendline(f"chat {talker}")
        shell.expect_exact(CHAT_PROMPT)
        shell.send("\x03")
        shell.expect_exact("(chat ended)")
        shell.expect(PROMPT)
        # an unknown process: one line, and no sub-prompt
        shell.sendline("chat nobody")
        shell.expect_exact("llmsh: ")
        shell.expect(r"llmsh \[\d+\]>")
        shell.send("\x04")
        shell.expect(pexpect.EOF)
    finally:
        if shell.isalive():
            shell.terminate(force=True)


def test_batch_chat_without_message_says_so(kernel: Any, talker: str) -> None:
    r = kernel.llmsh("-c", f"chat {talker}")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "MESSAGE" in lines[0], r.stderr
