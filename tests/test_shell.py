"""The interactive shell in a real pseudo-terminal (pexpect) against a real kernel: output, Tab completion asked of
the kernel, multi-line input, Ctrl-C (interrupts the foreground command only; at the prompt just a new prompt),
background job notices printed while the prompt waits, Ctrl-D and `exit N`, the history file."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pexpect
import pytest

from llmsh.client.render import PROGRESS_MIME

PROMPT = r"llmsh>"  # prompt-toolkit draws the trailing space as a cursor move, so match up to ">"


def spawn(kernel: Any) -> pexpect.spawn:
    env = dict(kernel.env, PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm", NO_COLOR="1")
    child = pexpect.spawn(
        sys.executable, ["-m", "llmsh", "--kernel", str(kernel.connection_file)],
        env=env, encoding="utf-8", dimensions=(40, 150), timeout=15,
    )
    child.expect_exact("'help' lists the commands")
    child.expect(PROMPT)
    return child


@pytest.fixture
def shell(kernel: Any) -> Any:
    child = spawn(kernel)
    yield child
    if child.isalive():
        child.terminate(force=True)


def test_output_completion_multiline_and_ctrl_d(shell: Any, isolated_home: Path) -> None:
    shell.sendline("echo 'x''y'z")
    shell.expect_exact("xyz\r\n")  # the typed line shows the quotes; only the output reads xyz
    shell.expect(PROMPT)
    shell.send("hel\t")  # the kernel completes "hel" to the only match, "help" (else: command not found)
    time.sleep(0.5)
    shell.send("\r")
    shell.expect_exact("Type 'help CMD' or 'CMD --help' for details.")
    shell.expect(PROMPT)
    shell.send("ech\t")  # a single match gets a trailing space, so the argument can follow at once
    time.sleep(0.5)
    shell.send("'sp''aced'\r")  # without the space this would be the unknown command echo'sp''aced'
    shell.expect_exact("spaced\r\n")
    shell.expect(PROMPT)
    shell.send("echo 'first\r")  # the quote is open: Enter continues the line
    time.sleep(0.3)
    shell.send("second'\r")
    shell.expect_exact("first\r\nsecond\r\n")
    shell.expect(PROMPT)
    shell.send("\x03")  # Ctrl-C at the prompt: just a new prompt
    shell.expect(PROMPT)
    shell.sendline("echo still-here | echo piped-ok")
    shell.expect_exact("piped-ok\r\n")
    shell.expect(PROMPT)
    shell.send("\x04")  # Ctrl-D leaves
    shell.expect(pexpect.EOF)
    shell.close()
    assert shell.exitstatus == 0
    history = (isolated_home / "state" / "llmsh" / "history").read_text()
    assert "echo 'x''y'z" in history and "echo 'first\nsecond'" in history.replace("+", "")


def test_ctrl_c_stops_the_foreground_command_not_the_jobs(shell: Any) -> None:
    shell.sendline("sleep 4 &")
    shell.expect_exact("[1] sleep 4")
    shell.expect(PROMPT)
    shell.sendline("sleep 30")
    time.sleep(0.5)
    shell.send("\x03")
    shell.expect_exact("llmsh: interrupted", timeout=5)
    shell.expect_exact("llmsh [130]>")
    shell.sendline("jobs")
    shell.expect_exact("[1]+  Running     sleep 4 &")
    shell.expect(PROMPT)
    # the job's end is announced while the prompt is waiting (patch_stdout prints above it)
    shell.expect_exact("[1]+  Done        sleep 4", timeout=10)
    shell.sendline("nope-cmd")
    shell.expect_exact("llmsh: nope-cmd: command not found")
    shell.expect_exact("llmsh [127]>")
    shell.sendline("exit 4")
    shell.expect(pexpect.EOF)
    shell.close()
    assert shell.exitstatus == 4


class _Tty(io.StringIO):
    """A captured stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _progress_msg(fraction: float) -> dict[str, Any]:
    data = {PROGRESS_MIME: {"fraction": fraction, "label": "load m (pid 1): reading"}, "text/plain": "load m 50%"}
    return {"msg_type": "display_data", "content": {"data": data}}


def test_progress_bar_is_rich_on_a_terminal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmsh.client.render import Printer

    piped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", piped)
    printer = Printer()
    printer.on_output(_progress_msg(0.5))
    printer.done()
    assert piped.getvalue() == ""  # no terminal: nothing drawn (not even the text/plain)
    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    printer.on_output(_progress_msg(0.25))
    printer.on_output(_progress_msg(0.5))
    drawn = tty.getvalue()
    assert "load m (pid 1): reading" in drawn and "50%" in drawn and "━" in drawn
    assert "rich.progress" in sys.modules
    printer.done()  # transient: the bar is erased when the command ends
    assert len(tty.getvalue()) > len(drawn)
    printer.done()  # idempotent


def test_rich_is_imported_only_for_progress(kernel: Any) -> None:
    code = """
import sys
from llmsh.client.render import Printer
p = Printer()
p.on_output({"msg_type": "stream", "content": {"name": "stdout", "text": "hi\\n"}})
print("RICH", "rich" in sys.modules)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=kernel.env, timeout=60)
    assert r.stdout.splitlines()[-1] == "RICH False", r.stdout + r.stderr
