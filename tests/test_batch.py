"""Batch mode through a real kernel and the real `llmsh` CLI: -c, files with line numbers, stdin, --keep-going,
exit codes, jobs, redirects, Ctrl-C, and the kernel discovery / start-on-demand paths."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest


def llmsh_in(kernel: Any, *argv: str, cwd: Path | None = None, input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI against `kernel` from the directory `cwd`."""
    return subprocess.run(
        [sys.executable, "-m", "llmsh", "--kernel", str(kernel.connection_file), *argv],
        input=input, capture_output=True, text=True, env=env or kernel.env, cwd=cwd, timeout=60,
    )


def test_dash_c_echo(kernel: Any) -> None:
    r = kernel.llmsh("-c", "echo hi")
    assert (r.returncode, r.stdout, r.stderr) == (0, "hi\n", "")


def test_unknown_command_suggests(kernel: Any) -> None:
    r = kernel.llmsh("-c", "ech hi")
    assert r.returncode == 127 and r.stdout == ""
    (line,) = r.stderr.splitlines()  # other families add names near "ech" (chat…): echo must come first
    assert line.startswith("llmsh: ech: command not found (did you mean: echo") and line.endswith("?)")


def test_bad_arguments_print_the_usage_line(kernel: Any) -> None:
    r = kernel.llmsh("-c", "sleep soon")
    assert r.returncode == 2
    (line,) = r.stderr.splitlines()
    assert line.startswith("llmsh: sleep: argument N: 'soon' is not a duration") and line.endswith("usage: sleep [-h] N")


def test_shell_semantics_within_a_line(kernel: Any) -> None:
    r = kernel.llmsh("-c", "nope || echo fallback; echo a && echo b | echo piped")
    assert r.returncode == 0 and r.stdout == "fallback\na\npiped\n"
    assert r.stderr.startswith("llmsh: nope: command not found") and r.stderr.count("\n") == 1
    r = kernel.llmsh("-c", "echo x && nope")
    assert r.returncode == 127 and r.stdout == "x\n"


def test_file_stops_at_first_failing_line(kernel: Any, tmp_path: Path) -> None:
    script = tmp_path / "job.llmsh"
    script.write_text("#!/usr/bin/env llmsh\necho one\n\n# a comment\necho 'two\nlines' && \\\n  echo three\nech x\necho never\n")
    r = kernel.llmsh(str(script))
    assert r.returncode == 127
    assert r.stdout == "one\ntwo\nlines\nthree\n"
    assert r.stderr.startswith(f"llmsh: {script}:8: ech: command not found (did you mean: echo") and r.stderr.count("\n") == 1


def test_keep_going_runs_every_line_and_returns_the_last_failure(kernel: Any, tmp_path: Path) -> None:
    script = tmp_path / "k.llmsh"
    script.write_text("sleep x\nech y\necho end\n")
    r = kernel.llmsh("--keep-going", str(script))
    assert r.returncode == 127 and r.stdout == "end\n"  # like make -k: a script with errors never exits 0
    lines = r.stderr.splitlines()
    assert lines[0].startswith(f"llmsh: {script}:1: sleep: argument N") and lines[1].startswith(f"llmsh: {script}:2: ech:")
    script.write_text("echo a\nsleep x\n")
    assert kernel.llmsh("--keep-going", str(script)).returncode == 2


def test_commands_on_stdin(kernel: Any) -> None:
    r = kernel.llmsh(input="echo a\necho b\nsleep nan-ish\necho c\n")
    assert r.returncode == 2 and r.stdout == "a\nb\n" and r.stderr.startswith("llmsh: <stdin>:3: sleep:")
    r = kernel.llmsh("-", input="echo dash\n")
    assert (r.returncode, r.stdout) == (0, "dash\n")


