"""Unit tests of the executor (contract B) in-process, with a plain namespace as the kernel and a recording Output.

The end-to-end tests through a real kernel process are in test_shell*.py / test_batch*.py; these pin down the shell
semantics: exit codes, error lines, pipes, redirects, --json/--help, jobs, cancellation, completion.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmsh.client.redirect import RedirectFiles
from llmsh.commands import executor
from llmsh.commands.executor import ExecResult, complete, execute
from llmsh.commands.registry import REGISTRY, Command, CommandError, arg
from llmsh.kernel.jobs import JobTable
from llmsh.protocol.redirect import REDIRECT_MIME


class Recorder:
    """An Output that records every event in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any, str]] = []

    def stream(self, name: str, text: str) -> None:
        self.events.append((name, None, text))

    def result(self, data: Any, text: str) -> None:
        self.events.append(("result", data, text))

    def text(self, name: str) -> str:
        return "".join(t for n, _, t in self.events if n == name)

    def results(self) -> list[tuple[Any, str]]:
        return [(d, t) for n, d, t in self.events if n == "result"]


def fake_services() -> Any:
    """The front's real services with an engine that is never started (these tests load no model)."""
    from llmsh.kernel.engines import EngineLink
    from llmsh.kernel.front import Processes, Services
    from llmsh.kernel.table import ProcessTable

    table = ProcessTable(None)
    link = EngineLink("test", Path("/nonexistent/engine.sock"), Path(os.devnull))
    return Services(table=table, procs=Processes(table, None, link), journal=None, jobs=JobTable())
class DisplayRecorder(Recorder):
    """A Recorder that also takes display_data, as the kernel's Output does (redirects and progress go there)."""

    def display(self, bundle: dict[str, Any]) -> None:
        self.events.append(("display", bundle, ""))


def fake_kernel() -> Any:
    return types.SimpleNamespace(
        history=["echo one", "echo two", "sleep 1"], services=fake_services(), pid=4242, started_at=time.time() - 65, clients={"a": 0.0}
    )


async def run(code: str, kernel: Any = None, client: str = "c1", cwd: str | None = None) -> tuple[ExecResult, Recorder]:
    out = Recorder()
    res = await execute(kernel if kernel is not None else fake_kernel(), code, client=client, out=out, cwd=cwd)
    return res, out


@pytest.fixture
def test_commands() -> Iterator[dict[str, Any]]:
    """Temporary commands for pipes and failures, removed again afterwards so `help` stays clean."""
    state: dict[str, Any] = {"seen_first": asyncio.Event(), "received": []}

    async def produce(ctx: Any, args: Any) -> None:
        ctx.write("first ")
        await asyncio.wait_for(state["seen_first"].wait(), 5)  # only set if `consume` got "first " while we run
        ctx.write("second")

    async def consume(ctx: Any, args: Any) -> None:
        async for piece in ctx.stdin:
            state["received"].append(piece)
            state["seen_first"].set()
            ctx.write(piece.upper())

    async def boom(ctx: Any, args: Any) -> None:
        raise RuntimeError("kaboom\nsecond line")

    async def fail(ctx: Any, args: Any) -> None:
        raise CommandError(f"it failed with {args.code}", status=args.code)

    async def structured(ctx: Any, args: Any) -> None:
        ctx.result({"rows": [1, 2]}, "two rows")

    async def endless(ctx: Any, args: Any) -> None:
        for i in range(1000):
            ctx.write(f"{i} ")
            state["written"] = i
            await asyncio.sleep(0.001)

    async def first(ctx: Any, args: Any) -> None:
        async for piece in ctx.stdin:
            ctx.write(piece.strip() + "\n")
            return

    async def progress(ctx: Any, args: Any) -> None:
        ctx.progress(0.5, "loading")

    names = []
    for name, handler, extra in (
        ("t-progress", progress, {}),
        ("t-endless", endless, {}),
        ("t-first", first, {}),
        ("t-produce", produce, {}),
        ("t-consume", consume, {}),
        ("t-boom", boom, {}),
        ("t-fail", fail, {"args": (arg("code", type=int),)}),
        ("t-structured", structured, {"structured": True}),
    ):
        REGISTRY.add(Command(name=name, summary="test", handler=handler, group="test", **extra))
        names.append(name)
    yield state
    for name in names:
        REGISTRY.commands.pop(name, None)


