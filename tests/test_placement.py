"""The placement policy alone (llmsh/cluster/placement.py): pure, fast, no Ray."""

from __future__ import annotations

import pytest

from llmsh.cluster.placement import NodeState, NoRoom, place

GiB = 1 << 30


def nodes() -> list[NodeState]:
    return [NodeState("a", 16 * GiB, 10 * GiB), NodeState("b", 16 * GiB, 2 * GiB), NodeState("c", 8 * GiB, 1 * GiB)]


def test_best_fit_packs_the_smallest_hole_that_fits() -> None:
    assert place(nodes(), 5 * GiB).node == "a"  # 6 GiB free: the tightest fit
    assert place(nodes(), 7 * GiB).node == "c"  # a cannot take it; c (7 GiB free) fits exactly
    assert place(nodes(), 12 * GiB).node == "b"


def test_load_queue_and_priority_break_near_ties() -> None:
    ns = [NodeState("x", 16 * GiB, 8 * GiB, load=0.9, queued=20, nices=[-5, -5]), NodeState("y", 16 * GiB, 8 * GiB)]
    assert place(ns, 2 * GiB, nice=-5).node == "y"
    ns[0].load, ns[0].queued, ns[0].nices = 0.0, 0, []
    assert place(ns, 2 * GiB).node == "x"  # equal in every way: the name decides, so choices are repeatable


def test_node_override_and_refusals_say_why() -> None:
    p = place(nodes(), 1 * GiB, node="b", pid=4)
    assert p.node == "b" and p.reason.startswith("placed pid 4 on b (--node): 13.0 GiB free after")
    with pytest.raises(NoRoom, match="node a has 6.0 GiB free, 7.0 GiB needed"):
        place(nodes(), 7 * GiB, node="a")
    with pytest.raises(NoRoom, match="no node named 'z'"):
        place(nodes(), 1, node="z")
    down = nodes()
    down[1].up = False
    with pytest.raises(NoRoom, match="node b is down"):
        place(down, 1, node="b")
    with pytest.raises(NoRoom, match=r"no node has room for 15.0 GiB \(the most free is 14.0 GiB on b\)"):
        place(nodes(), 15 * GiB)
    unreadable = nodes()
    for n in unreadable:
        n.readable = n.name == "a"
    assert place(unreadable, 1 * GiB).node == "a"


def test_reason_names_the_numbers() -> None:
    p = place(nodes(), 5 * GiB, pid=7)
    assert p.reason == "placed pid 7 on a: 1.0 GiB free after, load 0.00, 0 queued"
