"""`python -m llmsh.engine --connect URL`: one engine process, spoken to by the front over ZeroMQ.

The front starts this as its child (one machine), or a Ray actor runs `serve` on another node (`llmsh.cluster`).
The engine connects a DEALER socket (routing id = its node name) to the front's ROUTER, says `hello`, then serves
requests until the front says `shutdown`, closes the socket, or dies (Linux: the parent-death signal; elsewhere: the
front's socket going away ends the engine at its next send). A `heartbeat` every few seconds tells the front it is
alive (and, from another machine, that node's load). Across machines the socket is a CurveZMQ client.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import socket
import sys
import threading
from typing import Any

import zmq
import zmq.asyncio

from llmsh.engine.threads import set_openmp_spin
from llmsh.protocol import engine as wire

log = logging.getLogger("llmsh.engine")
HEARTBEAT_S = 2.0  # the front counts a node lost after several silent periods (llmsh.kernel.nodes.LOST_AFTER_S)


def _preimport() -> None:
    try:
        import llmsh.runtime.model  # noqa: F401  (torch comes with it)
    except Exception:  # the load that needs it reports the error
        log.debug("pre-import of the runtime failed", exc_info=True)


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGTERM us when the front exits (however it exits), so no engine outlives its front."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the front died before prctl took effect
        os._exit(0)


async def serve(url: str, node: str, budgets: dict[str, int], *, curve: dict[str, str] | None = None,
                heartbeat_s: float = HEARTBEAT_S, address: str = "", report_load: bool = False,
                stop: asyncio.Event | None = None) -> int:
    """Connect to the front and answer its requests until shutdown (or until `stop` is set by whoever runs us).

    `curve`: {"serverkey", "publickey", "secretkey"} (Z85) when the front is on another machine; `report_load`:
    put this node's driver sample in each heartbeat (the front cannot sample another machine itself)."""
    from llmsh.engine.service import EngineError, EngineService

    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.ROUTING_ID, node.encode())
    if curve is not None:  # the front is the CurveZMQ server; it knows our public key (it issued the pair)
        sock.curve_serverkey = curve["serverkey"].encode("ascii")
        sock.curve_publickey = curve["publickey"].encode("ascii")
        sock.curve_secretkey = curve["secretkey"].encode("ascii")
        sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)  # a front that vanished without closing TCP is noticed
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10000)
    sock.connect(url)
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()
    stop = stop or asyncio.Event()

    def send_now(frame: bytes) -> None:
        sock.send(frame)  # frames: [message]; the front's ROUTER prepends our routing id

    def send(msg_type: str, **fields: Any) -> None:
        frame = wire.encode(msg_type, **fields)
        if threading.get_ident() == loop_thread:
            send_now(frame)
        else:
            try:
                loop.call_soon_threadsafe(send_now, frame)
            except RuntimeError:  # the loop has closed: we are shutting down
                pass

    service = EngineService(budgets, send, node=node)
    service.start()
    tasks: set[asyncio.Task] = set()

    async def run(msg: dict[str, Any]) -> None:
        try:
            data = await service.handle(msg)
            send("reply", id=msg["id"], ok=True, data=data)
        except EngineError as e:
            send("reply", id=msg["id"], ok=False, ename=e.ename, error=str(e), kind=e.kind)
        except asyncio.CancelledError:
            send("reply", id=msg["id"], ok=False, ename="Cancelled", error="cancelled", kind="cancelled")
        except Exception as e:  # a bug in a handler fails that request only
            log.exception("request %s failed", msg.get("type"))
            send("reply", id=msg["id"], ok=False, ename="InternalError", error=f"{type(e).__name__}: {e}", kind="failed")
        if msg["type"] == "shutdown":
            stop.set()

    # a heartbeat first: the front then knows this engine's budget as soon as the hello shows it "up" (`nodes` had
    # no budget for a node in the seconds before its first timed beat)
    send("heartbeat", node=node, pid=os.getpid(), **service.heartbeat_fields())
    send("hello", node=node, pid=os.getpid(), devices=["cpu"], address=address)
    # Import torch and the runtime now, on a thread: a restarted engine is ready for its restored processes sooner
    # (the import is seconds on a busy machine); a load arriving meanwhile waits on the import lock.
    threading.Thread(target=_preimport, name="llmsh-preimport", daemon=True).start()

    async def receive() -> None:
        """The front's requests, each run as its own task."""
        while True:
            frame = await sock.recv()
            try:
                msg = wire.decode(frame)
            except wire.WireError as e:
                log.warning("dropped a frame from the front: %s", e)
                continue
            if msg["type"] not in wire.REQUESTS:
                log.warning("dropped a %s message: the front sends requests only", msg["type"])
                continue
            task = loop.create_task(run(msg), name=f"{msg['type']} {msg['id']}")
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def beat() -> None:
        """A heartbeat every `heartbeat_s`: the budget in use, processes, rates (and the node's load if asked)."""
        drivers = None
        if report_load:
            from llmsh.drivers import Drivers

            drivers = await asyncio.to_thread(Drivers, os.getpid(), node)
        while True:                 # the first with the node's load at once: the front has had none till now
            fields = service.heartbeat_fields()
            if drivers is not None:
                fields["load"] = dict(await asyncio.to_thread(drivers.sample), local=False)
            send("heartbeat", node=node, pid=os.getpid(), **fields)
            await asyncio.sleep(heartbeat_s)

    receiver = loop.create_task(receive())
    beater = loop.create_task(beat()) if heartbeat_s > 0 else None
    await stop.wait()
    receiver.cancel()
    if beater is not None:
        beater.cancel()
    for t in list(tasks):
        t.cancel()
    service.close()
    sock.close(linger=1000)
    ctx.term()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmsh.engine", description="one llmsh engine (started by the front)")
    p.add_argument("--connect", required=True, help="the front's engine socket URL")
    p.add_argument("--node", default=socket.gethostname(), help="node name (also the routing id)")
    p.add_argument("--mem-budget", default=None, help="as for 'llmsh kernel start'")
    p.add_argument("--parent", type=int, default=os.getppid(), help="the front's PID")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s engine[{os.getpid()}] %(levelname)s %(name)s: %(message)s")
    # Before torch (and its OpenMP runtime) is imported: idle OpenMP workers spin only briefly, and each engine
    # thread gives cores back while other programs need them (threads.py). The user's own OpenMP setting wins.
    set_openmp_spin()
    _die_with_parent(args.parent)
    from llmsh.engine.paging.budget import BudgetError, parse_budget

    try:
        budgets = parse_budget(args.mem_budget)
    except BudgetError as e:
        print(f"llmsh: engine: --mem-budget: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # the front is gone or stopping: nothing to save here
    return asyncio.run(serve(args.connect, args.node, budgets))


if __name__ == "__main__":
    sys.exit(main())