async def test_echo_ok() -> None:
    res, out = await run("echo hello   world")
    assert res == ExecResult("ok", 0) and out.text("stdout") == "hello world\n"
    res, out = await run("echo -n x")
    assert out.text("stdout") == "x"


async def test_unknown_command_suggests_nearest() -> None:
    res, out = await run("ehco hi")
    assert (res.status, res.exit_code, res.ename) == ("error", 127, "CommandNotFound")
    assert res.evalue == "llmsh: ehco: command not found (did you mean: echo?)"
    res, _ = await run("zzzzqqq")
    assert res.evalue == "llmsh: zzzzqqq: command not found; type 'help' for the list"


async def test_a_wrapped_usage_stays_one_readable_line() -> None:
    """argparse wraps long usages over several lines; joined, they must read as one usage, not `…; [--x N]; PATH`."""
    from llmsh.commands import load_all
    load_all()
    res, _ = await run("kill")  # kill's usage is longer than argparse's wrap width
    assert res.exit_code == 2 and "\n" not in res.evalue
    usage = res.evalue.split("; usage: ", 1)[1]
    assert usage.startswith("kill [-h]") and ";" not in usage and "  " not in usage, res.evalue


async def test_bad_arguments_give_one_usage_line() -> None:
    res, out = await run("sleep abc")
    assert (res.exit_code, res.ename) == (2, "UsageError")
    assert res.evalue.startswith("llmsh: sleep: ") and "usage: sleep" in res.evalue and "\n" not in res.evalue
    res, _ = await run("sleep")
    assert res.exit_code == 2 and "required: N" in res.evalue
    res, _ = await run("echo hi --json")  # echo takes anything
    assert res.status == "ok"
    res, _ = await run("sleep 1 --json")  # sleep is not structured
    assert res.exit_code == 2 and "unrecognized arguments: --json" in res.evalue


async def test_help_and_dash_dash_help() -> None:
    res, out = await run("help")
    ((rows, text),) = out.results()
    assert res.exit_code == 0 and "echo" in text and "sleep" in text and "help CMD" in text
    assert {"name": "sleep", "group": "core"}.items() <= next(r for r in rows if r["name"] == "sleep").items()
    res, out = await run("help sleep")
    assert "usage: sleep" in out.results()[0][1]
    res, out = await run("sleep --help")
    assert res.exit_code == 0 and out.text("stdout").startswith("usage: sleep")
    res, _ = await run("help slep")
    assert res.exit_code == 127 and "did you mean: sleep" in res.evalue


async def test_json_flag_shows_the_json(test_commands: Any) -> None:
    _, out = await run("t-structured")
    assert out.results() == [({"rows": [1, 2]}, "two rows")]
    _, out = await run("t-structured --json")
    ((data, text),) = out.results()
    assert data == {"rows": [1, 2]} and json.loads(text) == data
    _, out = await run("help --json")
    assert any(r["name"] == "echo" for r in json.loads(out.results()[0][1]))


async def test_sequences_and_exit_codes(test_commands: Any) -> None:
    res, out = await run("t-fail 3; echo after")
    assert res == ExecResult("ok", 0)
    assert out.text("stderr") == "llmsh: t-fail: it failed with 3\n" and out.text("stdout") == "after\n"
    res, out = await run("t-fail 4 && echo skipped")
    assert (res.exit_code, res.evalue) == (4, "llmsh: t-fail: it failed with 4")
    assert out.text("stdout") == "" and out.text("stderr") == ""  # the final error is shown once, by the reply
    res, out = await run("t-fail 1 || echo fallback && echo also")
    assert res.exit_code == 0 and out.text("stdout") == "fallback\nalso\n"
    res, out = await run("echo a || echo never; echo b")
    assert out.text("stdout") == "a\nb\n"


