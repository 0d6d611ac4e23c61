"""What a process name may be: the words `kill 2`, `fg %1` and a terminal's escape codes must never be ambiguous.

A name that is all digits would be shadowed by the PID of the same number, a leading `%` is job syntax, and a
control character (an escape sequence) would be printed raw by `ps` and `top`. Pure functions, used by the process
table (the one owner of names) and by the loader for names made from a folder's name.
"""

from __future__ import annotations

import unicodedata

MAX_NAME = 128


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a process name (one line, saying what to do), or None when it can."""
    if not name or not name.strip():
        return "a process name cannot be empty; choose one with --name"
    if name.isdigit():
        return f"process name {name!r} is all digits, which reads as a PID; choose another with --name"
    if name.startswith("%"):
        return f"process name {name!r} starts with '%', which is job syntax (fg %1); choose another with --name"
    if any(unicodedata.category(c) in ("Cc", "Cf") for c in name):
        return f"process name {name!r} has control characters; choose another with --name"
    if len(name) > MAX_NAME:
        return f"a process name has at most {MAX_NAME} characters, not {len(name)}; choose a shorter one with --name"
    return None


def check_name(name: str) -> str:
    """`name` itself, or ValueError with `name_problem`'s line."""
    problem = name_problem(name)
    if problem is not None:
        raise ValueError(problem)
    return name


def usable_name(base: str) -> str:
    """A valid name made from `base` (a folder's name): control characters dropped, `model-` before digits or `%`."""
    clean = "".join(c for c in base if unicodedata.category(c) not in ("Cc", "Cf"))[:MAX_NAME - 6].strip() or "model"
    return clean if name_problem(clean) is None else f"model-{clean}"
