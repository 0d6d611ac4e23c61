"""Float matrices in the runtime's layout, written to the cache once and memory-mapped on later loads.

GGUF stores a matrix (out, in) and q, k, v (gate, up) as separate tensors, with Llama's q and k rows permuted for
its RoPE; our modules take (in, out), q|k|v and gate|up fused, rows in Hugging Face's order. Building those takes a
transpose or a concatenation of every float matrix: ~4 s for a bfloat16 model of 1.1 B parameters, where mapping
the file takes milliseconds. So the first load of a float GGUF file writes the matrices it built into one
safetensors file under the user cache directory (paths.cache_dir()/layout), and later loads of the unchanged file
(same real path, size, mtime, inode and device: hash_cache.identity) map that file instead: zero-copy views from
the page cache, as for a safetensors checkpoint. A changed file gets a new entry and the old one is removed, as are
entries whose file is gone (each names its source in its metadata); an unwritable cache only costs the rebuild.
Quantized matrices need none of this where they are used as the file has them (fused or row-permuted ones are
cached as blocks); a float parameter stored quantized (GPT-2's tied embedding) is decoded once and cached like the rest.

Hugging Face checkpoints get the same for the matrices they store transposed or split (Llama's (out, in)
projections, GPT-2's tied embedding): their entry is keyed by every safetensors file of the folder. Without it a
paged GPT-2 un-transposed its 154 MB embedding at every page-in, ~80 ms before the first layer could run.
An entry is a second copy of those matrices on disk, so it is only written where the disk keeps twice its size free.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
from pathlib import Path

import torch
from torch import Tensor

from llmsh import paths
from llmsh.runtime import hash_cache
from llmsh.runtime.checkpoint import SafetensorsFile
from llmsh.runtime.errors import LoadError

log = logging.getLogger(__name__)
VERSION = "3"          # bump when the layout of the runtime's parameters changes: older entries are then ignored


def _target(path: Path, dtype: torch.dtype, files: list[Path] | None = None) -> tuple[Path, str]:
    """The entry for the model at path (a GGUF file, or a folder whose weights are `files`) in dtype."""
    ident = [hash_cache.identity(f)[1] for f in (files or [path])]
    key = hashlib.sha256(f"{VERSION}:{ident if files else ident[0]}:{dtype}".encode()).hexdigest()[:16]
    prefix = hash_cache.path_prefix(path)
    return paths.cache_dir() / "layout" / f"{prefix}-{key}.safetensors", prefix


def _source(entry: Path) -> str | None:
    """The GGUF file an entry was built from (its header's metadata), or None if unreadable."""
    try:
        with open(entry, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            meta = json.loads(f.read(min(n, 1 << 20))).get("__metadata__", {})
        return meta.get("source") if isinstance(meta, dict) else None
    except (OSError, ValueError, struct.error):
        return None


def forget(path: Path) -> None:
    """Remove the cached matrices of the GGUF file or checkpoint folder at path (entries are per path)."""
    for old in (paths.cache_dir() / "layout").glob(f"{hash_cache.path_prefix(path)}-*.safetensors"):
        old.unlink(missing_ok=True)


def forget_under(root: Path) -> None:
    """Remove the entries built from models under root (a benchmark's temporary checkpoints, before deleting them)."""
    real = os.path.realpath(root)
    for entry in (paths.cache_dir() / "layout").glob("*.safetensors"):
        source = _source(entry)
        if source is not None and (source == real or source.startswith(real + os.sep)):
            entry.unlink(missing_ok=True)


def open_cached(path: Path, dtype: torch.dtype, files: list[Path] | None = None) -> SafetensorsFile | None:
    """The cached matrices of the GGUF file (or the folder of `files`) at path in dtype, or None (never built, or a
    file changed)."""
    target, _ = _target(path, dtype, files)
    try:
        return SafetensorsFile(target) if target.exists() else None
    except (OSError, LoadError) as e:                  # a damaged entry: rebuilt on this load
        log.warning("ignoring the cached layout %s (%s)", target, e)
        return None


def write(path: Path, dtype: torch.dtype, tensors: dict[str, Tensor], files: list[Path] | None = None) -> None:
    """Store tensors (ours, built from the GGUF file or the folder of `files` at path) for later loads; atomically,
    best effort, and only where the disk has twice their size free."""
    if not tensors:
        return
    from llmsh.runtime.cache_file import write_safetensors

    target, prefix = _target(path, dtype, files)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(target.parent).free
        if free < 2 * size:
            log.info("not caching the layout of %s: %d MiB free in %s, %d MiB needed", path.name, free >> 20,
                     target.parent, 2 * size >> 20)
            return
        write_safetensors(target, tensors, {"version": VERSION, "source": os.path.realpath(path)})
        for old in target.parent.glob("*.safetensors"):       # the same file's earlier versions, deleted files'
            if old != target and (old.name.startswith(prefix) or not os.path.exists(_source(old) or old)):
                old.unlink(missing_ok=True)
    except OSError as e:
        log.warning("could not cache the layout of %s (%s): the next load rebuilds it", path.name, e)
