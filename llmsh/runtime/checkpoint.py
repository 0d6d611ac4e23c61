"""Safetensors checkpoints read through mmap: tensors are views of the file's pages, never a second copy.

A safetensors file is `u64 header length | JSON header {name: {dtype, shape, data_offsets}} | raw bytes`. We parse the
header ourselves, map the file copy-on-write (`mmap.ACCESS_COPY`: pages come from the page cache on first touch and are
never written back), and build each tensor with `torch.frombuffer` at its offset. Loading in the file's dtype on the CPU
therefore costs no memory beyond the page cache; a dtype or device change makes exactly one converted copy.

Parsing checks the structure up front (shard listed in the index but missing, header beyond the file, data shorter than
the header says) so that a truncated download fails with one line naming the file before any weight is used.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llmsh.runtime.errors import CheckpointChanged, LoadError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


def _valid_entry(e: object) -> bool:
    """A header entry as safetensors writes it: {dtype: str, shape: [int…], data_offsets: [start, end]}."""
    if not isinstance(e, dict) or not isinstance(e.get("dtype"), str):
        return False
    shape, offs = e.get("shape"), e.get("data_offsets")
    return (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
            and isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)
            and 0 <= offs[0] <= offs[1])


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ino


def map_weights(fileno: int) -> mmap.mmap:
    """The whole file mapped copy-on-write (see the module docstring), with huge pages asked for (MADV_HUGEPAGE).

    Pages missing from the page cache that fault through such a mapping are read in 2 MiB folios, which this load
    and every later one map with one page-table entry each; faulted through a plain mapping they are read in small
    folios, mapped a few KiB per fault ever after. A 1.1 B Q4_0 GGUF first read through a plain mapping left every
    later load's first token ~12 ms slower (46 against 34 ms). Where the kernel has no transparent huge pages the
    advice is refused, harmlessly."""
    m = mmap.mmap(fileno, 0, access=mmap.ACCESS_COPY)
    huge = getattr(mmap, "MADV_HUGEPAGE", None)          # (Linux only)
    if huge is not None:
        try:
            m.madvise(huge)
        except OSError:
            pass
    return m


class SafetensorsFile:
    """One mmap'd .safetensors file: `.entries` from its header and zero-copy `.tensor(name)`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise LoadError(f"{path.name} in {path.parent} is truncated ({size} bytes, no header); re-download it")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise LoadError(f"{path.name} in {path.parent} is truncated or not a safetensors file "
                                f"(header of {n} bytes, file of {size}); re-download it")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise LoadError(f"{path.name} in {path.parent} has a corrupt header; re-download it") from None
            self._map = map_weights(f.fileno()) if size > 8 + n else None
            self.stamp = _stamp(os.fstat(f.fileno()))  # what the mapping shows; a later page-in checks the file still is
        if not isinstance(header, dict) or not all(_valid_entry(e) for k, e in header.items() if k != "__metadata__"):
            self._map = None
            raise LoadError(f"{path.name} in {path.parent} has a corrupt header (a tensor entry without dtype, shape "
                            "or data_offsets); re-download it")
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries: dict[str, dict] = header
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self.data_start + end > size:
            raise LoadError(f"{path.name} in {path.parent} is truncated: the header needs {self.data_start + end} bytes, "
                            f"the file has {size}; re-download it")

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor `name` as a view of the mapped file (no copy)."""
        e = self.entries[name]
        dtype = DTYPES.get(e["dtype"])
        if dtype is None:
            raise LoadError(f"tensor {name} in {self.path.name} has dtype {e['dtype']}, which llmsh cannot load")
        start, end = e["data_offsets"]
        if end == start:
            return torch.empty(e["shape"], dtype=dtype)
        raw = torch.frombuffer(self._map, dtype=torch.uint8, count=end - start, offset=self.data_start + start)
        return raw.view(dtype).view(e["shape"])

    def check_unchanged(self) -> None:
        """Raise CheckpointChanged if the file on disk is no longer the one mapped at load (size, mtime or inode):
        its pages would be other weights, or past the end of a truncated file (SIGBUS)."""
        try:
            now = _stamp(os.stat(self.path))
        except OSError as e:
            raise CheckpointChanged(f"{self.path.name} in {self.path.parent} is missing {CheckpointChanged.MARK} "
                                    f"({e.strerror}); kill the process and load the model again") from None
        if now != self.stamp:
            what = "size" if now[0] != self.stamp[0] else "modification time" if now[1] != self.stamp[1] else "inode"
            raise CheckpointChanged(f"{self.path.name} in {self.path.parent} changed {CheckpointChanged.MARK} "
                                    f"({what} differs); kill the process and load the model again")

    def populate(self, name: str) -> None:
        """Map tensor `name`'s pages from the page cache now (one madvise), so that the thread that computes with a
        view of it takes no page faults: MADV_POPULATE_READ (Linux 5.14), else a WILLNEED hint for the read-ahead."""
        if self._map is None:
            return
        start, end = self.entries[name]["data_offsets"]
        first = (self.data_start + start) // mmap.PAGESIZE * mmap.PAGESIZE
        length = self.data_start + end - first
        if length <= 0:
            return
        try:
            self._map.madvise(getattr(mmap, "MADV_POPULATE_READ", 22), first, length)   # 22: Linux's value
        except OSError as e:
            if e.errno == errno.ENOMEM:
                raise MemoryError(f"out of memory mapping {name} of {self.path.name}") from None
            if e.errno != errno.EINVAL:
                raise      # EFAULT, EIO: the file shrank or cannot be read
            if hasattr(mmap, "MADV_WILLNEED"):                                            # an older kernel
                self._map.madvise(mmap.MADV_WILLNEED, first, length)

    def drop_pages(self, name: str, lo: int = 0, hi: int | None = None) -> None:
        """Tell the kernel we are done with bytes [lo, hi) of tensor `name` (after copying them): they leave our RSS."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start, end = self.entries[name]["data_offsets"]
        first = self.data_start + start + lo
        last = self.data_start + start + (end - start if hi is None else hi)
        first = -(-first // mmap.PAGESIZE) * mmap.PAGESIZE   # whole pages inside the range only
        last = last // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)

    def read_raw(self, name: str, out: memoryview) -> None:
        """Fill `out` with tensor `name`'s bytes by pread from the file, not through the mapping.

        A page-in copies the same tensors again and again after drop_pages unmapped them: through the mmap each 4 KiB
        page costs a fault (~0.13 s per 475 MiB, ~4 GB/s); pread copies from the page cache in the kernel at several
        times that. The descriptor is checked against the stamp taken at load, as check_unchanged does the path."""
        start, end = self.entries[name]["data_offsets"]
        if out.nbytes != end - start:
            raise ValueError(f"read_raw: {name} has {end - start} bytes, the buffer {out.nbytes}")
        changed = CheckpointChanged(f"{self.path.name} in {self.path.parent} changed {CheckpointChanged.MARK}; kill "
                                    "the process and load the model again")
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            raise changed from None
        try:
            if _stamp(os.fstat(fd)) != self.stamp:
                raise changed
            done, at = 0, self.data_start + start
            while done < out.nbytes:
                n = os.preadv(fd, [out[done:]], at + done)
                if n <= 0:
                    raise changed
                done += n
        finally:
            os.close(fd)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in this file."""
        return sum(e["data_offsets"][1] - e["data_offsets"][0] for e in self.entries.values())


class Checkpoint:
    """All safetensors files of a model folder, with the family's mapping from our parameter names to HF keys.

    `key_map(param_name) -> list[str]` gives candidate HF keys (first present wins), `transposed(param_name) -> bool`
    says whether the stored matrix is the transpose of ours (Llama projections), and `parts(param_name) -> list[str]`
    names the parameters that one of ours concatenates along its last (output) dimension, e.g. Llama's fused
    `wqkv` = `wq | wk | wv`, each part then mapped and transposed as above. All three are set by the model family.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}  # HF key -> file name
        index = self.folder / INDEX
        if index.exists():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise LoadError(f"{INDEX} in {self.folder} is not a valid index (no weight_map); re-download it") from None
            names = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE).exists():
            names, weight_map = [SINGLE], {}
        else:
            names, weight_map = sorted(p.name for p in self.folder.glob("*.safetensors")), {}
            if not names:
                raise LoadError(f"no *.safetensors weights in {self.folder} (only safetensors checkpoints are supported; "
                                "convert .bin files with transformers' save_pretrained)")
        for name in names:
            path = self.folder / name
            if not path.exists():
                raise LoadError(f"{name} is missing from {self.folder} (listed in {INDEX}); re-download the model")
            self.files[name] = SafetensorsFile(path)
            for key in self.files[name].entries:
                self.where.setdefault(key, name)
        for key, name in weight_map.items():
            if self.where.get(key) != name:
                raise LoadError(f"{name} in {self.folder} lacks tensor {key} that {INDEX} places there; re-download it")
        self.key_map: Callable[[str], list[str]] = lambda name: [name]
        self.transposed: Callable[[str], bool] = lambda name: False
        self.parts: Callable[[str], list[str]] = lambda name: []
        # our transposed or fused matrices as built at an earlier load (layout_cache.py): mapped, never rebuilt
        self.layout: SafetensorsFile | None = None

    def keys(self) -> list[str]:
        """Every tensor name stored in the checkpoint (HF layout)."""
        return list(self.where)

    def dtype(self) -> torch.dtype:
        """The floating dtype most of the stored bytes have (what 'load in the file's dtype' means)."""
        by_dtype: dict[str, int] = {}
        for f in self.files.values():
            for e in f.entries.values():
                by_dtype[e["dtype"]] = by_dtype.get(e["dtype"], 0) + e["data_offsets"][1] - e["data_offsets"][0]
        floats = {k: v for k, v in by_dtype.items() if k in ("F32", "F16", "BF16", "F64")}
        return DTYPES[max(floats, key=lambda k: floats[k])] if floats else torch.float32

    def hf_key(self, param_name: str) -> str:
        """The stored key holding our parameter `param_name` (its first part's, if fused); LoadError if it lacks it."""
        parts = self.parts(param_name)
        if parts:
            for part in parts[1:]:
                self.hf_key(part)  # every part must exist
            return self.hf_key(parts[0])
        candidates = self.key_map(param_name)
        for key in candidates:
            if key in self.where:
                return key
        raise LoadError(f"the checkpoint in {self.folder} has no tensor {candidates[0]} (needed for {param_name}); "
                        "it is incomplete or for a different architecture than config.json says")

    def shape(self, param_name: str) -> list[int]:
        """Shape of our parameter as stored (after undoing any transpose; fused parts concatenated)."""
        parts = self.parts(param_name)
        if parts:
            shapes = [self.shape(p) for p in parts]
            if any(sh[:-1] != shapes[0][:-1] for sh in shapes):
                raise LoadError(f"the tensors fused into {param_name} in {self.folder} have shapes {shapes} that do "
                                "not fit together; the checkpoint does not match config.json")
            return shapes[0][:-1] + [sum(sh[-1] for sh in shapes)]
        key = self.hf_key(param_name)
        shape = list(self.files[self.where[key]].entries[key]["shape"])
        return shape[::-1] if self.transposed(param_name) else shape

    def load_tensor(self, param_name: str, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> torch.Tensor:
        """Our parameter `param_name` read from the mmap'd file: a zero-copy view when device/dtype match the file
        (and it is neither transposed nor fused), else one copy written chunk by chunk (`read_into`)."""
        device = torch.device(device)
        view = self.view(param_name, dtype) if device.type == "cpu" else None
        if view is not None:
            return view  # zero copy: the parameter is the file's pages
        dtype = dtype or self._source((self.parts(param_name) or [param_name])[0])[2].dtype
        return self.read_into(param_name, torch.empty(self.shape(param_name), dtype=dtype, device=device))

    def view(self, param_name: str, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """Our parameter as a view of a mapped file if one stores it as we use it (in `dtype`): the checkpoint's own,
        or for a transposed or fused matrix the layout cache's; else None: it needs a copy (`read_into`)."""
        t = self._home(param_name)[2]
        if t is None:
            return None
        return t if dtype is None or dtype == t.dtype else None

    def layout_name(self, param_name: str) -> str | None:
        """The name our parameter has in the layout cache (its stored keys, transposed or not), or None if it is used
        as the checkpoint stores it. Equal names are the same matrix (a tied head and its embedding)."""
        parts = self.parts(param_name)
        if not parts and not self.transposed(param_name):
            return None
        return "+".join(self.hf_key(p) + (".T" if self.transposed(p) else "") for p in parts or [param_name])

    def _home(self, param_name: str) -> tuple[SafetensorsFile | None, str, torch.Tensor | None]:
        """(file, key, tensor) where our parameter is stored as we use it: the checkpoint's file, the layout cache's,
        or (None, "", None) if it is built at every load (transposed or fused, not cached)."""
        lname = self.layout_name(param_name)
        if lname is None:
            return self._source(param_name)
        if self.layout is not None and lname in self.layout.entries:
            cached = self.layout.tensor(lname)
            if list(cached.shape) == self.shape(param_name):       # (an entry not of this checkpoint: rebuilt)
                return self.layout, lname, cached
        return None, "", None

    def populate(self, param_name: str) -> None:
        """Fault in the file pages of a parameter used as a `view`, after checking the file is the one loaded."""
        file, key, _ = self._home(param_name)
        if file is not None:
            self._check_unchanged(param_name, file)
            file.populate(key)

    def drop(self, param_name: str) -> None:
        """The view of a parameter is no longer used: its file pages leave our RSS (they stay in the page cache)."""
        file, key, _ = self._home(param_name)
        if file is not None:
            file.drop_pages(key)

    def read_into(self, param_name: str, out: torch.Tensor) -> torch.Tensor:
        """Copy our parameter into `out` (its shape; any dtype, device or pinned buffer) in one chunked pass that
        converts, un-transposes and assembles fused parts on the way, dropping each source chunk's file pages. A
        matrix the layout cache holds is copied from there, as it is."""
        if self.layout_name(param_name) is not None:
            file, key, cached = self._home(param_name)
            if file is not None and cached is not None:
                self._check_unchanged(param_name, file)
                return _copy_out(file, key, cached, False, out)
        parts = self.parts(param_name)
        at = 0
        for part in parts or [param_name]:
            file, key, src = self._source(part)
            file.check_unchanged()  # a page-in after load: never copy weights out of a file that changed under us
            transposed = self.transposed(part)  # stored (out, in), wanted (in, out) (see layers.py)
            width = src.shape[0] if transposed else src.shape[-1] if src.dim() else 1
            _copy_out(file, key, src, transposed, out[..., at:at + width] if parts else out)
            at += width
        return out

    def _check_unchanged(self, param_name: str, home: SafetensorsFile) -> None:
        """CheckpointChanged if the file our parameter is read from, or for a cached matrix any file it was built
        from, is not the one loaded."""
        home.check_unchanged()
        if home is self.layout:
            for part in self.parts(param_name) or [param_name]:
                self._source(part)[0].check_unchanged()

    def _source(self, param_name: str) -> tuple[SafetensorsFile, str, torch.Tensor]:
        key = self.hf_key(param_name)
        file = self.files[self.where[key]]
        return file, key, file.tensor(key)

    def nbytes(self) -> int:
        """Bytes of tensor data over all files."""
        return sum(f.nbytes for f in self.files.values())

    def paths(self) -> list[Path]:
        """The safetensors files, in order."""
        return [f.path for f in self.files.values()]


COPY_CHUNK = 16 << 20


def _copy_out(file: SafetensorsFile, key: str, src: torch.Tensor, transposed: bool, out: torch.Tensor) -> torch.Tensor:
    """Copy (and convert / move / un-transpose) a stored tensor into `out` chunk by chunk, dropping each chunk's source
    pages, so that peak memory is the result plus one 16 MiB chunk, not the result plus the whole source tensor."""
    if src.dim() == 0 or src.numel() == 0:
        return out.copy_(src)
    if not transposed and out.dtype == src.dtype and out.device.type == "cpu" and out.is_contiguous():
        raw: Any = out.view(torch.uint8).reshape(-1).numpy()              # (a numpy array exposes the buffer)
        file.read_raw(key, memoryview(raw).cast("B"))                     # no conversion: pread
        return out
    row_bytes = src[0].numel() * src.element_size()
    rows = max(1, COPY_CHUNK // max(row_bytes, 1))
    transpose = _c_transpose(src, out) if transposed else None
    for a in range(0, src.shape[0], rows):
        part = src[a:a + rows]
        if transpose is not None:
            transpose(part, out, a)
        elif transposed:
            out[:, a:a + rows].copy_(part.t())
        else:
            out[a:a + rows].copy_(part)
        file.drop_pages(key, a * row_bytes, (a + part.shape[0]) * row_bytes)
    return out


def _c_transpose(src: torch.Tensor, out: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor, int], None] | None:
    """The C kernels' tiled transpose for un-transposing src into out, or None where it does not apply (another
    dtype or device, strided rows, no compiler): torch's copy of a transposed view runs element by element at
    ~1.3 GB/s, the tiled one at ~4-6 (kernels/cpu_transpose.c, lm_transpose)."""
    from llmsh.runtime.kernels import library

    same = out.dtype == src.dtype and src.element_size() in (2, 4)
    if not same or out.device.type != "cpu" or src.dim() != 2 or out.dim() != 2 or out.stride(1) != 1:
        return None
    lib = library()
    if lib is None:
        return None
    size = src.element_size()

    def transpose(part: torch.Tensor, dst: torch.Tensor, first_row: int) -> None:
        part = part.contiguous()                                          # (a view of the mapped file)
        lib.lm_transpose(part.data_ptr(), part.shape[0], part.shape[1], part.stride(0),
                         dst.data_ptr() + first_row * size, dst.stride(0), size)

    return transpose
