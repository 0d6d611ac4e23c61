"""Shell jobs: statements started with `&`, kept per client session in the front's `Services.jobs`.

A job is an asyncio task running one and-or list. It keeps writing through the Output of the request that started
it, so its output reaches the client that started it whichever request that client is waiting on. An interrupt
(Ctrl-C) cancels only the foreground request, so jobs keep running; `fg %N` makes a job the foreground (Ctrl-C
then cancels it), `wait` waits without taking ownership (Ctrl-C stops the waiting, not the job). Job numbers
restart at 1 when a client has no jobs left, like sh. Finished jobs stay listed until `jobs` or `wait` reports them.
"""

from __future__ import annotations

import asyncio
import builtins
import contextvars
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from llmsh.kernel.errors import KernelError

log = logging.getLogger("llmsh.kernel.jobs")

RUNNING, DONE, FAILED, INTERRUPTED = "running", "done", "failed", "interrupted"


class JobError(KernelError):
    """No such job (one line naming the spec and what to do)."""

    ename = "NoSuchJob"


@dataclass
class Job:
    """One background statement of one client session."""

    id: int
    client: str
    text: str
    started_at: float = field(default_factory=time.time)
    state: str = RUNNING
    exit_code: int | None = None
    finished_at: float | None = None
    foreground: bool = False  # taken over by `fg`: no completion notice
    task: asyncio.Task[int] | None = None
    out: Any = None  # the Output of the request that started it
    control: Any = None  # a job with pause()/resume()/progress() of its own (a `map` job), else None

    @property
    def done(self) -> bool:
        return self.state != RUNNING

    def status(self) -> str:
        """`Running`, `Done`, `Exit 2`, `Interrupted` — the words `jobs` shows, as in sh."""
        if self.state == RUNNING:
            return "Running"
        if self.state == INTERRUPTED:
            return "Interrupted"
        return "Done" if self.exit_code == 0 else f"Exit {self.exit_code}"

    def to_dict(self) -> dict[str, Any]:
        """The `jobs --json` row."""
        end = self.finished_at or time.time()
        return {
            "id": self.id,
            "command": self.text,
            "state": self.state,
            "status": self.status(),
            "exit_code": self.exit_code,
            "elapsed_s": round(end - self.started_at, 3),
            **({"progress": self.control.progress()} if self.control is not None else {}),
        }


CURRENT_JOB: contextvars.ContextVar[Job | None] = contextvars.ContextVar("llmsh_current_job", default=None)


class JobTable:
    """Every client's jobs; lives in `kernel.services.jobs`."""

    def __init__(self) -> None:
        self._jobs: dict[str, dict[int, Job]] = {}

    def start(self, kernel: Any, client: str, text: str, body: Coroutine[Any, Any, int], out: Any) -> Job:
        """Run `body` (returns an exit code) as a new job of `client`; returns at once."""
        jobs = self._jobs.setdefault(client, {})
        job = Job(id=max(jobs, default=0) + 1, client=client, text=text, out=out)
        jobs[job.id] = job
        coro = self._run(job, body)
        spawn = getattr(kernel, "spawn", None)
        job.task = spawn(coro, f"job {client[:8]}%{job.id}") if spawn else asyncio.ensure_future(coro)
        job.task.add_done_callback(lambda t: self._cancelled_early(job, body))
        return job

    @staticmethod
    def _cancelled_early(job: Job, body: Coroutine[Any, Any, int]) -> None:
        """A task cancelled before its first step never ran `_run`; record it as interrupted all the same."""
        if job.state == RUNNING:
            body.close()  # never started: close it so it is not reported as "never awaited"
            job.state, job.exit_code, job.finished_at = INTERRUPTED, 130, time.time()

    async def _run(self, job: Job, body: Coroutine[Any, Any, int]) -> int:
        CURRENT_JOB.set(job)  # this task's context: a command in the job can find it (map registers its control)
        try:
            code = await body
            job.state = DONE if code == 0 else FAILED
        except asyncio.CancelledError:
            code = 130
            job.state = INTERRUPTED
        except Exception:  # the executor already turns command errors into exit codes; this is a bug
            log.exception("job %s of %s crashed", job.id, job.client)
            code = 1
            job.state = FAILED
        job.exit_code = code
        job.finished_at = time.time()
        if not job.foreground and job.out is not None:
            try:
                job.out.stream("stderr", f"[{job.id}]+  {job.status():<12}{job.text}\n")
            except Exception:  # the client may be long gone; its notice does not matter then
                log.debug("could not notify job %s end", job.id, exc_info=True)
        return code

    def list(self, client: str) -> builtins.list[Job]:
        """The client's jobs, oldest first."""
        return sorted(self._jobs.get(client, {}).values(), key=lambda j: j.id)

    def running(self, client: str) -> builtins.list[Job]:
        return [j for j in self.list(client) if not j.done]

    def get(self, client: str, spec: str | None, cmd: str) -> Job:
        """The job named by `%N`, `N`, `%%`/`%+` (latest) or `%-` (the one before); None means the latest."""
        jobs = self.list(client)
        if not jobs:
            current = spec in (None, "%%", "%+")
            raise JobError("no current job; start one with 'CMD &'" if current else f"{spec}: no such job; see 'jobs'")
        if spec in (None, "%%", "%+"):
            return jobs[-1]
        if spec == "%-":
            if len(jobs) < 2:
                raise JobError("%-: no such job")
            return jobs[-2]
        num = spec[1:] if spec.startswith("%") else spec
        if not num.isdigit():
            raise JobError(f"{spec}: not a job number; use %N as shown by 'jobs'")
        job = self._jobs.get(client, {}).get(int(num))
        if job is None:
            raise JobError(f"{spec}: no such job; see 'jobs'")
        return job

    def forget(self, job: Job) -> None:
        """Drop a finished job from the table (it was reported)."""
        self._jobs.get(job.client, {}).pop(job.id, None)
        if not self._jobs.get(job.client):
            self._jobs.pop(job.client, None)

    def cancel(self, job: Job) -> bool:
        """Interrupt a running job (for `kill %N`); False if it already finished."""
        if job.done or job.task is None:
            return False
        job.task.cancel()
        return True

    async def wait(self, jobs: builtins.list[Job]) -> None:
        """Wait until these jobs finish; being cancelled stops the waiting only, never the jobs."""
        tasks = {j.task for j in jobs if j.task is not None and not j.task.done()}
        if tasks:
            await asyncio.wait(tasks)

    async def foreground(self, job: Job) -> int:
        """`fg`: wait for the job as the foreground command; being cancelled (Ctrl-C) cancels the job too."""
        job.foreground = True
        if job.task is not None and not job.task.done():
            try:
                await asyncio.wait({job.task})
            except asyncio.CancelledError:
                job.task.cancel()
                raise
        self.forget(job)
        return job.exit_code if job.exit_code is not None else 1
