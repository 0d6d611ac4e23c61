"""The llmsh engine as a Ray actor: one per Ray node, pinned there, restarted by Ray (`max_restarts=-1`) if it dies.

The actor is only a carrier: its constructor starts the ordinary engine service (`llmsh.engine.__main__.serve`) on a
thread with its own event loop, which connects a DEALER to the front's ROUTER over TCP as a CurveZMQ client (the
front issued the key pair and sent its own public key), says `hello`, and serves the same messages as a local
engine. Ray runs the constructor again after a restart, so a restarted engine says hello again by itself and the
front restores that node's processes on it. Nothing travels through Ray's object store but these arguments.

Imported on the Ray workers (and by the front only to create the actors); it needs the extra `llmsh[ray]`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any

import ray

from llmsh.engine.threads import set_openmp_spin

log = logging.getLogger("llmsh.cluster.actor")


@ray.remote(num_cpus=0, max_restarts=-1)
class EngineActor:
    """One llmsh engine on this Ray node (see the module docstring)."""

    def __init__(self, url: str, node: str, budget: str | None, curve: dict[str, str], heartbeat_s: float,
                 threads: int) -> None:
        # Before torch is imported by the engine: idle OpenMP workers spin briefly (see llmsh.engine.threads), and the
        # engine uses the CPUs Ray says this node has (Ray sets OMP_NUM_THREADS=1 for actors without CPUs).
        set_openmp_spin()
        if threads > 0:
            os.environ.setdefault("LLMSH_TORCH_THREADS", str(threads))
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s engine[{os.getpid()}] %(levelname)s %(name)s: %(message)s")
        self.args: dict[str, Any] = {"url": url, "node": node, "budget": budget, "curve": curve,
                                     "heartbeat_s": heartbeat_s}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_event: asyncio.Event | None = None
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, name="llmsh-engine", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from llmsh.engine.__main__ import serve
        from llmsh.engine.paging.budget import parse_budget

        a = self.args

        async def main() -> int:
            self.loop = asyncio.get_running_loop()
            self.stop_event = asyncio.Event()
            self.started.set()
            return await serve(a["url"], a["node"], parse_budget(a["budget"]), curve=a["curve"],
                               heartbeat_s=a["heartbeat_s"], address=ray.util.get_node_ip_address(),
                               report_load=True, stop=self.stop_event)

        try:
            asyncio.run(main())
        except Exception:  # the front sees the engine's silence and says so; the details are in Ray's worker log
            log.exception("the llmsh engine on node %s failed", a["node"])

    def pid(self) -> int:
        """The engine's OS process id (tests kill it to see Ray restart the actor)."""
        return os.getpid()

    def stop(self) -> None:
        """End the engine's service (the front is going away)."""
        self.started.wait(10)
        if self.loop is not None and self.stop_event is not None:
            self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(10)
