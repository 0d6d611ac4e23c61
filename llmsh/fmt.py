"""Plain-text formatting shared by the dashboard, the commands and the kernel: sizes, durations, tables.

No Textual or torch here: every room may import it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

_UNITS = ("B", "K", "M", "G", "T", "P")

# Process table columns: (row key, header, width, right-aligned), in display order
PROC_COLUMNS: tuple[tuple[str, str, int, bool], ...] = (
    ("pid", "PID", 5, True),
    ("name", "NAME", 12, False),
    ("state", "STATE", 9, False),
    ("nice", "NI", 3, True),
    ("device", "DEVICE", 6, False),
    ("res_bytes", "RES", 6, True),
    ("paged_bytes", "PAGED", 6, True),
    ("reqs", "REQS", 4, True),
    ("tok_s", "TOK/S", 5, True),
    ("tokens", "TOKENS", 6, True),
    ("time_s", "TIME", 7, True),
    ("node", "NODE", 10, False),  # shown when there are several nodes (the dashboard, `top -n 1`)
)
# which columns to keep first when the terminal is narrow (80 columns fit all but PAGED and TOKENS)
PROC_PRIORITY = ("pid", "name", "state", "nice", "device", "res_bytes", "tok_s", "reqs", "time_s", "paged_bytes",
                 "tokens")


def human_bytes(n: float | None, long: bool = False) -> str:
    """1536 → '1.5K' (powers of 1024, like `free -h`), or '1.5 KiB' with `long` (for sentences); None → '-'.

    The one byte formatter of the project: tables use the short form, messages the long one."""
    if n is None:
        return "-"
    n = float(n)
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            if long:
                return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}iB"
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}P"


def format_bytes(n: float) -> str:
    """1536 → '1.5 KiB' (the long form of `human_bytes`, for messages)."""
    return human_bytes(n, long=True)


def duration(s: float | None) -> str:
    """Seconds → 'H:MM:SS' (or 'D-HH:MM:SS' past a day)."""
    if s is None:
        return "-"
    s = int(max(0, s))
    d, rest = divmod(s, 86400)
    h, rest = divmod(rest, 3600)
    m, sec = divmod(rest, 60)
    return f"{d}-{h:02d}:{m:02d}:{sec:02d}" if d else f"{h}:{m:02d}:{sec:02d}"


def rate(x: float | None) -> str:
    """A rate with a sensible number of digits."""
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def proc_cell(row: dict[str, Any], key: str) -> str:
    """One process-table cell as text."""
    if key == "reqs":
        a, q = row.get("reqs_active"), row.get("reqs_queued")
        return "-" if a is None and q is None else f"{a or 0}+{q or 0}" if q else str(a or 0)
    v = row.get(key)
    if v is None or v == "":
        return "-"
    if key in ("res_bytes", "paged_bytes"):
        return human_bytes(v)
    if key == "time_s":
        return duration(v)
    if key == "tok_s":
        return rate(v)
    return str(v)


def proc_sort_key(row: dict[str, Any], key: str) -> Any:
    """Sort key for a process-table column (numbers numerically, text case-insensitively, missing last)."""
    v = (row.get("reqs_active") or 0) + (row.get("reqs_queued") or 0) if key == "reqs" else row.get(key)
    if v is None:
        return (1, 0, "")
    if isinstance(v, (int, float)):
        return (0, v, "")
    return (0, 0, str(v).lower())


def table(rows: Sequence[Sequence[str]], headers: Sequence[str], right: Iterable[int] = ()) -> str:
    """A plain aligned text table."""
    right = set(right)
    widths = [len(h) for h in headers]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r)]

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def proc_table(procs: list[dict[str, Any]]) -> str:
    """The process table as text (the bottom half of `top -n 1`); NODE only when the processes are on several."""
    columns = [c for c in PROC_COLUMNS if c[0] != "node" or len({p.get("node") for p in procs}) > 1]
    keys = [c[0] for c in columns]
    rows = [[proc_cell(p, k) for k in keys] for p in procs]
    right = [i for i, c in enumerate(columns) if c[3]]
    return table(rows, [c[1] for c in columns], right)


def clock(t: float, utc: bool = False) -> str:
    """'HH:MM:SS.mmm' of a time.time() value, local time unless utc."""
    tm = time.gmtime(t) if utc else time.localtime(t)
    return time.strftime("%H:%M:%S", tm) + f".{int((t % 1) * 1000):03d}"
