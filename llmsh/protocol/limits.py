"""What the kernel refuses before doing any work: requests over the size limit (`llmsh kernel start --max-message
SIZE`: its default, how a size is written, the one line a refused request gets) and malformed request fields.

A request bigger than the limit is answered with an error reply and never parsed, so a huge paste cannot tie up
the kernel. The default leaves room for a prompt of a long-context model (128k tokens of text is about 0.5 MiB).
"""

from __future__ import annotations

import re
from typing import Any

DEFAULT_MAX_MESSAGE = 4 << 20  # 4 MiB
_UNITS = {
    "": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000**2, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*$")


def parse_message_size(text: str) -> int:
    """'4MiB' → 4194304, '500000' → 500000; raises ValueError with one line for anything else."""
    m = _SIZE.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"bad size {text.strip()!r}: expected a number of bytes or a size like 4MiB")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value < 1024:
        raise ValueError(f"bad size {text.strip()!r}: the message limit must be at least 1KiB")
    return value


def human(n: int) -> str:
    """4194304 → '4MiB' (what the refusal line shows)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n}B"


def too_big(nbytes: int, limit: int) -> str:
    """The one line for a refused request."""
    return (
        f"llmsh: message of {human(nbytes)} is over the kernel's limit of {human(limit)}; "
        f"send less, or start the kernel with a larger --max-message"
    )


def bad_complete_request(content: dict[str, Any]) -> str | None:
    """Why a complete_request's content is unusable (one line), or None: `code` a string, `cursor_pos` inside it."""
    code = content.get("code")
    if not isinstance(code, str):
        return f"complete_request: code must be a string, not {type(code).__name__}"
    pos = content.get("cursor_pos", len(code))
    if isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos <= len(code):
        return f"complete_request: cursor_pos {pos!r:.40} is not a position in the code (0..{len(code)})"
    return None
