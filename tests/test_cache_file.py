"""The runtime's cache files: safetensors that safetensors itself reads, written in 2 MiB-aligned writes."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from llmsh.runtime.cache_file import CHUNK, AlignedWriter, write_safetensors
from llmsh.runtime.checkpoint import SafetensorsFile


class Recorder:
    """A raw file that keeps each write apart, taking at most `cap` bytes per call (as a signal may cut one)."""

    def __init__(self, cap: int | None = None) -> None:
        self.writes: list[tuple[int, int]] = []        # (offset, length)
        self.data = bytearray()
        self.cap = cap

    def write(self, data: memoryview) -> int:
        n = len(data) if self.cap is None else min(len(data), self.cap)
        self.writes.append((len(self.data), n))
        self.data += data[:n]
        return n


@pytest.mark.parametrize("sizes", [[8, CHUNK * 3 + 5, 17, CHUNK - 25, 3 * CHUNK], [CHUNK], [1, 2, 3], []])
def test_every_write_but_the_last_is_whole_chunks_at_a_chunk_boundary(sizes: list[int]) -> None:
    raw = Recorder()
    out = AlignedWriter(raw)
    pieces = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    for p in pieces:
        out.write(p)
    out.close()
    assert bytes(raw.data) == b"".join(pieces)
    assert all(at % CHUNK == 0 for at, _ in raw.writes)
    assert all(n % CHUNK == 0 for _, n in raw.writes[:-1])


def test_a_short_raw_write_is_continued() -> None:
    raw = Recorder(cap=CHUNK // 3)
    out = AlignedWriter(raw)
    out.write(b"x" * (2 * CHUNK + 7))
    out.close()
    assert bytes(raw.data) == b"x" * (2 * CHUNK + 7)


def test_written_files_read_back_in_safetensors_and_llmsh(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w.q": torch.randint(0, 255, (3000, 1000), dtype=torch.uint8, generator=g),
        "norm": torch.randn(7, generator=g),
        "half": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "t": torch.randn(4, 6, generator=g).t(),            # not contiguous: written in its logical order
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(3, dtype=torch.int64),
    }
    target = tmp_path / "c.safetensors"
    write_safetensors(target, tensors, {"version": "9"})
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]      # no temporary file left
    with safe_open(str(target), "pt") as f:
        assert f.metadata() == {"version": "9"}
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t), name
    ours = SafetensorsFile(target)
    for name, t in tensors.items():
        assert torch.equal(ours.tensor(name), t), name


def test_a_failed_write_leaves_neither_file(tmp_path, monkeypatch) -> None:
    def no_room(self, view):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(AlignedWriter, "_write_all", no_room)
    target = tmp_path / "c.safetensors"
    with pytest.raises(OSError, match="No space"):
        write_safetensors(target, {"c": torch.zeros(2)}, {})
    assert list(tmp_path.iterdir()) == []
