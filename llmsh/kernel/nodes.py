"""The front's nodes: one engine link per node (name → link), where a new process goes, and what `nodes` shows.

On one machine there is one node, the local engine (spawned on first use, as before), and placement is not asked:
nothing is probed, nothing changes. With Ray (`llmsh.cluster.ray_engines`) there is one link per Ray node; a `load`
asks every node that is up for its free budget, its load and whether it can read the checkpoint (`probe`), and the
pure policy `llmsh.cluster.placement.place` chooses; the reason goes to dmesg. Loads placed but not yet finished are
counted against their node, so loads started together do not all pick the same hole.

A node is `up` while its engine answers (heartbeats), `lost` once it went away (the front marks its processes lost),
and `idle` before its engine started. Nothing here imports Ray or torch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from llmsh.cluster.placement import NodeState, NoRoom, place
from llmsh.fmt import format_bytes
from llmsh.kernel.engines import EngineLink
from llmsh.kernel.errors import KernelError

log = logging.getLogger("llmsh.kernel.nodes")
PROBE_TIMEOUT_S = 10.0  # a node that does not answer a probe in this time is left out of this placement


class UnknownNode(KernelError):
    ename = "UnknownNode"


class Discovery(Protocol):
    """Finds the nodes of a cluster and makes their links (Ray: `llmsh.cluster.ray_engines.RayCluster`)."""

    async def refresh(self, nodes: Nodes) -> None: ...

    def node_alive(self, name: str) -> bool | None: ...

    async def close(self) -> None: ...


@dataclass
class Choice:
    """Where a load goes and why (the dmesg line), and the bytes reserved there until the load ends."""

    node: str
    reason: str
    need: int = 0


class Nodes:
    """Node name → engine link; placement; node rows."""

    def __init__(self, links: list[EngineLink] | None = None, discovery: Discovery | None = None) -> None:
        self.links: dict[str, EngineLink] = {link.node: link for link in links or []}
        self.discovery = discovery
        self.on_add: list[Callable[[EngineLink], None]] = []  # the front wires each new link's callbacks
        self._reserved: dict[str, int] = {}
        self._placing = asyncio.Lock()

    def __iter__(self) -> Iterator[EngineLink]:
        return iter(list(self.links.values()))

    def add(self, link: EngineLink) -> None:
        """A new node's link (discovery calls this; the front sets its callbacks through `on_add`)."""
        self.links[link.node] = link
        for fn in list(self.on_add):
            fn(link)

    @property
    def names(self) -> list[str]:
        return sorted(self.links)

    @property
    def single(self) -> EngineLink | None:
        """The one link of a kernel without a cluster (placement is then never asked)."""
        if self.discovery is None and len(self.links) == 1:
            return next(iter(self.links.values()))
        return None

    def link(self, name: str) -> EngineLink:
        """The link of node `name`; UnknownNode (one line listing the nodes) otherwise."""
        link = self.links.get(name)
        if link is None:
            raise UnknownNode(f"no node named {name!r}; the nodes are {', '.join(self.names) or 'none'} (see 'nodes')")
        return link

    def is_lost(self, name: str) -> bool:
        link = self.links.get(name)
        return link is not None and bool(link.lost)

    async def refresh(self) -> None:
        """Look for nodes that joined or left the cluster (nothing to do on one machine); start the new ones."""
        if self.discovery is not None:
            before = set(self.links)
            await self.discovery.refresh(self)
            if set(self.links) - before:
                await self.start_all()

    async def start_all(self) -> None:
        """Start every node's engine that is not running (at a cluster kernel's start: `nodes` shows them up)."""
        links = [link for link in self if not link.running and not link.lost]
        results = await asyncio.gather(*(link.ensure_started() for link in links), return_exceptions=True)
        for link, r in zip(links, results, strict=True):
            if isinstance(r, BaseException):
                log.error("the engine of node %s did not start: %s", link.node, r)

    # ---- placement ----------------------------------------------------------------------------------------------
    async def choose(self, path: str, *, device: str, nice: int, node: str | None, pid: int) -> Choice:
        """The node for a new process (see the module docstring); KernelError with one line when none fits."""
        single = self.single
        if single is not None:
            if node is not None and node != single.node:
                self.link(node)  # raises, naming the nodes
            return Choice(single.node, "")
        await self.refresh()
        if node is not None:
            self.link(node)
        async with self._placing:
            states, need, why = await self._probe(path, device, only=node)
            unreadable = [s for s in states if not s.readable and s.up]
            if node is not None and unreadable:
                raise KernelError(f"node {node} cannot read the checkpoint: {why[node]} (give a path that "
                                  "every node can read: a shared filesystem, or the same path on each)", ename="LoadError")
            try:
                chosen = place(states, need, nice=nice, node=node, pid=pid)
            except NoRoom as e:
                readable = [s for s in states if s.up and s.readable and s.budget > 0]  # budget 0: no such device
                if node is not None or not readable:
                    if not readable and unreadable:
                        first = unreadable[0].name
                        raise KernelError(f"no node can read the checkpoint ({first}: {why[first]})",
                                          ename="LoadError") from None
                    raise KernelError(str(e), ename="LoadError") from None
                roomiest = max(readable, key=lambda s: (s.free, s.name))  # the pager pages what does not fit
                chosen_name = roomiest.name
                reason = (f"placed pid {pid} on {chosen_name}: {format_bytes(roomiest.free)} free of "
                          f"{format_bytes(need)} needed (the rest is paged), load {roomiest.load:.2f}")
                self._reserved[chosen_name] = self._reserved.get(chosen_name, 0) + need
                return Choice(chosen_name, reason, need)
            self._reserved[chosen.node] = self._reserved.get(chosen.node, 0) + need
            return Choice(chosen.node, chosen.reason, need)

    def release(self, choice: Choice) -> None:
        """A placed load has ended (loaded or failed): its node's engine now counts it itself."""
        if choice.need:
            self._reserved[choice.node] = max(0, self._reserved.get(choice.node, 0) - choice.need)

    async def _probe(self, path: str, device: str, only: str | None) -> tuple[list[NodeState], int, dict[str, str]]:
        """Ask each node (or just `only`) about the checkpoint, its budget and its load, all at once; returns the
        nodes' states, the checkpoint's size (the largest any node saw) and why a node cannot read it."""
        links = [self.links[only]] if only is not None else list(self.links.values())
        answers = await asyncio.gather(*(self._probe_one(link, path, device) for link in links))
        why: dict[str, str] = {}
        need = 0
        states = []
        for link, a in zip(links, answers, strict=True):
            if a is None:
                states.append(NodeState(link.node, budget=0, used=0, up=False))
                continue
            why[link.node] = str(a.get("why") or "")
            need = max(need, int(a.get("bytes") or 0))
            states.append(NodeState(link.node, budget=int(a["budget"]), used=int(a["used"]) + self._reserved.get(link.node, 0),
                                    load=float(a.get("load") or 0.0), queued=int(a.get("queued") or 0),
                                    nices=[int(n) for n in a.get("nices") or []], readable=bool(a.get("readable"))))
        return states, need, why

    async def _probe_one(self, link: EngineLink, path: str, device: str) -> dict[str, Any] | None:
        if link.lost:
            return None
        try:
            return dict(await asyncio.wait_for(link.request("probe", path=path, device=device), PROBE_TIMEOUT_S))
        except (KernelError, TimeoutError) as e:
            log.warning("node %s did not answer the placement probe: %s", link.node, e)
            return None

    # ---- what `nodes` and the dashboard show ---------------------------------------------------------------------
    def engine_row(self, link: EngineLink, procs: int) -> dict[str, Any]:
        """The engine side of a node row: state, address, engine pid, heartbeat age, budget in use, tok/s."""
        beat = link.beat
        lost = link.lost
        state = "lost" if lost else ("up" if link.running else "idle")
        alive = self.discovery.node_alive(link.node) if self.discovery is not None else None
        budget = beat.get("budget") or {}
        return {
            "state": state, "reason": lost, "address": link.address, "engine_pid": link.engine_pid,
            "heartbeat_age_s": round(time.monotonic() - link.last_seen, 1) if link.last_seen else None,
            "budget": budget, "budget_used": sum(int(b.get("used", 0)) for b in budget.values()),
            "budget_total": sum(int(b.get("budget", 0)) for b in budget.values()),
            "procs": procs, "tok_s": float(beat.get("tok_s") or 0.0), "queued": int(beat.get("queued") or 0),
            "ray_alive": alive,
        }

    def node_loads(self, procs_by_node: dict[str, int] | None = None) -> list[dict[str, Any]]:
        """One telemetry node row per remote engine: its node's load (from its heartbeats) and its engine row."""
        counts = procs_by_node or {}
        rows = []
        for link in self:
            if not link.remote:
                continue
            load = dict(link.beat.get("load") or {})
            row = {"name": link.node, "local": False, "drivers": load.get("drivers", []),
                   "cpu": load.get("cpu") or {}, "gpus": load.get("gpus") or [], "torch": load.get("torch"),
                   "memory": load.get("memory") or []}
            row.update(self.engine_row(link, counts.get(link.node, int(link.beat.get("procs") or 0))))
            rows.append(row)
        return rows

    async def close(self) -> None:
        """Stop every engine (each link's polite shutdown, then harder), then the discovery service."""
        await asyncio.gather(*(link.close() for link in self), return_exceptions=True)
        if self.discovery is not None:
            await self.discovery.close()