async def test_syntax_error_is_exit_2() -> None:
    res, out = await run("echo a ;; echo b")
    assert (res.exit_code, res.ename) == (2, "SyntaxError") and res.evalue == "llmsh: syntax error near ';'"
    assert out.events == []  # nothing ran


async def test_pipe_streams_pieces(test_commands: Any) -> None:
    res, out = await asyncio.wait_for(run("t-produce | t-consume"), 10)
    assert res.exit_code == 0
    assert test_commands["received"] == ["first ", "second"]  # the consumer saw the first piece before the second existed
    assert out.text("stdout") == "FIRST SECOND"


async def test_pipe_status_is_the_last_stage(test_commands: Any) -> None:
    res, out = await run("t-fail 5 | echo right")
    assert res.exit_code == 0 and out.text("stdout") == "right\n" and "it failed with 5" in out.text("stderr")
    res, out = await run("echo left | t-fail 6")
    assert res.exit_code == 6 and out.text("stdout") == ""
    res, out = await run("t-structured --json | t-consume")
    assert json.loads(out.text("stdout").lower()) == {"rows": [1, 2]}


async def test_unexpected_exception_is_one_line_and_logged(test_commands: Any, caplog: Any) -> None:
    with caplog.at_level(logging.ERROR, logger="llmsh.commands"):
        res, out = await run("t-boom; echo still")
    assert res.exit_code == 0 and out.text("stdout") == "still\n"
    line = out.text("stderr")
    assert line == "llmsh: t-boom: internal error: RuntimeError: kaboom; second line (details in the kernel log)\n"
    assert any("Traceback" in (r.exc_text or "") or r.exc_info for r in caplog.records)
    res, _ = await run("t-boom")
    assert (res.exit_code, res.ename) == (1, "InternalError")


async def test_redirect_is_sent_to_the_client_which_writes_the_file(tmp_path: Any, test_commands: Any, monkeypatch: Any) -> None:
    fifo = tmp_path / "jobs.fifo"
    os.mkfifo(fifo)  # a FIFO without a reader: opening it in the kernel would block its loop
    out = DisplayRecorder()
    code = f"echo never > {fifo}; echo one > out.txt && echo two >> out.txt; t-structured > s.txt"
    res = await execute(fake_kernel(), code, client="c1", out=out, cwd=str(tmp_path))
    assert res.exit_code == 0 and out.text("stdout") == ""
    assert not (tmp_path / "out.txt").exists()  # the kernel opened nothing
    events = [b[REDIRECT_MIME] for kind, b, _ in out.events if kind == "display"]
    assert [(e["path"], e["op"]) for e in events[:3]] == [(str(fifo), "open"), (str(fifo), "write"), (str(fifo), "close")]
    errors: list[str] = []
    files = RedirectFiles(errors.append)
    monkeypatch.chdir(tmp_path)  # the client opens relative paths in its own directory
    for e in events[3:]:
        files.handle(e)
    assert (tmp_path / "out.txt").read_text() == "one\ntwo\n"
    assert (tmp_path / "s.txt").read_text() == "two rows\n"
    assert errors == [] and not files.take_failure()


def test_a_failing_redirect_file_is_one_line_and_a_failure(tmp_path: Any) -> None:
    errors: list[str] = []
    files = RedirectFiles(errors.append)
    for op in ("open", "write", "write", "close"):
        files.handle({"id": "r1", "path": "/dev/full", "append": False, "op": op, "text": "ps rows\n"})
    files.handle({"id": "r2", "path": str(tmp_path / "no/such/dir/f"), "append": False, "op": "open"})
    assert errors == ["llmsh: /dev/full: No space left on device", f"llmsh: {tmp_path}/no/such/dir/f: No such file or directory"]
    assert files.take_failure() and not files.take_failure()


