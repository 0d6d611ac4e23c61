"""The engine thread's intra-op threads (llmsh.engine.threads): every core while the machine is otherwise idle, fewer
while other programs keep cores busy, and threads that ran torch now and then free their idle OpenMP workers."""

from __future__ import annotations

import os
import threading
import time

import pytest

from llmsh.engine.threads import ThreadGovernor, machine_busy_seconds, own_busy_seconds, release_openmp_workers


class FakeLoad:
    """A machine whose busy seconds the test advances: `others` cores busy besides this process's `own`."""

    def __init__(self) -> None:
        self.t = self.machine = self.own = 0.0

    def advance(self, seconds: float, others: float, own: float) -> None:
        self.t += seconds
        self.machine += seconds * (others + own)
        self.own += seconds * own


def _governor(load: FakeLoad, applied: list[int], max_threads: int = 4, cpus: int = 4) -> ThreadGovernor:
    return ThreadGovernor(max_threads, cpus=cpus, interval=0.5, machine=lambda: load.machine, own=lambda: load.own,
                          clock=lambda: load.t, apply=applied.append)


def test_all_threads_on_an_idle_machine_fewer_while_others_keep_cores_busy() -> None:
    load, applied = FakeLoad(), []
    gov = _governor(load, applied)
    assert gov.adjust() == 4 and applied == [4]            # the engine thread's own count, set on its first step
    load.advance(1.0, others=0.1, own=4.0)
    assert gov.adjust() == 4 and applied == [4]            # nothing changed: nothing applied
    load.advance(1.0, others=2.0, own=2.0)                 # a build took two cores
    assert gov.adjust() == 2 and applied == [4, 2] and gov.others == pytest.approx(2.0)
    load.advance(0.2, others=0.0, own=2.0)
    assert gov.adjust() == 2                               # under `interval`: not sampled yet
    load.advance(1.0, others=3.5, own=0.5)
    assert gov.adjust() == 1                               # never below one thread
    load.advance(1.0, others=0.0, own=1.0)
    assert gov.adjust() == 4 and applied == [4, 2, 1, 4]   # the machine is free again


def test_the_user_limit_caps_the_threads() -> None:
    load, applied = FakeLoad(), []
    gov = _governor(load, applied, max_threads=2, cpus=8)
    gov.adjust()
    load.advance(1.0, others=3.0, own=2.0)
    assert gov.adjust() == 2 and applied == [2]            # five cores free, but LLMSH_TORCH_THREADS said two


def test_the_load_figures_come_from_this_machine() -> None:
    busy, own = machine_busy_seconds(), own_busy_seconds()
    if busy is None:
        pytest.skip("no /proc/stat here")
    end = time.process_time() + 0.05
    while time.process_time() < end:  # burn a little CPU so both counters move
        pass
    assert machine_busy_seconds() >= busy and own_busy_seconds() > own  # type: ignore[operator]


def _tasks() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_a_thread_that_ran_torch_frees_its_openmp_workers() -> None:
    torch = pytest.importorskip("torch")
    before: list[int] = []
    after: list[int] = []

    def work() -> None:
        torch.set_num_threads(3)  # a team of three: two workers that libgomp keeps, idle, for the next region
        x = torch.randn(512, 512)
        for _ in range(3):
            (x @ x).sum()
            torch.nn.functional.gelu(torch.randn(1 << 20))
        before.append(_tasks())
        release_openmp_workers()
        deadline = time.monotonic() + 5
        while _tasks() >= before[0] and time.monotonic() < deadline:  # workers exit right after the release
            time.sleep(0.01)
        after.append(_tasks())
        torch.nn.functional.gelu(torch.randn(1 << 20))     # and the next region starts new ones

    t = threading.Thread(target=work)
    t.start()
    t.join()
    if "libgomp" not in open("/proc/self/maps").read():
        pytest.skip("torch here does not use libgomp")
    assert after[0] < before[0]
