"""Digests of model files remembered across processes, so that loading an unchanged file again does not rehash it.

A digest is valid while the file keeps its (real path, size, mtime, inode, device): a re-download or an edit in place
changes the mtime, a replaced file the inode. Entries live in one small JSON file in the user cache directory
(platformdirs), rewritten atomically; a lost or corrupt cache only costs a rehash. Hashing itself streams the file
in 8 MiB reads into one reused buffer (hashlib releases the GIL on large updates, so a load's hash does not stall
the kernel's other threads). Torch-free: the CLI's `llmsh checksum` uses it too.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from llmsh import paths

CHUNK = 8 << 20
FILE = "file-digests.json"
MAX_ENTRIES = 1000                 # newest kept: a bound on the cache file however many models come and go
_lock = threading.Lock()


def identity(path: str | os.PathLike) -> tuple[str, list[int]]:
    """(real path, [size, mtime_ns, inode, device]): while these hold, the file has not changed."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return real, [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]


def path_prefix(path: str | os.PathLike) -> str:
    """A short name for a file's real path: the caches of per-file data (GGUF indexes, reshaped matrices) begin their
    entries' names with it, so that every version of one file can be found, and removed, by it."""
    return hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:16]


def _cache_file() -> Path:
    return paths.cache_dir() / FILE


def _read() -> dict[str, dict]:
    try:
        data = json.loads(_cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def lookup(path: str | os.PathLike, algo: str = "sha256") -> str | None:
    """The remembered digest of path if the file is unchanged since it was hashed, else None."""
    real, ident = identity(path)
    entry = _read().get(f"{algo}:{real}")
    return entry["digest"] if isinstance(entry, dict) and entry.get("id") == ident else None


def remember(path: str | os.PathLike, digest: str, algo: str = "sha256") -> None:
    """Store path's digest under its current identity (atomically; best effort: an unwritable cache is ignored)."""
    real, ident = identity(path)
    with _lock:
        data = {k: v for k, v in _read().items() if os.path.exists(k.split(":", 1)[-1])}   # forget deleted files
        data[f"{algo}:{real}"] = {"id": ident, "digest": digest}
        data = dict(list(data.items())[-MAX_ENTRIES:])
        try:
            folder = _cache_file().parent
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(tmp, _cache_file())
        except OSError:
            pass


def sha256(path: str | os.PathLike, progress: Callable[[int, int], None] | None = None) -> str:
    """Hex sha256 of path: remembered if the file is unchanged, else streamed once (progress(done, total) per read)."""
    known = lookup(path)
    if known is not None:
        return known
    h, buf = hashlib.sha256(), bytearray(CHUNK)
    view, done, total = memoryview(buf), 0, os.path.getsize(path)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            done += n
            if progress:
                progress(done, total)
    digest = h.hexdigest()
    remember(path, digest)
    return digest
