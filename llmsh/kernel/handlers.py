"""What each Jupyter request means to llmsh: one function per request type, given the kernel and the verified message.

`llmsh.kernel.server` owns the sockets and decides which function answers a message; the functions here only use
the kernel's public methods (send, publish_now, publish_status, running, executor). `execute` and `complete` run as
their own asyncio tasks and send their own replies; the others are quick and return the reply's content.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from llmsh import __version__
from llmsh.protocol.limits import bad_complete_request

if TYPE_CHECKING:
    from llmsh.kernel.server import Kernel

log = logging.getLogger("llmsh.kernel")

PROTOCOL_VERSION = "5.3"
LANGUAGE_INFO = {
    "name": "llmsh",
    "version": __version__,
    "mimetype": "text/x-llmsh",
    "file_extension": ".llmsh",
    "pygments_lexer": "bash",
    "codemirror_mode": "shell",
}
BANNER = f"llmsh {__version__}: an operating-system shell for language models. Type 'help' for the commands."


def one_line(text: object) -> str:
    """`text` as one line of at most 500 characters, for an error reply's evalue."""
    return " ".join(str(text).split())[:500]


def _jsonable(data: Any) -> Any:
    try:
        json.dumps(data)
        return data
    except (TypeError, ValueError):
        return json.loads(json.dumps(data, default=str))


class Output:
    """Contract B's `Output` for one execute_request: stream → iopub `stream`, result → `execute_result`,
    display → `display_data`."""

    __slots__ = ("_kernel", "parent", "_count", "_silent")

    def __init__(self, kernel: Kernel, parent: dict[str, Any], count: int, silent: bool) -> None:
        self._kernel, self._count, self._silent = kernel, count, silent
        self.parent = parent  # the request answered: the executor reads its metadata (the client's cwd)

    def stream(self, name: str, text: str) -> None:
        """Send `text` as an iopub `stream` message named stdout or stderr."""
        if text and not self._silent:
            self._kernel.publish("stream", {"name": "stderr" if name == "stderr" else "stdout", "text": text}, self.parent)

    def result(self, data: Any, text: str) -> None:
        """Send an `execute_result` with text/plain and application/json."""
        if self._silent:
            return
        bundle = {"text/plain": text, "application/json": _jsonable(data)}
        content = {"data": bundle, "metadata": {}, "execution_count": self._count}
        self._kernel.publish("execute_result", content, self.parent)

    def display(self, bundle: dict[str, Any]) -> None:
        """Send a `display_data` (e.g. load progress, which the shell draws as a bar and Jupyter shows as text)."""
        if not self._silent:
            self._kernel.publish("display_data", {"data": bundle, "metadata": {}, "transient": {}}, self.parent)


# ----------------------------------------------------------------- execute and complete (tasks of their own)
async def execute(kernel: Kernel, channel: str, idents: list[bytes], msg: dict[str, Any], fd: int) -> None:
    """Run one execute_request to completion: busy, execute_input, output, reply, idle."""
    content, header = msg["content"], msg["header"]
    code = content.get("code", "")
    code = code if isinstance(code, str) else ""
    silent = bool(content.get("silent", False))
    store_history = bool(content.get("store_history", not silent))
    session = header.get("session", "")
    kernel.publish_status("busy", msg)
    count = kernel.record_execution(code, store_history)
    if not silent:
        kernel.publish_now("execute_input", {"code": code, "execution_count": count}, msg)
    status, exit_code, ename, evalue = "ok", 0, "", ""
    if kernel.notice and not silent:  # e.g. "kernel restarted after a crash …", told once, to the first client
        kernel.publish_now("stream", {"name": "stderr", "text": f"llmsh: {kernel.take_notice()}\n"}, msg)
    executor = kernel.executor
    if executor is None:
        status, exit_code, ename, evalue = "error", 1, "KernelError", "llmsh: the command executor failed to load; see the kernel log"
    else:
        kwargs: dict[str, Any] = {"client": session, "out": Output(kernel, msg, count, silent)}
        cwd = content.get("llmsh_cwd") or msg["metadata"].get("cwd")
        if isinstance(cwd, str) and cwd:
            kwargs["cwd"] = cwd
        inner = asyncio.ensure_future(executor.execute(kernel, code, **kwargs))
        fg = kernel.running.start(inner, session, fd, header["msg_id"])
        try:
            result = await inner
            status = getattr(result, "status", "ok")
            exit_code = int(getattr(result, "exit_code", 0 if status == "ok" else 1))
            ename, evalue = getattr(result, "ename", ""), getattr(result, "evalue", "")
        except asyncio.CancelledError:
            if fg.cause is None:  # the kernel itself is shutting down
                raise
        except Exception as e:
            log.exception("command crashed: %r", code)
            status, exit_code, ename, evalue = "error", 1, type(e).__name__, f"llmsh: internal error: {one_line(e)}"
        finally:
            kernel.running.finish(fg)
        if fg.cause is not None:
            status, exit_code, ename, evalue = "error", 130, "KeyboardInterrupt", "interrupted"
    reply: dict[str, Any] = {"status": status, "execution_count": count, "llmsh_exit_code": exit_code}
    if status == "ok":
        reply.update(user_expressions={}, payload=[])
    else:
        reply.update(ename=ename or "Error", evalue=evalue, traceback=[evalue] if evalue else [])
        if not silent:
            kernel.publish_now("error", {"ename": reply["ename"], "evalue": evalue, "traceback": reply["traceback"]}, msg)
    kernel.send(channel, "execute_reply", reply, msg, idents)
    kernel.publish_status("idle", msg)