def test_stdin_lines_run_as_they_arrive(kernel: Any) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmsh", "--kernel", str(kernel.connection_file)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=kernel.env,
    )
    try:
        proc.stdin.write("echo 'first\n")  # an open quote: nothing runs until the piece is complete
        proc.stdin.flush()
        proc.stdin.write("line'\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "first\n" and proc.stdout.readline() == "line\n"  # stdin is still open
        proc.stdin.write("echo second\n")
        proc.stdin.close()
        proc.wait(timeout=30)
        out, err = proc.stdout.read(), proc.stderr.read()
    finally:
        proc.kill()
    assert (proc.returncode, out, err) == (0, "second\n", "")


def test_exit_stops_the_script_with_its_code(kernel: Any, tmp_path: Path) -> None:
    script = tmp_path / "e.llmsh"
    script.write_text("echo before\nexit 3\necho after\n")
    r = kernel.llmsh(str(script))
    assert (r.returncode, r.stdout) == (3, "before\n")
    r = kernel.llmsh("-c", "echo one && exit 5 && echo never\necho never")  # exit inside a line, run by the kernel
    assert (r.returncode, r.stdout, r.stderr) == (5, "one\n", "")
    assert kernel.llmsh("-c", "nope\nexit").returncode == 127  # stopped at the failing line already
    assert kernel.llmsh("--keep-going", "-c", "nope\nexit").returncode == 127  # `exit` keeps the last status


def test_unfinished_script_is_a_syntax_error(kernel: Any) -> None:
    r = kernel.llmsh("-c", "echo ok\necho 'open")
    assert r.returncode == 2 and r.stdout == "ok\n" and r.stderr == "llmsh: -c:2: unclosed ' quote\n"


def test_background_job_jobs_and_wait(kernel: Any) -> None:
    t0 = time.monotonic()
    r = kernel.llmsh("-c", "sleep 1 &\njobs\nwait\necho done\njobs --json")
    assert r.returncode == 0 and time.monotonic() - t0 >= 1.0
    out = r.stdout.splitlines()
    assert out[0] == "[1]+  Running     sleep 1 &" and out[1] == "done"
    assert json.loads("\n".join(out[2:])) == []  # like sh: 'wait' reaped it
    assert r.stderr.splitlines() == ["[1] sleep 1", "[1]+  Done        sleep 1"]
    r = kernel.llmsh("-c", "sleep 0.3 & wait %1 && echo waited; fg %1")
    assert r.returncode == 1 and r.stdout == "waited\n" and "fg: %1: no such job" in r.stderr


def test_redirect_writes_in_the_client_directory(kernel: Any, tmp_path: Path) -> None:
    r = llmsh_in(kernel, "-c", "echo first > out.txt; echo second >> out.txt; help --json > help.json", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout == ""
    assert (tmp_path / "out.txt").read_text() == "first\nsecond\n"
    assert any(row["name"] == "echo" for row in json.loads((tmp_path / "help.json").read_text()))


def test_structured_results_carry_json(kernel: Any) -> None:
    res = kernel.execute("uname")
    assert res["status"] == "ok" and res["data"]["pid"] == kernel.pid and res["data"]["torch"] is None
    assert f"pid {kernel.pid}" in res["results"][0]["text/plain"]
    r = kernel.llmsh("-c", "kernel --json")
    assert json.loads(r.stdout)["pid"] == kernel.pid


def test_ctrl_c_interrupts_the_foreground_command(kernel: Any) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmsh", "--kernel", str(kernel.connection_file), "-c", "echo started; sleep 30; echo never"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=kernel.env,
    )
    try:
        assert proc.stdout.readline() == "started\n"
        time.sleep(0.2)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 130 and time.monotonic() - t0 < 5
    assert out == "" and err == "llmsh: interrupted\n"
    assert kernel.llmsh("-c", "echo alive").stdout == "alive\n"


def test_missing_file_and_dead_kernel_are_one_line(kernel: Any, tmp_path: Path) -> None:
    r = kernel.llmsh(str(tmp_path / "nope.llmsh"))
    assert r.returncode == 1 and r.stderr == f"llmsh: cannot read {tmp_path / 'nope.llmsh'}: No such file or directory\n"
    dead = tmp_path / "dead.json"
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs: lifecycle rejects the file without waiting for a heartbeat
    dead.write_text(json.dumps({"pid": gone.pid, "ip": "127.0.0.1", "shell_port": 1, "iopub_port": 2, "control_port": 3, "stdin_port": 4, "hb_port": 5, "key": "aa"}))
    r = subprocess.run([sys.executable, "-m", "llmsh", "--kernel", str(dead), "-c", "echo hi"], capture_output=True, text=True, env=kernel.env, timeout=60)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and r.stderr.startswith(f"llmsh: no kernel answers at {dead}")


def _isolated_env(kernel: Any, root: Path) -> dict[str, str]:
    env = dict(kernel.env)
    for var in ("XDG_RUNTIME_DIR", "XDG_STATE_HOME"):
        (root / var).mkdir(mode=0o700)
        env[var] = str(root / var)
    return env


@pytest.mark.slow
def test_no_kernel_starts_one_on_demand(kernel: Any, tmp_path: Path) -> None:
    env = _isolated_env(kernel, tmp_path)
    try:
        r = subprocess.run([sys.executable, "-m", "llmsh", "-c", "echo hi"], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0 and r.stdout == "hi\n"
        (line,) = r.stderr.splitlines()
        assert line.startswith("llmsh: started kernel (pid ") and line.endswith(")")
        r2 = subprocess.run([sys.executable, "-m", "llmsh", "-c", "uname --json"], capture_output=True, text=True, env=env, timeout=60)
        assert r2.stderr == "" and str(json.loads(r2.stdout)["pid"]) in line
    finally:
        subprocess.run([sys.executable, "-m", "llmsh", "kernel", "stop"], capture_output=True, env=env, timeout=60)
        for f in (tmp_path / "XDG_RUNTIME_DIR").rglob("*.json"):  # belt and braces: never leak a kernel
            pid = json.loads(f.read_text()).get("pid")
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_kernel_start_failure_is_one_line(kernel: Any, tmp_path: Path, monkeypatch: Any, capsys: Any) -> None:
    from llmsh.cli import main

    env = _isolated_env(kernel, tmp_path)
    for var in ("XDG_RUNTIME_DIR", "XDG_STATE_HOME"):
        monkeypatch.setenv(var, env[var])
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    assert main(["-c", "echo hi"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llmsh: cannot start a kernel: cannot run ")


def test_completion_knows_the_session_jobs_and_the_client_directory(kernel: Any, tmp_path: Path, monkeypatch: Any) -> None:
    from llmsh.client.sync_client import SyncKernelClient
    from llmsh.protocol.connection import read_connection_file

    (tmp_path / "notes.txt").write_text("")
    monkeypatch.chdir(tmp_path)
    client = SyncKernelClient(read_connection_file(kernel.connection_file))
    try:
        client.start()
        assert client.execute("sleep 0.5 &")["status"] == "ok"
        reply = client.complete("fg ", 3)
        assert (reply["matches"], reply["cursor_start"], reply["cursor_end"]) == (["%1"], 3, 3)
        assert client.complete("echo x > no", 11)["matches"] == ["notes.txt"]
        assert client.execute("wait")["status"] == "ok"
    finally:
        client.close()
