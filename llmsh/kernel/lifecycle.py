"""Kernel lifecycle for clients and the CLI: start (daemonised or foreground), find, stop, status, list, install.

This module is imported by the shell client on every `llmsh -c …`, so it must stay cheap: no torch, no
jupyter_client, no kernel server at import time (those are imported inside the functions that need them).

A kernel is found through its connection file in the runtime dir; a file whose kernel no longer answers the
heartbeat is stale and removed. Stopping escalates like jupyter_client: a polite `shutdown_request`, then
SIGTERM, then SIGKILL, and reports which step ended it (`StopOutcome`).
"""

from __future__ import annotations

import argparse
import enum
import json
import logging
import logging.handlers
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from llmsh import paths
from llmsh.fmt import format_bytes
from llmsh.paths import log_file

log = logging.getLogger("llmsh.kernel")
LOG_BYTES = 8 << 20  # a kernel's log rolls over at this size, keeping two older parts (.log.1, .log.2)


class KernelStartError(Exception):
    """The kernel could not be started; the message is one line saying why."""


class StopOutcome(enum.Enum):
    """Which step of `stop_kernel`'s escalation ended the kernel."""

    NOT_RUNNING = "not running"
    SHUTDOWN_REQUEST = "shutdown_request"
    SIGTERM = "SIGTERM"
    SIGKILL = "SIGKILL"
    FAILED = "still running"


# ------------------------------------------------------------------------------------------ files and liveness
def connection_files() -> list[Path]:
    """This user's kernel connection files, newest first."""
    files = list(paths.runtime_dir().glob("kernel-*.json"))
    files.sort(key=lambda p: p.stat().st_mtime if p.exists() else 0, reverse=True)
    return files


def new_connection_file() -> Path:
    """A fresh connection-file path in the runtime dir."""
    return paths.runtime_dir() / f"kernel-{uuid.uuid4().hex[:12]}.json"


def _read(path: Path) -> dict[str, Any] | None:
    from llmsh.protocol.connection import ConnectionFileError, read_connection_file

    try:
        return read_connection_file(path)
    except ConnectionFileError:
        return None


def pid_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is gone for our purposes; /proc avoids importing psutil on the fast path
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        pass
    try:
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:
        return True


def is_alive(path: Path | str, timeout: float = 1.0) -> bool:
    """True if the kernel of this connection file answers its heartbeat."""
    from llmsh.protocol.request import heartbeat

    info = _read(Path(path))
    if info is None:
        return False
    pid = info.get("pid")
    if isinstance(pid, int) and not pid_alive(pid):
        return False
    return heartbeat(info, timeout) or heartbeat(info, timeout * 2)


def find_kernel(connection_file: str | None = None) -> Path | None:
    """A live kernel's connection file (the given one, else the newest); stale files of ours are removed.

    Stale means the kernel that wrote the file is gone (its pid is dead or now belongs to a newer process), or the
    file is unreadable junk. A kernel whose process lives but does not answer (stopped, wedged) is skipped, not
    removed; files without a pid (written by Jupyter) are never removed here."""
    from llmsh.protocol.request import heartbeat

    candidates = [Path(connection_file)] if connection_file else connection_files()
    for path in candidates:
        if not path.exists():
            continue
        info = _read(path)
        if info is None:
            if time.time() - path.stat().st_mtime > 10:
                log.info("removing unreadable connection file %s", path)
                path.unlink(missing_ok=True)
            continue
        pid = info.get("pid")
        if isinstance(pid, int) and not pid_alive(pid):
            log.info("removing stale connection file %s (pid %d is gone)", path, pid)
            path.unlink(missing_ok=True)
            continue
        if heartbeat(info, 1.0) or heartbeat(info, 2.0):
            return path
        if isinstance(pid, int) and _owned_pid(info) is None:
            log.info("removing stale connection file %s (pid %d belongs to another process now)", path, pid)
            path.unlink(missing_ok=True)
    return None


