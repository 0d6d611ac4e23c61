"""A blocking client of the llmsh kernel for batch mode: the same protocol as `kernel_client.KernelClient`, with
plain pyzmq sockets and a poller instead of asyncio.

Batch mode (`llmsh -c 'echo hi'`) runs one short request and exits; importing asyncio and zmq.asyncio alone costs
about 60 ms of its 300 ms budget, so this path avoids them. Ctrl-C arrives as KeyboardInterrupt inside `execute`,
which then sends `interrupt_request` on control and keeps waiting for the (interrupted) reply.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import zmq

from llmsh.client.wire import Wire, WireError
from llmsh.protocol.connection import url
from llmsh.protocol.request import client_socket


class KernelGone(Exception):
    """The kernel stopped answering (its heartbeat is silent); the message is one line."""


OutputHandler = Callable[[dict[str, Any]], None]


class SyncKernelClient:
    """One client session with blocking calls: start, execute, complete, interrupt."""

    def __init__(self, info: dict[str, Any], *, on_output: OutputHandler | None = None) -> None:
        self.info = info
        self.wire = Wire(info.get("key", ""))
        self.session = self.wire.session
        self.on_output = on_output
        self.ctx = zmq.Context()
        self.shell = self._socket(zmq.DEALER, "shell")
        self.control = self._socket(zmq.DEALER, "control")
        self.iopub = self._socket(zmq.SUB, "iopub")
        self.poller = zmq.Poller()
        for sock in (self.shell, self.control, self.iopub):
            self.poller.register(sock, zmq.POLLIN)
        self._replies: dict[str, dict[str, Any]] = {}  # msg_id → reply, for requests still being waited on
        self._waiting: set[str] = set()
        self._idle: set[str] = set()  # msg_ids whose `status: idle` has arrived
        self.last_heard = time.monotonic()

    def _socket(self, kind: int, channel: str) -> zmq.Socket:
        sock = client_socket(self.ctx, kind, self.info)
        if kind == zmq.DEALER:
            sock.identity = self.wire.bsession
        if kind == zmq.SUB:
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(url(self.info, channel))
        return sock

    # ---- receiving ---------------------------------------------------------------------------------------------

    def _pump(self, timeout: float) -> None:
        """Handle whatever arrives within `timeout` seconds (returns after the first batch of events)."""
        for sock, _ in self.poller.poll(int(max(0.0, timeout) * 1000)):
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.last_heard = time.monotonic()
                try:
                    msg = self.wire.deserialize(frames)
                except WireError:
                    continue
                if sock is self.iopub:
                    self._on_iopub(msg)
                else:
                    parent_id = msg["parent_header"].get("msg_id", "")
                    if parent_id in self._waiting:
                        self._replies[parent_id] = msg

    def _on_iopub(self, msg: dict[str, Any]) -> None:
        parent = msg["parent_header"]
        if parent.get("session") != self.session:
            return  # another client's output, or the telemetry broadcast
        if msg["msg_type"] == "status":
            if msg["content"].get("execution_state") == "idle":
                self._idle.add(parent.get("msg_id", ""))
            return
        if self.on_output is not None:
            self.on_output(msg)

    def _wait_reply(self, msg_id: str, timeout: float | None) -> dict[str, Any]:
        """Block until the reply to `msg_id` arrives; with no timeout, as long as the heartbeat answers."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while msg_id not in self._replies:
            if deadline is not None and time.monotonic() > deadline:
                raise KernelGone("the kernel did not answer; check it with 'llmsh kernel status'")
            step = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            self._pump(step)
            if deadline is None and time.monotonic() - self.last_heard > 3.0:
                if not self.heartbeat(3.0):
                    raise KernelGone("the kernel stopped answering (no heartbeat); see its log")
        self._waiting.discard(msg_id)
        return self._replies.pop(msg_id)

    def _wait_idle(self, msg_id: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while msg_id not in self._idle and time.monotonic() < deadline:
            self._pump(deadline - time.monotonic())
        found = msg_id in self._idle
        self._idle.discard(msg_id)
        return found

    def _send(self, sock: zmq.Socket, msg: dict[str, Any]) -> str:
        msg_id = msg["header"]["msg_id"]
        self._waiting.add(msg_id)
        sock.send_multipart(self.wire.serialize(msg))
        return msg_id

    # ---- requests -------------------------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> dict[str, Any]:
        """Wait until the kernel answers on shell AND iopub (the SUB subscription is live), so no output is lost."""
        deadline = time.monotonic() + timeout
        wait = 0.01  # the SUB subscription usually goes live within milliseconds: retry soon, then back off
        while True:
            msg_id = self._send(self.shell, self.wire.msg("kernel_info_request", {}))
            reply = self._wait_reply(msg_id, max(0.1, deadline - time.monotonic()))
            if self._wait_idle(msg_id, min(wait, max(0.01, deadline - time.monotonic()))):
                return reply["content"]
            wait = min(wait * 2, 0.25)
            if time.monotonic() > deadline:
                raise KernelGone("the kernel answers but its iopub channel does not; is it a llmsh kernel?")

    def execute(self, code: str, *, store_history: bool = True, stdin: str | None = None) -> dict[str, Any]:
        """Run `code`, passing output to `on_output` as it arrives; returns the execute_reply content.

        Ctrl-C (KeyboardInterrupt) while waiting sends interrupt_request and keeps waiting for the reply; a second
        Ctrl-C gives up waiting and re-raises."""
        content = {"code": code, "silent": False, "store_history": store_history, "user_expressions": {}, "allow_stdin": False}
        metadata: dict[str, Any] = {"cwd": os.getcwd()}
        if stdin is not None:  # the output of a `!cmd |` run here, for the line's first command to read
            metadata["llmsh_stdin"] = stdin
        msg_id = self._send(self.shell, self.wire.msg("execute_request", content, metadata=metadata))
        try:
            reply = self._wait_reply(msg_id, None)
        except KeyboardInterrupt:
            self.interrupt()
            reply = self._wait_reply(msg_id, None)
        self._wait_idle(msg_id, 5.0)  # output published before the reply may still be in flight on iopub
        return reply["content"]

    def complete(self, code: str, cursor_pos: int, timeout: float = 2.0) -> dict[str, Any]:
        """The kernel's completions for `code` at `cursor_pos` (complete_reply content)."""
        msg_id = self._send(self.shell, self.wire.msg("complete_request", {"code": code, "cursor_pos": cursor_pos}, metadata={"cwd": os.getcwd()}))
        return self._wait_reply(msg_id, timeout)["content"]

    def interrupt(self, timeout: float = 2.0) -> None:
        """Cancel this session's foreground command in the kernel (background jobs keep running)."""
        msg_id = self._send(self.control, self.wire.msg("interrupt_request", {"llmsh_session": self.session}))
        try:
            self._wait_reply(msg_id, timeout)
        except KernelGone:
            self._waiting.discard(msg_id)

    def heartbeat(self, timeout: float = 1.0) -> bool:
        """True if the kernel echoes a heartbeat ping within `timeout` seconds."""
        sock = self._socket(zmq.REQ, "hb")
        try:
            payload = b"ping %d" % time.monotonic_ns()
            sock.send(payload)
            if sock.poll(int(timeout * 1000)) and sock.recv() == payload:
                self.last_heard = time.monotonic()
                return True
            return False
        finally:
            sock.close(linger=0)

    def close(self) -> None:
        """Close the sockets."""
        self.ctx.destroy(linger=0)
