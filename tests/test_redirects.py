"""`> FILE` is opened by the client, in its own directory, through a real kernel and the real CLI (issue 14)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def test_a_fifo_without_reader_blocks_only_that_client(kernel: Any, tmp_path: Path) -> None:
    fifo = tmp_path / "jobs.fifo"
    os.mkfifo(fifo)

    def executes() -> int:  # execute_requests the kernel has received (kernel_info needs a free event loop)
        shell = kernel.kernel_info(timeout=10)["counters"]["in"].get("shell", {})
        return int(shell.get("execute_request", {}).get("count", 0))

    before = executes()
    blocked = subprocess.Popen(
        [sys.executable, "-m", "llmsh", "--kernel", str(kernel.connection_file), "-c", "ps > jobs.fifo"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=kernel.env,
    )
    try:
        deadline = time.monotonic() + 30
        while executes() == before and time.monotonic() < deadline:  # the blocked client's `ps` has arrived
            time.sleep(0.05)
        res = kernel.execute("echo still here", timeout=10)  # another client: the kernel's loop is free
        assert res["status"] == "ok" and res["stdout"] == "still here\n"
        with open(fifo, encoding="utf-8") as reader:  # a reader arrives: the blocked client goes on
            assert "PID" in reader.read()
        assert blocked.wait(timeout=30) == 0
    finally:
        blocked.kill()
        blocked.wait()


def test_a_full_disk_is_one_line_and_status_1(kernel: Any) -> None:
    r = kernel.llmsh("-c", "ps > /dev/full")
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == "llmsh: /dev/full: No space left on device\n"
    r = kernel.llmsh("-c", "echo a > /dev/full; echo after")
    assert r.returncode == 1 and r.stdout == "after\n"


def test_the_file_is_the_clients_own(kernel: Any, tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "llmsh", "--kernel", str(kernel.connection_file), "-c", "echo one > o.txt; echo two >> o.txt"],
        cwd=tmp_path, capture_output=True, text=True, env=kernel.env, timeout=60,
    )
    assert r.returncode == 0 and (tmp_path / "o.txt").read_text() == "one\ntwo\n"
