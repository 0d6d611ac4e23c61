"""Real kernel processes for tests (contract F): `kernel` (one per test module) and `make_kernel(*extra_args)`.

A kernel here is `python -m llmsh kernel start --foreground --connection-file F --telemetry-hz 0` in a child
process, in the isolated XDG dirs that conftest set up. Tests talk to it through `jupyter_client`
(`handle.client()`, `handle.execute(code)`) and through the real CLI (`handle.llmsh(...)`).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from queue import Empty
from typing import Any

import pytest
from jupyter_client import BlockingKernelClient

from llmsh.client.redirect import RedirectFiles
from llmsh.protocol.redirect import REDIRECT_MIME

REPO = Path(__file__).resolve().parents[1]
_COUNTER = itertools.count(1)


def kernel_env() -> dict[str, str]:
    """The environment for kernels and `llmsh` subprocesses: the isolated dirs, and this checkout importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


class KernelHandle:
    """One running kernel process: `.connection_file`, `.env`, `.proc`, `.client()`, `.execute()`, `.llmsh()`."""

    def __init__(self, proc: subprocess.Popen, connection_file: Path, env: dict[str, str], log: Path) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.connection_file = connection_file
        self.env = env
        self.log = log
        self._kc: BlockingKernelClient | None = None

    def client(self, timeout: float = 30) -> BlockingKernelClient:
        """A new BlockingKernelClient with started channels, ready (caller calls `.stop_channels()`)."""
        kc = BlockingKernelClient(connection_file=str(self.connection_file))
        kc.load_connection_file()
        kc.start_channels()
        kc.wait_for_ready(timeout=timeout)
        return kc

    def execute(self, code: str, timeout: float = 30) -> dict[str, Any]:
        """Run `code` and collect what a user would see.

        `> FILE` redirects are written by this process (relative to its cwd), as the llmsh shell writes them.
        Returns {"status", "stdout", "stderr", "data" (application/json of the last execute_result, else None),
        "results" (every execute_result/display_data bundle), "error" (the iopub error content or None),
        "exit_code" (reply's llmsh_exit_code), "reply" (the execute_reply content)}.
        """
        if self._kc is None:
            self._kc = self.client()
        out: dict[str, Any] = {"stdout": "", "stderr": "", "data": None, "results": [], "error": None}
        files = RedirectFiles(lambda line: out.__setitem__("stderr", out["stderr"] + line + "\n"))

        def hook(msg: dict[str, Any]) -> None:
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                out[content["name"]] += content["text"]
            elif kind == "display_data" and REDIRECT_MIME in content["data"]:  # `> FILE`: written here, as the shell does
                files.handle(content["data"][REDIRECT_MIME])
            elif kind in ("execute_result", "display_data"):
                out["results"].append(content["data"])
                if kind == "execute_result":
                    out["data"] = content["data"].get("application/json")
            elif kind == "error":
                out["error"] = content

        reply = self._kc.execute_interactive(code, timeout=timeout, output_hook=hook, allow_stdin=False)
        out["reply"] = reply["content"]
        out["status"] = reply["content"]["status"]
        out["exit_code"] = reply["content"].get("llmsh_exit_code")
        return out

    def kernel_info(self, timeout: float = 10) -> dict[str, Any]:
        """The kernel's own report (the `llmsh` field of kernel_info_reply: pid, counters, running, torch_loaded…)."""
        if self._kc is None:
            self._kc = self.client()
        msg_id = self._kc.kernel_info()
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = self._kc.get_shell_msg(timeout=max(0.01, deadline - time.monotonic()))
            except Empty:
                raise TimeoutError("no kernel_info_reply") from None
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply["content"]["llmsh"]

    def llmsh(self, *argv: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run the real `llmsh` CLI against this kernel (`--kernel F` put where the subcommand expects it)."""
        args = list(argv)
        if args[:1] == ["kernel"]:
            if args[1:2] and args[1] in ("stop", "status"):
                args += ["--kernel", str(self.connection_file)]
        elif args[:1] == ["top"]:
            args += ["--kernel", str(self.connection_file)]
        else:
            args = ["--kernel", str(self.connection_file), *args]
        return subprocess.run(
            [sys.executable, "-m", "llmsh", *args], input=input, capture_output=True, text=True, env=self.env, timeout=timeout
        )

    def alive(self) -> bool:
        """True while the kernel process runs."""
        return self.proc.poll() is None

    def stop(self) -> None:
        """Shut the kernel down (polite request, then SIGTERM/SIGKILL) and reap the process."""
        if self._kc is not None:
            self._kc.stop_channels()
            self._kc = None
        if self.proc.poll() is None:
            from llmsh.kernel.lifecycle import stop_kernel

            try:
                stop_kernel(self.connection_file, polite_timeout=5, term_timeout=3)
            except Exception:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def start_kernel(*extra_args: str, env: dict[str, str] | None = None, timeout: float = 30) -> KernelHandle:
    """Start a kernel process and wait until it answers kernel_info."""
    from llmsh import paths

    env = env or kernel_env()
    n = next(_COUNTER)
    cf = paths.runtime_dir() / f"kernel-test-{os.getpid()}-{n}.json"
    cf.unlink(missing_ok=True)
    log = paths.state_dir() / f"test-kernel-{os.getpid()}-{n}.out"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmsh", "kernel", "start", "--foreground", "--connection-file", str(cf), "--telemetry-hz", "0", *extra_args],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=env,
        )
    deadline = time.monotonic() + timeout
    try:
        while not cf.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"kernel did not start (exit {proc.poll()}): {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.02)
    except BaseException:  # also pytest-timeout's exception: never leave a kernel process behind
        proc.kill()
        proc.wait()
        raise
    handle = KernelHandle(proc, cf, env, log)
    try:
        handle.kernel_info(timeout=max(1.0, deadline - time.monotonic()))
    except BaseException:
        handle.stop()
        raise
    return handle


@pytest.fixture(scope="module")
def make_kernel() -> Iterator[Any]:
    """Factory: `make_kernel(*extra_args)` starts a kernel with extra `kernel start` options; all stop at module end."""
    handles: list[KernelHandle] = []

    def factory(*extra_args: str, env: dict[str, str] | None = None) -> KernelHandle:
        handle = start_kernel(*extra_args, env=env)
        handles.append(handle)
        return handle

    yield factory
    for handle in handles:
        handle.stop()


@pytest.fixture(scope="module")
def kernel(make_kernel: Any) -> KernelHandle:
    """A real kernel process shared by the tests of one module."""
    return make_kernel()
