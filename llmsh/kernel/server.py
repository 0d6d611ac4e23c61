"""The llmsh kernel: Jupyter messaging protocol 5.3 over ZeroMQ, served by one asyncio loop.

Unlike ipykernel there is no execute queue: every `execute_request` becomes its own asyncio task, so a long
command from one client never delays a short one from another. Every inbound frame list is verified
(`llmsh.protocol.session.Verifier`) before anything looks at it; rejects are counted by reason and dropped.
The heartbeat echoes from its own thread. A client that disconnects mid-command is noticed through the shell
socket's monitor (libzmq here has no ROUTER_NOTIFY): each message carries the file descriptor it arrived on
(ZMQ_SRCFD) and a DISCONNECTED event names that descriptor, so the commands that client started are cancelled.

This module owns the sockets, the loop and the kernel's state, and routes each verified message: what a request
means is in `llmsh.kernel.handlers`, the running commands in `llmsh.kernel.running`, socket set-up in
`llmsh.kernel.sockets`.

Models never run here: the front's services (`kernel.services`, `llmsh.kernel.front.Services`: the process table, the
journal, the engine link, jobs) are built once at start; the engine process they spawn on demand runs the models.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from llmsh import __version__
from llmsh.kernel import handlers
from llmsh.kernel.counters import Counters
from llmsh.kernel.handlers import one_line
from llmsh.kernel.heartbeat import Heartbeat
from llmsh.kernel.running import Running
from llmsh.kernel.sockets import bind_sockets, connection_info
from llmsh.paths import log_file, runtime_dir
from llmsh.protocol.connection import PORT_NAMES, uses_curve, write_connection_file
from llmsh.protocol.limits import DEFAULT_MAX_MESSAGE, too_big
from llmsh.protocol.session import Rejected, Verifier, make_session
from llmsh.protocol.transport import remove_ipc_files

if TYPE_CHECKING:
    from llmsh.kernel.front import Services

log = logging.getLogger("llmsh.kernel")

ROUTERS = ("shell", "control", "stdin")


def default_args(**overrides: Any) -> argparse.Namespace:
    """The options of `llmsh kernel start` with their defaults (for kernels built in tests or tools)."""
    values = dict(
        foreground=True, connection_file=None, ip=None, mem_budget=None, telemetry_hz=2.0, ray=None,
        max_message=DEFAULT_MAX_MESSAGE, restore=False, http=None, http_key=None, http_min_nice=None,
    )
    values.update(overrides)
    return argparse.Namespace(**values)


class Executor(Protocol):
    """The shell language, given to the kernel by whoever starts it (`llmsh.commands.executor`): the kernel itself
    does not depend on the commands."""

    async def execute(self, kernel: Kernel, code: str, *, client: str, out: Any, cwd: str | None = None) -> Any: ...

    def complete(self, kernel: Kernel, code: str, cursor_pos: int, *, client: str = "",
                 cwd: str | None = None) -> tuple[list[str], int, int]: ...

    def is_complete(self, code: str) -> tuple[str, str]: ...

    def help_text(self, word: str) -> str | None: ...


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
        self.running = Running(self.counters)  # the commands running for clients
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
            self.publish_now(msg_type, content, parent)
            return
        try:
            self.loop.call_soon_threadsafe(self.publish_now, msg_type, content, parent)
        except RuntimeError:  # the loop is closed: the kernel has shut down, nobody is listening
            pass

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task:
        """Run `coro` as a tracked task: failures are logged, and it is cancelled at shutdown."""
        assert self.loop is not None, "the kernel loop is not running"
        task: asyncio.Task = self.loop.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    @property
    def executor(self) -> Executor | None:
        """The shell language this kernel runs (None when it failed to load)."""
        return self._executor

    def record_execution(self, code: str, store_history: bool) -> int:
        """Count an execute_request (and keep its code in the history) when it is stored; its execution count."""
        if store_history:
            self.execution_count += 1
            if code.strip():
                self.history.append(code)
        return self.execution_count

    def take_notice(self) -> str:
        """The notice for the first client, once: later clients get ''."""
        notice, self.notice = self.notice, ""
        return notice

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
            "running": len(self.running),
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
            self.publish_now("status", {"execution_state": "starting"}, None)
            for channel in ROUTERS:
                self.spawn(self._serve_router(channel), name=f"serve {channel}")
            self.spawn(self._watch_disconnects(), name="watch disconnects")
            log.info("kernel %s ready: pid %d, %s", __version__, self.pid, self.connection_file)
            await self._stop.wait()
        finally:
            await self._cleanup()

    def _bind(self) -> None:
        info, owns = connection_info(self.connection_file, getattr(self.args, "ip", None))
        self._owns_file = self._owns_file or owns
        ip, transport = info["ip"], info.get("transport", "tcp")
        secret = info["curve_secretkey"].encode("ascii") if uses_curve(info) else None
        self.session = make_session(info.get("key", ""), username="llmsh-kernel")
        self.verifier = Verifier(self.session)
        self._ctx = zmq.asyncio.Context()
        bind_sockets(self._ctx, info, secret, into=self._sockets)
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
        if len(self.running):
            self.running.interrupt_all()
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
        self.running.cancel_all()
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
    def send(self, channel: str, msg_type: str, content: dict[str, Any], parent: dict[str, Any] | None, ident: list[bytes] | bytes | None) -> None:
        """Sign and send one message on `channel` (from the loop's thread only), counting it."""
        sock = self._sockets.get(channel)
        if sock is None or sock.closed:
            return
        msg = self.session.msg(msg_type, content=content, parent=parent)
        frames = self.session.serialize(msg, ident)  # [idents…, DELIM, HMAC, header, parent, metadata, content]
        sock.send_multipart(frames)
        client = parent["header"].get("session", "") if parent else ""
        self.counters.record("out", channel, msg_type, sum(len(f) for f in frames), client)

    def publish_now(self, msg_type: str, content: dict[str, Any], parent: dict[str, Any] | None) -> None:
        """Send on iopub from the loop's thread (other threads use `publish`)."""
        self.send("iopub", msg_type, content, parent, msg_type.encode())

    def publish_status(self, state: str, parent: dict[str, Any]) -> None:
        """Publish the kernel's busy/idle status for the request `parent`."""
        self.publish_now("status", {"execution_state": state}, parent)

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
            self.running.executed(session)
            self.spawn(handlers.execute(self, channel, idents, msg, fd), name=f"execute {header['msg_id']}")
            return
        if msg_type == "complete_request":
            self.spawn(handlers.complete(self, channel, idents, msg), name=f"complete {header['msg_id']}")
            return
        handler = handlers.QUICK.get(msg_type)
        if handler is None:
            log.warning("unknown message type %s on %s", msg_type, channel)
            if msg_type.endswith("_request"):
                content = {"status": "error", "ename": "UnknownMessageType", "evalue": f"llmsh does not handle {msg_type}", "traceback": []}
                self.send(channel, msg_type[: -len("_request")] + "_reply", content, msg, idents)
            return
        self.publish_status("busy", msg)
        try:
            content = handler(self, msg)
        except Exception as e:
            log.exception("%s handler failed", msg_type)
            content = {"status": "error", "ename": type(e).__name__, "evalue": one_line(e), "traceback": []}
        self.send(channel, msg_type[: -len("_request")] + "_reply", content, msg, idents)
        self.publish_status("idle", msg)
        if msg_type == "shutdown_request":
            self.request_shutdown(bool(msg["content"].get("restart", False)))

    def _refuse(self, channel: str, idents: list[bytes], msg: dict[str, Any], line: str) -> None:
        """Answer a request with an error reply of one line, without running it (busy/idle so clients stop waiting)."""
        self.publish_status("busy", msg)
        content = {"status": "error", "ename": "MessageTooLarge", "evalue": line, "traceback": [line], "llmsh_exit_code": 1}
        if msg["header"]["msg_type"] == "execute_request":
            content["execution_count"] = self.execution_count
        self.send(channel, msg["header"]["msg_type"][: -len("_request")] + "_reply", content, msg, idents)
        self.publish_status("idle", msg)

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
            self.running.disconnected(fd)
            for session in [s for s, f in self._client_fds.items() if f == fd]:
                del self._client_fds[session]
                self.clients.pop(session, None)  # `clients` lists who is connected; counters keep how many were seen


def run(args: argparse.Namespace, connection_file: str | Path, executor: Executor | None = None) -> Kernel:
    """Run a kernel in this process until it shuts down; returns it (for its restart flag and counters)."""
    kernel = Kernel(args, connection_file, executor)
    asyncio.run(kernel.serve())
    return kernel
