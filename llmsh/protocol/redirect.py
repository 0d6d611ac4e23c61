"""Shell redirects on the wire: the kernel sends a command's `> FILE` output to the client, which writes the file.

As in a Unix shell, `>`/`>>` open the file on the client's side, in the client's working directory: a FIFO with no
reader then blocks only that client (never the kernel's event loop), and a file is written with the client user's
rights. The kernel publishes each piece as `display_data` with REDIRECT_MIME and no `text/plain` (other Jupyter
front-ends show nothing for it); the payload is `{"id", "path", "append", "op", "text"}` with `op` one of OPEN,
WRITE, CLOSE, in that order for one redirect.
"""

from __future__ import annotations

from typing import Any

REDIRECT_MIME = "application/vnd.llmsh.redirect+json"
OPEN, WRITE, CLOSE = "open", "write", "close"


def redirect_bundle(rid: str, path: str, append: bool, op: str, text: str = "") -> dict[str, Any]:
    """The display_data bundle of one redirect event."""
    return {REDIRECT_MIME: {"id": rid, "path": path, "append": append, "op": op, "text": text}}
