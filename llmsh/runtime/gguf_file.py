"""Reading a GGUF file (llama.cpp's format): its metadata by key and its tensors by name, as views of the file mapped
copy-on-write, with an index in the user cache so that opening an unchanged file again skips gguf's parser.

Kept apart from `llmsh.runtime.gguf_loader`, which turns what is read here into a model (config, weight layout,
tokenizer); this module knows the file format and the index cache, not the model families.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from llmsh.runtime.checkpoint import map_weights
from llmsh.runtime.errors import LoadError


class TensorInfo(NamedTuple):
    """What gguf's ReaderTensor says of one tensor (name, type, ggml dims, bytes, absolute offset) and its data."""

    name: str
    tensor_type: Any              # gguf.GGMLQuantizationType
    shape: np.ndarray             # ggml order: the row length (input dimension) first
    n_bytes: int
    data_offset: int
    data: np.ndarray              # float types (out, in); others bytes (out, row_bytes)


def _plain_reader() -> type:
    """gguf's GGUFReader over a plain ndarray view of its memmap. np.memmap runs Python code for every slice the
    reader takes (~2 per vocabulary string): a 32k-token vocabulary parsed in 2.1 s, 0.75 s this way."""
    from gguf import GGUFReader

    class PlainReader(GGUFReader):
        @property  # type: ignore[override]  # a property over gguf's attribute, same value
        def data(self) -> np.ndarray:
            return self._plain

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._plain = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    return PlainReader


def _map(path: Path) -> np.ndarray:
    """The file's bytes, mapped as the safetensors checkpoints are (copy-on-write, huge pages asked for)."""
    with open(path, "rb") as f:
        return np.frombuffer(map_weights(f.fileno()), dtype=np.uint8)


INDEX_VERSION = 2
LONG_LIST = 256                    # metadata lists longer than this are kept beside the index (see save_index)
LISTS, TOKENIZER = "lists.json", "tokenizer.json"      # the files beside an index


