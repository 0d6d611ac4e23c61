"""The command registry: each shell command is one entry of data (name, help, argument spec, completion, handler).

`help`, `help CMD`, tab completion and usage errors are all generated from these entries, so a command family
(core, processes, memory, nodes…) only has to declare its commands with `@command(...)` in its own module.

A handler is `async def handler(ctx: Context, args: argparse.Namespace) -> int | None`. It writes text with
`ctx.write`, reports structured data with `ctx.result`, and fails with `raise CommandError("what is wrong; what to do")`.
It runs as an asyncio task in the kernel; an interrupt (Ctrl-C in the shell) cancels it, so long waits must be
`await`-ed, never blocking.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # the kernel object is only a type here; commands reach services through it
    from typing import Any as Kernel


class CommandError(Exception):
    """A one-line error for the user; the executor prints it as `llmsh: CMD: message` and the command fails."""

    def __init__(self, message: str, *, status: int = 1, ename: str = "CommandError") -> None:
        super().__init__(message)
        self.status = status
        self.ename = ename


class UsageError(CommandError):
    """Bad arguments: the message carries the usage line."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=2, ename="UsageError")


class HelpRequested(Exception):
    """`CMD -h` / `CMD --help`: the executor prints the command's help and succeeds."""


class Context(Protocol):
    """What a running command can see and do. Implemented by the executor (llmsh/commands/executor.py)."""

    kernel: Kernel  # the kernel's state and services (process table, scheduler, history, counters…)
    client: str  # session id of the client that sent the request (jobs are per client session)
    stdin: AsyncIterator[str] | None  # text streamed from the left side of `|`, else None

    def write(self, text: str) -> None:
        """Stream text to the client's stdout (or into the next stage of a pipe). Does not add a newline."""

    def warn(self, text: str) -> None:
        """Stream text to the client's stderr."""

    def result(self, data: Any, text: str) -> None:
        """Send a structured result: `text` as text/plain, `data` as application/json (`--json` shows the JSON)."""


Handler = Callable[[Context, argparse.Namespace], Awaitable["int | None"]]
Completer = Callable[[Context, Sequence[str], str], list[str]]


@dataclass(frozen=True)
class Arg:
    """One argparse argument, kept as data: `Arg("-n", "--lines", type=int, help="…")`."""

    flags: tuple[str, ...]
    options: dict[str, Any]


def arg(*flags: str, **options: Any) -> Arg:
    """Declare an argument with `argparse.add_argument`'s signature."""
    return Arg(flags, options)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises instead of exiting: the kernel must never call sys.exit for a user's typo."""

    def error(self, message: str) -> None:  # type: ignore[override]
        usage = " ".join(self.format_usage().split())  # argparse wraps long usages; the shell shows one line
        raise UsageError(f"{message}\n{usage}")

    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        if status:
            raise UsageError((message or "").strip() or " ".join(self.format_usage().split()))
        raise HelpRequested()

    def print_help(self, file: Any = None) -> None:  # -h is handled by the executor
        raise HelpRequested()


@dataclass(frozen=True)
class Command:
    """One registry entry."""

    name: str
    summary: str  # one line, shown by `help`
    handler: Handler
    args: tuple[Arg, ...] = ()
    description: str = ""  # longer text for `help CMD`
    structured: bool = False  # accepts --json
    completer: Completer | None = None  # completes the word being typed; default completes flags
    aliases: tuple[str, ...] = ()
    group: str = "core"  # heading in `help`
    _parser: ArgumentParser | None = field(default=None, init=False, repr=False, compare=False)

    def parser(self) -> ArgumentParser:
        """The argparse parser built from the spec, once: building one costs more than a whole `echo` (argparse
        looks up gettext catalogues on disk for every string), and parse_args leaves the parser unchanged, so the
        tasks of the kernel's single event-loop thread can share it."""
        if self._parser is None:
            p = ArgumentParser(prog=self.name, description=self.description or self.summary, add_help=True)
            for a in self.args:
                p.add_argument(*a.flags, **a.options)
            if self.structured:
                p.add_argument("--json", action="store_true", help="print the result as JSON")
            object.__setattr__(self, "_parser", p)  # frozen dataclass: a cache, not state
            return p
        return self._parser

    def parse(self, argv: Sequence[str]) -> argparse.Namespace:
        """Parse argv with the spec; raises UsageError or HelpRequested."""
        return self.parser().parse_args(list(argv))

    def usage(self) -> str:
        return self.parser().format_usage().strip()

    def help_text(self) -> str:
        return self.parser().format_help().rstrip()

    def flags(self) -> list[str]:
        out = [f for a in self.args for f in a.flags if f.startswith("-")]
        if self.structured:
            out.append("--json")
        return out + ["--help"]


@dataclass
class Registry:
    """Name → Command. One global instance, `REGISTRY`, filled at import of the command modules."""

    commands: dict[str, Command] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def add(self, cmd: Command) -> Command:
        if cmd.name in self.commands or cmd.name in self.aliases:
            raise ValueError(f"command {cmd.name!r} registered twice")
        self.commands[cmd.name] = cmd
        for a in cmd.aliases:
            self.aliases[a] = cmd.name
        return cmd

    def require(self, name: str) -> Command:
        """The command `name`, which must be registered (KeyError otherwise: a bug, not user input)."""
        cmd = self.get(name)
        if cmd is None:
            raise KeyError(name)
        return cmd

    def get(self, name: str) -> Command | None:
        return self.commands.get(self.aliases.get(name, name))

    def names(self) -> list[str]:
        return sorted([*self.commands, *self.aliases])

    def nearest(self, name: str, n: int = 3) -> list[str]:
        """Closest known names, for `command not found` messages."""
        return difflib.get_close_matches(name, self.names(), n=n, cutoff=0.5)

    def not_found(self, name: str) -> CommandError:
        near = self.nearest(name)
        hint = f" (did you mean: {', '.join(near)}?)" if near else "; type 'help' for the list"
        return CommandError(f"{name}: command not found{hint}", status=127, ename="CommandNotFound")


REGISTRY = Registry()


def command(
    name: str,
    summary: str,
    *args: Arg,
    description: str = "",
    structured: bool = False,
    completer: Completer | None = None,
    aliases: tuple[str, ...] = (),
    group: str = "core",
    registry: Registry | None = None,
) -> Callable[[Handler], Handler]:
    """Decorator: register `handler` as the command `name` with the argument spec `args`."""

    def deco(handler: Handler) -> Handler:
        (registry or REGISTRY).add(
            Command(
                name=name,
                summary=summary,
                handler=handler,
                args=tuple(args),
                description=description,
                structured=structured,
                completer=completer,
                aliases=aliases,
                group=group,
            )
        )
        return handler

    return deco
