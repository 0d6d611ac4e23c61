"""Copying a page's tensors from its pinned host copy to a CUDA device on a side stream, and making the compute stream
wait for that copy when the page is installed.

Kept apart from the page table: this is the only part of the pager that talks to CUDA streams and events, and it
holds no table state (only one side stream per device, created on first use).
"""

from __future__ import annotations

from typing import Any

from llmsh.engine.paging.table import Entry


class DeviceCopies:
    """One side stream per CUDA device, for host → device page copies that overlap compute."""

    def __init__(self) -> None:
        self._streams: dict[str, Any] = {}

    def _side_stream(self, device: str) -> Any:
        import torch

        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def to_device(self, e: Entry, host: dict[str, Any]) -> dict[str, Any]:
        """Start copying `host` to e's device on the side stream; e.ready_event marks when the copy is done."""
        import torch

        stream = self._side_stream(e.proc.device)
        with torch.cuda.stream(stream):
            moved = {k: v.to(e.proc.device, non_blocking=True) for k, v in host.items()}
            event = torch.cuda.Event()
            event.record(stream)
        e.ready_event = event
        return moved

    @staticmethod
    def wait_for_copy(e: Entry, tensors: dict[str, Any]) -> None:
        """Before e's tensors are used: the compute stream waits for the side-stream copy, not the CPU."""
        if e.ready_event is None:
            return
        import torch

        current = torch.cuda.current_stream(e.proc.device)
        current.wait_event(e.ready_event)
        for t in tensors.values():
            t.record_stream(current)
        e.ready_event = None
