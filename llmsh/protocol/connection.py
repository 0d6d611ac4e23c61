"""Connection files: the JSON that tells a client where a kernel listens and which key signs its messages.

The format is Jupyter's (ip, transport, five ports, key, signature_scheme, kernel_name, optional CurveZMQ keys),
so `jupyter console --existing FILE` works. Secrets are written owner-only at creation (os.open mode 0600) into a
temporary name and renamed into place, so a reader never sees a half-written file.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
from pathlib import Path
from typing import Any

CHANNELS = ("shell", "control", "stdin", "iopub", "hb")
PORT_NAMES = tuple(f"{c}_port" for c in CHANNELS)
SIGNATURE_SCHEME = "hmac-sha256"


class ConnectionFileError(Exception):
    """A connection file that cannot be read; the message is one line."""


def new_key() -> str:
    """A random 32-byte signing key, hex-encoded (what goes in the file's `key`)."""
    return secrets.token_hex(32)


def is_loopback(ip: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost' — addresses where the HMAC alone is enough."""
    if ip == "localhost":
        return True
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def url(info: dict[str, Any], channel: str) -> str:
    """The ZeroMQ endpoint of one channel (`tcp://127.0.0.1:5555` or Jupyter's `ipc://IP-PORT`)."""
    port = info[f"{channel}_port"]
    if info.get("transport", "tcp") == "ipc":
        return f"ipc://{info['ip']}-{port}"
    ip = info["ip"]
    return f"tcp://[{ip}]:{port}" if ":" in ip else f"tcp://{ip}:{port}"


def write_connection_file(path: Path, info: dict[str, Any]) -> Path:
    """Write `info` to `path` atomically with mode 0600 from creation; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_connection_file(path: Path | str) -> dict[str, Any]:
    """Load and check a connection file; raises ConnectionFileError with one line saying what is wrong."""
    path = Path(path)
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConnectionFileError(f"no connection file at {path}") from None
    except (OSError, ValueError) as e:
        raise ConnectionFileError(f"cannot read connection file {path}: {e}") from None
    if not isinstance(info, dict):
        raise ConnectionFileError(f"connection file {path} is not a JSON object")
    info.setdefault("transport", "tcp")
    info.setdefault("ip", "127.0.0.1")
    info.setdefault("signature_scheme", SIGNATURE_SCHEME)
    info.setdefault("key", "")
    for name in PORT_NAMES:
        value = info.setdefault(name, 0)
        if not isinstance(value, int) or not 0 <= value < 65536:
            raise ConnectionFileError(f"connection file {path}: {name} must be a port number, not {value!r}")
    if info["signature_scheme"] != SIGNATURE_SCHEME and info["key"]:
        raise ConnectionFileError(
            f"connection file {path}: signature_scheme {info['signature_scheme']!r} is not supported (use {SIGNATURE_SCHEME})"
        )
    return info


def curve_keypair() -> tuple[str, str]:
    """A new CurveZMQ (public, secret) key pair in Z85 text, the form jupyter_client reads from the file."""
    import zmq

    public, secret = zmq.curve_keypair()
    return public.decode("ascii"), secret.decode("ascii")


def uses_curve(info: dict[str, Any]) -> bool:
    """True when the file carries CurveZMQ server keys (the kernel then encrypts every socket)."""
    return bool(info.get("curve_publickey") and info.get("curve_secretkey"))
