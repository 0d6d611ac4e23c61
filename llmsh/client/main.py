"""The `llmsh` client entry: pick the script source, find (or start) a kernel, run the REPL or batch mode.

Kept light on purpose (`llmsh -c 'echo hi'` aims at < 300 ms): no torch, no jupyter_client, no prompt_toolkit
unless the shell is interactive.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable
from pathlib import Path


def _err(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _source(args: argparse.Namespace) -> tuple[str, str | Iterable[str]] | None:
    """(name, script) to run — text, or stdin's lines as they arrive — or None for the interactive shell.
    Raises OSError for an unreadable file."""
    if args.command is not None:
        return "-c", args.command
    if args.file == "-" or (args.file is None and not sys.stdin.isatty()):
        return "<stdin>", sys.stdin
    if args.file is not None:
        return args.file, Path(args.file).read_text(encoding="utf-8")
    return None


def _kernel(args: argparse.Namespace) -> Path | None:
    """The connection file of a live kernel: --kernel FILE, else the newest running one, else a new one."""
    from llmsh.kernel.lifecycle import KernelStartError, find_kernel, find_or_start_kernel

    path = find_kernel(args.kernel)
    if path is not None:
        return path
    if args.kernel:
        _err(f"llmsh: no kernel answers at {args.kernel}; start one with 'llmsh kernel start' or leave out --kernel")
        return None
    try:
        path, started = find_or_start_kernel()
    except KernelStartError as e:
        _err(f"llmsh: cannot start a kernel: {e}")
        return None
    if not started:
        return path
    from llmsh.protocol.connection import read_connection_file

    _err(f"llmsh: started kernel (pid {read_connection_file(path).get('pid', '?')})")
    return path


def main(args: argparse.Namespace) -> int:
    """Run the shell as the parsed `llmsh` arguments say; returns the process exit code."""
    try:
        source = _source(args)
    except (OSError, UnicodeDecodeError) as e:
        _err(f"llmsh: cannot read {args.file}: {getattr(e, 'strerror', None) or e}")
        return 1
    try:
        path = _kernel(args)
        if path is None:
            return 1
        from llmsh.protocol.connection import ConnectionFileError, read_connection_file

        try:
            info = read_connection_file(path)
        except ConnectionFileError as e:
            _err(f"llmsh: {e}")
            return 1
        if source is None:
            import asyncio

            from llmsh.client.repl import run_repl

            def reconnect() -> dict | None:
                """After the kernel went away: the live one (or a new one) to talk to next."""
                again = _kernel(args)
                return read_connection_file(again) if again is not None else None

            return asyncio.run(run_repl(info, reconnect))
        from llmsh.client.batch import run_batch

        name, script = source
        return run_batch(info, name, script, keep_going=args.keep_going)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `llmsh -c help | head -1`: the reader left; exit quietly like a killed sh
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
