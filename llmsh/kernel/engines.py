"""The front's link to one engine process: spawn it, send requests, stream tokens, notice when it dies.

`EngineLink` is the local case: the engine is a child OS process (`python -m llmsh.engine`) connected to a ROUTER
socket that the front binds on an `ipc://` path in the 0700 runtime dir. Requests get a future each; `generate` also
gets a queue for its tokens. The child's exit is awaited (`asyncio` subprocess `wait()`, no polling): every request
in flight then fails at once with the cause (`EngineDied`), and `on_exit` tells the front, which restores the
processes on a new engine. An engine on another node (a Ray actor, `llmsh.cluster.ray_engines`) is the same link
with another socket (TCP + CurveZMQ), another launcher and another way of noticing its end.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from llmsh.kernel.errors import KernelError
from llmsh.protocol import engine as wire

log = logging.getLogger("llmsh.kernel.engines")
HELLO_TIMEOUT = 60.0  # an engine imports numpy/zmq before it says hello; a loaded machine can be slow

# glibc malloc settings for engine processes (glibc's documented tunables; other C libraries ignore the variable).
# By default every tensor over ~32 MiB is a fresh mmap, and each of its pages faults and is zeroed when first written:
# a GPT-2 124M float32 prefill of 3,900 tokens makes ~200 MB of such tensors a layer, ~10% of its time. Raising the
# mmap threshold keeps large blocks in the heap, where a freed one is reused with no fault, and one arena makes that
# hold for the model's thread too (a thread's own arena maps large blocks whatever the threshold). The heap keeps up
# to the trim threshold of freed memory. (GPT-2 124M float32 prefill in a thread: 2.89 -> 2.48 s; `map` of 256 prompts
# 62.3 -> 58.0 s, of 512 no change beyond noise.) jemalloc or tcmalloc would do the same but are not installed by pip.
MALLOC_TUNABLES = {"glibc.malloc.arena_max": "1", "glibc.malloc.mmap_threshold": str(256 << 20),
                   "glibc.malloc.trim_threshold": str(256 << 20)}


def glibc_tunables(current: str = "") -> str:
    """A GLIBC_TUNABLES value: `current` (the user's) plus each of MALLOC_TUNABLES that it does not set."""
    mine = [kv for kv in current.split(":") if kv]
    named = {kv.split("=", 1)[0] for kv in mine}
    return ":".join(mine + [f"{k}={v}" for k, v in MALLOC_TUNABLES.items() if k not in named])


def engine_environment() -> dict[str, str]:
    """The environment an engine process starts with: ours, with glibc_tunables."""
    return {**os.environ, "GLIBC_TUNABLES": glibc_tunables(os.environ.get("GLIBC_TUNABLES", ""))}


class EngineDied(KernelError):
    """The engine process exited while a request was in flight; the message names the cause."""

    ename = "EngineDied"


class EngineRequestError(KernelError):
    """The engine refused or failed a request: `ename`, one human line, and a `kind` (killed, failed…)."""

    def __init__(self, ename: str, line: str, kind: str = "") -> None:
        super().__init__(line, ename=ename, status=2 if ename == "UsageError" else 1)
        self.kind = kind


def exit_cause(returncode: int | None) -> str:
    """`SIGBUS`, `SIGKILL`, `exit status 3`…"""
    if returncode is None:
        return "unknown cause"
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit status {returncode}"


def _open_log(path: Path) -> Any:
    """The kernel's log, for appending, owner-only (opened off the event loop: it is file I/O)."""
    f = open(path, "ab")  # noqa: SIM115  (handed to the child process, closed by the caller)
    os.chmod(path, 0o600)
    return f


async def _default_exit(cause: str) -> str:
    return f"engine exited: {cause}"


def _log_failed_send(node: str, msg_type: str, sent: asyncio.Future) -> None:
    if not sent.cancelled() and (err := sent.exception()) is not None:
        log.info("a %s message to engine %s was not delivered (%s)", msg_type, node, err)


class EngineLink:
    """One engine process and its socket."""

    remote = False  # an engine on another node (its heartbeats carry that node's load)

    def __init__(self, node: str, socket_path: Path, log_path: Path, *, mem_budget: str | None = None,
                 ctx: zmq.asyncio.Context | None = None) -> None:
        self.node = node
        self.address = "local"  # where the engine runs (a Ray node's IP for remote engines)
        self.last_seen = 0.0  # time.monotonic() of the engine's latest message
        self.beat: dict[str, Any] = {}  # its latest heartbeat (budget in use, processes, tok/s, load)
        self.lost = ""  # why its node is gone (remote engines only; a local engine is restarted instead)
        self.on_back: Callable[[], Awaitable[None]] | None = None  # a lost node's engine is back (remote only)
        self.socket_path = socket_path
        self.log_path = log_path
        self.mem_budget = mem_budget
        self.on_event: Callable[[dict[str, Any]], None] = lambda msg: None  # state, progress, removed
        self.on_exit: Callable[[str], Awaitable[str]] = _default_exit  # returns the line for the failed requests
        self.proc: asyncio.subprocess.Process | None = None
        self.engine_pid: int | None = None
        self.generation = 0  # how many engines were started (1 = the first)
        self._own_ctx = ctx is None
        self._ctx = ctx if ctx is not None else zmq.asyncio.Context()
        self._sock: zmq.asyncio.Socket | None = None
        self._ident = node.encode()
        self._ids = itertools.count(1)
        self._replies: dict[str, asyncio.Future] = {}
        self._tokens: dict[str, asyncio.Queue] = {}
        self._hello: asyncio.Future | None = None
        self._start_lock = asyncio.Lock()
        self._watcher: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self.closing = False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None and self._hello is not None and self._hello.done()

    # ---- life -------------------------------------------------------------------------------------------------------
    async def ensure_started(self) -> None:
        """Start the engine if none runs (concurrent callers share one start)."""
        async with self._start_lock:
            if self._watcher is not None and not self._watcher.done() and self.proc is not None \
                    and self.proc.returncode is not None:
                await asyncio.shield(self._watcher)  # a death not yet handled: let the front hear of it first
            if self.running:
                return
            await self._start()

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._sock is None:
            self._sock = self._bind()
            self._spawn_task(self._receive(), "engine receive")
        self._hello = loop.create_future()
        await self._launch()

    def _bind(self) -> zmq.asyncio.Socket:
        """The ROUTER the engine connects to: an ipc path in the private runtime dir."""
        self.socket_path.unlink(missing_ok=True)
        sock = self._ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a dead engine raises instead of vanishing
        sock.bind(f"ipc://{self.socket_path}")
        return sock

    async def _launch(self) -> None:
        """Spawn `python -m llmsh.engine` and wait for its hello (or its exit)."""
        assert self._hello is not None
        loop = asyncio.get_running_loop()
        argv = [sys.executable, "-m", "llmsh.engine", "--connect", f"ipc://{self.socket_path}", "--node", self.node,
                "--parent", str(os.getpid())]
        if self.mem_budget:
            argv += ["--mem-budget", self.mem_budget]
        logf = await asyncio.to_thread(_open_log, self.log_path)  # the engine's stderr goes to the kernel's log
        try:
            self.proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                             stdout=logf, stderr=logf, env=engine_environment())
        finally:
            logf.close()  # the child has its own descriptor
        self.generation += 1
        proc = self.proc
        exited = loop.create_task(proc.wait())
        done, _ = await asyncio.wait({self._hello, exited}, timeout=HELLO_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        if self._hello not in done:
            if exited not in done:
                proc.kill()
                await proc.wait()
            self.proc = None
            raise EngineDied(f"the engine did not start ({exit_cause(proc.returncode)}); see the kernel log {self.log_path}")
        self.engine_pid = int(self._hello.result().get("pid", proc.pid))
        log.info("engine %s started: pid %s", self.node, self.engine_pid)
        self._watcher = asyncio.get_running_loop().create_task(self._watch(proc, exited), name="engine watch")
        self._tasks.add(self._watcher)
        self._watcher.add_done_callback(self._tasks.discard)

    def _spawn_task(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self, proc: asyncio.subprocess.Process, exited: asyncio.Task) -> None:
        """Wait for the engine to exit; then fail what was in flight and tell the front."""
        rc = await exited
        if self.proc is proc:
            self.proc = None
        cause = exit_cause(rc)
        if self.closing:
            return
        log.error("engine %s (pid %s) exited: %s", self.node, proc.pid, cause)
        self.fail_inflight(await self.on_exit(cause))

    def fail_inflight(self, line: str) -> None:
        """Every request in flight on this engine ends now with `line` (EngineDied); their token streams end."""
        err = EngineDied(line)
        for fut in list(self._replies.values()):
            if not fut.done():
                fut.set_exception(err)
        self._replies.clear()
        for q in list(self._tokens.values()):
            q.put_nowait(None)

    async def close(self) -> None:
        """Ask the engine to shut down (then SIGTERM, then SIGKILL) and close the socket."""
        self.closing = True
        proc = self.proc
        if proc is not None and proc.returncode is None:
            try:
                await asyncio.wait_for(self.request("shutdown"), 5)
                await asyncio.wait_for(proc.wait(), 5)
            except (TimeoutError, EngineDied, EngineRequestError, zmq.ZMQError):
                pass
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if proc.returncode is not None:
                    break
                try:
                    proc.send_signal(sig)
                    await asyncio.wait_for(proc.wait(), 5)
                except (TimeoutError, ProcessLookupError):
                    pass
        for t in list(self._tasks):
            t.cancel()
        if self._sock is not None:
            self._sock.close(linger=0)
        if self._own_ctx:
            self._ctx.term()
        self.socket_path.unlink(missing_ok=True)

    # ---- messages ---------------------------------------------------------------------------------------------------
    async def _receive(self) -> None:
        """Engine → front: replies to futures, tokens to their queues, the rest to `on_event`."""
        assert self._sock is not None
        while True:
            try:
                frames, fd = await self._recv()
            except zmq.ZMQError:
                return
            self.last_seen = time.monotonic()
            if len(frames) != 2:  # routing id, message
                log.warning("dropped a malformed engine frame list (%d frames)", len(frames))
                continue
            try:
                msg = wire.decode(frames[1])
            except wire.WireError as e:
                log.warning("dropped an engine message: %s", e)
                continue
            kind = msg["type"]
            if kind == "token":
                q = self._tokens.get(str(msg["id"]))
                if q is not None:
                    q.put_nowait(msg["text"])
            elif kind == "reply":
                fut = self._replies.pop(str(msg["id"]), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            elif kind == "hello":
                self.on_hello(msg, fd)
            elif kind == "heartbeat":
                self.on_heartbeat(msg, fd)
            else:
                try:
                    self.on_event(msg)
                except Exception:
                    log.exception("handling engine event %s failed", kind)

    async def _recv(self) -> tuple[list[bytes], int]:
        """One message's frames and the file descriptor it came on (-1: not asked)."""
        assert self._sock is not None
        return await self._sock.recv_multipart(), -1

    def on_hello(self, msg: dict[str, Any], fd: int) -> None:
        """An engine said hello: the one being started."""
        if self._hello is not None and not self._hello.done():
            self._hello.set_result(msg)

    def on_heartbeat(self, msg: dict[str, Any], fd: int) -> None:
        """The engine is alive; keep what it says about its node."""
        self.beat = msg

    def _send(self, msg_type: str, **fields: Any) -> None:
        """Send one message; EngineDied if the engine is not connected (ROUTER_MANDATORY: it just died). The asyncio
        socket reports a failed send in the future it returns, never by raising: a send that failed at once raises
        here; one that failed after waiting for room is logged (the engine's death reaches the requests through its
        exit watcher), so no failed future is left unread."""
        assert self._sock is not None
        sent = asyncio.ensure_future(self._sock.send_multipart([self._ident, wire.encode(msg_type, **fields)]))
        if sent.done() and (err := sent.exception()) is not None:
            raise EngineDied(f"engine {self.node} is not running ({err})")
        sent.add_done_callback(functools.partial(_log_failed_send, self.node, msg_type))

    def _new_id(self) -> str:
        return f"{self.generation}.{next(self._ids)}"

    async def request(self, msg_type: str, **fields: Any) -> Any:
        """One request → the reply's data; EngineRequestError or EngineDied otherwise."""
        await self.ensure_started()
        rid = self._new_id()
        fut = asyncio.get_running_loop().create_future()
        self._replies[rid] = fut
        try:
            self._send(msg_type, id=rid, **fields)
            reply = await fut
        finally:
            self._replies.pop(rid, None)
        if not reply["ok"]:
            raise EngineRequestError(reply.get("ename") or "EngineError", reply.get("error") or "failed",
                                     reply.get("kind") or "")
        return reply.get("data")

    async def generate(self, pid: int, fields: dict[str, Any], result: dict[str, Any]) -> AsyncIterator[str]:
        """Stream a generate request's text pieces; `result` gets the final reply's data. Cancelling the iteration
        cancels the request in the engine."""
        await self.ensure_started()
        rid = self._new_id()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        queue: asyncio.Queue = asyncio.Queue()
        self._replies[rid], self._tokens[rid] = fut, queue
        fut.add_done_callback(lambda _f: queue.put_nowait(None))  # wakes the reader after the last token
        finished = False
        try:
            self._send("generate", id=rid, pid=pid, **fields)
            while True:
                piece = await queue.get()
                if piece is None:
                    break
                yield piece
            while not queue.empty():  # tokens that arrived before the reply was seen
                piece = queue.get_nowait()
                if piece is not None:
                    yield piece
            reply = await fut
            finished = True
            if not reply["ok"]:
                raise EngineRequestError(reply.get("ename") or "EngineError", reply.get("error") or "failed",
                                         reply.get("kind") or "")
            result.update(reply.get("data") or {})
        finally:
            self._tokens.pop(rid, None)
            self._replies.pop(rid, None)
            if not finished and self.running:
                try:
                    self._send("cancel", id=rid)
                except EngineDied:
                    pass
