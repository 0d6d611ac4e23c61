"""The pager's vocabulary, shared by its modules (core, kv, prefetch): page states and its errors."""

from __future__ import annotations

OUT, LOADING, STAGED, IN = "out", "loading", "staged", "in"  # where a page is: on disk, being read, on the host, in


class PagerError(Exception):
    """A one-line error about memory: what is needed, what holds memory, what to do."""


class PageInError(PagerError):
    """Reading a page failed (out of memory, I/O); the request that needed it fails, the pager goes on."""
