"""Start and stop uvicorn on the kernel's running loop: the socket is bound here (so a taken port is one clear
line, not uvicorn's sys.exit), and uvicorn's signal handling stays out of the kernel's way."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import uvicorn

from llmsh.http.app import build_app
from llmsh.http.config import HttpConfigError, HttpSettings
from llmsh.protocol.connection import is_loopback

log = logging.getLogger("llmsh.http")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise HttpConfigError(f"--http {host}:{port}: cannot bind ({e.strerror}); choose another port") from None
    sock.listen(512)
    sock.setblocking(False)
    return sock


class HttpServer:
    """The HTTP API of one kernel: `await start()` after the services exist, `await stop()` before they go."""

    def __init__(self, kernel: Any, settings: HttpSettings) -> None:
        self.kernel = kernel
        self.settings = settings
        self.port = settings.port
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None
        self._sock: socket.socket | None = None

    async def start(self) -> None:
        """Bind, then serve from a task on the current loop."""
        s = self.settings
        self._sock = _bind(s.host, s.port)
        self.port = int(self._sock.getsockname()[1])
        app = build_app(self.kernel, s)
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", loop="none",
                                timeout_graceful_shutdown=2, server_header=False, date_header=False)
        config.load()
        self._server = uvicorn.Server(config)
        self._server.lifespan = config.lifespan_class(config)  # what uvicorn's serve() sets up before startup()
        await self._server.startup(sockets=[self._sock])
        self._task = asyncio.get_running_loop().create_task(self._server.main_loop(), name="http")
        where = f"http://{'[' + s.host + ']' if ':' in s.host else s.host}:{self.port}"
        guard = "loopback only" if is_loopback(s.host) else "Bearer key required"
        log.info("HTTP API (OpenAI /v1, Ollama /api) on %s (%s)", where, guard)
        if not is_loopback(s.host):
            log.warning("HTTP API bound to %s, off loopback: clients must send 'Authorization: Bearer <key>'; "
                        "traffic is plain HTTP (put TLS in front of it)", s.host)

    async def stop(self) -> None:
        """Stop accepting, end open streams, close the socket."""
        if self._server is None:
            return
        self._server.should_exit = True
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=3)
            except (TimeoutError, asyncio.CancelledError):
                pass
        self._server.force_exit = True
        try:
            await asyncio.wait_for(self._server.shutdown(sockets=[self._sock] if self._sock else None), timeout=3)
        except Exception:  # the kernel is stopping anyway: note it, go on with the rest
            log.debug("HTTP shutdown did not finish cleanly", exc_info=True)
        self._server = None
