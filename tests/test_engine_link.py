"""The front's link to an engine process (kernel/engines.py), on a real ROUTER socket with no engine behind it."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

import pytest

from llmsh.kernel.engines import EngineDied, EngineLink


class Unstarted(EngineLink):
    """A link whose socket is bound but whose engine never starts (as in the moment after an engine died)."""

    async def ensure_started(self) -> None:
        if self._sock is None:
            self._sock = self._bind()


def test_a_request_to_an_engine_that_is_not_connected_fails_at_once(tmp_path: Path) -> None:
    """ROUTER_MANDATORY makes such a send fail, and the asyncio socket puts that failure in the future it returns:
    the link reads it there. Unread, the request waited for a reply that could not come, and the failed future was
    logged as "Future exception was never retrieved" (twice in every `kernel stop`'s log)."""
    unread: list[Any] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: unread.append(ctx))
        link = Unstarted("test", tmp_path / "engine.sock", tmp_path / "engine.log")
        try:
            with pytest.raises(EngineDied, match="engine test is not running"):
                await asyncio.wait_for(link.request("shutdown"), 5)
        finally:
            await link.close()
        gc.collect()

    asyncio.run(main())
    assert not unread, unread
