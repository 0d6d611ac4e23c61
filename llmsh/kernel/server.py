"""The llmsh kernel: Jupyter messaging protocol 5.3 over ZeroMQ, served by one asyncio loop.

Unlike ipykernel there is no execute queue: every `execute_request` becomes its own asyncio task, so a long
command from one client never delays a short one from another. Every inbound frame list is verified
(`llmsh.protocol.session.Verifier`) before anything looks at it; rejects are counted by reason and dropped.
The heartbeat echoes from its own thread. A client that disconnects mid-command is noticed through the shell
socket's monitor (libzmq here has no ROUTER_NOTIFY): each message carries the file descriptor it arrived on
(ZMQ_SRCFD) and a DISCONNECTED event names that descriptor, so the commands that client started are cancelled.

Models never run here: the front's services (`kernel.services`, `llmsh.kernel.front.Services`: the process table, the
journal, the engine link, jobs) are built once at start; the engine process they spawn on demand runs the models.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from llmsh import __version__
from llmsh.kernel.counters import Counters
from llmsh.kernel.heartbeat import Heartbeat
from llmsh.paths import log_file, runtime_dir
from llmsh.protocol.connection import (
    PORT_NAMES,
    SIGNATURE_SCHEME,
    curve_keypair,
    is_loopback,
    new_key,
    read_connection_file,
    url,
    uses_curve,
    write_connection_file,
)
from llmsh.protocol.limits import DEFAULT_MAX_MESSAGE, bad_complete_request, too_big
from llmsh.protocol.session import Rejected, Verifier, make_session
from llmsh.protocol.transport import choose_transport, remove_ipc_files

if TYPE_CHECKING:
    from llmsh.kernel.front import Services

log = logging.getLogger("llmsh.kernel")

PROTOCOL_VERSION = "5.3"
LANGUAGE_INFO = {
    "name": "llmsh",
    "version": __version__,
    "mimetype": "text/x-llmsh",
    "file_extension": ".llmsh",
    "pygments_lexer": "bash",
    "codemirror_mode": "shell",
}
BANNER = f"llmsh {__version__}: an operating-system shell for language models. Type 'help' for the commands."
ROUTERS = ("shell", "control", "stdin")
MAX_FRAME_BYTES = 64 << 20  # no request needs more; a bigger frame is an attack or a bug


def default_args(**overrides: Any) -> argparse.Namespace:
    """The options of `llmsh kernel start` with their defaults (for kernels built in tests or tools)."""
    values = dict(
        foreground=True, connection_file=None, ip=None, mem_budget=None, telemetry_hz=2.0, ray=None,
        max_message=DEFAULT_MAX_MESSAGE, restore=False, http=None, http_key=None, http_min_nice=None,
    )
    values.update(overrides)
    return argparse.Namespace(**values)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())[:500]


def _jsonable(data: Any) -> Any:
    try:
        json.dumps(data)
        return data
    except (TypeError, ValueError):
        return json.loads(json.dumps(data, default=str))


class Executor(Protocol):
    """The shell language, given to the kernel by whoever starts it (`llmsh.commands.executor`): the kernel itself
    does not depend on the commands."""

    async def execute(self, kernel: Kernel, code: str, *, client: str, out: Any, cwd: str | None = None) -> Any: ...

    def complete(self, kernel: Kernel, code: str, cursor_pos: int, *, client: str = "",
                 cwd: str | None = None) -> tuple[list[str], int, int]: ...

    def is_complete(self, code: str) -> tuple[str, str]: ...

    def help_text(self, word: str) -> str | None: ...


@dataclass
class _Foreground:
    """A running execute_request: its executor task and who asked for it."""

    task: asyncio.Future
    session: str
    fd: int
    msg_id: str
    cause: str | None = None  # set when we cancel it on purpose ("interrupt", "disconnect")


class _Output:
    """Contract B's `Output` for one execute_request: stream → iopub `stream`, result → `execute_result`,
    display → `display_data`."""

    __slots__ = ("_kernel", "_parent", "_count", "_silent")

    def __init__(self, kernel: Kernel, parent: dict[str, Any], count: int, silent: bool) -> None:
        self._kernel, self._parent, self._count, self._silent = kernel, parent, count, silent

    def stream(self, name: str, text: str) -> None:
        """Send `text` as an iopub `stream` message named stdout or stderr."""
        if text and not self._silent:
            self._kernel.publish("stream", {"name": "stderr" if name == "stderr" else "stdout", "text": text}, self._parent)

    def result(self, data: Any, text: str) -> None:
        """Send an `execute_result` with text/plain and application/json."""
        if self._silent:
            return
        bundle = {"text/plain": text, "application/json": _jsonable(data)}
        content = {"data": bundle, "metadata": {}, "execution_count": self._count}
        self._kernel.publish("execute_result", content, self._parent)

    def display(self, bundle: dict[str, Any]) -> None:
        """Send a `display_data` (e.g. load progress, which the shell draws as a bar and Jupyter shows as text)."""
        if not self._silent:
            self._kernel.publish("display_data", {"data": bundle, "metadata": {}, "transient": {}}, self._parent)


class Kernel:
    """The daemon's state and sockets; see contract A for what other parts may use."""

    def __init__(self, args: argparse.Namespace | None = None, connection_file: str | Path | None = None,
                 executor: Executor | None = None) -> None:
        self.args = args if args is not None else default_args()
        self.pid = os.getpid()
        self.started_at = time.time()
        self.connection_file: Path = Path(connection_file or getattr(self.args, "connection_file", None) or f"kernel-{self.pid}.json")
        self.connection_info: dict[str, Any] = {}
        self.clients: dict[str, float] = {}
        self.counters = Counters(self.clients)
        self.history: list[str] = []
        self.services: Services | None = None  # built at the start of `serve()`
        self.http: Any = None  # llmsh.http.server.HttpServer with --http (or config.toml http/serve_http)
        self.notice = ""  # told to the first client (e.g. that the kernel restarted after a crash)
        self.on_start: list[Callable[[Kernel], None]] = []
        self.on_shutdown: list[Callable[[Kernel], Awaitable[None] | None]] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.execution_count = 0
        self.restart_requested = False
        self._tasks: set[asyncio.Task] = set()
        self._foreground: dict[str, _Foreground] = {}
        self._executed_sessions: set[str] = set()
        self._client_fds: dict[str, int] = {}  # client session → fd of its shell connection
        self._given_executor = executor
        self._executor: Executor | None = None
        self._loop_thread: int | None = None
        self._stop: asyncio.Event | None = None
        self._sockets: dict[str, zmq.asyncio.Socket] = {}
        self._monitor: zmq.asyncio.Socket | None = None
        self._heartbeat: Heartbeat | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._owns_file = False
        self.session = make_session(b"")
        self.verifier = Verifier(self.session)

    # ----------------------------------------------------------------- public API (contract A)
    def publish(self, msg_type: str, content: dict[str, Any], parent: dict[str, Any] | None = None) -> None:
        """Send a message on iopub; safe to call from any thread."""
        if self.loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._publish_now(msg_type, content, parent)
            return
        try:
            self.loop.call_soon_threadsafe(self._publish_now, msg_type, content, parent)
        except RuntimeError:  # the loop is closed: the kernel has shut down, nobody is listening
            pass

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task:
        """Run `coro` as a tracked task: failures are logged, and it is cancelled at shutdown."""
        assert self.loop is not None, "the kernel loop is not running"
        task: asyncio.Task = self.loop.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def request_shutdown(self, restart: bool = False) -> None:
        """Ask the kernel to exit cleanly (thread-safe)."""
        self.restart_requested = restart
        if self.loop is not None and self._stop is not None:
            try:
                self.loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # already shut down
                pass

    def info(self) -> dict[str, Any]:
        """What `llmsh kernel status` shows: pid, uptime, ports, counters, running commands."""
        ci = self.connection_info
        return {
            "pid": self.pid,
            "started_at": self.started_at,
            "uptime": time.time() - self.started_at,
            "connection_file": str(self.connection_file),
            "ip": ci.get("ip"),
            "transport": ci.get("transport"),
            "ports": {name[:-5]: ci.get(name) for name in PORT_NAMES},
            "curve": uses_curve(ci),
            "counters": self.counters.snapshot(),
            "running": len(self._foreground),
            "execution_count": self.execution_count,
            "torch_loaded": "torch" in sys.modules,
            "executor": self._executor is not None,
            "engine_pid": self.services.procs.engine.engine_pid if self.services is not None else None,
            "http": f"{self.http.settings.host}:{self.http.port}" if self.http is not None else None,
        }

    # ----------------------------------------------------------------- start-up and shut-down
    async def serve(self) -> None:
        """Bind, announce the connection file, and serve until shutdown; cleans up on the way out."""
        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._stop = asyncio.Event()
        try:
            self._bind()
        except BaseException:
            self._unbind()
            raise
        try:
            self._install_signals()
            self._load_executor()
            self._build_services()
            await self._start_http()
            self._run_start_hooks()
            if self._owns_file or any(not self.connection_info.get(p) for p in PORT_NAMES):
                write_connection_file(self.connection_file, self.connection_info)
                self._owns_file = True
            self._publish_now("status", {"execution_state": "starting"}, None)
            for channel in ROUTERS:
                self.spawn(self._serve_router(channel), name=f"serve {channel}")
            self.spawn(self._watch_disconnects(), name="watch disconnects")
            log.info("kernel %s ready: pid %d, %s", __version__, self.pid, self.connection_file)
            await self._stop.wait()
        finally:
            await self._cleanup()

    def _bind(self) -> None:
        info: dict[str, Any] = {}
        if self.connection_file.exists():
            info = read_connection_file(self.connection_file)
        else:
            self._owns_file = True
            transport, ip = choose_transport(getattr(self.args, "ip", None), self.connection_file)
            info = {
                "ip": ip,
                "transport": transport,
                "key": new_key(),
                "signature_scheme": SIGNATURE_SCHEME,
                "kernel_name": "llmsh",
            }
        if self._owns_file or not info.get("kernel_name"):
            info["kernel_name"] = "llmsh"
        ip, transport = info["ip"], info.get("transport", "tcp")
        if not uses_curve(info) and not is_loopback(ip) and transport == "tcp":
            info["curve_publickey"], info["curve_secretkey"] = curve_keypair()
        secret = info["curve_secretkey"].encode("ascii") if uses_curve(info) else None
        self.session = make_session(info.get("key", ""), username="llmsh-kernel")
        self.verifier = Verifier(self.session)
        self._ctx = zmq.asyncio.Context()
        kinds = {"shell": zmq.ROUTER, "control": zmq.ROUTER, "stdin": zmq.ROUTER, "iopub": zmq.PUB}
        for channel, kind in kinds.items():
            sock = self._sockets[channel] = self._ctx.socket(kind)
            sock.linger = 1000
            if kind == zmq.ROUTER:  # ZMTP pings: a peer that vanished without closing TCP still gets disconnected
                sock.setsockopt(zmq.HEARTBEAT_IVL, 5000)
                sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 20000)
                sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)  # libzmq drops the peer rather than buffer more
            if secret:
                sock.curve_server = True
                sock.curve_secretkey = secret
            port = int(info.get(f"{channel}_port") or 0)
            if transport == "ipc":
                port = port or _free_ipc_port(ip)
                sock.bind(f"ipc://{ip}-{port}")
            elif port:
                sock.bind(url({**info, f"{channel}_port": port}, channel))
            else:
                port = sock.bind_to_random_port(f"tcp://[{ip}]" if ":" in ip else f"tcp://{ip}")
            info[f"{channel}_port"] = port
        self._monitor = self._sockets["shell"].get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._heartbeat = Heartbeat(ip, int(info.get("hb_port") or 0), transport, secret)
        info["hb_port"] = self._heartbeat.port
        self._heartbeat.start()
        if self._owns_file:
            info.update(pid=self.pid, started_at=self.started_at, llmsh_version=__version__)
        self.connection_info = info

    def _unbind(self, linger: int = 0) -> None:
        """Close the sockets, monitor, heartbeat and context: after a failed `_bind` (drop everything) or at
        shutdown (linger so the last replies still leave)."""
        for sock in self._sockets.values():
            sock.close(linger=linger)
        if self._monitor is not None:
            self._monitor.close(linger=0)
        if self._heartbeat is not None:
            self._heartbeat.stop()
        if self._ctx is not None:
            self._ctx.term()

    def _install_signals(self) -> None:
        assert self.loop is not None
        try:
            self.loop.add_signal_handler(signal.SIGTERM, self.request_shutdown)
            self.loop.add_signal_handler(signal.SIGINT, self._on_sigint)
        except (ValueError, RuntimeError, NotImplementedError):  # not the main thread: tests, embedding
            pass

    def _on_sigint(self) -> None:
        """SIGINT interrupts every foreground command (Jupyter's signal-style interrupt); idle at a terminal, it stops."""
        if self._foreground:
            for fg in list(self._foreground.values()):
                self._cancel(fg, "interrupt")
        elif sys.stdin is not None and sys.stdin.isatty():
            self.request_shutdown()

    def _load_executor(self) -> None:
        self._executor = self._given_executor
        if self._executor is None:
            log.error("this kernel was started without a command executor; execute requests will fail")

    def _build_services(self) -> None:
        """The process table, journal and engine link; restores the journalled table after a crash."""
        from llmsh.kernel import telemetry
        from llmsh.kernel.front import build_services
        from llmsh.kernel.journal import open_journal

        journal_path, crashed_at = open_journal(self.connection_file)
        self.services = build_services(runtime_dir(), log_file(self.connection_file), journal_path,
                                       ray=getattr(self.args, "ray", None), mem_budget=getattr(self.args, "mem_budget", None))
        journal = self.services.journal
        if journal is not None:
            state = journal.load_state()
            clean = bool(state["meta"].get("clean", True))
            if state["procs"] and (not clean or getattr(self.args, "restore", False)):
                state["meta"].setdefault("alive_at", crashed_at)
                self.notice = self.services.procs.restore(state, crashed=not clean)
                self.services.procs.restore_pinned()
            else:
                for row in state["procs"]:
                    journal.drop_proc(int(row["pid"]))
                self.services.table.next_pid = int(state["meta"].get("next_pid", 1))
            journal.clear_requests()
            journal.set_meta(clean=False, started_at=self.started_at, kernel_pid=self.pid)
            journal.event("start", f"kernel {__version__} started (pid {self.pid})")
        telemetry.setup(self)

    async def _start_http(self) -> None:
        """The OpenAI/Ollama HTTP API on this loop, when asked for (a bad address or taken port stops the start)."""
        from llmsh.http.config import settings
        from llmsh.paths import config_dir

        chosen = settings(self.args, config_dir() / "config.toml")
        if chosen is not None:
            from llmsh.http.server import HttpServer  # starlette/uvicorn only when HTTP is on

            self.http = HttpServer(self, chosen)
            await self.http.start()

    def _run_start_hooks(self) -> None:
        for hook in list(self.on_start):
            try:
                hook(self)
            except Exception:
                log.exception("on_start hook %r failed", hook)

    async def _cleanup(self) -> None:
        log.info("kernel shutting down (restart=%s)", self.restart_requested)
        if self.loop is not None and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.loop.remove_signal_handler(sig)
        if self.http is not None:
            await self.http.stop()
        for hook in list(self.on_shutdown):
            try:
                result = hook(self)
                if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                    await asyncio.wait_for(result, timeout=5)
            except Exception:
                log.exception("on_shutdown hook %r failed", hook)
        if self.services is not None:
            try:
                await asyncio.wait_for(self.services.procs.close(), timeout=15)
            except Exception:
                log.exception("stopping the engine failed")
            if self.services.journal is not None:
                self.services.journal.event("stop", f"kernel stopped cleanly (pid {self.pid})")
                self.services.journal.set_meta(clean=True)
                self.services.journal.close()
        for fg in list(self._foreground.values()):
            fg.task.cancel()
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        self._unbind(linger=1000)
        remove_ipc_files(self.connection_info)
        if self._owns_file or not self.restart_requested:
            self.connection_file.unlink(missing_ok=True)
        log.info("kernel stopped")

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    # ----------------------------------------------------------------- sending
    def _send(self, channel: str, msg_type: str, content: dict[str, Any], parent: dict[str, Any] | None, ident: list[bytes] | bytes | None) -> None:
        sock = self._sockets.get(channel)
        if sock is None or sock.closed:
            return
        msg = self.session.msg(msg_type, content=content, parent=parent)
        frames = self.session.serialize(msg, ident)  # [idents…, DELIM, HMAC, header, parent, metadata, content]
        sock.send_multipart(frames)
        client = parent["header"].get("session", "") if parent else ""
        self.counters.record("out", channel, msg_type, sum(len(f) for f in frames), client)

    def _publish_now(self, msg_type: str, content: dict[str, Any], parent: dict[str, Any] | None) -> None:
        self._send("iopub", msg_type, content, parent, msg_type.encode())

    def _status(self, state: str, parent: dict[str, Any]) -> None:
        self._publish_now("status", {"execution_state": state}, parent)

    # ----------------------------------------------------------------- receiving
    async def _serve_router(self, channel: str) -> None:
        """Receive, verify and dispatch every message arriving on one ROUTER socket."""
        sock = self._sockets[channel]
        while True:
            try:
                frames = await sock.recv_multipart(copy=False)
            except zmq.ZMQError as e:
                if sock.closed or e.errno == zmq.ETERM:
                    return
                log.warning("%s recv failed: %s", channel, e)
                continue
            try:
                fd = frames[0].get(zmq.SRCFD)
            except zmq.ZMQError:
                fd = -1
            try:
                self._dispatch(channel, [f.bytes for f in frames], fd)
            except Exception:
                log.exception("failed to handle a %s message; still serving", channel)

    def _dispatch(self, channel: str, frames: list[bytes], fd: int) -> None:
        nbytes = sum(len(f) for f in frames)
        try:
            idents, msg = self.verifier.verify(frames)
        except Rejected as r:
            self.counters.reject(r.reason, channel, nbytes)
            n = self.counters.rejected[r.reason]
            if n <= 20 or n % 1000 == 0:  # a flood must not flood the log too
                log.warning("dropped a message on %s: %s (%d so far for this reason)", channel, r, n)
            return
        header = msg["header"]
        msg_type, session = header["msg_type"], header.get("session", "")
        self.counters.record("in", channel, msg_type, nbytes, session)
        if session:
            if session not in self.clients:
                self.counters.clients_seen += 1
            self.clients[session] = time.time()
            if channel == "shell" and fd >= 0:
                self._client_fds[session] = fd  # its disconnect (socket monitor) takes it off `clients`
        if channel == "stdin":  # the kernel never asks for input; replies there are only counted
            return
        limit = int(getattr(self.args, "max_message", None) or DEFAULT_MAX_MESSAGE)
        if nbytes > limit and msg_type.endswith("_request"):  # refused before anything parses it
            self._refuse(channel, idents, msg, too_big(nbytes, limit))
            return
        if msg_type == "execute_request" and channel == "shell":
            self._drain_monitor()  # apply pending disconnects first: a new client may reuse a closed fd number
            self._executed_sessions.add(session)
            self.spawn(self._execute(channel, idents, msg, fd), name=f"execute {header['msg_id']}")
            return
        if msg_type == "complete_request":
            self.spawn(self._complete_async(channel, idents, msg), name=f"complete {header['msg_id']}")
            return
        handler = self._handlers.get(msg_type)
        if handler is None:
            log.warning("unknown message type %s on %s", msg_type, channel)
            if msg_type.endswith("_request"):
                content = {"status": "error", "ename": "UnknownMessageType", "evalue": f"llmsh does not handle {msg_type}", "traceback": []}
                self._send(channel, msg_type[: -len("_request")] + "_reply", content, msg, idents)
            return
        self._status("busy", msg)
        try:
            content = handler(self, msg)
        except Exception as e:
            log.exception("%s handler failed", msg_type)
            content = {"status": "error", "ename": type(e).__name__, "evalue": _one_line(e), "traceback": []}
        self._send(channel, msg_type[: -len("_request")] + "_reply", content, msg, idents)
        self._status("idle", msg)
        if msg_type == "shutdown_request":
            self.request_shutdown(bool(msg["content"].get("restart", False)))

    def _refuse(self, channel: str, idents: list[bytes], msg: dict[str, Any], line: str) -> None:
        """Answer a request with an error reply of one line, without running it (busy/idle so clients stop waiting)."""
        self._status("busy", msg)
        content = {"status": "error", "ename": "MessageTooLarge", "evalue": line, "traceback": [line], "llmsh_exit_code": 1}
        if msg["header"]["msg_type"] == "execute_request":
            content["execution_count"] = self.execution_count
        self._send(channel, msg["header"]["msg_type"][: -len("_request")] + "_reply", content, msg, idents)
        self._status("idle", msg)

    # ----------------------------------------------------------------- execute
    async def _execute(self, channel: str, idents: list[bytes], msg: dict[str, Any], fd: int) -> None:
        """Run one execute_request to completion: busy, execute_input, output, reply, idle."""
        content, header = msg["content"], msg["header"]
        code = content.get("code", "")
        code = code if isinstance(code, str) else ""
        silent = bool(content.get("silent", False))
        store_history = bool(content.get("store_history", not silent))
        session = header.get("session", "")
        self._status("busy", msg)
        if store_history:
            self.execution_count += 1
        count = self.execution_count
        if not silent:
            self._publish_now("execute_input", {"code": code, "execution_count": count}, msg)
        if store_history and code.strip():
            self.history.append(code)
        status, exit_code, ename, evalue = "ok", 0, "", ""
        if self.notice and not silent:  # e.g. "kernel restarted after a crash …", told once, to the first client
            self._publish_now("stream", {"name": "stderr", "text": f"llmsh: {self.notice}\n"}, msg)
            self.notice = ""
        if self._executor is None:
            status, exit_code, ename, evalue = "error", 1, "KernelError", "llmsh: the command executor failed to load; see the kernel log"
        else:
            kwargs: dict[str, Any] = {"client": session, "out": _Output(self, msg, count, silent)}
            cwd = content.get("llmsh_cwd") or msg["metadata"].get("cwd")
            if isinstance(cwd, str) and cwd:
                kwargs["cwd"] = cwd
            inner = asyncio.ensure_future(self._executor.execute(self, code, **kwargs))
            fg = _Foreground(inner, session, fd, header["msg_id"])
            self._foreground[fg.msg_id] = fg
            try:
                result = await inner
                status = getattr(result, "status", "ok")
                exit_code = int(getattr(result, "exit_code", 0 if status == "ok" else 1))
                ename, evalue = getattr(result, "ename", ""), getattr(result, "evalue", "")
            except asyncio.CancelledError:
                if fg.cause is None:  # the kernel itself is shutting down
                    raise
            except Exception as e:
                log.exception("command crashed: %r", code)
                status, exit_code, ename, evalue = "error", 1, type(e).__name__, f"llmsh: internal error: {_one_line(e)}"
            finally:
                self._foreground.pop(fg.msg_id, None)
            if fg.cause is not None:
                status, exit_code, ename, evalue = "error", 130, "KeyboardInterrupt", "interrupted"
        reply: dict[str, Any] = {"status": status, "execution_count": count, "llmsh_exit_code": exit_code}
        if status == "ok":
            reply.update(user_expressions={}, payload=[])
        else:
            reply.update(ename=ename or "Error", evalue=evalue, traceback=[evalue] if evalue else [])
            if not silent:
                self._publish_now("error", {"ename": reply["ename"], "evalue": evalue, "traceback": reply["traceback"]}, msg)
        self._send(channel, "execute_reply", reply, msg, idents)
        self._status("idle", msg)

    def _cancel(self, fg: _Foreground, cause: str) -> None:
        if fg.cause is None and not fg.task.done():
            fg.cause = cause
            fg.task.cancel()
            self.counters.cancel(cause)
            log.info("cancelled %s (%s)", fg.msg_id, cause)

    # ----------------------------------------------------------------- client disconnects
    async def _watch_disconnects(self) -> None:
        """Cancel the commands of a client whose shell connection closes."""
        assert self._monitor is not None
        while True:
            try:
                frames = await self._monitor.recv_multipart()
            except zmq.ZMQError:
                return
            self._on_monitor_event(frames)

    def _drain_monitor(self) -> None:
        if self._monitor is None:
            return
        while True:
            fut: Any = self._monitor.recv_multipart(flags=zmq.NOBLOCK)  # a done future on an asyncio socket
            if fut.exception() is not None:
                return
            self._on_monitor_event(fut.result())

    def _on_monitor_event(self, frames: list[bytes]) -> None:
        event = parse_monitor_message(frames)
        if event["event"] == zmq.EVENT_DISCONNECTED:
            fd = int(event["value"])
            for fg in list(self._foreground.values()):
                if fg.fd == fd:
                    self._cancel(fg, "disconnect")
            for session in [s for s, f in self._client_fds.items() if f == fd]:
                del self._client_fds[session]
                self.clients.pop(session, None)  # `clients` lists who is connected; counters keep how many were seen

    # ----------------------------------------------------------------- request handlers (sync)
    def _kernel_info(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {
            "status": "ok",
            "protocol_version": PROTOCOL_VERSION,
            "implementation": "llmsh",
            "implementation_version": __version__,
            "language_info": LANGUAGE_INFO,
            "banner": BANNER,
            "help_links": [],
            "debugger": False,
            "llmsh": self.info(),
        }

    async def _complete_async(self, channel: str, idents: list[bytes], msg: dict[str, Any]) -> None:
        """complete_request off the loop: completers list folders (paths, model dirs), which may be slow or hang."""
        self._status("busy", msg)
        try:
            content = await asyncio.to_thread(self._complete, msg)
        except Exception as e:
            log.exception("complete_request failed")
            content = {"status": "error", "ename": type(e).__name__, "evalue": _one_line(e), "traceback": []}
        self._send(channel, "complete_reply", content, msg, idents)
        self._status("idle", msg)

    def _complete(self, msg: dict[str, Any]) -> dict[str, Any]:
        problem = bad_complete_request(msg["content"])
        if problem is not None:  # an error reply, never silence: the client is waiting for one
            return {"status": "error", "ename": "BadRequest", "evalue": problem, "traceback": [problem]}
        code = msg["content"]["code"]
        pos = msg["content"].get("cursor_pos", len(code))
        matches: list[str]
        if self._executor is None:
            matches, start, end = [], pos, pos
        else:
            kwargs: dict[str, Any] = {"client": msg["header"].get("session", "")}
            cwd = msg["content"].get("llmsh_cwd") or msg["metadata"].get("cwd")
            if isinstance(cwd, str) and cwd:
                kwargs["cwd"] = cwd
            try:
                matches, start, end = self._executor.complete(self, code, pos, **kwargs)
            except TypeError:  # an executor without the client=/cwd= keywords
                matches, start, end = self._executor.complete(self, code, pos)
        return {"status": "ok", "matches": list(matches), "cursor_start": start, "cursor_end": end, "metadata": {}}

    def _is_complete(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self._executor is None:
            return {"status": "unknown"}
        status, indent = self._executor.is_complete(str(msg["content"].get("code", "")))
        return {"status": status, "indent": indent} if status == "incomplete" else {"status": status}

    def _interrupt(self, msg: dict[str, Any]) -> dict[str, Any]:
        session = msg["content"].get("llmsh_session") or msg["header"].get("session", "")
        targets = [fg for fg in self._foreground.values() if fg.session == session]
        if not targets and session not in self._executed_sessions:
            # A session that never executed anything (jupyter_client's KernelManager.interrupt_kernel uses its own)
            # means "interrupt the kernel": stop every foreground command, as SIGINT would.
            targets = list(self._foreground.values())
        for fg in targets:
            self._cancel(fg, "interrupt")
        return {"status": "ok"}

    def _shutdown(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {"status": "ok", "restart": bool(msg["content"].get("restart", False))}

    def _history(self, msg: dict[str, Any]) -> dict[str, Any]:
        c = msg["content"]
        entries = [(1, i + 1, code) for i, code in enumerate(self.history)]
        kind = c.get("hist_access_type", "tail")
        if kind == "tail":
            n = int(c.get("n") or 10)
            entries = entries[-n:] if n > 0 else []
        elif kind == "range":
            start = int(c.get("start") or 0)
            stop = c.get("stop")
            entries = [e for e in entries if e[1] >= start and (stop is None or e[1] < int(stop))]
        elif kind == "search":
            pattern = str(c.get("pattern") or "*")
            entries = [e for e in entries if fnmatch.fnmatchcase(e[2], pattern)]
            if c.get("unique"):
                seen: set[str] = set()
                entries = [e for e in reversed(entries) if not (e[2] in seen or seen.add(e[2]))][::-1]  # type: ignore[func-returns-value]
            n = c.get("n")
            if n:
                entries = entries[-int(n) :]
        if c.get("output"):
            return {"status": "ok", "history": [(s, n, (code, None)) for s, n, code in entries]}
        return {"status": "ok", "history": entries}

    def _inspect(self, msg: dict[str, Any]) -> dict[str, Any]:
        code = str(msg["content"].get("code", ""))
        pos = msg["content"].get("cursor_pos")
        pos = len(code) if not isinstance(pos, int) else max(0, min(pos, len(code)))
        start = pos
        while start > 0 and not code[start - 1].isspace() and code[start - 1] not in ";|&":
            start -= 1
        end = pos
        while end < len(code) and not code[end].isspace() and code[end] not in ";|&":
            end += 1
        word = code[start:end]
        text = self._executor.help_text(word) if self._executor is not None else None
        if text is None:
            return {"status": "ok", "found": False, "data": {}, "metadata": {}}
        return {"status": "ok", "found": True, "data": {"text/plain": text}, "metadata": {}}

    def _comm_info(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {"status": "ok", "comms": {}}

    _handlers: dict[str, Callable[[Kernel, dict[str, Any]], dict[str, Any]]] = {
        "kernel_info_request": _kernel_info,
        "is_complete_request": _is_complete,
        "interrupt_request": _interrupt,
        "shutdown_request": _shutdown,
        "history_request": _history,
        "inspect_request": _inspect,
        "comm_info_request": _comm_info,
    }


def _free_ipc_port(ip: str) -> int:
    port = 1
    while os.path.exists(f"{ip}-{port}"):
        port += 1
    return port


def run(args: argparse.Namespace, connection_file: str | Path, executor: Executor | None = None) -> Kernel:
    """Run a kernel in this process until it shuts down; returns it (for its restart flag and counters)."""
    kernel = Kernel(args, connection_file, executor)
    asyncio.run(kernel.serve())
    return kernel
