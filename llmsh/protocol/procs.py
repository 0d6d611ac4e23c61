"""The vocabulary of processes that the front and the engines share: states, transitions, signals, CFS weights.

Pure definitions (no torch, no threads): the front's process table (`llmsh.kernel.table`) and the engine's run-time
records (`llmsh.engine.process`) both speak in these terms, and they cross the front ↔ engine wire as their values.
"""

from __future__ import annotations

import enum


class ProcState(str, enum.Enum):
    """The states a process row can show; the values are what `ps` prints."""

    LOADING = "loading"
    READY = "ready"
    RUNNING = "running"
    STOPPED = "stopped"
    PAGED_OUT = "paged-out"
    EXITING = "exiting"
    FAILED = "failed"
    LOST = "lost"  # its node went away (machine down, engine actor lost); it comes back if the node's engine does


S = ProcState
# Allowed transitions; anything else is a bug in the caller (the commands check `can_signal` first and say why).
TRANSITIONS: dict[ProcState, frozenset[ProcState]] = {
    S.LOADING: frozenset({S.READY, S.FAILED, S.LOST}),
    S.READY: frozenset({S.RUNNING, S.STOPPED, S.PAGED_OUT, S.EXITING, S.FAILED, S.LOST}),
    S.RUNNING: frozenset({S.READY, S.STOPPED, S.PAGED_OUT, S.EXITING, S.FAILED, S.LOST}),
    S.PAGED_OUT: frozenset({S.READY, S.RUNNING, S.STOPPED, S.EXITING, S.FAILED, S.LOST}),
    S.STOPPED: frozenset({S.READY, S.RUNNING, S.PAGED_OUT, S.EXITING, S.FAILED, S.LOST}),
    S.EXITING: frozenset({S.FAILED, S.LOST}),
    S.FAILED: frozenset(),
    S.LOST: frozenset({S.READY, S.PAGED_OUT, S.STOPPED, S.FAILED}),  # the front's alone: no engine holds a lost one
}
RUNNABLE = frozenset({S.READY, S.RUNNING, S.PAGED_OUT, S.EXITING})  # states the scheduler may step

SIGNALS = ("TERM", "KILL", "STOP", "CONT")
SIGNAL_NUMBERS = {"15": "TERM", "9": "KILL", "19": "STOP", "18": "CONT"}  # Linux numbering


class StateError(Exception):
    """A signal or transition that the process's current state cannot take (one human line)."""


class ExitHow(str, enum.Enum):
    """How a process left the table, recorded like jupyter_client's shutdown status (which step ended it)."""

    TERM = "term"  # finished its accepted requests and unloaded
    KILL_AFTER_TERM = "kill-after-term"  # TERM's grace period ran out, escalated to KILL
    KILL = "kill"  # aborted at once
    REAPED = "reaped"  # a failed entry, removed by `ps` or `kill`


def cfs_weight(nice: int) -> int:
    """The Linux CFS load weight of a nice value (kernel/sched/core.c `sched_prio_to_weight`)."""
    if not -20 <= nice <= 19:
        raise ValueError(f"nice value {nice} out of range -20..19")
    return SCHED_PRIO_TO_WEIGHT[nice + 20]


# Each nice step is ~1.25x the CPU share of the next: nice 0 = 1024, nice 5 = 335, nice -20 = 88761, nice 19 = 15.
SCHED_PRIO_TO_WEIGHT: tuple[int, ...] = (
    88761, 71755, 56483, 46273, 36291,
    29154, 23254, 18705, 14949, 11916,
    9548, 7620, 6100, 4904, 3906,
    3121, 2501, 1991, 1586, 1277,
    1024, 820, 655, 526, 423,
    335, 272, 215, 172, 137,
    110, 87, 70, 56, 45,
    36, 29, 23, 18, 15,
)  # fmt: skip


def parse_signal(text: str) -> str:
    """`-TERM`, `TERM`, `SIGTERM`, `15`, `-9` → the canonical signal name; ValueError otherwise."""
    t = text.lstrip("-").upper()
    if t.startswith("SIG"):
        t = t[3:]
    t = SIGNAL_NUMBERS.get(t, t)
    if t not in SIGNALS:
        raise ValueError(f"unknown signal '{text}' (use TERM, KILL, STOP or CONT)")
    return t