async def test_redirect_needs_a_client_that_writes_files() -> None:
    res, out = await run("echo x > f")  # a Recorder has no display(): nowhere to send the file's text
    assert res.exit_code == 1 and "needs a client that writes files" in res.evalue and out.text("stdout") == ""


async def test_sleep_is_interruptible() -> None:
    task = asyncio.ensure_future(run("sleep 30; echo never"))
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - t0 < 1


async def test_sleep_durations() -> None:
    res, _ = await run("sleep 0.01 && sleep 0.01s && sleep .01")
    assert res.exit_code == 0
    res, _ = await run("sleep -1")
    assert res.exit_code == 2


async def test_background_jobs_wait_and_numbers() -> None:
    k = fake_kernel()
    t0 = time.monotonic()
    res, out = await run("sleep 0.3 & echo started", k)
    assert res.exit_code == 0 and time.monotonic() - t0 < 0.25
    assert out.text("stderr") == "[1] sleep 0.3\n" and out.text("stdout") == "started\n"
    _, out2 = await run("jobs", k)
    assert out2.results()[0][1] == "[1]+  Running     sleep 0.3 &"
    assert out2.results()[0][0][0]["state"] == "running"
    _, other = await run("jobs", k, client="c2")  # jobs are per client session
    assert other.results()[0][0] == []
    res, _ = await run("wait", k)
    assert res.exit_code == 0 and time.monotonic() - t0 >= 0.3
    assert "[1]+  Done        sleep 0.3\n" in out.text("stderr")  # notice through the starting request's Output
    _, out3 = await run("jobs --json", k)  # like sh: 'wait' reaps what it waited for, numbering restarts
    assert json.loads(out3.results()[0][1]) == []
    await run("sleep 0.01 &", k)
    await asyncio.sleep(0.1)
    _, out4 = await run("jobs --json", k)  # a job that ended by itself is listed Done once, then reaped
    assert json.loads(out4.results()[0][1])[0]["status"] == "Done"
    _, out5 = await run("jobs", k)
    assert out5.results()[0][0] == []
    await run("sleep 0.01 &", k)
    assert k.services.jobs.list("c1")[0].id == 1


async def test_wait_returns_the_job_exit_code(test_commands: Any) -> None:
    k = fake_kernel()
    _, out = await run("t-fail 7 & t-fail 0 &", k)
    res, _ = await run("wait %1", k)
    assert res.exit_code == 7
    res, _ = await run("wait %2", k)
    assert res.exit_code == 0
    assert "llmsh: t-fail: it failed with 7\n" in out.text("stderr")
    res, _ = await run("wait %9", k)
    assert res.exit_code == 1 and res.evalue == "llmsh: wait: %9: no such job; see 'jobs'"
    res, _ = await run("wait 123", k)
    assert res.exit_code == 127 and "no process with PID 123" in res.evalue


async def test_fg_waits_and_ctrl_c_on_fg_stops_the_job() -> None:
    k = fake_kernel()
    await run("sleep 0.2 &", k)
    res, out = await run("fg %1", k)
    assert res.exit_code == 0 and out.text("stdout") == "sleep 0.2\n"
    await run("sleep 30 &", k)
    (job,) = k.services.jobs.list("c1")
    fg = asyncio.ensure_future(run("fg", k))
    await asyncio.sleep(0.05)
    fg.cancel()
    with pytest.raises(asyncio.CancelledError):
        await fg
    await asyncio.sleep(0.01)
    assert job.state == "interrupted" and job.exit_code == 130


async def test_ctrl_c_on_wait_leaves_the_job_running() -> None:
    k = fake_kernel()
    await run("sleep 30 &", k)
    (job,) = k.services.jobs.list("c1")
    waiter = asyncio.ensure_future(run("wait", k))
    await asyncio.sleep(0.05)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert job.state == "running"
    res, out = await run("bg %1", k)
    assert res.exit_code == 0 and out.text("stdout") == "[1]+ sleep 30 &\n"
    assert k.services.jobs.cancel(job)
    await asyncio.sleep(0.01)
    assert job.state == "interrupted"
    res, _ = await run("fg %1", k)
    assert res.exit_code == 1 and "already finished" in res.evalue