# ------------------------------------------------------------------------------------------ start
def _kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # so `python -m llmsh` works without an install
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _start_args(args: argparse.Namespace | None) -> list[str]:
    out: list[str] = []
    if args is None:
        return out
    if getattr(args, "ip", None):
        out += ["--ip", args.ip]
    if getattr(args, "mem_budget", None):
        out += ["--mem-budget", args.mem_budget]
    if getattr(args, "telemetry_hz", None) is not None and args.telemetry_hz != 2.0:
        out += ["--telemetry-hz", str(args.telemetry_hz)]
    if getattr(args, "max_message", None):
        out += ["--max-message", str(args.max_message)]
    if getattr(args, "ray", None):
        out += ["--ray", args.ray]
    if getattr(args, "restore", False):
        out += ["--restore"]
    if getattr(args, "http", None):
        out += ["--http", args.http]
    if getattr(args, "http_min_nice", None) is not None:
        out += ["--http-min-nice", str(args.http_min_nice)]
    return out


def start_kernel_daemon(connection_file: str | None = None, timeout: float = 20, args: argparse.Namespace | None = None) -> Path:
    """Start `llmsh kernel start --foreground` detached (own session, output to the log); return its connection file once it answers."""
    path = Path(connection_file) if connection_file else new_connection_file()
    if path.exists():
        if is_alive(path):
            raise KernelStartError(f"a kernel is already running with {path}; stop it first ('llmsh kernel stop --kernel {path}')")
        info = _read(path)
        if info is None or "pid" in info:  # a stale file of ours (or junk): start afresh
            path.unlink(missing_ok=True)
        # else: a Jupyter-style file with ports and key chosen by someone else; the kernel binds those
    paths.prune_logs(paths.LOGS_KEPT - 1)  # room for this kernel's log: the newest few are kept
    logpath = paths.private_file(log_file(path))
    offset = logpath.stat().st_size
    cmd = [sys.executable, "-m", "llmsh", "kernel", "start", "--foreground", "--connection-file", str(path), *_start_args(args)]
    env = _kernel_env()
    http_key = getattr(args, "http_key", None)
    if http_key:  # in the environment, not the command line that `ps` shows
        env["LLMSH_HTTP_KEY"] = http_key
    with open(logpath, "ab") as logf:
        try:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, env=env, close_fds=True
            )
        except OSError as e:
            raise KernelStartError(f"cannot run {sys.executable}: {e}") from None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            raise KernelStartError(f"the kernel exited with status {code} while starting: {_last_line(logpath, offset)} (log: {logpath})")
        if path.exists() and is_alive(path, timeout=0.5):
            return path
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise KernelStartError(f"the kernel did not answer within {timeout:g} s (log: {logpath})")


def find_or_start_kernel() -> tuple[Path, bool]:
    """The newest live kernel, else a new one; (connection file, started). Many clients at once start exactly one:
    the check and the start happen under a lock file in the runtime dir (released by the OS if we die)."""
    import fcntl

    with open(paths.runtime_dir() / "start.lock", "a+") as lock:
        os.chmod(lock.name, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)  # blocks while another client is starting one; it is found below
        path = find_kernel()
        if path is not None:
            return path, False
        return start_kernel_daemon(), True


