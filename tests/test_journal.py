"""The journal (SQLite, WAL) on its own: committed changes survive a kill -9 between two writes, whole or not at all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from llmsh.kernel.journal import Journal

WRITER = """
import sys, itertools
from llmsh.kernel.journal import Journal
j = Journal(sys.argv[1])
for i in itertools.count():
    j.put_proc(i % 50, {"pid": i % 50, "name": "p%d" % i, "blob": "x" * 4000, "i": i}).result()
    j.set_meta(next_pid=i).result()
    if i == 20:
        print("ready", flush=True)
"""


def test_a_kill_between_writes_leaves_whole_rows(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    time.sleep(0.3)  # many transactions later, somewhere inside one
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    j = Journal(path)
    try:
        state = j.load_state()
    finally:
        j.close()
    rows = state["procs"]
    assert rows and all(r["name"] == f"p{r['i']}" and len(r["blob"]) == 4000 for r in rows)  # no half rows
    newest = max(r["i"] for r in rows)
    assert state["meta"]["next_pid"] in (newest, newest - 1)  # each write is its own transaction: in step


def test_events_and_requests_round_trip(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite")
    try:
        j.event("load", "pid 1 (a): loading /x", 1).result()
        j.request_started("r1", 1).result()
        j.request_ended("r1").result()
        j.request_started("r2", 1).result()
        state = j.load_state()
        assert [r["id"] for r in state["requests"]] == ["r2"]
        (ev,) = j.events().result()
        assert (ev["kind"], ev["pid"], ev["text"]) == ("load", 1, "pid 1 (a): loading /x")
        assert json.dumps(ev)
    finally:
        j.close()
    assert (tmp_path / "j.sqlite").stat().st_mode & 0o777 == 0o600
