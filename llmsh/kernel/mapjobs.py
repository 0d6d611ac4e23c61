"""`map` jobs: every line of an input file becomes one request of a model process; results come out in input order.

Nothing is lost and nothing is done twice: each finished line is committed to the journal before it is written to the
output, so after a crash of the client, the engine or the kernel itself, running the job again (`map --resume JOB`,
or the same command) rewrites the output from the journal and sends only the lines that never finished. The input's
sha256 is kept with the job: an input that changed under a resume is refused with one line.

The requests are ordinary requests of the process (its nice, its continuous batching): at most as many are in flight
as fill its batch. STOP pauses the dispatch of new lines (those in flight finish), CONT resumes it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import string
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmsh.kernel.engines import EngineDied
from llmsh.kernel.errors import KernelError
from llmsh.kernel.journal import Journal
from llmsh.kernel.table import Entry

# The engine's default batch (max_batch, 64) and a quarter more: a row freed in one step has the next line already
# queued at the engine to join the next step, instead of waiting a round trip through the front (GPT-2 124M, 192
# lines with 64 in flight: 37 s; with 80: 29 s, as fast as feeding the batch in-process). The engine's queue bounds
# the excess: a line it refuses as busy goes again when one of the job's own requests has ended.
DEFAULT_IN_FLIGHT = 80
BUSY_BACKOFF_S = (0.01, 1.0)  # first and longest wait before a refused line goes again, if none of the job's is in flight
LINE_PARAMS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")  # a JSON line may set its own


DIED: dict[str, Any] = {}  # attempt()'s answer when the engine died under the request


class MapError(KernelError):
    ename = "MapError"


@dataclass
class Line:
    """One input line: its number (1-based), its id, and the prompt or the reason it has none."""

    no: int
    id: Any
    prompt: str | None
    error: str | None = None
    params: dict[str, Any] = field(default_factory=dict)  # per-line sampling settings from its JSON (max_tokens…)


def read_input(text: str, *, jsonl: bool, field_name: str, template: str | None) -> list[Line]:
    """Input text → lines; a malformed line becomes a Line with an error (the job goes on), never an exception."""
    lines: list[Line] = []
    for no, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        values: dict[str, Any]
        if jsonl:
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                lines.append(Line(no, no, None, f"line {no}: not JSON ({e.msg})"))
                continue
            if not isinstance(obj, dict):
                lines.append(Line(no, no, None, f"line {no}: not a JSON object"))
                continue
            values = obj
        else:
            values = {"text": raw, field_name: raw}
        ident = values.get("id", no)
        try:
            if template is not None:
                prompt = render(template, values)
            elif field_name in values:
                prompt = str(values[field_name])
            else:
                raise KeyError(field_name)
        except KeyError as e:
            lines.append(Line(no, ident, None, f"line {no}: no field {e.args[0]!r}"))
            continue
        lines.append(Line(no, ident, prompt, params={k: values[k] for k in LINE_PARAMS if k in values}))
    return lines


def render(template: str, values: dict[str, Any]) -> str:
    """`Summarise: {text}` with the line's fields; KeyError names a missing one. Only plain `{name}` fields, so a
    template cannot reach attributes or indexes of the values."""
    out = []
    for literal, name, spec, _conv in string.Formatter().parse(template):
        out.append(literal)
        if name is None:
            continue
        if not name.isidentifier():
            raise KeyError(name)
        out.append(format(values[name], spec or ""))
    return "".join(out)


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


@dataclass
class MapJob:
    """One running map job."""

    name: str
    entry: Entry
    lines: list[Line]
    output: Path
    params: dict[str, Any]
    in_flight: int = DEFAULT_IN_FLIGHT
    done: dict[int, dict[str, Any]] = field(default_factory=dict)  # line no → output record
    started: float = field(default_factory=time.monotonic)
    tokens: int = 0
    requests: int = 0  # requests sent by this run (resumes send only what was missing)
    paused: asyncio.Event = field(default_factory=asyncio.Event)  # set = running
    replicas: list[Entry] = field(default_factory=list)  # more processes of the same model that share the lines
    busy: dict[int, int] = field(default_factory=dict)  # pid → requests in flight

    def __post_init__(self) -> None:
        self.paused.set()
        if not self.replicas:
            self.replicas = [self.entry]

    def pick(self) -> Entry:
        """The replica with the fewest requests in flight (the first on a tie)."""
        return min(self.replicas, key=lambda e: self.busy.get(e.pid, 0))

    @property
    def total(self) -> int:
        return len(self.lines)

    def progress(self) -> dict[str, Any]:
        """done/total, tokens/s and ETA, for `jobs`, the progress bar and --json."""
        elapsed = max(time.monotonic() - self.started, 1e-6)
        done = len(self.done)
        rate = self.requests and done / elapsed
        left = self.total - done
        return {"job": self.name, "pid": self.entry.pid, "pids": [e.pid for e in self.replicas], "done": done,
                "total": self.total,
                "errors": sum(1 for r in self.done.values() if r.get("error")), "tokens": self.tokens,
                "tok_s": round(self.tokens / elapsed, 2), "eta_s": round(left / rate, 1) if rate else None,
                "requests": self.requests, "state": "stopped" if not self.paused.is_set() else "running"}


class MapJobs:
    """The front's map jobs: run, resume, pause; each line journalled before it reaches the output."""

    def __init__(self, journal: Journal | None, generate: Callable[..., Any]) -> None:
        self.journal = journal
        self.generate = generate  # Processes.generate
        self.running: dict[str, MapJob] = {}

    async def run(self, job: MapJob, *, input_sha: str, spec: dict[str, Any],
                  on_progress: Callable[[MapJob], None] | None = None) -> dict[str, Any]:
        """Run (or resume) `job` to the end; returns its summary. MapError for a job that cannot run at all."""
        if job.name in self.running:
            raise MapError(f"map job {job.name!r} is already running; 'wait' for it or 'kill' its shell job")
        if self.journal is not None:
            known = await self.journal.run(lambda db: db.execute(
                "SELECT input_sha FROM map_jobs WHERE name = ?", (job.name,)).fetchone())
            if known is not None and known[0] != input_sha:
                raise MapError(f"map job {job.name!r}: its input changed since the job started (sha256 differs); "
                               "give the job another --name, or restore the input")
            await self.journal.run(lambda db: db.execute(
                "INSERT OR IGNORE INTO map_jobs (name, input_sha, spec, started) VALUES (?, ?, ?, ?)",
                (job.name, input_sha, json.dumps(spec), time.time())))
            rows = await self.journal.run(lambda db: db.execute(
                "SELECT line, record FROM map_lines WHERE job = ?", (job.name,)).fetchall())
            job.done = {int(no): json.loads(rec) for no, rec in rows}
        for line in job.lines:  # lines that cannot become a request are results too (with their error)
            if line.error is not None and line.no not in job.done:
                await self._finish(job, line, {"id": line.id, "line": line.no, "text": None, "error": line.error})
        self.running[job.name] = job
        writer = OrderedWriter(job.output, [ln.no for ln in job.lines])
        try:
            await asyncio.to_thread(writer.open)
            await asyncio.to_thread(writer.write_ready, job.done)
            todo = [ln for ln in job.lines if ln.no not in job.done]
            await self._dispatch(job, todo, writer, on_progress)
        finally:
            self.running.pop(job.name, None)
            await asyncio.to_thread(writer.close)
        return job.progress()

    async def _dispatch(self, job: MapJob, todo: list[Line], writer: OrderedWriter,
                        on_progress: Callable[[MapJob], None] | None) -> None:
        slots = asyncio.Semaphore(job.in_flight * len(job.replicas))
        failed: list[BaseException] = []
        ended = asyncio.Condition()  # one of the job's requests ended: a line refused as busy may go again

        async def one(line: Line) -> None:
            try:
                backoff = BUSY_BACKOFF_S[0]
                while (record := await attempt(line)) is None:
                    async with ended:
                        if sum(job.busy.values()):
                            await ended.wait()
                        else:  # the queue is full of other clients' requests: nothing of ours to wait for
                            await asyncio.sleep(backoff)
                            backoff = min(2 * backoff, BUSY_BACKOFF_S[1])
                if record is DIED:
                    return
                await self._finish(job, line, record)
                await asyncio.to_thread(writer.write_ready, job.done)
                if on_progress is not None:
                    on_progress(job)
            finally:
                slots.release()

        async def attempt(line: Line) -> dict[str, Any] | None:
            """One request for `line`: its output record, None if the engine's queue was full, DIED if the engine
            died (not the line's fault: the job stops and a resume sends the line again)."""
            pieces: list[str] = []
            result: dict[str, Any] = {}
            job.requests += 1
            replica = job.pick()
            job.busy[replica.pid] = job.busy.get(replica.pid, 0) + 1
            try:
                async for piece in self.generate(replica, prompt=line.prompt, params={**job.params, **line.params},
                                                 client=f"map:{job.name}", result=result):
                    pieces.append(piece)
                job.tokens += int(result.get("tokens") or 0)
                return {"id": line.id, "line": line.no, "text": "".join(pieces),
                        "prompt_tokens": result.get("prompt_tokens"), "tokens": result.get("tokens"),
                        "finish_reason": result.get("finish_reason")}
            except EngineDied as e:
                failed.append(e)
                return DIED
            except KernelError as e:
                if e.ename == "Busy":  # refused before it started: nothing was generated
                    job.requests -= 1
                    return None
                return {"id": line.id, "line": line.no, "text": None, "error": str(e)}
            finally:
                job.busy[replica.pid] -= 1
                async with ended:
                    ended.notify_all()

        tasks: list[asyncio.Task] = []
        try:
            for line in todo:
                await job.paused.wait()  # STOP: no new lines (those in flight finish)
                await slots.acquire()
                if failed:
                    slots.release()
                    break
                tasks.append(asyncio.create_task(one(line)))
            await asyncio.gather(*tasks)
        except asyncio.CancelledError:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        if failed:
            raise MapError(f"map job {job.name!r} stopped: {failed[0]}; 'map --resume {job.name}' goes on where it "
                           "stopped")

    async def _finish(self, job: MapJob, line: Line, record: dict[str, Any]) -> None:
        """Journal the line's result (committed), then it counts as done."""
        if self.journal is not None:
            text = json.dumps(record)
            await self.journal.run(lambda db: db.execute(
                "INSERT OR REPLACE INTO map_lines (job, line, record) VALUES (?, ?, ?)", (job.name, line.no, text)))
        job.done[line.no] = record

    async def spec(self, name: str) -> dict[str, Any] | None:
        """How job `name` was started (for `map --resume NAME`)."""
        if self.journal is None:
            return None
        row = await self.journal.run(lambda db: db.execute("SELECT spec FROM map_jobs WHERE name = ?", (name,)).fetchone())
        return json.loads(row[0]) if row else None


class OrderedWriter:
    """Writes records to the output file in input order, as soon as every earlier line is done. Each finished line
    calls write_ready on a worker thread (asyncio.to_thread): two of them at once wrote the same next record twice
    and skipped one, so a lock makes them take turns."""

    def __init__(self, path: Path, order: list[int]) -> None:
        self.path = path
        self.order = order
        self.next = 0
        self.f: Any = None
        self._turn = threading.Lock()

    def open(self) -> None:
        self.f = open(self.path, "w", encoding="utf-8")  # rewritten from the journal: equal to an uninterrupted run

    def write_ready(self, done: dict[int, dict[str, Any]]) -> None:
        with self._turn:
            while self.next < len(self.order) and self.order[self.next] in done:
                self.f.write(json.dumps(done[self.order[self.next]], ensure_ascii=False) + "\n")
                self.next += 1
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
