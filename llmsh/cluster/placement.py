"""Where a new process goes: one small, pure placement policy over the nodes' state (no Ray, no I/O).

The policy, in order:
1. `--node NAME` wins; a node that is down or lacks room is refused with the reason (never silently moved).
2. Only nodes that are up and have room for the weights on a device of the asked kind are candidates.
3. Among them, best fit by memory (the smallest budget left after the load, as a fraction of the node's budget), so
   large holes stay free for large models and the cluster packs full before it refuses; then the node's load
   (CPU/GPU utilisation), its queued requests, and the CFS weight of what already runs there at a priority at least
   as high as the new process's (a nice -5 model should not land beside other nice -5 work when an idle node fits).

`place` returns a `Placement` whose `reason` is the line `dmesg` shows
(`placed pid 4 on node-b: 6.1 GiB free after, load 0.20, 3 queued`), or raises `NoRoom` with one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmsh.fmt import format_bytes
from llmsh.protocol.procs import cfs_weight

# Weights of the score terms (lower score wins). Memory fit dominates: a node's load and queue move a choice only
# between nodes whose fit is within a few percent of each other, so packing stays tight (see placement_sim.py).
W_FIT, W_LOAD, W_QUEUE, W_CONTENTION = 1.0, 0.05, 0.02, 0.03


@dataclass
class NodeState:
    """What the front knows of one node (from its engine's heartbeat)."""

    name: str
    budget: int  # bytes the pager may use on the node's device of this kind
    used: int  # bytes in use there
    load: float = 0.0  # utilisation 0..1
    queued: int = 0  # requests waiting for a batch slot
    nices: list[int] = field(default_factory=list)  # nice values of the processes already there
    up: bool = True
    readable: bool = True  # the checkpoint's path can be read there

    @property
    def free(self) -> int:
        return max(0, self.budget - self.used)


@dataclass
class Placement:
    node: str
    reason: str


class NoRoom(Exception):
    """No node can take the process; the message says why, in one line."""


def score(node: NodeState, need: int, nice: int) -> float:
    """Lower is better; only for nodes where `need` fits."""
    fit = (node.free - need) / node.budget if node.budget else 1.0
    contention = sum(cfs_weight(n) for n in node.nices if n <= nice) / cfs_weight(nice)
    return (W_FIT * fit + W_LOAD * min(max(node.load, 0.0), 1.0) + W_QUEUE * node.queued / (node.queued + 8)
            + W_CONTENTION * contention / (contention + 4))


def place(nodes: list[NodeState], need: int, *, nice: int = 0, node: str | None = None,
          pid: int | None = None) -> Placement:
    """The node for a process of `need` bytes at `nice` (see the module docstring); NoRoom otherwise."""
    who = f"pid {pid}" if pid is not None else "the process"
    if node is not None:
        chosen = next((n for n in nodes if n.name == node), None)
        if chosen is None:
            raise NoRoom(f"no node named {node!r}; see 'nodes'")
        if not chosen.up:
            raise NoRoom(f"node {node} is down; see 'nodes'")
        if not chosen.readable:
            raise NoRoom(f"node {node} cannot read the checkpoint (give a path on a filesystem it shares)")
        if chosen.free < need:
            raise NoRoom(f"node {node} has {format_bytes(chosen.free)} free, {format_bytes(need)} needed; "
                         "free memory there or leave out --node")
        return Placement(node, f"placed {who} on {node} (--node): {format_bytes(chosen.free - need)} free after, "
                               f"load {chosen.load:.2f}")
    best: NodeState | None = None
    best_score = 0.0
    for n in nodes:
        if not (n.up and n.readable and n.free >= need):
            continue
        s = score(n, need, nice)
        if best is None or s < best_score or (s == best_score and n.name < best.name):
            best, best_score = n, s
    if best is None:
        up = [n for n in nodes if n.up]
        if not up:
            raise NoRoom("no node is up; see 'nodes'")
        largest = max(up, key=lambda n: n.free)
        raise NoRoom(f"no node has room for {format_bytes(need)} (the most free is {format_bytes(largest.free)} on "
                     f"{largest.name}); kill or page out a process, or add a node")
    return Placement(best.name, f"placed {who} on {best.name}: {format_bytes(best.free - need)} free after, "
                                f"load {best.load:.2f}, {best.queued} queued")
