"""The one exception type the runtime raises for user-facing failures.

Every message is a single line that names the file or setting at fault and says what to do, so the shell can print it
as-is (`llmsh: load: ...`) instead of a traceback.
"""

from __future__ import annotations


class LoadError(Exception):
    """A model could not be loaded; `str(err)` is one human line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))
