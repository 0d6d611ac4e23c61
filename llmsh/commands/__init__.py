"""The shell language: parser, executor and the command families registered in `registry.REGISTRY`.

Each command family lives in its own module and registers itself on import; `load_all()` imports them all.
Add a family by appending its module to `FAMILIES`.
"""

from __future__ import annotations

import importlib

FAMILIES: list[str] = [
    "llmsh.commands.core",
    "llmsh.commands.nodes",
    "llmsh.commands.processes",
    "llmsh.commands.generation",
    "llmsh.commands.memory",
    "llmsh.commands.dmesg",
    "llmsh.commands.mapreduce",
]


def load_all() -> None:
    """Import every command family so its commands are in the registry (idempotent)."""
    for name in FAMILIES:
        importlib.import_module(name)
