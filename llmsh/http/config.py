"""Where the HTTP API listens and who may use it: `--http [ADDR:]PORT`, `--http-key`, or config.toml
(`http = "ADDR:PORT"` or `serve_http = true`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from llmsh.config import ConfigError, read_config
from llmsh.protocol.connection import is_loopback

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11435  # one above Ollama's 11434, so both can run on one machine
DEFAULT_MAX_BODY = 4 << 20  # bytes: a long prompt fits; a runaway upload does not
KEY_ENV = "LLMSH_HTTP_KEY"  # the key handed to a daemonised kernel without showing it in `ps`


class HttpConfigError(ValueError):
    """A bad --http setting: one line saying what to do."""


@dataclass(frozen=True)
class HttpSettings:
    """The resolved HTTP options of one kernel."""

    host: str
    port: int
    key: str | None = None
    min_nice: int = 0  # X-Llmsh-Nice below this is refused (keyed clients cannot jump ahead of the shell)
    max_body: int = DEFAULT_MAX_BODY

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def parse_address(spec: str) -> tuple[str, int]:
    """`PORT`, `ADDR:PORT` or `[V6]:PORT` → (host, port); HttpConfigError otherwise."""
    spec = spec.strip()
    host, port_text = DEFAULT_HOST, spec
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        port_text = rest.lstrip(":")
    elif ":" in spec:
        host, _, port_text = spec.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        raise HttpConfigError(f"--http {spec!r}: give [ADDR:]PORT, e.g. --http {DEFAULT_PORT} or --http 0.0.0.0:{DEFAULT_PORT}") from None
    if not 0 <= port <= 65535:
        raise HttpConfigError(f"--http {spec!r}: port {port} is out of range (0-65535)")
    return host or DEFAULT_HOST, port


def _from_config(data: dict[str, Any]) -> str | None:
    spec = data.get("http")
    if isinstance(spec, (str, int)) and str(spec):
        return str(spec)
    if data.get("serve_http") is True:
        return str(DEFAULT_PORT)
    return None


def settings(args: Any, config_path: Any = None) -> HttpSettings | None:
    """The HTTP settings from the command line, else config.toml; None when HTTP is off."""
    spec = getattr(args, "http", None)
    data: dict[str, Any] = {}
    if config_path is not None:
        try:
            data = read_config(config_path)
        except ConfigError:
            data = {}
    spec = spec or _from_config(data)
    if not spec:
        return None
    host, port = parse_address(str(spec))
    key = getattr(args, "http_key", None) or os.environ.get(KEY_ENV) or data.get("http_key") or None
    if not is_loopback(host) and not key:
        raise HttpConfigError(f"--http {host}:{port} is not a loopback address: anyone who can reach it could run your "
                              "models; give --http-key KEY (clients send 'Authorization: Bearer KEY'), or bind 127.0.0.1")
    min_nice = getattr(args, "http_min_nice", None)
    if min_nice is None:
        min_nice = int(data.get("http_min_nice", 0))
    if not -20 <= int(min_nice) <= 19:
        raise HttpConfigError(f"--http-min-nice {min_nice} is out of range; use -20 .. 19")
    return HttpSettings(host=host, port=port, key=str(key) if key else None, min_nice=int(min_nice))
