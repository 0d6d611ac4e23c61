"""The real placement policy (llmsh/cluster/placement.py) driven over simulated clusters: how full they get before the
first refusal, how evenly load spreads, and what one decision costs.

A cluster of N nodes with a mix of memory budgets (24/48/80/141 GiB, as GPUs come) receives a stream of loads and
unloads (default 10 000) with sizes drawn from what people run (0.5–8 GiB small models most often, 14–40 GiB
large ones sometimes, 70–140 GiB rarely) and nice values (mostly 0, some batch work at 5–10, some interactive at -5).
Until the first refusal, every load is placed and 30 % of events unload a random resident process; after it, the
stream stops. Reported:
  packed       used / total budget at the first refusal of a load that would fit on an empty node (goal ≥ 0.95)
  spread       the standard deviation of per-node utilisation when half the events are done
  decision_us  the median cost of one `place` call at that cluster size (goal < 1000 µs at 1000 nodes)
Last line: packed=<f> spread=<f> decision_us=<f> nodes=<N>
Usage: python scripts/bench/placement_sim.py [--nodes 1000] [--events 10000] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from llmsh.cluster.placement import NodeState, NoRoom, place  # noqa: E402

GiB = 1 << 30
BUDGETS = (24 * GiB, 48 * GiB, 80 * GiB, 141 * GiB)


def model_size(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.70:
        return int(rng.uniform(0.5, 8) * GiB)
    if r < 0.95:
        return int(rng.uniform(14, 40) * GiB)
    return int(rng.uniform(70, 140) * GiB)


def nice_value(rng: random.Random) -> int:
    r = rng.random()
    return 0 if r < 0.7 else (rng.choice((5, 10)) if r < 0.9 else -5)


def simulate(n_nodes: int, events: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    nodes = [NodeState(f"node-{i}", rng.choice(BUDGETS), 0, load=rng.random() * 0.5) for i in range(n_nodes)]
    by_name = {n.name: n for n in nodes}
    resident: list[tuple[str, int, int]] = []  # (node, bytes, nice)
    costs: list[float] = []
    spread = 0.0
    packed = 0.0
    largest_budget = max(n.budget for n in nodes)
    for i in range(events):
        if i == events // 2:
            spread = statistics.pstdev(n.used / n.budget for n in nodes)
        if resident and rng.random() < 0.3:
            name, size, nice = resident.pop(rng.randrange(len(resident)))
            node = by_name[name]
            node.used -= size
            node.nices.remove(nice)
            continue
        size, nice = model_size(rng), nice_value(rng)
        t0 = time.perf_counter()
        try:
            p = place(nodes, size, nice=nice)
        except NoRoom:
            if size <= largest_budget:
                packed = sum(n.used for n in nodes) / sum(n.budget for n in nodes)
                break
            continue
        finally:
            costs.append(time.perf_counter() - t0)
        node = by_name[p.node]
        node.used += size
        node.nices.append(nice)
        resident.append((p.node, size, nice))
    else:
        packed = sum(n.used for n in nodes) / sum(n.budget for n in nodes)  # never refused: as full as it got
    return {"packed": packed, "spread": spread, "decision_us": statistics.median(costs) * 1e6}


def fill(n_nodes: int, seed: int) -> float:
    """Loads only, until the first refusal: how full the policy packs the cluster."""
    rng = random.Random(seed)
    nodes = [NodeState(f"node-{i}", rng.choice(BUDGETS), 0) for i in range(n_nodes)]
    by_name = {n.name: n for n in nodes}
    while True:
        size, nice = model_size(rng), nice_value(rng)
        try:
            p = place(nodes, size, nice=nice)
        except NoRoom:
            return sum(n.used for n in nodes) / sum(n.budget for n in nodes)
        by_name[p.node].used += size
        by_name[p.node].nices.append(nice)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--events", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    churn = simulate(args.nodes, args.events, args.seed)
    packed = fill(args.nodes, args.seed)
    print(f"{args.nodes} nodes, {args.events} load/unload events: spread of utilisation {churn['spread']:.3f}, "
          f"median decision {churn['decision_us']:.0f} µs; loads only until the first refusal: {packed:.3f} full",
          file=sys.stderr)
    print(f"packed={packed:.3f} spread={churn['spread']:.3f} decision_us={churn['decision_us']:.0f} nodes={args.nodes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
