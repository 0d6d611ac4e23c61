"""The heartbeat: a ROUTER socket echoing every ping from its own thread, like ipykernel's.

`zmq.proxy` runs in C without the GIL, so the heartbeat answers even while the event loop is busy; a client
that gets no echo knows the kernel process is gone, not merely working.
"""

from __future__ import annotations

import logging
import threading

import zmq

log = logging.getLogger("llmsh.kernel")


class Heartbeat(threading.Thread):
    """Echo thread bound to `endpoint` (port 0 picks a free one); `.port` is known after construction."""

    def __init__(self, ip: str, port: int, transport: str = "tcp", curve_secretkey: bytes | None = None) -> None:
        super().__init__(name="llmsh-heartbeat", daemon=True)
        self.ctx = zmq.Context()
        self.socket = self.ctx.socket(zmq.ROUTER)
        self.socket.linger = 0
        if curve_secretkey:
            self.socket.curve_server = True
            self.socket.curve_secretkey = curve_secretkey
        try:
            if transport == "ipc":
                self.socket.bind(f"ipc://{ip}-{port}")
                self.port = port
            elif port:
                self.socket.bind(f"tcp://[{ip}]:{port}" if ":" in ip else f"tcp://{ip}:{port}")
                self.port = port
            else:
                self.port = self.socket.bind_to_random_port(f"tcp://[{ip}]" if ":" in ip else f"tcp://{ip}")
        except zmq.ZMQError:
            self.socket.close(linger=0)
            self.ctx.term()
            raise

    def run(self) -> None:
        """Echo until the context is terminated."""
        try:
            zmq.proxy(self.socket, self.socket)
        except zmq.ContextTerminated:
            pass
        except zmq.ZMQError as e:  # pragma: no cover - logged, the kernel keeps running without a heartbeat
            log.error("heartbeat stopped: %s", e)
        finally:
            self.socket.close(linger=0)

    def stop(self) -> None:
        """Terminate the context (the proxy returns) and wait for the thread."""
        if not self.is_alive():
            self.socket.close(linger=0)
        self.ctx.term()
        self.join(timeout=2)
