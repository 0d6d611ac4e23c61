"""Interactive chat in the shell: `chat PID|NAME [options]` with no message opens a sub-prompt (`NAME> `).

The kernel never reads from its clients (no stdin channel), so a conversation is a series of one-turn commands:
each line typed at the sub-prompt is sent as `chat [options] PID -- 'line'` (quoted for llmsh's parser) and the
reply streams back like any command's output. The kernel keeps the conversation per client session, so the turns
of one shell form one conversation. Ctrl-C during a reply interrupts that turn only (the kernel keeps the partial
reply); Ctrl-C at an empty sub-prompt, Ctrl-D or `/exit` leave the chat; `/reset` forgets it, `/show` prints it.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from llmsh.commands.parser import simple_argv

# `chat` options that take a value (llmsh/commands/generation.py: --system and SAMPLING_ARGS); the rest are flags
VALUE_OPTIONS = {"--system", "--max-tokens", "--temperature", "--top-p", "--top-k", "--seed", "--stop", "--repetition-penalty"}
# options that only make sense once (when the chat opens), not on every turn
ONCE_OPTIONS = {"--system", "--reset", "--show"}
HELP = "chat with {}: Enter sends a line; Ctrl-C stops a reply; /reset, /show, /help; Ctrl-D or /exit leaves"
COMMANDS = ("/reset", "/show", "/help", "/exit", "/quit")
_SLASH_COMMAND = re.compile(r"^/[A-Za-z?][^/\s]*(\s|$)")  # `/word …` is a chat command; `/usr/bin/…` has a second /


def quote(word: str) -> str:
    """`word` as one single-quoted llmsh word (a `'` inside becomes `'\\''`, as in sh)."""
    return "'" + word.replace("'", "'\\''") + "'"


@dataclass
class ChatSpec:
    """A `chat` line with no message: the target, the per-turn options and the opening options (--system/--reset)."""

    target: str
    turn_options: list[str]
    open_options: list[str]

    def turn(self, message: str) -> str:
        """The command line of one turn."""
        return " ".join(["chat", *map(quote, self.turn_options), quote(self.target), "--", quote(message)])

    def opening(self) -> str:
        """The command line run when the chat opens: checks the process and prints the conversation so far."""
        return " ".join(["chat", *map(quote, self.open_options or ["--show"]), quote(self.target)])

    def reset(self) -> str:
        """The command line that forgets this shell's conversation with the process."""
        return f"chat --reset {quote(self.target)}"

    def show(self) -> str:
        """The command line that prints the conversation."""
        return f"chat --show {quote(self.target)}"


def chat_request(text: str) -> ChatSpec | None:
    """A ChatSpec when `text` is exactly `chat [options] PID|NAME` with no message (no pipe, `&` or redirect); else None."""
    line = simple_argv(text)
    if not line or line[0] != "chat":
        return None
    words: list[str] = []
    turn: list[str] = []
    once: list[str] = []
    argv = line[1:]
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            words += argv[i + 1 :]
            break
        if word in ("-h", "--help", "--json"):
            return None  # help, or output meant for a program: let the kernel run the line as typed
        if word.startswith("--"):
            name = word.split("=", 1)[0]
            group = [word]
            if name in VALUE_OPTIONS and "=" not in word and i + 1 < len(argv):
                group.append(argv[i + 1])
                i += 1
            if name == "--show":
                pass  # the opening shows the conversation anyway
            elif name in ONCE_OPTIONS:
                once += group
            else:
                turn += group
        else:
            words.append(word)
        i += 1
    if len(words) != 1:
        return None  # a message (one turn, run by the kernel) or no target (the kernel says which is missing)
    return ChatSpec(words[0], turn, once)


async def chat_loop(spec: ChatSpec, prompt: Callable[[str], Awaitable[str]], run: Callable[[str], Awaitable[int]],
                    say: Callable[[str], Any]) -> int:
    """The sub-prompt: `prompt(text)` reads a line (KeyboardInterrupt/EOFError as prompt-toolkit raises them),
    `run(code)` executes a command line in the foreground and returns its exit code. Returns the last turn's code."""
    status = await run(spec.opening())
    if status != 0:
        return status  # unknown process, no chat template…: the kernel's one line was shown
    say(HELP.format(spec.target))
    while True:
        try:
            line = await prompt(f"{spec.target}> ")
        except (KeyboardInterrupt, EOFError):
            line = "/exit"
        message = line.strip()
        if not message:
            continue
        if message in ("/exit", "/quit"):
            say("(chat ended)")
            return status
        if message == "/reset":
            status = await run(spec.reset())
            if status == 0:
                say(f"(conversation with {spec.target} forgotten; the next line starts a new one)")
            continue
        if message == "/show":
            status = await run(spec.show())
            continue
        if message in ("/help", "/?"):
            say(HELP.format(spec.target) + "; /reset forgets the conversation, /show prints it; "
                "start a line with // to send one that begins with /")
            continue
        if _SLASH_COMMAND.match(message):
            say(f"llmsh: chat: unknown command {message.split()[0]}; known: {', '.join(COMMANDS)} "
                "(start the line with // to send it to the model)")
            status = 2
            continue
        if message.startswith("//"):
            line = line.replace("//", "/", 1)
        status = await run(spec.turn(line))
