"""This process's mappings of given files, as Linux's /proc/self/smaps describes them (tests only)."""

from __future__ import annotations

from pathlib import Path


def file_mappings(paths: set[str]) -> list[dict[str, str]]:
    """One dict per mapping of a file in `paths`: its smaps fields ("Rss" -> "12 kB", "VmFlags" -> "rd mr …")."""
    found: list[dict[str, str]] = []
    current: dict[str, str] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):   # a mapping's header line
            current = {} if len(head) == 6 and head[5] in paths else None
            if current is not None:
                found.append(current)
        elif current is not None and ":" in line:
            key, value = line.split(":", 1)
            current[key] = value.strip()
    return found
