"""The shell and the language, hardened (issue 14): options after the prompt, process names, sanitised terminal
output, bad configs, seeds, chat's /commands. A real kernel, the real CLI, a tiny GPT-2."""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llmsh.client.chat import ChatSpec, chat_loop
from llmsh.protocol.names import name_problem, usable_name
from llmsh.runtime import LoadError, load


@pytest.fixture(scope="module")
def g(kernel: Any, tiny_gpt2: Path) -> str:
    rows = kernel.execute("ps --json")["data"]
    if not any(r["name"] == "g" for r in rows):
        r = kernel.execute(f"load {tiny_gpt2} --name g")
        assert r["status"] == "ok", r
    return "g"


def test_json_after_the_prompt(kernel: Any, g: str) -> None:
    r = kernel.llmsh("-c", f"run {g} --max-tokens 3 --temperature 0 hi --json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["pid"] and isinstance(data["text"], str) and data["prompt_tokens"] >= 1
    r = kernel.llmsh("-c", f"run {g} --max-tokens 2 --temperature 0 -- --json")  # `--` ends options: a prompt
    assert r.returncode == 0 and not r.stdout.lstrip().startswith("{")


@pytest.mark.parametrize(
    ("name", "why"),
    [("2", "is all digits, which reads as a PID"), ("%1", "starts with '%', which is job syntax"),
     ("a\x1b]0;x\x07b", "has control characters"), ("", "cannot be empty")],
)
def test_bad_process_names_are_refused(kernel: Any, tiny_gpt2: Path, name: str, why: str) -> None:
    assert why in (name_problem(name) or "")
    r = kernel.execute(f"load {tiny_gpt2} --name '{name}'")
    assert r["status"] == "error" and why in r["reply"]["evalue"] and "with --name" in r["reply"]["evalue"]
    assert all(row["name"] != name for row in kernel.execute("ps --json")["data"])


def test_a_folder_named_by_digits_loads_under_a_usable_name(kernel: Any, tiny_gpt2: Path, tmp_path: Path) -> None:
    assert usable_name("7") == "model-7" and usable_name("gpt2") == "gpt2" and usable_name("a\x1bb") == "ab"
    shutil.copytree(tiny_gpt2, tmp_path / "7")
    r = kernel.execute(f"load {tmp_path / '7'}")
    assert r["status"] == "ok", r
    assert r["data"]["name"] == "model-7"
    kernel.execute(f"kill -KILL {r['data']['pid']}")


def _on_a_terminal(kernel: Any, code: str) -> bytes:
    """Run `llmsh -c CODE` with stdout and stderr on a pty; what the terminal received."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmsh", "--kernel", str(kernel.connection_file), "-c", code],
        stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env={**kernel.env, "NO_COLOR": "1"},
    )
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=30)
    os.close(leader)
    return out


def test_control_sequences_are_shown_not_obeyed_on_a_terminal(kernel: Any, tmp_path: Path) -> None:
    code = "echo 'title\x1b]0;pwned\x07 csi\u009b2J end'"
    seen = _on_a_terminal(kernel, code).decode()
    assert "\x1b" not in seen and "\x07" not in seen and "\u009b" not in seen
    assert "title^[]0;pwned^G csi<9b>2J end" in seen
    r = kernel.llmsh("-c", code)  # into a pipe: the bytes as they are
    assert r.stdout == "title\x1b]0;pwned\x07 csi\u009b2J end\n"


@pytest.mark.parametrize(("key", "value"), [("n_layer", 0), ("n_layer", -3), ("n_head", 0), ("n_embd", 63)])
def test_bad_configs_fail_load_with_one_line(tiny_gpt2: Path, tmp_path: Path, key: str, value: int) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_gpt2, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError) as err:
        load(folder)
    line = str(err.value)
    assert "\n" not in line and key in line and str(folder / "config.json") in line


def test_a_bad_config_through_the_kernel(kernel: Any, tiny_gpt2: Path, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_gpt2, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "n_head": 0}))
    r = kernel.llmsh("-c", f"load {folder} --name broken")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "n_head is 0 in" in r.stderr and "ZeroDivision" not in r.stderr


@pytest.mark.parametrize("seed", ["1e23", str(2**64), "-1"])
def test_a_bad_seed_is_a_usage_error(kernel: Any, g: str, seed: str) -> None:
    r = kernel.llmsh("-c", f"run {g} --seed {seed} hi")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert f"argument --seed: '{seed}' is not a whole number from 0 to {2**63 - 1}" in r.stderr


async def test_chat_slash_commands() -> None:
    lines = iter(["/frobnicate", "/reset", "//etc is a folder", "/usr/bin holds programs", "/exit"])
    ran: list[str] = []
    said: list[str] = []

    async def prompt(_: str) -> str:
        return next(lines)

    async def run(code: str) -> int:
        ran.append(code)
        return 0

    await chat_loop(ChatSpec("g", [], []), prompt, run, said.append)
    assert said[1] == ("llmsh: chat: unknown command /frobnicate; known: /reset, /show, /help, /exit, /quit "
                       "(start the line with // to send it to the model)")
    assert said[2] == "(conversation with g forgotten; the next line starts a new one)"
    assert ran[1] == "chat --reset 'g'"
    assert ran[2].endswith("-- '/etc is a folder'") and ran[3].endswith("-- '/usr/bin holds programs'")
    assert not any("frobnicate" in code for code in ran)  # never sent to the model


def test_background_half_lines_wait_for_their_newline_while_the_prompt_is_up(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from llmsh.client.render import Printer

    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    printer = Printer()

    def stream(text: str) -> None:
        printer.on_output({"msg_type": "stream", "content": {"name": "stdout", "text": text}})

    printer.prompting(True)
    stream("a background ")
    assert out.getvalue() == ""  # would have landed on the prompt's line
    stream("job's line\nand half")
    assert out.getvalue() == "a background job's line\n"
    printer.prompting(False)  # a foreground command starts: the half line ends first
    assert out.getvalue() == "a background job's line\nand half\n"
    stream("fore")
    stream("ground")
    assert out.getvalue().endswith("and half\nforeground")  # a foreground command streams as it comes
