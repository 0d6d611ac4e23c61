"""The exception types the runtime raises for user-facing failures (LoadError, and its CheckpointChanged).

Every message is a single line that names the file or setting at fault and says what to do, so the shell can print it
as-is (`llmsh: load: ...`) instead of a traceback.
"""

from __future__ import annotations


class LoadError(Exception):
    """A model could not be loaded; `str(err)` is one human line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class CheckpointChanged(LoadError):
    """A mapped weight file changed on disk after the load; the process using it must fail with this one line."""

    MARK = "on disk since it was loaded"  # in every message: the pager's error callbacks only see the text
