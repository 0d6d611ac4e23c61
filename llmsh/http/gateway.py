"""What both APIs share: API errors, the model named in a request → a ready process (loaded on demand), the
per-request nice (a sibling process at that nice), and one generate call that counts HTTP traffic."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmsh.kernel.errors import KernelError
from llmsh.kernel.table import Entry
from llmsh.models import find_models
from llmsh.protocol.names import usable_name
from llmsh.protocol.procs import ProcState

NICE_HEADER = "x-llmsh-nice"
DISCONNECT_POLL_S = 0.25  # how often a non-streamed request looks for its client having gone
_STATUS = {  # llmsh error name → HTTP status
    "NoSuchProcess": 404, "ModelNotFound": 404, "UsageError": 400, "BadRequest": 400, "Busy": 429,
    "EngineDied": 503, "StateError": 409, "Killed": 503, "LoadError": 500, "RequestFailed": 500,
}
_CLIENT_FAULTS = ("exceeds the context", "empty after tokenization", "no tokenizer", "chat template", "roles must")


@dataclass
class ApiError(Exception):
    """An error answered to the client: HTTP status, one line, and OpenAI's `type`/`code`/`param`."""

    status: int
    message: str
    code: str | None = None
    param: str | None = None

    @property
    def type(self) -> str:
        return {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}.get(self.status, "server_error")

    @classmethod
    def from_kernel(cls, e: KernelError) -> ApiError:
        """The HTTP status of a front or engine error (a prompt too long for the context is the client's fault)."""
        ename = getattr(e, "ename", "") or type(e).__name__
        text = str(e)
        status = _STATUS.get(ename, 500)
        if ename == "RequestFailed" and any(s in text for s in _CLIENT_FAULTS):
            status = 400
        code = {404: "model_not_found", 429: "busy", 503: "unavailable"}.get(status)
        return cls(status, text, code)


def bad(param: str, message: str) -> ApiError:
    """A 400 naming the parameter."""
    return ApiError(400, message, "invalid_parameter", param)


def request_nice(headers: Any, min_nice: int) -> int | None:
    """X-Llmsh-Nice as an int in [min_nice, 19], None when absent."""
    raw = headers.get(NICE_HEADER)
    if raw is None:
        return None
    try:
        nice = int(raw)
    except ValueError:
        raise bad("X-Llmsh-Nice", f"X-Llmsh-Nice {raw!r} is not a nice value; give an integer from {min_nice} to 19") from None
    if not min_nice <= nice <= 19:
        raise bad("X-Llmsh-Nice", f"X-Llmsh-Nice {nice} is out of range for this server; use {min_nice} (highest "
                  "allowed) .. 19 (lowest)")
    return nice


def has_chat_template(path: str) -> bool:
    """Whether the model folder carries a chat template (where llmsh.runtime.tokenizer looks; read here without
    importing the runtime, which the front must not)."""
    folder = Path(path)
    if (folder / "chat_template.jinja").exists() or (folder / "chat_template.json").exists():
        return True
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False


