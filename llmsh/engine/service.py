"""One engine: the models of a node, their scheduler, pager and loader, driven by the front's messages.

The engine is a separate OS process (`python -m llmsh.engine`), so whatever kills it (SIGBUS on a checkpoint that
changed under its mmap, a segfault in a C kernel, the OOM killer) costs its requests, never the front: the front
notices the exit, tells the clients why, starts a new engine and restores the processes from its journal.

Here, PIDs, names and nice values are the front's: the engine keeps the run-time side of each process (model, batch,
scheduling state) and reports what changes (`progress`, `state`, `removed`). Each request is its own asyncio task;
tokens go from the scheduler's device thread straight onto the socket (one `token` message each).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from llmsh.engine.loader import Loader
from llmsh.engine.pager import PagerError, PagerService
from llmsh.engine.paging.core import Pager
from llmsh.engine.process import ExitHow, Process, ProcessTable, ProcState, StateError
from llmsh.engine.runqueue import COALESCE_S
from llmsh.engine.scheduler import BusyError, Request, Scheduler
from llmsh.procinfo import thread_rows

log = logging.getLogger("llmsh.engine")

Send = Callable[..., None]  # send(msg_type, **fields), thread-safe


class EngineError(Exception):
    """A request the engine refuses or cannot finish: `ename` and one human line (and a `kind` for generate)."""

    def __init__(self, ename: str, line: str, kind: str = "") -> None:
        super().__init__(line)
        self.ename, self.kind = ename, kind


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def tokenizer_of(proc: Any) -> Any:
    tok = proc.runtime.model.tokenizer  # type: ignore[union-attr]
    if tok is None:
        raise EngineError("RequestFailed", f"process {proc.pid} ({proc.name}) has no tokenizer.json in {proc.path}, "
                          "so it cannot take text prompts; add the model's tokenizer.json to that folder and load it again")
    return tok

def encode_prompt(proc: Any, prompt: str, params: Any, special: bool = True) -> list[int]:
    """Prompt → ids, checked against the context (the KV cache length per request)."""
    ids = list(tokenizer_of(proc).encode(prompt, add_special_tokens=special))
    limit = proc.runtime.max_seq_len  # type: ignore[union-attr]
    if not ids:
        raise EngineError("UsageError", "the prompt is empty after tokenization; give some text")
    if len(ids) + int(params.max_tokens) > limit:
        raise EngineError("RequestFailed",
                          f"prompt of {len(ids)} tokens + --max-tokens {params.max_tokens} exceeds the context of "
                          f"{limit} tokens; shorten the prompt or lower --max-tokens")
    return ids

def chat_prompt_ids(proc: Any, messages: list[dict[str, str]], params: Any) -> list[int]:
    """The conversation through the chat template; the oldest exchanges (not the system message) are left out
    until it fits the context with room for max_tokens."""
    tok = tokenizer_of(proc)
    system = [m for m in messages[:1] if m.get("role") == "system"]
    turns, last = messages[len(system):-1], messages[-1:]
    limit = proc.runtime.max_seq_len  # type: ignore[union-attr]
    while True:
        try:
            prompt = tok.apply_chat_template([*system, *turns, *last], add_generation_prompt=True)
        except Exception as e:  # no template, or one that rejects the conversation (roles must alternate…)
            raise EngineError("RequestFailed", f"{proc.name}: {_first_line(e)}") from None
        ids = list(tok.encode(prompt, add_special_tokens=False))  # the template already has BOS
        if len(ids) + int(params.max_tokens) <= limit or not turns:
            return encode_prompt(proc, prompt, params, special=False)
        turns = turns[2:]  # forget the oldest user/assistant exchange



WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")


def checkpoint_size(path: str) -> tuple[bool, int, str]:
    """(readable here, bytes of its weight files, why not) for a checkpoint folder or file on this node."""
    if path.startswith("ollama:"):  # resolved by the loader in this node's Ollama store
        return True, 0, ""
    p = os.path.expanduser(path)
    if not os.path.exists(p):
        return False, 0, f"no such file or folder {path}"
    if not os.access(p, os.R_OK):
        return False, 0, f"{path} is not readable"
    if os.path.isfile(p):
        return True, os.path.getsize(p), ""
    try:
        names = os.listdir(p)
    except OSError as e:
        return False, 0, f"{path}: {e.strerror or e}"
    return True, sum(os.path.getsize(os.path.join(p, n)) for n in names if n.endswith(WEIGHT_SUFFIXES)), ""


def _settle(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


class EngineService:
    """The engine's state (one owner: this object) and a handler per request type."""

    def __init__(self, budgets: dict[str, int], send: Send, *, node: str | None = None, max_procs: int = 64) -> None:
        self.node = node or socket.gethostname()
        self.send = send
        self.table = ProcessTable(max_procs=max_procs)
        self.sched = Scheduler(self.table, coalesce_s=COALESCE_S)
        self.loader = Loader(self.table, self.sched)
        self.pager = Pager(budgets)
        self.pager_service = PagerService(self.pager, self.table, self.sched)
        self.pager_service.connect()
        self.table.listeners.append(self._on_change)
        self.streams: dict[str, Request] = {}  # generate id → its scheduler request
        self._housekeeping: asyncio.Task | None = None

    # ---- events to the front ------------------------------------------------------------------------------------
    def _on_change(self, proc: Process, event: str) -> None:
        """Process table listener (any thread): tell the front what changed."""
        if event == "removed":
            how = proc.exit_how.value if proc.exit_how else ExitHow.KILL.value
            self.send("removed", pid=proc.pid, how=how, reason=proc.reason)
        elif event == "progress":
            self.send("progress", pid=proc.pid, progress=proc.progress, text=proc.progress_text)
        elif event != "added":
            self.send("state", pid=proc.pid, state=proc.state.value, reason=proc.reason, dtype=proc.dtype,
                      device=proc.device)

    # ---- dispatch -----------------------------------------------------------------------------------------------
    async def handle(self, msg: dict[str, Any]) -> Any:
        """Run one request; returns the reply's data or raises EngineError."""
        handler = getattr(self, "on_" + msg["type"], None)
        if handler is None:
            raise EngineError("ProtocolError", f"the engine does not handle {msg['type']!r}")
        return await handler(msg)

    def _proc(self, pid: Any) -> Process:
        proc = self.table.get(int(pid))
        if proc is None:
            raise EngineError("NoSuchProcess", f"no process with PID {pid} on engine {self.node}")
        return proc

    # ---- load ---------------------------------------------------------------------------------------------------
    async def on_load(self, msg: dict[str, Any]) -> dict[str, Any]:
        try:
            proc, fut = self.loader.start(
                msg["path"], name=msg["name"], pid=int(msg["pid"]), device=msg.get("device") or "cpu",
                dtype=msg.get("dtype") or None, nice=int(msg.get("nice", 0)), max_batch=msg.get("max_batch"),
                ctx=msg.get("ctx"), quant=msg.get("quant"),
            )
        except (ValueError, RuntimeError) as e:
            raise EngineError("LoadError", _first_line(e)) from None
        try:
            await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            if proc.runtime is None and not proc.gone.is_set():
                self.sched.kill(proc, reason="load interrupted")
            raise
        if proc.state is ProcState.FAILED:
            raise EngineError("LoadError", proc.reason)
        if proc.gone.is_set():
            raise EngineError("Killed", f"{msg['path']}: process {proc.pid} was killed while loading")
        if msg.get("keep_alive", "unset") != "unset" and proc.pid in self.pager.procs:
            self.pager.set_keep_alive(proc.pid, msg.get("keep_alive"))
        if msg.get("locked"):
            try:
                await asyncio.to_thread(self.pager.mlock, proc.pid)
            except PagerError as e:
                log.warning("pid %s: mlock after restore failed: %s", proc.pid, e)
        return proc.row()

    # ---- generate -----------------------------------------------------------------------------------------------
    def _ready(self, pid: Any) -> Process:
        proc = self._proc(pid)
        if proc.state is ProcState.FAILED:
            raise EngineError("RequestFailed", f"process {proc.pid} ({proc.name}) failed: {proc.reason}")
        if proc.state is ProcState.LOADING or proc.runtime is None:
            raise EngineError("StateError", f"process {proc.pid} ({proc.name}) is not loaded")
        return proc

    @staticmethod
    def _params(proc: Process, overrides: dict[str, Any]) -> Any:
        from llmsh.runtime.sampling import SamplingParams

        model = proc.runtime.model  # type: ignore[union-attr]
        try:
            params = SamplingParams.from_config(getattr(model, "generation_config", {}) or {}, **overrides)
            params.validate()
        except (ValueError, TypeError, OverflowError) as e:
            raise EngineError("UsageError", _first_line(e)) from None
        return params

    async def on_generate(self, msg: dict[str, Any]) -> dict[str, Any]:
        rid = str(msg["id"])
        proc = self._ready(msg["pid"])
        params = self._params(proc, dict(msg.get("params") or {}))
        if msg.get("messages") is not None:
            ids = chat_prompt_ids(proc, list(msg["messages"]), params)
        else:
            ids = encode_prompt(proc, str(msg.get("prompt") or ""), params)
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        send = self.send

        def sink(kind: str, value: Any) -> None:  # on the device thread: tokens go straight out
            if kind == "token":
                send("token", id=rid, text=value)
            else:
                loop.call_soon_threadsafe(_settle, done, (kind, value))

        try:
            req = self.sched.submit(proc, ids, params, sink, str(msg.get("client") or ""))
        except BusyError as e:
            raise EngineError("Busy", str(e)) from None
        except StateError as e:
            raise EngineError("StateError", str(e)) from None
        self.streams[rid] = req
        try:
            kind, value = await done
        finally:
            self.streams.pop(rid, None)
            if not req.final:
                self.sched.cancel(req)
        if kind == "error":
            ekind, line = value
            raise EngineError("Killed" if ekind == "killed" else "RequestFailed", line, kind=ekind)
        return {"finish_reason": value, "prompt_tokens": len(ids), "tokens": req.tokens}

    async def on_cancel(self, msg: dict[str, Any]) -> dict[str, Any]:
        req = self.streams.get(str(msg["id"]))
        if req is not None:
            self.sched.cancel(req)
        return {"cancelled": req is not None}

    # ---- signals ------------------------------------------------------------------------------------------------
    async def on_signal(self, msg: dict[str, Any]) -> dict[str, Any]:
        proc = self._proc(msg["pid"])
        sig = msg["sig"]
        try:
            if proc.state is ProcState.FAILED:
                self.table.remove(proc, ExitHow.REAPED)
            elif sig == "STOP":
                self.sched.stop(proc)
                await asyncio.to_thread(self.sched.wait_step_done, proc)  # not one token after STOP returns
            elif sig == "CONT":
                self.sched.cont(proc)
            elif sig == "TERM":
                self.sched.terminate(proc)
            elif sig == "KILL":
                how = ExitHow(msg.get("how") or ExitHow.KILL.value)
                self.sched.kill(proc, how, msg.get("reason") or "killed")
            else:
                raise EngineError("UsageError", f"unknown signal {sig!r}")
        except StateError as e:
            raise EngineError("StateError", f"{sig}: {e}") from None
        return {"pid": proc.pid, "state": "exited" if proc.gone.is_set() else proc.state.value}

    async def on_renice(self, msg: dict[str, Any]) -> dict[str, Any]:
        proc = self._proc(msg["pid"])
        try:
            old = self.sched.renice(proc, int(msg["nice"]))
        except ValueError as e:
            raise EngineError("UsageError", str(e)) from None
        return {"old": old}

    # ---- reports ------------------------------------------------------------------------------------------------
    async def on_stats(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Live rows of every process (resident bytes, requests, rates) and the scheduler's device stats."""
        self.pager_service.sync_rows()
        rows = {str(p.pid): p.row() for p in self.table}
        for pid, row in rows.items():
            pp = self.pager.procs.get(int(pid))
            if pp is not None:
                row["locked"] = bool(pp.locked)
        return {"rows": rows, "scheduler": self.sched.stats(), "node": self.node, "pid": os.getpid()}

    async def on_mem(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.pager_service.sync_rows()
        return self.pager.snapshot()

    def _paged(self, pid: Any) -> int:
        p = int(pid)
        if p not in self.pager.procs:
            raise EngineError("NoSuchProcess", f"process {pid} has no model under the pager (still loading, or failed); see 'ps'")
        return p

    async def on_mlock(self, msg: dict[str, Any]) -> dict[str, Any]:
        pid = self._paged(msg["pid"])
        try:
            await asyncio.to_thread(self.pager.mlock, pid)
        except PagerError as e:
            raise EngineError("OutOfMemory", str(e)) from None
        self.pager_service.sync_rows()
        return dict(self.pager.proc_row(pid))

    async def on_munlock(self, msg: dict[str, Any]) -> dict[str, Any]:
        pid = self._paged(msg["pid"])
        self.pager.munlock(pid)
        return {"pid": pid, "locked": False}

    async def on_keepalive(self, msg: dict[str, Any]) -> dict[str, Any]:
        pid = self._paged(msg["pid"])
        self.pager.set_keep_alive(pid, msg["seconds"])
        return {"pid": pid, "keep_alive_s": msg["seconds"]}

    async def on_pageout(self, msg: dict[str, Any]) -> dict[str, Any]:
        pid = self._paged(msg["pid"])
        if self.pager.proc(pid).locked:
            raise EngineError("StateError", f"process {pid} is locked in memory; 'munlock {pid}' first")
        proc = self.table.get(pid)
        if proc is not None and (proc.has_work() or proc.stepping):
            raise EngineError("StateError",
                              f"process {pid} is generating; page it out when it is idle (or 'kill -STOP' it first)")
        freed = self.pager.page_out(pid)
        self.pager_service.sync_rows()
        return {"pid": pid, "freed_bytes": freed}

    async def on_threads(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        known: dict[int, dict[str, Any]] = {}
        for info in [*self.sched.threads(), *self.loader.threads()]:
            known[info["thread"].ident or 0] = {"pool": info["pool"], "task": info["task"]}
        return thread_rows(known, loop_thread=threading.current_thread())

    async def on_split(self, msg: dict[str, Any]) -> list[str]:
        """A long text → chunks of at most `tokens` tokens, each overlapping the previous by `overlap` (map --split)."""
        proc = self._ready(msg["pid"])
        tok = tokenizer_of(proc)
        size, overlap = int(msg["tokens"]), int(msg.get("overlap") or 0)
        if size < 1 or not 0 <= overlap < size:
            raise EngineError("UsageError", f"--split {size} --overlap {overlap}: give 0 ≤ overlap < split")
        ids = list(tok.encode(str(msg["text"]), add_special_tokens=False))
        chunks, start = [], 0
        while start < len(ids):
            chunks.append(tok.decode(ids[start:start + size]))
            if start + size >= len(ids):
                break
            start += size - overlap
        return chunks

    async def on_count(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Token counts of texts and the process's context (reduce groups texts that fit)."""
        proc = self._ready(msg["pid"])
        tok = tokenizer_of(proc)
        counts = [len(tok.encode(str(t), add_special_tokens=False)) for t in msg["texts"]]
        return {"counts": counts, "context": proc.runtime.max_seq_len}  # type: ignore[union-attr]

    async def on_probe(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Placement's question to every node: can it read the checkpoint, how big is it, how much of the device's
        budget is free, how busy is the node (llmsh.cluster.placement takes the answers)."""
        device = str(msg.get("device") or "cpu")
        readable, size, why = await asyncio.to_thread(checkpoint_size, str(msg["path"]))
        try:
            budget, free = self.pager.budget(device), self.pager.free(device)
        except ValueError as e:  # a device this node does not have
            raise EngineError("UsageError", f"node {self.node}: {_first_line(e)}") from None
        beat = self.heartbeat_fields()
        return {"node": self.node, "readable": readable, "bytes": size, "why": why, "budget": budget,
                "used": budget - free, "queued": beat["queued"], "load": beat["load_avg"],
                "nices": [p.nice for p in self.table if not p.gone.is_set()]}

    def heartbeat_fields(self) -> dict[str, Any]:
        """What a heartbeat carries besides node and pid: budgets in use, processes, token rate, queue."""
        devices = self.sched.stats()["devices"]
        budget = {dev: {"budget": b, "used": b - self.pager.free(dev)} for dev, b in self.pager.budgets().items()
                  if not dev.startswith("kv:")}
        if "cpu" not in budget:
            b = self.pager.budget("cpu")
            budget["cpu"] = {"budget": b, "used": b - self.pager.free("cpu")}
        return {"budget": budget, "procs": len(self.table), "tok_s": round(sum(d["tok_s"] for d in devices.values()), 2),
                "queued": sum(int(d["queue"]) for d in devices.values()),
                "load_avg": round(os.getloadavg()[0] / (os.cpu_count() or 1), 3)}

    async def on_shutdown(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {"bye": True}

    # ---- life -----------------------------------------------------------------------------------------------------
    async def housekeeping(self) -> None:
        """keep_alive releases and paged-out rows, every REAP_INTERVAL seconds."""
        await self.pager_service.run()

    def start(self) -> None:
        """Start the periodic pager task (call on the running loop)."""
        self._housekeeping = asyncio.get_running_loop().create_task(self.housekeeping(), name="pager housekeeping")

    def close(self) -> None:
        """Stop the loader and the device threads, release the pager."""
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        self.loader.close()
        self.sched.close()
        self.pager.close()
