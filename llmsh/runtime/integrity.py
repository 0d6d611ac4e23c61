"""Checksums for model files: verify before trusting bytes we are about to mmap and run.

Two sources of truth:
- the Hugging Face hub cache names every blob by its hash (sha256 for LFS files such as *.safetensors, the git blob
  sha1 for small files such as config.json), so a snapshot verifies itself;
- a plain folder gets a manifest, `llmsh-checksums.sha256` (the `sha256sum` format), written by `llmsh checksum PATH`.
Hashing streams 1 MiB at a time, so a 10 GB checkpoint never sits in memory; results are remembered per
(file, size, mtime) for the life of the process so that re-loading a model does not re-hash it.
This module is imported by the torch-free CLI: keep it free of torch.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from llmsh.runtime import hash_cache
from llmsh.runtime.errors import LoadError

MANIFEST = "llmsh-checksums.sha256"
CHUNK = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
# Files whose bytes become weights: a manifest must list every one of them (an unlisted shard would load unchecked)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".npz", ".h5", ".msgpack", ".index.json")
_verified: dict[tuple[str, int, int, str], str] = {}  # (realpath, size, mtime_ns, algo) -> hex digest


def _digest(path: Path, algo: str, on_chunk: Callable[[int], None] | None = None) -> str:
    """Hex digest of a file; `on_chunk(n)` after each chunk may raise to stop hashing (an interrupted load)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns, algo)
    if key in _verified:
        return _verified[key]
    if algo == "sha256" and (known := hash_cache.lookup(real)) is not None:   # hashed by an earlier process
        _verified[key] = known
        return known
    if algo == "git-sha1":
        h = hashlib.sha1(b"blob %d\0" % st.st_size)
    else:
        h = hashlib.sha256()
    with open(real, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if on_chunk is not None:
                on_chunk(len(chunk))
    _verified[key] = h.hexdigest()
    if algo == "sha256":
        hash_cache.remember(real, _verified[key])
    return _verified[key]


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    return _digest(Path(path), "sha256")


def model_files(folder: Path) -> list[str]:
    """Relative paths of the files a manifest covers: every regular file except the manifest and hidden ones."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name == MANIFEST or name.startswith("."):
                continue
            out.append(os.path.relpath(os.path.join(root, name), folder))
    return out


def write_manifest(folder: str | os.PathLike) -> Path:
    """Hash every file of folder and write `llmsh-checksums.sha256` there; returns the manifest path."""
    folder = Path(folder)
    lines = [f"{sha256_file(folder / rel)}  {rel}\n" for rel in model_files(folder)]
    path = folder / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(lines))
    os.replace(tmp, path)
    return path


def read_manifest(path: Path) -> dict[str, str]:
    """Parse a sha256sum-format manifest into {relative path: hex digest}."""
    entries = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, _, rel = line.partition("  ")
        if not _SHA256.match(digest) or not rel:
            raise LoadError(f"{path.name} line {n} is not '<sha256>  <file>'; rewrite it with 'llmsh checksum {path.parent}'")
        entries[rel.lstrip("*")] = digest
    return entries


def verify_folder(folder: str | os.PathLike, progress: Callable[[float, str], None] | None = None) -> int:
    """Verify a model folder (hub snapshot blobs or manifest); LoadError naming the first bad file. Returns files checked."""
    folder = Path(folder)
    checks = list(_hub_checks(folder)) if _is_hub_snapshot(folder) else list(_manifest_checks(folder))
    total = sum(_size(p) for _, p, _, _, _ in checks) or 1
    done = 0
    shown = -1

    def advanced(n: int) -> None:  # progress inside a file too: the loader's callback stops an interrupted load here
        nonlocal done, shown
        done += n
        if progress and int(100 * done / total) != shown:
            shown = int(100 * done / total)
            progress(min(1.0, done / total), f"verifying {rel}")

    for rel, path, algo, expected, source in checks:
        if not path.exists():
            raise LoadError(f"{rel} is missing from {folder} (its checksum is listed); re-download the model")
        before = done
        if _digest(path, algo, advanced) != expected:
            how = f"is truncated ({_size(path)} bytes) or corrupt: its checksum does not match {source}"
            if source == MANIFEST:
                raise LoadError(f"{rel} in {folder} {how}; re-download it, or if you changed it on purpose "
                                f"run 'llmsh checksum {folder}'")
            repo = folder.parent.parent.name.removeprefix("models--").replace("--", "/")
            raise LoadError(f"{rel} of {repo} (snapshot {folder.name[:12]}) {how}; delete it and re-download "
                            f"(huggingface-cli download {repo})")
        done = before + _size(path)  # a remembered digest reads nothing
        if progress:
            progress(done / total, f"verified {rel}")
    return len(checks)


def has_checksums(folder: Path) -> bool:
    """True if the folder can be verified (it is a hub snapshot or has a manifest)."""
    return _is_hub_snapshot(folder) or (Path(folder) / MANIFEST).exists()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _is_hub_snapshot(folder: Path) -> bool:
    return folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--")


def _hub_checks(folder: Path) -> Iterable[tuple[str, Path, str, str, str]]:
    for rel in model_files(folder) + _broken_links(folder):
        path = folder / rel
        if not path.is_symlink():
            continue  # a file copied into the snapshot by hand: nothing to check it against
        blob = os.path.basename(os.readlink(path))
        source = "its blob name in the Hugging Face cache"
        if _SHA256.match(blob):
            yield rel, path, "sha256", blob, source
        elif _SHA1.match(blob):
            yield rel, path, "git-sha1", blob, source


def _broken_links(folder: Path) -> list[str]:
    return sorted(os.path.relpath(p, folder) for p in folder.rglob("*") if p.is_symlink() and not p.exists())


def _manifest_checks(folder: Path) -> Iterable[tuple[str, Path, str, str, str]]:
    manifest = folder / MANIFEST
    if not manifest.exists():
        return
    listed = read_manifest(manifest)
    for rel in listed:
        parts = Path(rel).parts
        if os.path.isabs(rel) or ".." in parts or not parts:
            raise LoadError(f"{MANIFEST} in {folder} lists {rel!r}, which is outside the model folder; "
                            f"rewrite it with 'llmsh checksum {folder}'")
    unlisted = [rel for rel in model_files(folder) if rel not in listed and rel.endswith(WEIGHT_SUFFIXES)]
    if unlisted:
        raise LoadError(f"{unlisted[0]} in {folder} is not in {MANIFEST} (added after 'llmsh checksum'?); remove it, "
                        f"or if you trust it run 'llmsh checksum {folder}'")
    for rel, digest in listed.items():
        yield rel, folder / rel, "sha256", digest, MANIFEST


def main(args) -> int:
    """`llmsh checksum PATH`: write the sha256 manifest of a model folder; returns the exit code."""
    folder = Path(args.path).expanduser()
    if not folder.is_dir():
        print(f"llmsh checksum: {args.path} is not a folder; pass a model folder (config.json, *.safetensors)", file=sys.stderr)
        return 2
    if not (folder / "config.json").is_file():  # a manifest of some other folder would only mislead later loads
        print(f"llmsh checksum: {args.path} has no config.json, so it is not a model folder; "
              "pass the folder that holds config.json and *.safetensors", file=sys.stderr)
        return 2
    if _is_hub_snapshot(folder):
        print(f"llmsh checksum: {args.path} is in the Hugging Face cache, whose blobs are already named by their hash; "
              "nothing to write", file=sys.stderr)
        return 0
    try:
        path = write_manifest(folder)
    except OSError as e:
        print(f"llmsh checksum: cannot write the manifest in {folder}: {e.strerror or e}", file=sys.stderr)
        return 1
    n = len(read_manifest(path))
    print(f"llmsh checksum: wrote {n} sha256 sums to {path}; later loads verify them")
    return 0
