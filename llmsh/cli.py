"""Command-line entry point: argument parsing only, then hand over to the client, kernel or dashboard.

Imports are deferred into each branch so that `llmsh -c 'echo hi'` loads neither torch nor textual.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from llmsh import __version__
from llmsh.protocol.limits import DEFAULT_MAX_MESSAGE

SUBCOMMANDS = ("kernel", "top", "checksum")


def _shell_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmsh",
        description="An operating-system shell for language models. "
        "Subcommands: 'llmsh kernel start|stop|status|list|install', 'llmsh top', 'llmsh checksum PATH'.",
    )
    p.add_argument("file", nargs="?", help="a batch file of llmsh commands ('-' for stdin)")
    p.add_argument("-c", dest="command", metavar="CMDS", help="run these commands and exit")
    p.add_argument("--kernel", metavar="FILE", help="connection file of the kernel to use")
    p.add_argument("--keep-going", action="store_true", help="batch mode: do not stop at the first failing line")
    p.add_argument("--version", action="version", version=f"llmsh {__version__}")
    return p


def _budget(spec: str) -> str:
    """Validate `--mem-budget` before the kernel daemonises, so a typo is a usage line here, not a dead daemon."""
    from llmsh.engine.paging.budget import BudgetError, parse_budget  # plain parsing: no torch

    try:
        parse_budget(spec)
    except BudgetError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return spec


def _message_size(spec: str) -> int:
    """Validate `--max-message` here, so a typo is a usage line rather than a dead daemon."""
    from llmsh.protocol.limits import parse_message_size

    try:
        return parse_message_size(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _http_address(spec: str) -> str:
    """Validate `--http [ADDR:]PORT` here, so a typo is a usage line rather than a dead daemon."""
    from llmsh.http.config import HttpConfigError, parse_address  # plain parsing: no starlette

    try:
        parse_address(spec)
    except HttpConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return spec


def _kernel_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmsh kernel", description="Manage the background kernel.")
    sub = p.add_subparsers(dest="action", required=True)
    start = sub.add_parser("start", help="start a kernel (daemonises unless --foreground)")
    start.add_argument("--foreground", action="store_true", help="stay attached to the terminal")
    start.add_argument("--connection-file", metavar="F", help="where to write (or read, for Jupyter) the connection file")
    start.add_argument(
        "--ip", default=None,
        help="bind TCP on this address (non-loopback uses CurveZMQ); default: ipc sockets in the private runtime dir on POSIX",
    )
    start.add_argument("--mem-budget", metavar="SPEC", type=_budget, help="memory budget per device, e.g. cpu=4GiB,cuda:0=20GiB")
    start.add_argument("--telemetry-hz", type=float, default=2.0, help="telemetry publish rate (0 disables)")
    start.add_argument(
        "--max-message", metavar="SIZE", type=_message_size, default=DEFAULT_MAX_MESSAGE,
        help="refuse requests larger than this (default 4MiB)",
    )
    start.add_argument("--ray", metavar="auto|ADDRESS", help="one engine per node of this Ray cluster ('auto': the one "
                       "'ray start --head' runs here), processes placed by free memory and load; needs llmsh[ray]")
    start.add_argument("--http", metavar="[ADDR:]PORT", type=_http_address,
                       help="serve the OpenAI (/v1) and Ollama (/api) HTTP APIs (default address 127.0.0.1; port 11435 "
                       "is the documented choice; off loopback --http-key is required)")
    start.add_argument("--http-key", metavar="KEY",
                       help="require 'Authorization: Bearer KEY' on HTTP requests (or set LLMSH_HTTP_KEY)")
    start.add_argument("--http-min-nice", type=int, metavar="N",
                       help="lowest X-Llmsh-Nice an HTTP request may ask for (default 0: no higher priority than the shell)")
    start.add_argument("--restore", action="store_true",
                       help="bring back the processes of the last clean 'kernel stop' (after a crash they always come back)")
    for name, text in (("stop", "stop the kernel"), ("status", "show pid, uptime, ports and message counters")):
        s = sub.add_parser(name, help=text)
        s.add_argument("--kernel", metavar="FILE", help="connection file (default: the newest running kernel)")
        if name == "status":
            s.add_argument("--json", action="store_true", help="print the kernel's report as JSON")
    sub.add_parser("list", help="list running kernels")
    inst = sub.add_parser("install", help="write a Jupyter kernelspec named 'llmsh'")
    inst.add_argument("--user", action="store_true", default=True, help="install for this user (default)")
    inst.add_argument("--prefix", help="install under this prefix (e.g. a virtualenv)")
    return p


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmsh top", description="Live dashboard of the kernel: load, processes, traffic.")
    p.add_argument("--kernel", metavar="FILE", help="connection file of the kernel to watch")
    return p


def _checksum_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmsh checksum", description="Write a sha256 manifest that later loads verify.")
    p.add_argument("path", help="a model folder in Hugging Face format")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen part; returns the process exit code."""
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except OSError as e:
        from llmsh.paths import UnsafeDirError  # platformdirs only on this path: `llmsh -c` stays fast

        if not isinstance(e, UnsafeDirError):
            raise
        sys.stderr.write(f"llmsh: {e}\n")
        return 1


def _main(argv: list[str]) -> int:
    if argv and argv[0] == "kernel":
        args = _kernel_parser().parse_args(argv[1:])
        from llmsh.kernel.lifecycle import main as kernel_main

        shell_language: Any = None
        if args.action == "start" and args.foreground:  # the kernel runs here: give it the shell language
            from llmsh.commands import executor as shell_language
        return kernel_main(args, shell_language)
    if argv and argv[0] == "top":
        args = _top_parser().parse_args(argv[1:])
        from llmsh.tui.app import main as top_main

        return top_main(args)
    if argv and argv[0] == "checksum":
        args = _checksum_parser().parse_args(argv[1:])
        from llmsh.runtime.integrity import main as checksum_main

        return checksum_main(args)
    args = _shell_parser().parse_args(argv)
    from llmsh.client.main import main as client_main

    return client_main(args)


if __name__ == "__main__":
    sys.exit(main())