def _last_line(logpath: Path, offset: int = 0) -> str:
    """The most telling line the kernel wrote since `offset`: its own one-line error, a traceback's last line, or
    the last logged error."""
    try:
        with open(logpath, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return "no log"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    is_log = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ([A-Z]+) ")
    said = [ln for ln in lines if ln.startswith("llmsh:")]
    plain = [ln for ln in lines if not is_log.match(ln) and not ln.startswith(("File ", "Traceback", "^", "~"))]
    errors = [is_log.sub("", ln) for ln in lines if (m := is_log.match(ln)) and m.group(1) in ("ERROR", "CRITICAL")]
    best = (said or plain or errors or lines or ["no output"])[-1]
    for prefix in ("llmsh: kernel: ", "llmsh: "):
        if best.startswith(prefix):
            best = best[len(prefix) :]
            break
    return best[:300]


def setup_logging(connection_file: Path) -> Path:
    """Send the `llmsh` loggers to the kernel's log file in the state dir; returns the file."""
    path = paths.private_file(log_file(connection_file))
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=LOG_BYTES, backupCount=2, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("llmsh")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return path


def run_foreground(args: argparse.Namespace, executor: Any = None) -> int:
    """Run the kernel in this process until it is shut down; `executor` runs the shell language."""
    import zmq

    from llmsh.config import ConfigError
    from llmsh.http.config import HttpConfigError
    from llmsh.kernel import server
    from llmsh.protocol.connection import ConnectionFileError

    path = Path(args.connection_file) if args.connection_file else new_connection_file()
    setup_logging(path)
    try:
        server.run(args, path, executor)
    except (ConnectionFileError, HttpConfigError, ConfigError) as e:
        print(f"llmsh: kernel: {e}", file=sys.stderr)
        return 1
    except (OSError, zmq.ZMQError) as e:  # e.g. a port in the given connection file is taken
        log.error("kernel failed to start: %s", e)
        print(f"llmsh: kernel: cannot start: {e}", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------ stop / status
def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return not pid_alive(pid)


def _owned_pid(info: dict[str, Any]) -> int | None:
    """The kernel's pid from its file, if that process still is the one that wrote it (guards against pid reuse)."""
    pid = info.get("pid")
    if not isinstance(pid, int) or not pid_alive(pid):
        return None
    try:
        import psutil

        if psutil.Process(pid).create_time() > float(info.get("started_at", 0)) + 1.0:
            return None  # a newer process got this pid
    except Exception:
        pass
    return pid


def stop_kernel(path: Path | str, polite_timeout: float = 5.0, term_timeout: float = 5.0) -> StopOutcome:
    """Stop the kernel of `path`: shutdown_request → wait → SIGTERM → wait → SIGKILL; the file is removed."""
    from llmsh.protocol.request import request

    path = Path(path)
    info = _read(path)
    if info is None:
        return StopOutcome.NOT_RUNNING
    pid = _owned_pid(info)
    try:
        reply = request(info, "shutdown_request", {"restart": False}, timeout=min(polite_timeout, 2.0))
        if pid is None:
            outcome = StopOutcome.SHUTDOWN_REQUEST if reply is not None else StopOutcome.NOT_RUNNING
            if reply is not None:
                deadline = time.monotonic() + polite_timeout  # no pid to watch: wait for the heartbeat to stop
                from llmsh.protocol.request import heartbeat

                while time.monotonic() < deadline and heartbeat(info, 0.2):
                    time.sleep(0.05)
            return outcome
        if _wait_gone(pid, polite_timeout):
            return StopOutcome.SHUTDOWN_REQUEST
        _signal(pid, signal.SIGTERM)
        if _wait_gone(pid, term_timeout):
            return StopOutcome.SIGTERM
        _signal(pid, signal.SIGKILL)
        return StopOutcome.SIGKILL if _wait_gone(pid, 5.0) else StopOutcome.FAILED
    finally:
        if "pid" in info and (pid is None or not pid_alive(pid)):
            path.unlink(missing_ok=True)


def kernel_status(path: Path | str, timeout: float = 5.0) -> dict[str, Any]:
    """The kernel's own report (pid, uptime, ports, counters…) from a kernel_info_request on control."""
    from llmsh.protocol.request import request

    info = _read(Path(path))
    if info is None:
        raise KernelStartError(f"no readable connection file at {path}")
    reply = request(info, "kernel_info_request", timeout=timeout)
    if reply is None:
        raise KernelStartError(f"the kernel of {path} did not answer within {timeout:g} s")
    data = dict(reply["content"].get("llmsh", {}))
    data.setdefault("connection_file", str(path))
    return data


def _human_time(s: float) -> str:
    s = int(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def format_status(st: dict[str, Any]) -> str:
    """`llmsh kernel status` as a few aligned lines."""
    c = st.get("counters", {})

    def total(direction: str) -> tuple[int, int]:
        per = c.get(direction, {})
        return (
            sum(v["count"] for t in per.values() for v in t.values()),
            sum(v["bytes"] for t in per.values() for v in t.values()),
        )

    (ni, bi), (no, bo) = total("in"), total("out")
    rejected = c.get("rejected", {})
    ports = st.get("ports", {})
    lines = [
        f"kernel    {st.get('connection_file')}",
        f"pid       {st.get('pid')}",
        f"uptime    {_human_time(st.get('uptime', 0))}",
        f"address   {st.get('transport', 'tcp')}://{st.get('ip')}" + ("  (CurveZMQ)" if st.get("curve") else ""),
        "ports     " + "  ".join(f"{k} {v}" for k, v in ports.items()),
        f"clients   {c.get('clients', 0)} connected, {c.get('clients_seen', 0)} seen",
        f"messages  in {ni} ({format_bytes(bi)}), out {no} ({format_bytes(bo)})",
        f"rejected  {sum(rejected.values())}" + (" (" + ", ".join(f"{k} {v}" for k, v in sorted(rejected.items())) + ")" if rejected else ""),
        f"running   {st.get('running', 0)} command(s)",
    ]
    if st.get("http"):
        lines.insert(5, f"http      http://{st['http']}  (OpenAI /v1, Ollama /api)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ install
def kernelspec(extra_args: list[str] | None = None) -> dict[str, Any]:
    """The kernel.json that lets Jupyter start llmsh (`extra_args` go after the connection file, e.g. --telemetry-hz 0)."""
    return {
        "argv": [sys.executable, "-m", "llmsh", "kernel", "start", "--foreground", "--connection-file", "{connection_file}", *(extra_args or [])],
        "display_name": "llmsh",
        "language": "llmsh",
        "interrupt_mode": "message",
        "metadata": {"debugger": False},
    }


def install_kernelspec(user: bool = True, prefix: str | None = None, extra_args: list[str] | None = None) -> Path:
    """Install the `llmsh` kernelspec with jupyter_client (user dir, or under `prefix`); returns its folder."""
    import tempfile

    from jupyter_client.kernelspec import KernelSpecManager

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "llmsh"
        src.mkdir()
        (src / "kernel.json").write_text(json.dumps(kernelspec(extra_args), indent=1), encoding="utf-8")
        dest = KernelSpecManager().install_kernel_spec(str(src), kernel_name="llmsh", user=user and prefix is None, prefix=prefix)
    return Path(dest)


# ------------------------------------------------------------------------------------------ CLI
def _err(text: str) -> int:
    print(f"llmsh: kernel: {text}", file=sys.stderr)
    return 1


def _target(args: argparse.Namespace) -> Path | None:
    return find_kernel(getattr(args, "kernel", None))


def main(args: argparse.Namespace, executor: Any = None) -> int:
    """`llmsh kernel start|stop|status|list|install`; returns the exit code (`executor`: see `run_foreground`)."""
    action = args.action
    if action == "start":
        if getattr(args, "ray", None):
            import importlib.util

            if importlib.util.find_spec("ray") is None:
                return _err("--ray needs Ray: pip install 'llmsh[ray]'")
        if args.foreground:
            return run_foreground(args, executor)
        try:
            path = start_kernel_daemon(args.connection_file, args=args)
        except KernelStartError as e:
            return _err(str(e))
        print(path)
        return 0
    if action == "stop":
        target = _target(args)
        if target is None:
            return _err("no running kernel" + (f" at {args.kernel}" if args.kernel else "") + "; start one with 'llmsh kernel start'")
        outcome = stop_kernel(target)
        if outcome in (StopOutcome.FAILED, StopOutcome.NOT_RUNNING):
            return _err(f"could not stop the kernel of {target}: {outcome.value}")
        print(f"stopped kernel {target} ({outcome.value})")
        return 0
    if action == "status":
        target = _target(args)
        if target is None:
            return _err("no running kernel" + (f" at {args.kernel}" if args.kernel else "") + "; start one with 'llmsh kernel start'")
        try:
            st = kernel_status(target)
        except KernelStartError as e:
            return _err(str(e))
        print(json.dumps(st, indent=1) if getattr(args, "json", False) else format_status(st))
        return 0
    if action == "list":
        rows = []
        for path in connection_files():
            if find_kernel(str(path)) is None:
                continue
            info = _read(path) or {}
            uptime = time.time() - float(info.get("started_at", time.time()))
            rows.append(f"{path}  pid {info.get('pid', '?')}  up {_human_time(uptime)}  shell {info.get('shell_port')}")
        print("\n".join(rows) if rows else "no running kernels")
        return 0
    if action == "install":
        try:
            dest = install_kernelspec(user=True, prefix=args.prefix)
        except Exception as e:  # permission errors, bad prefix
            return _err(f"cannot install the kernelspec: {e}")
        print(f"installed kernelspec 'llmsh' in {dest}")
        return 0
    return _err(f"unknown action {action!r}")