async def test_uname_kernel_history() -> None:
    res, out = await run("uname")
    text = out.results()[0][1]
    assert "llmsh 0.1.0 pid 4242 up 1m5s" in text
    assert ("torch not loaded" in text) == ("torch" not in sys.modules)
    _, out = await run("kernel --json")
    info = json.loads(out.results()[0][1])
    assert info["pid"] == 4242 and info["clients"] == 1 and info["python"].count(".") == 2
    _, out = await run("history -n 2")
    assert out.results()[0][1] == "2  echo two\n3  sleep 1"


async def test_complete() -> None:
    k = fake_kernel()
    assert complete(k, "ec", 2) == (["echo"], 0, 2)
    assert complete(k, "echo a && sl", 12) == (["sleep"], 10, 12)
    assert complete(k, "help --j", 8) == (["--json"], 5, 8)
    assert complete(k, "help sle", 8) == (["sleep"], 5, 8)
    matches, start, end = complete(k, "", 0)
    assert "echo" in matches and (start, end) == (0, 0)
    await run("sleep 30 &", k)
    assert complete(k, "fg ", 3, client="c1") == (["%1"], 3, 3)
    k.services.jobs.cancel(k.services.jobs.list("c1")[0])


def test_complete_redirect_path(tmp_path: Any) -> None:
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / "nested").mkdir()
    (tmp_path / "my dir").mkdir()
    matches, start, _ = complete(fake_kernel(), "echo a > n", 10, cwd=str(tmp_path))
    assert matches == ["nested/", "notes.txt"] and start == 9
    assert complete(fake_kernel(), "echo a > my", 11, cwd=str(tmp_path))[0] == ["'my dir/'"]  # quoted: stays one word
    assert complete(fake_kernel(), "echo a > 'my d", 14, cwd=str(tmp_path)) == (["'my dir/'"], 9, 14)


async def test_progress_goes_to_display_or_stderr(test_commands: Any) -> None:
    _, out = await run("t-progress")
    assert out.text("stderr") == "loading  50%\n" and out.text("stdout") == ""

    class WithDisplay(Recorder):
        def display(self, bundle: dict) -> None:
            self.events.append(("display", bundle, ""))

    rec = WithDisplay()
    await execute(fake_kernel(), "t-progress | t-consume", client="c", out=rec)
    assert rec.events == [("display", {"application/vnd.llmsh.progress+json": {"fraction": 0.5, "label": "loading"}, "text/plain": "loading 50%"}, "")]


async def test_exit_stops_the_line_but_not_in_pipes_or_jobs() -> None:
    res, out = await run("echo a; exit 3; echo never")
    assert res == ExecResult("error", 3, "Exit", "llmsh: exit 3") and out.text("stdout") == "a\n"
    res, out = await run("exit; echo never")
    assert res == ExecResult("ok", 0) and out.text("stdout") == ""
    res, out = await run("exit 4 | echo piped; echo after")
    assert res.exit_code == 0 and out.text("stdout") == "piped\nafter\n"
    res, out = await run("echo x | exit 5 || echo status-was-5")
    assert res.exit_code == 0 and out.text("stdout") == "status-was-5\n"
    res, _ = await run("exit nope")
    assert res.exit_code == 2 and "invalid int value" in res.evalue


async def test_writer_stops_when_the_reader_has_finished(test_commands: Any) -> None:
    res, out = await asyncio.wait_for(run("t-endless | t-first; echo next"), 10)
    assert res == ExecResult("ok", 0) and out.text("stdout") == "0\nnext\n" and out.text("stderr") == ""
    assert test_commands["written"] < 50  # stopped at its next write, like SIGPIPE, instead of running to 999


def test_contract_b_names() -> None:
    assert executor.is_complete("echo 'open") == ("incomplete", "") and executor.is_complete("echo ok") == ("complete", "")
    assert callable(executor.execute) and callable(executor.complete)