class GGUFFile:
    """One GGUF file: metadata by key and tensors by name, their data views of the file mapped copy-on-write.

    The first open parses the file with gguf's reader and keeps what it found (metadata values, tensor names, types,
    shapes and offsets) in an index in the user cache dir, keyed by the file's (path, size, mtime, inode): a second
    open of the unchanged file maps it and takes the index, without parsing a vocabulary of 100k strings again.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.cached_tokenizer: str | None = None
        self._lengths: dict[str, int] = {}          # list metadata kept beside the index -> its length
        self.fields: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        try:
            self._where, self._ident = _index_path(self.path)   # this version's index, taken once: see save_index
        except OSError as e:
            raise LoadError(f"cannot read {self.path} ({e.strerror})") from None
        self.indexed = self._open_index()           # opened from the index, not parsed
        if not self.indexed:
            self.fields, table = self._parse()
            try:                                    # (a file cut or changed since the parse: views fail)
                self._data = _map(self.path)
                self.tensors = {entry[0]: self._tensor(*entry) for entry in table}
            except (OSError, ValueError) as e:
                raise LoadError(f"cannot map the tensors of {self.path} ({e}); re-download it") from None

    def _open_index(self) -> bool:
        """Take metadata and tensor table from this version's index; False where there is none (or it is bad)."""
        index = _read_index(self._where, self._ident)
        if index is None:
            return False
        try:
            self._data = _map(self.path)
            self.tensors = {i[0]: self._tensor(*i) for i in index["tensors"]}
        except (OSError, ValueError, TypeError, IndexError, KeyError):
            return False
        self.fields = index["meta"]
        self._lengths = index["lengths"]
        self.cached_tokenizer = _read_text(_beside(self._where, TOKENIZER))
        return True

    def _parse(self) -> tuple[dict[str, Any], list[tuple[str, int, list[int], int, int]]]:
        """The file's metadata and tensor table (name, type id, ggml dims, bytes, offset), through gguf's reader
        (slow: every string of the vocabulary is a numpy slice)."""
        try:
            reader = _plain_reader()(self.path, "c")          # copy-on-write map: writable views, never written back
            fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        except Exception as e:  # the reader raises ValueError, struct errors, IndexError… on a bad file
            raise LoadError(f"{self.path} is not a readable GGUF file ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else 'truncated'}); re-download it") from None
        table = [(t.name, int(t.tensor_type), [int(d) for d in t.shape.tolist()], int(t.n_bytes), int(t.data_offset))
                 for t in reader.tensors]
        return fields, table

    def _tensor(self, name: str, type_id: int, dims: list[int], n_bytes: int, offset: int) -> TensorInfo:
        from gguf import GGMLQuantizationType, quant_shape_to_byte_shape

        kind = GGMLQuantizationType(type_id)
        np_dims = tuple(reversed(dims))
        dtype = {"F32": np.float32, "F16": np.float16}.get(kind.name)
        if dtype is None:
            view = self._data[offset:offset + n_bytes].reshape(quant_shape_to_byte_shape(np_dims, kind))
        else:
            view = self._data[offset:offset + n_bytes].view(dtype).reshape(np_dims)
        return TensorInfo(name, kind, np.array(dims, dtype=np.uint64), n_bytes, offset, view)

    def save_index(self, tokenizer_json: str | None) -> None:
        """Remember this file's metadata, tensor table and tokenizer (see the class docstring); best effort. Long
        lists (a vocabulary, its scores and merges) and the tokenizer go to files beside the index: a load reads
        only the small index and the tokenizer, and a list when it is asked for (a first build of the tokenizer).
        Nothing is saved if the file changed since it was opened: what was read may be of either version."""
        from llmsh.runtime import hash_cache

        try:
            if hash_cache.identity(self.path)[1] != self._ident:
                return
        except OSError:
            return
        tensors = [[t.name, int(t.tensor_type), [int(d) for d in t.shape.tolist()], t.n_bytes, t.data_offset]
                   for t in self.tensors.values()]
        missing = any(k not in self.fields for k in self._lengths)
        fields = {**self.fields, **(self._lists() if missing else {})}
        lists = {k: v for k, v in fields.items() if isinstance(v, list) and len(v) > LONG_LIST}
        if not (_write_text(_beside(self._where, LISTS), lambda: json.dumps(lists))
                and (tokenizer_json is None or _write_text(_beside(self._where, TOKENIZER), lambda: tokenizer_json))):
            return
        small = {k: v for k, v in fields.items() if k not in lists}
        index = {"meta": small, "lengths": {k: len(v) for k, v in lists.items()}, "tensors": tensors, "id": self._ident}
        if _write_text(self._where, lambda: json.dumps(index)):
            forget(self.path, keep=self._where)      # the indexes of earlier versions of the file

    def meta(self, key: str, default: Any = None) -> Any:
        """The value of metadata `key` (a str, number, bool or list), or default."""
        if key in self._lengths and key not in self.fields:
            self.fields.update(self._lists())
        return self.fields.get(key, default)

    def length(self, key: str) -> int:
        """The number of items of list metadata `key` (0 where it is absent or not a list), without reading it."""
        if key in self._lengths:
            return self._lengths[key]
        value = self.fields.get(key)
        return len(value) if isinstance(value, list) else 0

    def _lists(self) -> dict[str, Any]:
        """The long lists kept beside the index (none before the index exists); a file lost or damaged there is
        read from the GGUF file again."""
        if not self._lengths:
            return {}
        text = _read_text(_beside(self._where, LISTS))
        try:
            lists: dict[str, Any] = json.loads(text or "")
            if all(len(lists[k]) == n for k, n in self._lengths.items()):
                return lists
        except (ValueError, KeyError, TypeError):
            pass
        fields, _ = self._parse()
        if any(k not in fields for k in self._lengths):
            raise LoadError(f"{self.path} changed while it was being loaded; load it again")
        return {k: fields[k] for k in self._lengths}

    @property
    def arch(self) -> str:
        return str(self.meta("general.architecture", ""))

    def type_name(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def array(self, name: str) -> np.ndarray:
        """Tensor `name` as stored: float arrays (out, in), block-quantized ones as bytes (out, row_bytes)."""
        return self.tensors[name].data

    def float_tensor(self, name: str) -> Tensor:
        """A float tensor as a zero-copy torch view (F32, F16, BF16)."""
        t = self.tensors[name]
        kind = t.tensor_type.name
        if kind == "BF16":  # the reader gives BF16 as bytes (out, 2 * in)
            return torch.from_numpy(t.data).view(torch.bfloat16)
        if kind in ("F32", "F16"):
            return torch.from_numpy(t.data)
        raise LoadError(f"tensor {name} in {self.path.name} is {kind}; llmsh expects a float type there")


def _index_path(path: Path) -> tuple[Path, list[int]]:
    """Where the index of `path` as it is now goes (named by the path's prefix and the version), and the version
    (hash_cache.identity: size, mtime, inode, device)."""
    import hashlib

    from llmsh.runtime import hash_cache

    real, ident = hash_cache.identity(path)
    key = hashlib.sha256(f"{INDEX_VERSION}:{real}:{ident}".encode()).hexdigest()[:16]
    return _folder() / f"{hash_cache.path_prefix(path)}-{key}.json", ident


def _folder() -> Path:
    from llmsh import paths

    return paths.cache_dir() / "gguf"


def index_files(path: Path) -> list[Path]:
    """The index of the GGUF file at `path` and the files beside it, of every version of the file indexed."""
    from llmsh.runtime import hash_cache

    return sorted(_folder().glob(f"{hash_cache.path_prefix(path)}-*"))


def forget(path: Path, keep: Path | None = None) -> None:
    """Remove the index of the GGUF file at `path` and the files beside it (all versions but `keep`'s), and the
    indexes of llmsh versions that named them by a hash alone (which no path can be matched with)."""
    import re

    old = [p for p in index_files(path) if keep is None or not p.name.startswith(keep.stem + ".")]
    old += [p for p in _folder().glob("*.json") if re.fullmatch(r"[0-9a-f]{32}(\.lists|\.tokenizer)?\.json", p.name)]
    for stale in old:
        try:
            stale.unlink(missing_ok=True)
        except OSError:                          # (in use elsewhere, on some systems): left for the next time
            pass


def _read_index(where: Path, ident: list[int]) -> dict[str, Any] | None:
    try:
        data = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = (isinstance(data, dict) and data.get("id") == ident and isinstance(data.get("meta"), dict)
          and isinstance(data.get("lengths"), dict) and isinstance(data.get("tensors"), list)
          and all(isinstance(n, int) for n in data["lengths"].values()))
    return data if ok else None


def _beside(where: Path, name: str) -> Path:
    """File `name` (LISTS, TOKENIZER) beside the index at `where`."""
    return where.with_suffix("." + name)


def _read_text(where: Path) -> str | None:
    try:
        return where.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _write_text(where: Path, text: Callable[[], str]) -> bool:
    """Write text() to `where` atomically; False where that fails (a cache is best effort)."""
    import os
    import tempfile

    try:
        content = text()
        where.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=where.parent, suffix=".tmp")
    except (OSError, ValueError, TypeError):      # (json.dumps: ValueError, TypeError)
        return False
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(content)
        os.replace(tmp, where)
        return True
    except (OSError, ValueError):
        Path(tmp).unlink(missing_ok=True)
        return False
