"""`!CMD` runs a system command on the client, alone or on either side of a pipe (issue 14): the real CLI and
shell language against a real kernel and a tiny GPT-2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llmsh.client.bang import BangError, Part, plan


def llmsh_in(kernel: Any, code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmsh", "--kernel", str(kernel.connection_file), "-c", code],
        capture_output=True, text=True, env=kernel.env, cwd=cwd, timeout=60,
    )


def test_plans() -> None:
    assert plan("echo hi | run g") is None
    p = plan("!cat notes.txt | run g --max-tokens 3 && run g x | !sort | !uniq -c; !ls")
    assert p is not None
    first, second = p.statements
    assert first == [("", Part("cat notes.txt", "run g --max-tokens 3", None)), ("&&", Part(None, "run g x", "sort | uniq -c"))]
    assert second == [("", Part("ls", None, None))]
    with pytest.raises(BangError, match="can only start or end a pipeline"):
        plan("run a | !sort | run b")
    with pytest.raises(BangError, match="background"):
        plan("!sleep 1 &")


def test_a_system_command_runs_here(kernel: Any, tmp_path: Path) -> None:
    (tmp_path / "here.txt").write_text("x")
    r = llmsh_in(kernel, "!ls; !exit 3", tmp_path)
    assert r.stdout == "here.txt\n" and r.returncode == 3


def test_kernel_output_into_a_system_command(kernel: Any, tmp_path: Path) -> None:
    r = llmsh_in(kernel, "echo pear apple fig | !tr ' ' '\\n' | !sort", tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (0, "apple\nfig\npear\n", "")
    r = llmsh_in(kernel, "!false && echo never || echo fallback", tmp_path)
    assert r.stdout == "fallback\n"


def test_a_system_command_into_a_model(kernel: Any, tiny_gpt2: Path, tmp_path: Path) -> None:
    if not any(row["name"] == "bang" for row in kernel.execute("ps --json")["data"]):
        assert kernel.execute(f"load {tiny_gpt2} --name bang")["status"] == "ok"
    (tmp_path / "notes.txt").write_text("the quick brown fox jumps over the lazy dog")
    opts = "--max-tokens 2 --temperature 0 --json"
    piped = llmsh_in(kernel, f"!cat notes.txt | run bang {opts}", tmp_path)
    direct = llmsh_in(kernel, f"run bang {opts} 'the quick brown fox jumps over the lazy dog'", tmp_path)
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["prompt_tokens"] == json.loads(direct.stdout)["prompt_tokens"]
    assert json.loads(piped.stdout)["text"] == json.loads(direct.stdout)["text"]
