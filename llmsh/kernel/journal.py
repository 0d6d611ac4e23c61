"""The kernel's journal: the process table, requests in flight and the event log (`dmesg`) in SQLite.

Why SQLite (stdlib `sqlite3`, WAL): every change is one transaction, so a `kill -9` between two writes leaves the
previous state whole, never half a row; it is the well-kept store for exactly this. All writes run on one writer
thread (the front never does file I/O on its event loop); each write returns a future that the front awaits before
it acknowledges the change to a client ("committed before it is acknowledged").

A clean `kernel stop` marks the journal clean; the next start restores the table only after a crash (or with
`kernel start --restore`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import json
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmsh.paths import state_dir

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS procs (pid INTEGER PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests (id TEXT PRIMARY KEY, pid INTEGER NOT NULL, started REAL NOT NULL);
CREATE TABLE IF NOT EXISTS map_jobs (name TEXT PRIMARY KEY, input_sha TEXT NOT NULL, spec TEXT NOT NULL, started REAL NOT NULL);
CREATE TABLE IF NOT EXISTS map_lines (job TEXT NOT NULL, line INTEGER NOT NULL, record TEXT NOT NULL, PRIMARY KEY (job, line));
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, t REAL NOT NULL, kind TEXT NOT NULL, pid INTEGER, text TEXT NOT NULL
);
"""
MAX_EVENTS = 10_000  # older events are dropped (dmesg is a ring buffer, like the kernel's)


class Journal:
    """One SQLite file and the thread that writes it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._jobs: queue.Queue[tuple[Callable[[sqlite3.Connection], Any], concurrent.futures.Future] | None] = queue.Queue()
        self._ready = concurrent.futures.Future()  # type: concurrent.futures.Future[None]
        self._thread = threading.Thread(target=self._run, name="llmsh-journal", daemon=True)
        self._thread.start()
        self._ready.result(timeout=30)
        self.listeners: list[Callable[[dict[str, Any]], None]] = []  # new events (dmesg -f); called on the loop

    # ---- the writer thread --------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a committed change survives power loss, not just a crash
            db.executescript(SCHEMA)
            self.path.chmod(0o600)
        except Exception as e:  # noqa: BLE001 - reported to the constructor
            self._ready.set_exception(e)
            return
        self._ready.set_result(None)
        while True:
            job = self._jobs.get()
            if job is None:
                db.close()
                return
            fn, fut = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                db.execute("BEGIN IMMEDIATE")
                result = fn(db)
                db.execute("COMMIT")
                fut.set_result(result)
            except Exception as e:  # noqa: BLE001 - the caller sees it
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                fut.set_exception(e)

    def submit(self, fn: Callable[[sqlite3.Connection], Any]) -> concurrent.futures.Future:
        """Run `fn(db)` in one transaction on the writer thread."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fn, fut))
        return fut

    async def run(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """`submit` and await the commit."""
        return await asyncio.wrap_future(self.submit(fn))

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)

    # ---- what the front writes ----------------------------------------------------------------------------------
    def put_proc(self, pid: int, data: dict[str, Any]) -> concurrent.futures.Future:
        text = json.dumps(data, sort_keys=True)
        return self.submit(lambda db: db.execute("INSERT OR REPLACE INTO procs VALUES (?, ?)", (pid, text)))

    def drop_proc(self, pid: int) -> concurrent.futures.Future:
        return self.submit(lambda db: db.execute("DELETE FROM procs WHERE pid = ?", (pid,)))

    def request_started(self, rid: str, pid: int) -> concurrent.futures.Future:
        return self.submit(lambda db: db.execute("INSERT OR REPLACE INTO requests VALUES (?, ?, ?)", (rid, pid, time.time())))

    def request_ended(self, rid: str) -> concurrent.futures.Future:
        return self.submit(lambda db: db.execute("DELETE FROM requests WHERE id = ?", (rid,)))

    def set_meta(self, **values: Any) -> concurrent.futures.Future:
        items = [(k, json.dumps(v)) for k, v in values.items()]
        return self.submit(lambda db: db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", items))

    def event(self, kind: str, text: str, pid: int | None = None) -> concurrent.futures.Future:
        """Append one `dmesg` line."""
        t = time.time()

        def write(db: sqlite3.Connection) -> dict[str, Any]:
            cur = db.execute("INSERT INTO events (t, kind, pid, text) VALUES (?, ?, ?, ?)", (t, kind, pid, text))
            seq = int(cur.lastrowid or 0)
            if seq % 1000 == 0:
                db.execute("DELETE FROM events WHERE seq <= ?", (seq - MAX_EVENTS,))
            return {"seq": seq, "t": t, "kind": kind, "pid": pid, "text": text}

        fut = self.submit(write)
        fut.add_done_callback(self._announce)
        return fut

    def _announce(self, fut: concurrent.futures.Future) -> None:
        if fut.exception() is None:
            for fn in list(self.listeners):
                try:
                    fn(fut.result())
                except Exception:  # noqa: BLE001 - a listener must not break the journal
                    pass

    # ---- what the front reads -------------------------------------------------------------------------------------
    def load_state(self) -> dict[str, Any]:
        """Everything a start needs: meta, the journalled processes, the requests that were in flight (blocking)."""

        def read(db: sqlite3.Connection) -> dict[str, Any]:
            meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
            procs = [json.loads(d) for (d,) in db.execute("SELECT data FROM procs ORDER BY pid")]
            reqs = [{"id": i, "pid": p, "started": s} for i, p, s in db.execute("SELECT id, pid, started FROM requests")]
            return {"meta": meta, "procs": procs, "requests": reqs}

        return self.submit(read).result(timeout=30)

    def events(self, n: int | None = None, after: int = 0) -> concurrent.futures.Future:
        """The last `n` events (all if None) with seq > `after`, oldest first."""

        def read(db: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = db.execute(
                "SELECT seq, t, kind, pid, text FROM events WHERE seq > ? ORDER BY seq DESC LIMIT ?",
                (after, -1 if n is None else n),
            ).fetchall()
            return [{"seq": s, "t": t, "kind": k, "pid": p, "text": x} for s, t, k, p, x in reversed(rows)]

        return self.submit(read)

    def clear_requests(self) -> concurrent.futures.Future:
        return self.submit(lambda db: db.execute("DELETE FROM requests"))


_held_locks: list[Any] = []  # lock files held for this process's life (the OS releases them if it dies)


def _try_lock(path: Path) -> bool:
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return False
    _held_locks.append(f)
    return True


def open_journal(connection_file: Path | str) -> tuple[Path | None, float]:
    """The journal this kernel owns, and when it was last written (the time of a crash, if there was one).

    One kernel per runtime dir owns `journal.sqlite` (a lock held for its life, released by the OS however it
    ends), so the kernel started after a crash finds the table the dead one left. A second kernel running at the
    same time (tests, `--connection-file`) gets a journal of its own, named after its connection file."""
    folder = state_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name in ("journal", f"journal-{Path(connection_file).stem}"):
        if _try_lock(folder / f"{name}.lock"):
            path = folder / f"{name}.sqlite"
            times = [p.stat().st_mtime for p in (path, Path(f"{path}-wal")) if p.exists()]
            return path, max(times, default=time.time())
    return None, time.time()
