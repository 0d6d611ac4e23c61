"""A small asyncio client of the llmsh kernel over pyzmq: execute, complete, interrupt, with streamed output.

The one client implementation of llmsh: the shell uses it directly, batch mode through the blocking facade in
sync_client.py, `llmsh top` through tui/source.py. Why not jupyter_client's KernelClient: it drags in traitlets and
tornado (~250 ms of imports) and the shell only needs four requests. Replies are matched to requests by the parent header's msg_id; iopub messages are shown only
if their parent was sent by this client session (other clients' output and the telemetry broadcast are ignored).
Output of a background job arrives with the parent of the request that started it and goes to `on_output` too.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from llmsh.client.wire import Wire, WireError
from llmsh.protocol.connection import url
from llmsh.protocol.request import client_socket

__all__ = ["KernelClient", "KernelGone"]


class KernelGone(Exception):
    """The kernel stopped answering (its heartbeat is silent); the message is one line."""

OutputHandler = Callable[[dict[str, Any]], None]


class KernelClient:
    """One client session: shell + control (DEALER), iopub (SUB), heartbeat (REQ, on demand)."""

    def __init__(self, info: dict[str, Any], *, on_output: OutputHandler | None = None,
                 on_broadcast: OutputHandler | None = None) -> None:
        self.info = info
        self.on_broadcast = on_broadcast  # iopub messages of no client request (telemetry), for `llmsh top`
        self.wire = Wire(info.get("key", ""))
        self.session = self.wire.session
        self.on_output = on_output
        self.ctx = zmq.asyncio.Context()
        self.shell = self._socket(zmq.DEALER, "shell")
        self.control = self._socket(zmq.DEALER, "control")
        self.iopub = self._socket(zmq.SUB, "iopub", subscribe=True)
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._idle: dict[str, asyncio.Event] = {}
        self._readers: list[asyncio.Task[None]] = []
        self.last_heard = time.monotonic()

    def _socket(self, kind: int, channel: str, subscribe: bool = False) -> zmq.asyncio.Socket:
        sock: Any = client_socket(self.ctx, kind, self.info)  # an asyncio socket: the context is zmq.asyncio's
        if kind == zmq.DEALER:
            sock.identity = self.wire.bsession
        if subscribe:
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(url(self.info, channel))
        return sock

    async def start(self, timeout: float = 10.0) -> dict[str, Any]:
        """Start reading and wait until the kernel answers on shell AND iopub (so no early output is lost)."""
        self._readers = [
            asyncio.ensure_future(self._read(self.shell)),
            asyncio.ensure_future(self._read(self.control)),
            asyncio.ensure_future(self._read_iopub()),
        ]
        deadline = time.monotonic() + timeout
        while True:
            # iopub is a SUB socket: its subscription takes a moment to reach the kernel. A kernel_info_request's
            # `status` messages on iopub prove the subscription is live; retry until one arrives.
            msg = self.wire.msg("kernel_info_request", {})
            msg_id = msg["header"]["msg_id"]
            idle = self._idle[msg_id] = asyncio.Event()
            reply = await self._request(self.shell, msg, timeout=max(0.1, deadline - time.monotonic()))
            try:
                await asyncio.wait_for(idle.wait(), min(0.25, max(0.01, deadline - time.monotonic())))
                return reply["content"]
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise KernelGone("the kernel answers but its iopub channel does not; is it a llmsh kernel?") from None
            finally:
                self._idle.pop(msg_id, None)

    async def _request(self, sock: zmq.asyncio.Socket, msg: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        msg_id = msg["header"]["msg_id"]
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[msg_id] = fut
        await sock.send_multipart(self.wire.serialize(msg))
        try:
            if timeout is None:
                return await self._await_alive(fut)
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise KernelGone("the kernel did not answer; check it with 'llmsh kernel status'") from None
        finally:
            self._replies.pop(msg_id, None)

    async def _await_alive(self, fut: asyncio.Future[Any]) -> Any:
        """Wait for `fut` as long as the kernel is alive (heartbeat checked whenever it has been quiet for a while)."""
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(fut), 2.0)
            except TimeoutError:
                if time.monotonic() - self.last_heard > 2.0 and not await self.heartbeat(3.0):
                    raise KernelGone("the kernel stopped answering (no heartbeat); see its log") from None

    async def heartbeat(self, timeout: float = 1.0) -> bool:
        """True if the kernel echoes a heartbeat ping within `timeout` seconds."""
        sock = self._socket(zmq.REQ, "hb")
        try:
            payload = b"ping %d" % time.monotonic_ns()
            await sock.send(payload)
            if await sock.poll(int(timeout * 1000)):
                ok = await sock.recv() == payload
                if ok:
                    self.last_heard = time.monotonic()
                return ok
            return False
        finally:
            sock.close(linger=0)

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        """Deliver shell/control replies to the request waiting for them."""
        while True:
            frames = await sock.recv_multipart()
            self.last_heard = time.monotonic()
            try:
                msg = self.wire.deserialize(frames)
            except WireError:
                continue
            fut = self._replies.get(msg["parent_header"].get("msg_id", ""))
            if fut is not None and not fut.done():
                fut.set_result(msg)

    async def _read_iopub(self) -> None:
        """Pass this session's iopub messages on; `status: idle` marks the end of a request's output."""
        while True:
            frames = await self.iopub.recv_multipart()
            self.last_heard = time.monotonic()
            try:
                msg = self.wire.deserialize(frames)
            except WireError:
                continue
            parent = msg["parent_header"]
            if not parent and self.on_broadcast is not None:
                self.on_broadcast(msg)
                continue
            if parent.get("session") != self.session:
                continue
            if msg["msg_type"] == "status":
                if msg["content"].get("execution_state") == "idle":
                    event = self._idle.get(parent.get("msg_id", ""))
                    if event is not None:
                        event.set()
                continue
            if self.on_output is not None:
                self.on_output(msg)

    async def execute(self, code: str, *, store_history: bool = True, stdin: str | None = None) -> dict[str, Any]:
        """Run `code`; output goes to `on_output` as it arrives; returns the execute_reply content after all output.
        `stdin` is text for the line's first command to read (the output of a `!cmd |` run here)."""
        metadata: dict[str, Any] = {"cwd": os.getcwd()}
        if stdin is not None:
            metadata["llmsh_stdin"] = stdin
        msg = self.wire.msg(
            "execute_request",
            {"code": code, "silent": False, "store_history": store_history, "user_expressions": {}, "allow_stdin": False},
            metadata=metadata,
        )
        msg_id = msg["header"]["msg_id"]
        idle = self._idle[msg_id] = asyncio.Event()
        try:
            reply = await self._request(self.shell, msg, timeout=None)
            try:  # output published before the reply may still be in flight on iopub
                await asyncio.wait_for(idle.wait(), 5.0)
            except TimeoutError:
                pass
            return reply["content"]
        finally:
            self._idle.pop(msg_id, None)

    async def kernel_info(self, timeout: float = 2.0) -> dict[str, Any]:
        """The kernel's kernel_info_reply content (KernelGone if it does not answer within `timeout`)."""
        return (await self._request(self.shell, self.wire.msg("kernel_info_request", {}), timeout))["content"]

    async def complete(self, code: str, cursor_pos: int, timeout: float = 2.0) -> dict[str, Any]:
        """The kernel's completions for `code` at `cursor_pos` (complete_reply content)."""
        msg = self.wire.msg("complete_request", {"code": code, "cursor_pos": cursor_pos}, metadata={"cwd": os.getcwd()})
        return (await self._request(self.shell, msg, timeout))["content"]

    async def interrupt(self, timeout: float = 2.0) -> None:
        """Ask the kernel to cancel this session's foreground command (background jobs keep running)."""
        msg = self.wire.msg("interrupt_request", {"llmsh_session": self.session})
        try:
            await self._request(self.control, msg, timeout)
        except KernelGone:
            pass

    async def close(self) -> None:
        """Stop reading and close the sockets."""
        for t in self._readers:
            t.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        self.ctx.destroy(linger=0)
