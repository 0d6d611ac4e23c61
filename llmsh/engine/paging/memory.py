"""The pager's dealings with the allocators under it: giving freed pages back to the OS, recognising an
out-of-memory failure, and emptying CUDA's cache after one.

Kept apart from the page table because these talk to glibc and torch's allocator, not to the pager's state; torch is
only looked up if the engine already imported it.
"""

from __future__ import annotations

import sys

_MALLOC_TUNED = False


def return_freed_memory_to_os(threshold: int = 1 << 20) -> bool:
    """Make glibc serve allocations of at least `threshold` bytes with mmap, so a released page's memory goes back to
    the OS at once. Without it glibc raises its mmap threshold after the first large free (up to 32 MiB) and keeps
    later pages on its heap, where freeing them does not lower the process's RSS. Best effort; False if not glibc."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        M_MMAP_THRESHOLD = -3
        _MALLOC_TUNED = bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False
    return _MALLOC_TUNED


def is_oom(exc: BaseException) -> bool:
    """Whether a failed read ran out of memory (host MemoryError, CUDA OutOfMemoryError, or an allocator's message)."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def recover_oom(device: str) -> None:
    """After an out-of-memory read on a CUDA device, hand the cached blocks back so the next read can get them."""
    torch = sys.modules.get("torch")
    if device.startswith("cuda") and torch is not None:
        torch.cuda.empty_cache()