async def complete(kernel: Kernel, channel: str, idents: list[bytes], msg: dict[str, Any]) -> None:
    """complete_request off the loop: completers list folders (paths, model dirs), which may be slow or hang."""
    kernel.publish_status("busy", msg)
    try:
        content = await asyncio.to_thread(_complete, kernel, msg)
    except Exception as e:
        log.exception("complete_request failed")
        content = {"status": "error", "ename": type(e).__name__, "evalue": one_line(e), "traceback": []}
    kernel.send(channel, "complete_reply", content, msg, idents)
    kernel.publish_status("idle", msg)


def _complete(kernel: Kernel, msg: dict[str, Any]) -> dict[str, Any]:
    problem = bad_complete_request(msg["content"])
    if problem is not None:  # an error reply, never silence: the client is waiting for one
        return {"status": "error", "ename": "BadRequest", "evalue": problem, "traceback": [problem]}
    code = msg["content"]["code"]
    pos = msg["content"].get("cursor_pos", len(code))
    matches: list[str]
    executor = kernel.executor
    if executor is None:
        matches, start, end = [], pos, pos
    else:
        kwargs: dict[str, Any] = {"client": msg["header"].get("session", "")}
        cwd = msg["content"].get("llmsh_cwd") or msg["metadata"].get("cwd")
        if isinstance(cwd, str) and cwd:
            kwargs["cwd"] = cwd
        try:
            matches, start, end = executor.complete(kernel, code, pos, **kwargs)
        except TypeError:  # an executor without the client=/cwd= keywords
            matches, start, end = executor.complete(kernel, code, pos)
    return {"status": "ok", "matches": list(matches), "cursor_start": start, "cursor_end": end, "metadata": {}}


# ----------------------------------------------------------------- quick requests (answered on the loop)
def kernel_info(kernel: Kernel, msg: dict[str, Any]) -> dict[str, Any]:
    """kernel_info_request: the protocol, language and banner, plus llmsh's own status."""
    return {
        "status": "ok",
        "protocol_version": PROTOCOL_VERSION,
        "implementation": "llmsh",
        "implementation_version": __version__,
        "language_info": LANGUAGE_INFO,
        "banner": BANNER,
        "help_links": [],
        "debugger": False,
        "llmsh": kernel.info(),
    }


def is_complete(kernel: Kernel, msg: dict[str, Any]) -> dict[str, Any]:
    """is_complete_request: whether the shell should send the line or ask for more."""
    if kernel.executor is None:
        return {"status": "unknown"}
    status, indent = kernel.executor.is_complete(str(msg["content"].get("code", "")))
    return {"status": status, "indent": indent} if status == "incomplete" else {"status": status}


def interrupt(kernel: Kernel, msg: dict[str, Any]) -> dict[str, Any]:
    """interrupt_request: stop the asking session's commands (or all of them, see `Running.interrupt`)."""
    kernel.running.interrupt(msg["content"].get("llmsh_session") or msg["header"].get("session", ""))
    return {"status": "ok"}


def shutdown(kernel: Kernel, msg: dict[str, Any]) -> dict[str, Any]:
    """shutdown_request: the reply only; the server stops the kernel once it is sent."""
    return {"status": "ok", "restart": bool(msg["content"].get("restart", False))}


def history(kernel: Kernel, msg: dict[str, Any]) -> dict[str, Any]:
    """history_request: tail, range or search over this kernel's command history."""
    c = msg["content"]
    entries = [(1, i + 1, code) for i, code in enumerate(kernel.history)]
    kind = c.get("hist_access_type", "tail")
    if kind == "tail":
        n = int(c.get("n") or 10)
        entries = entries[-n:] if n > 0 else []
    elif kind == "range":
        start = int(c.get("start") or 0)
        stop = c.get("stop")
        entries = [e for e in entries if e[1] >= start and (stop is None or e[1] < int(stop))]
    elif kind == "search":
        pattern = str(c.get("pattern") or "*")
        entries = [e for e in entries if fnmatch.fnmatchcase(e[2], pattern)]
        if c.get("unique"):
            seen: set[str] = set()
            entries = [e for e in reversed(entries) if not (e[2] in seen or seen.add(e[2]))][::-1]  # type: ignore[func-returns-value]
        n = c.get("n")
        if n:
            entries = entries[-int(n) :]
    if c.get("output"):
        return {"status": "ok", "history": [(s, n, (code, None)) for s, n, code in entries]}
    return {"status": "ok", "history": entries}


def inspect(kernel: Kernel, msg: dict[str, Any]) -> dict[str, Any]:
    """inspect_request: the help text of the command word under the cursor."""
    code = str(msg["content"].get("code", ""))
    pos = msg["content"].get("cursor_pos")
    pos = len(code) if not isinstance(pos, int) else max(0, min(pos, len(code)))
    start = pos
    while start > 0 and not code[start - 1].isspace() and code[start - 1] not in ";|&":
        start -= 1
    end = pos
    while end < len(code) and not code[end].isspace() and code[end] not in ";|&":
        end += 1
    word = code[start:end]
    text = kernel.executor.help_text(word) if kernel.executor is not None else None
    if text is None:
        return {"status": "ok", "found": False, "data": {}, "metadata": {}}
    return {"status": "ok", "found": True, "data": {"text/plain": text}, "metadata": {}}


def comm_info(kernel: Kernel, msg: dict[str, Any]) -> dict[str, Any]:
    """comm_info_request: llmsh has no comms."""
    return {"status": "ok", "comms": {}}


QUICK: dict[str, Callable[[Kernel, dict[str, Any]], dict[str, Any]]] = {
    "kernel_info_request": kernel_info,
    "is_complete_request": is_complete,
    "interrupt_request": interrupt,
    "shutdown_request": shutdown,
    "history_request": history,
    "inspect_request": inspect,
    "comm_info_request": comm_info,
}