class Gateway:
    """Model names → processes for HTTP requests, and the generate call they all go through."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.aliases: dict[tuple[str, int | None], int] = {}  # (model as asked, nice) → pid loaded for it
        self._locks: dict[tuple[str, int | None], asyncio.Lock] = {}
        self._templates: dict[str, bool] = {}

    @property
    def procs(self) -> Any:
        return self.kernel.services.procs

    @property
    def table(self) -> Any:
        return self.kernel.services.table

    def _known(self, key: tuple[str, int | None]) -> Entry | None:
        pid = self.aliases.get(key)
        entry = self.table.get(pid) if pid is not None else None
        if entry is None or self.table.gone(entry):
            self.aliases.pop(key, None)
            return None
        return entry

    def _loaded(self, model: str) -> Entry | None:
        try:
            entry = self.table.resolve(model)  # a name or PID in `ps`
        except LookupError:
            return self._known((model, None))
        return None if entry.state is ProcState.FAILED else entry

    async def entry(self, model: Any, *, nice: int | None = None, ctx: int | None = None) -> Entry:
        """The process serving `model` at `nice` (None: the process's own), loaded on demand when the name is one
        `models` lists; ApiError 404 otherwise."""
        if not isinstance(model, str) or not model.strip():
            raise bad("model", "model: give the name of a process in 'ps' or of a model in 'models'")
        base = self._loaded(model)
        if base is not None and (nice is None or base.nice == nice):
            return base
        key = (model, nice)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:  # concurrent first requests load it once
            found = self._known(key)
            if found is not None:
                return found
            path = base.path if base is not None else await self._find(model)
            options = dict(base.options) if base is not None else {}
            name = self.table.unique_name(usable_name(model.split("/")[-1] + (f"-nice{nice}" if nice is not None else "")))
            try:
                entry = await self.procs.load(
                    path, name=name, device=options.get("device") or "cpu", dtype=options.get("dtype"),
                    nice=nice if nice is not None else 0, max_batch=options.get("max_batch"),
                    ctx=ctx if ctx is not None else options.get("ctx"))
            except KernelError as e:
                raise ApiError.from_kernel(e) from None
            self.aliases[key] = entry.pid
            return entry

    async def templated(self, entry: Entry) -> bool:
        """Whether `entry`'s model has a chat template (read once per folder, off the loop)."""
        if entry.path not in self._templates:
            self._templates[entry.path] = await asyncio.to_thread(has_chat_template, entry.path)
        return self._templates[entry.path]

    async def _find(self, model: str) -> str:
        """A model by name from `models` (model dirs, HF cache) — never a path: HTTP clients do not pick files."""
        models = await asyncio.to_thread(find_models)
        for m in models:
            if m["name"] == model or m["name"].split("/")[-1] == model:
                return str(m["path"])
        raise ApiError(404, f"model '{model}' is not loaded and not found among the models llmsh can load "
                       "(model dirs, HF cache); see 'models' and 'ps' in llmsh", "model_not_found", "model")

    async def stream(self, entry: Entry, *, params: dict[str, Any], client: str, result: dict[str, Any],
                     prompt: str | None = None, messages: list[dict[str, str]] | None = None) -> AsyncIterator[str]:
        """Text pieces of one request (closing the iterator cancels it in the engine); KernelError → ApiError."""
        gen = self.procs.generate(entry, prompt=prompt, messages=messages, params=params, client=client, result=result)
        async with contextlib.aclosing(gen) as pieces:
            try:
                async for piece in pieces:
                    yield piece
            except KernelError as e:
                raise ApiError.from_kernel(e) from None

    async def first(self, request: Any, pieces: AsyncIterator[str]) -> str | None:
        """Start a stream: the first piece (None if it produced nothing), so errors become a status, not a broken stream."""
        async def one() -> str | None:
            try:
                return await pieces.__anext__()
            except StopAsyncIteration:
                return None

        return await self.watched(request, one())

    async def collect(self, request: Any, first: str | None, pieces: AsyncIterator[str]) -> str:
        """The whole text of a non-streamed request."""
        async def join() -> str:
            return (first or "") + "".join([p async for p in pieces])

        return await self.watched(request, join())

    async def watched(self, request: Any, coro: Any) -> Any:
        """Await `coro` while the client stays: one that hangs up meanwhile cancels it (checked every
        DISCONNECT_POLL_S), as a disconnect cancels a running stream."""
        task = asyncio.get_running_loop().create_task(coro)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    self.disconnected()
                    raise ApiError(499, "the client closed the connection", "client_closed")
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def disconnected(self) -> None:
        """Count one request cancelled because its HTTP client went away (`kernel status`: cancelled)."""
        counters = getattr(self.kernel, "counters", None)
        if counters is not None:
            counters.cancel("http-disconnect")

    def count(self, direction: str, what: str, nbytes: int, client: str) -> None:
        """HTTP traffic in the kernel's message counters (`top`'s traffic panel, `kernel status`)."""
        counters = getattr(self.kernel, "counters", None)
        if counters is not None:
            counters.record(direction, "http", what, nbytes, client)
