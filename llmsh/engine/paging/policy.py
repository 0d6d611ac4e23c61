"""Which page to evict: LRU weighted by priority, with scan resistance for the process that is running.

Every page access advances a logical clock (`tick`), so the order is deterministic and testable. A page's score
estimates how far in the future it will be needed again, scaled by its process's priority:
- pages of other processes: their age (ticks since last use) — plain LRU — plus the requester's cycle length, since
  they cannot be needed before the requester's pass is over;
- pages of the process that is asking: the distance to their next use in layer order, which is known exactly
  (a forward pass visits pages 0, 1, …, n-1 and then starts again), so a model larger than its budget keeps the
  pages it will need soonest instead of evicting each one just before it is needed (LRU's worst case);
- a mixture of experts' expert pages are visited only when a token chooses them: their age, as for LRU, so the
  hot experts stay resident and the cold ones go first;
- both multiplied by 1024 / weight(nice) with the CFS weights the scheduler uses, so a nice 10 model's pages age
  about 9x faster than a nice 0 model's and a nice −5 model's pages about 3x slower.
The largest score is evicted first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# Linux CFS prio_to_weight: nice −20 … 19; each step is ~1.25x, nice 0 = 1024.
NICE_WEIGHTS: tuple[int, ...] = (
    88761, 71755, 56483, 46273, 36291, 29154, 23254, 18705, 14949, 11916,
    9548, 7620, 6100, 4904, 3906, 3121, 2501, 1991, 1586, 1277,
    1024, 820, 655, 526, 423, 335, 272, 215, 172, 137,
    110, 87, 70, 56, 45, 36, 29, 23, 18, 15,
)  # fmt: skip


def nice_weight(nice: int) -> int:
    """CFS weight of a nice value (clamped to −20..19)."""
    return NICE_WEIGHTS[max(-20, min(19, int(nice))) + 20]


def age_factor(nice: int) -> float:
    """How much faster than a nice-0 page a page of this priority ages (nice 10 ≈ 9.3, nice −5 ≈ 0.33)."""
    return 1024.0 / nice_weight(nice)


@dataclass(frozen=True)
class Candidate:
    """An evictable page as the policy sees it."""

    key: tuple[int, int]  # (pid, page index)
    nbytes: int
    last_used: int  # tick of the last access
    nice: int
    n_pages: int  # pages in its process (for the cyclic distance)
    idle: bool = False  # its process has no request in flight
    on_demand: bool = False  # a MoE expert: needed when chosen, not at a known point of the pass


def score(c: Candidate, tick: int, requester: tuple[int, int] | None, horizon: int = 0) -> float:
    """Estimated ticks until this page is needed again, weighted by priority (bigger = evict sooner).

    `horizon` is the length of the requester's cycle (its page count): its own pages are all needed within it, while
    another process's page is needed only after the requester's pass at the earliest — so those count from there."""
    if requester is not None and c.key[0] == requester[0]:
        if c.on_demand:  # an expert: the pass may skip it, so recency is the guess (hot experts stay, cold go first)
            return (tick - c.last_used) * age_factor(c.nice)
        distance = (c.key[1] - requester[1]) % c.n_pages
        return distance * age_factor(c.nice)
    return (horizon + tick - c.last_used) * age_factor(c.nice)


def eviction_order(
    candidates: Iterable[Candidate],
    tick: int,
    requester: tuple[int, int] | None = None,
    *,
    horizon: int = 0,
    idle_first: bool = False,
) -> list[Candidate]:
    """Candidates sorted best victim first; with idle_first, pages of idle processes go before any busy one."""
    return sorted(
        candidates,
        key=lambda c: ((1 if (idle_first and c.idle) else 0), score(c, tick, requester, horizon), c.nbytes),
        reverse=True,
    )
