"""A page source over plain tensors, for the pager's unit tests: a 'model' of N linear pages whose forward calls the
page hook before each page and fails loudly if the page is not materialised."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from llmsh.engine.paging.sources import PageInfo


class TensorSource:
    """Pages of real tensors; `disk` is the home copy, `live` what is materialised now."""

    def __init__(self, sizes: list[int], *, device: str = "cpu", seed: int = 0, dim: int = 8) -> None:
        g = torch.Generator().manual_seed(seed)
        self.device = device
        # each page: a (rows, dim) float32 matrix; rows chosen so the page has `size` bytes
        self.disk = [{"w": torch.randn(max(1, s // (4 * dim)), dim, generator=g)} for s in sizes]
        self.live: list[dict[str, torch.Tensor] | None] = [dict(d) for d in self.disk]
        self.hook: Callable[[int], None] | None = None
        self.reads = 0
        self.reused = 0  # reads that filled an evicted page's buffers
        self.fail_next_read: BaseException | None = None
        self.read_delay = 0.0
        self.lock = threading.Lock()

    def page_infos(self) -> list[PageInfo]:
        return [PageInfo(f"block.{i}", d["w"].numel() * 4) for i, d in enumerate(self.disk)]

    def layout(self, index: int) -> tuple:
        return tuple((tuple(v.shape), tuple(v.stride()), str(v.dtype)) for v in self.disk[index].values())

    def read(self, index: int, device: str, *, pin: bool = False,
             out: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        if out is not None:
            self.reused += 1
            for buf, v in zip(out, self.disk[index].values()):
                buf.copy_(v)
            return dict(zip(self.disk[index], out))
        if self.fail_next_read is not None:
            exc, self.fail_next_read = self.fail_next_read, None
            raise exc
        if self.read_delay:
            import time

            time.sleep(self.read_delay)
        with self.lock:
            self.reads += 1
        return {k: v.clone() for k, v in self.disk[index].items()}

    def install(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        assert self.live[index] is None, f"page {index} installed twice"
        self.live[index] = tensors

    def release(self, index: int) -> None:
        assert self.live[index] is not None, f"page {index} released twice"
        self.live[index] = None

    def is_resident(self, index: int) -> bool:
        return self.live[index] is not None

    def set_hook(self, fn: Callable[[int], None] | None) -> None:
        self.hook = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run every page in order, like a model: hook, then compute with the page's weights."""
        for i in range(len(self.disk)):
            if self.hook is not None:
                self.hook(i)
            page = self.live[i]
            assert page is not None, f"page {i} not resident when it runs"
            x = torch.tanh(page["w"].sum(0) * 0.1 + x)
        return x
