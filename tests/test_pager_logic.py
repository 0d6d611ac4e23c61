"""Pure paging logic: budget strings, priority-weighted LRU, mlock, keep_alive, accounting, prefetch, OOM recovery.

Pages are small real tensors behind `TensorSource` (tests/pager_fakes.py), whose forward asserts every page is
materialised when it runs, so a paging bug shows up as a failed forward or a wrong output.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from llmsh.engine.paging.budget import BudgetError, default_budget, format_bytes, parse_budget, parse_size
from llmsh.engine.paging.core import PageInError, Pager, PagerError
from llmsh.engine.paging.policy import Candidate, age_factor, eviction_order, nice_weight
from tests.pager_fakes import TensorSource

KB = 1024


# ---- budgets ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,expected",
    [("4GiB", 4 * 1024**3), ("1.5MB", 1_500_000), ("512 MiB", 512 * 1024**2), ("100", 100), ("2kb", 2000), ("3KiB", 3072), ("7B", 7)],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_parse_budget_devices() -> None:
    assert parse_budget("cpu=4GiB,cuda:0=20GiB") == {"cpu": 4 * 1024**3, "cuda:0": 20 * 1024**3}
    assert parse_budget("cuda=1GB, kv=10MiB") == {"cuda:0": 10**9, "kv:cpu": 10 * 1024**2}
    assert parse_budget("300MiB") == {"cpu": 300 * 1024**2}
    assert parse_budget(None) == {} and parse_budget("") == {}


@pytest.mark.parametrize("bad", ["cpu=lots", "gpu=1GiB", "cpu=4XB", "cpu=1GiB,cpu=2GiB", "cpu=-3MiB", "cpu=0", "=5GB"])
def test_parse_budget_rejects_with_one_line(bad: str) -> None:
    with pytest.raises(BudgetError) as e:
        parse_budget(bad)
    msg = str(e.value)
    assert "\n" not in msg and "expected" in msg


def test_default_budget_is_free_memory_less_margin() -> None:
    import psutil

    b = default_budget("cpu")
    assert 0 < b < psutil.virtual_memory().available
    assert default_budget("kv") == pytest.approx(b // 4, rel=0.2)
    if not torch.cuda.is_available():
        assert default_budget("cuda:0") == 0
    assert format_bytes(1536) == "1.5 KiB" and format_bytes(10) == "10 B"


# ---- policy -------------------------------------------------------------------------------------------------------
def test_nice_weights_and_aging() -> None:
    assert nice_weight(0) == 1024 and nice_weight(5) == 335 and nice_weight(-20) == 88761 and nice_weight(99) == 15
    assert age_factor(10) > age_factor(0) > age_factor(-5)


def _cand(pid: int, idx: int, last: int, nice: int = 0, n: int = 4, idle: bool = False) -> Candidate:
    return Candidate((pid, idx), 100, last, nice, n, idle)


def test_eviction_order_lru_weighted_by_nice() -> None:
    cands = [_cand(1, 0, last=10), _cand(1, 1, last=5), _cand(2, 0, last=95, nice=10), _cand(3, 0, last=0, nice=-5)]
    order = [c.key for c in eviction_order(cands, tick=100)]
    # plain ages: 90, 95, 5, 100 → weighted: 90, 95, 5*9.3=46.5, 100*0.33=33
    assert order == [(1, 1), (1, 0), (2, 0), (3, 0)]
    # idle processes go first whatever their age
    cands.append(_cand(4, 0, last=99, idle=True))
    assert eviction_order(cands, tick=100, idle_first=True)[0].key == (4, 0)


def test_requester_keeps_the_pages_of_its_pass_over_other_processes_pages() -> None:
    # pid 1 (4 pages) computes page 1; pid 2's page was used 2 ticks ago, pid 1's page 2 is needed next tick
    cands = [_cand(1, 2, last=0), _cand(1, 0, last=9), _cand(2, 0, last=8)]
    order = [c.key for c in eviction_order(cands, tick=10, requester=(1, 1), horizon=4)]
    assert order == [(2, 0), (1, 0), (1, 2)]
    # …unless the other process has the higher priority: a nice 10 requester gives up its own pages first
    cands = [_cand(1, 2, last=0, nice=10), _cand(1, 0, last=9, nice=10), _cand(2, 0, last=8, nice=-5)]
    assert [c.key for c in eviction_order(cands, tick=10, requester=(1, 1), horizon=4)][0] == (1, 0)


def test_requester_pages_evicted_by_distance_to_next_use() -> None:
    # pid 1 computes page 2 of 4: page 1 is needed last (distance 3), page 3 next (distance 1)
    cands = [_cand(1, 0, last=1), _cand(1, 1, last=2), _cand(1, 3, last=0)]
    assert [c.key for c in eviction_order(cands, tick=3, requester=(1, 2))] == [(1, 1), (1, 0), (1, 3)]


# ---- the pager on tensor pages ------------------------------------------------------------------------------------
def _budget_checker(pager: Pager) -> list[tuple[str, int, int]]:
    seen: list[tuple[str, int, int]] = []

    def hook(device: str, used: int, budget: int) -> None:
        assert used <= budget, f"tracked {used} > budget {budget} on {device}"
        seen.append((device, used, budget))

    pager.check_hooks.append(hook)
    return seen


@pytest.fixture
def pager():
    p = Pager({"cpu": 10 * KB}, prefetch=False)
    yield p
    p.close()


def test_attach_keeps_what_fits_and_forward_matches(pager: Pager) -> None:
    seen = _budget_checker(pager)
    src = TensorSource([3 * KB] * 6, seed=1)  # 18 KiB of pages, 10 KiB budget
    x = torch.ones(8)
    reference = src.forward(x)
    proc = pager.attach(1, src, name="a")
    assert proc.resident_bytes == 9 * KB and [src.is_resident(i) for i in range(6)] == [True] * 3 + [False] * 3
    for _ in range(3):
        assert torch.equal(src.forward(x), reference)
    assert seen and max(u for _, u, _ in seen) <= 10 * KB
    row = pager.proc_row(1)
    assert row["page_ins"] > 0 and row["page_outs"] > 0 and row["bytes_moved"] == (row["page_ins"] + row["page_outs"]) * 3 * KB
    assert row["hits"] + row["misses"] == 18 and 0 < row["hit_rate"] < 1
    # scan resistance: a 6-page model with room for 3 keeps 2 pages between passes instead of 0 (LRU would miss all)
    assert row["hits"] >= 4


def _two_models_in_budget_of_one(pager: Pager, seeds: tuple[int, int]) -> tuple:
    """Two 4-page models of 3 KiB pages attached to a 12 KiB budget (room for one), with their all-resident outputs;
    returns (a, b, x, ref_a, ref_b, seen) where `seen` records every budget check."""
    pager.set_budget("cpu", 12 * KB)
    seen = _budget_checker(pager)
    a, b = TensorSource([3 * KB] * 4, seed=seeds[0]), TensorSource([3 * KB] * 4, seed=seeds[1])
    x = torch.ones(8)
    ref_a, ref_b = a.forward(x), b.forward(x)
    pager.attach(1, a)
    pager.attach(2, b)
    return a, b, x, ref_a, ref_b, seen


def test_two_models_share_a_budget_of_one(pager: Pager) -> None:
    a, b, x, ref_a, ref_b, seen = _two_models_in_budget_of_one(pager, (2, 3))
    for _ in range(3):  # round-robin requests of a few steps each
        for src, ref in ((a, ref_a), (b, ref_b)):
            for _ in range(3):
                assert torch.equal(src.forward(x), ref)
    assert pager.used["cpu"] <= 12 * KB and seen
    # after one step of a model all its pages are resident: the steps after the first are all hits
    a.forward(x)
    misses = pager.proc(1).stats.misses
    for _ in range(3):
        a.forward(x)
    assert pager.proc(1).stats.misses == misses


def test_page_in_reuses_the_buffers_of_an_evicted_page_of_the_same_layout(pager: Pager) -> None:
    a, b, x, ref_a, ref_b, seen = _two_models_in_budget_of_one(pager, (31, 32))
    for _ in range(3):
        assert torch.equal(a.forward(x), ref_a) and torch.equal(b.forward(x), ref_b)
    # the pages first came in as fresh copies (a's were the checkpoint's own, never written to); since then every
    # switch refills the buffers of the page it evicts
    assert b.reused + a.reused >= 8 and b.reads + a.reads <= 8
    assert max(u for _, u, _ in seen) <= 12 * KB and pager.used["cpu"] == 12 * KB
    assert pager.proc(1).resident_bytes + pager.proc(2).resident_bytes == 12 * KB


def test_a_switch_refills_the_big_page_from_the_big_page_however_far_down_the_order(pager: Pager) -> None:
    """GPT-2's shape: a big embedding page that the tied head touches again last, and many small blocks. Switching
    models, the embedding comes in first: it must refill the other model's embedding, not free five of its blocks
    first (they come in again as fresh allocations, ~4x slower to fill than a refill) and then take it anyway."""
    pager.set_budget("cpu", 30 * KB)
    a, b = TensorSource([10 * KB] + [2 * KB] * 10, seed=41), TensorSource([10 * KB] + [2 * KB] * 10, seed=42)
    x = torch.ones(8)
    ref = {id(a): a.forward(x), id(b): b.forward(x)}
    pager.attach(1, a)
    pager.attach(2, b)

    def request(src: TensorSource) -> None:
        assert torch.equal(src.forward(x), ref[id(src)])
        assert src.hook is not None
        src.hook(0)                                       # the tied head reads the embedding's matrix again

    for _ in range(2):
        request(a), request(b)
    reads = a.reads + b.reads
    for _ in range(3):
        request(a), request(b)
    assert a.reads + b.reads == reads                     # every page-in since refilled an evicted page's buffers
    assert pager.used["cpu"] <= 30 * KB


def test_priority_eviction_order(pager: Pager) -> None:
    pager.set_budget("cpu", 12 * KB)
    hi, lo, mid = TensorSource([2 * KB] * 2, seed=4), TensorSource([2 * KB] * 2, seed=5), TensorSource([2 * KB] * 2, seed=6)
    pager.attach(1, hi, nice=-5)
    pager.attach(2, lo, nice=10)
    pager.attach(3, mid, nice=0)
    x = torch.ones(8)
    lo.forward(x)  # lo used most recently
    hi.forward(x)
    mid.forward(x)
    # a newcomer needs 4 KiB: nice 10 goes first although it was used after hi
    new = TensorSource([2 * KB] * 2, seed=7)
    pager.attach(4, new)
    assert pager.proc(2).resident_bytes == 0
    assert pager.proc(1).resident_bytes == 4 * KB and pager.proc(3).resident_bytes == 4 * KB


def test_mlock_pins_and_munlock_releases(pager: Pager) -> None:
    a, b = TensorSource([2 * KB] * 3, seed=8), TensorSource([2 * KB] * 3, seed=9)
    pager.attach(1, a)
    pager.attach(2, b)
    assert pager.proc(1).resident_bytes + pager.proc(2).resident_bytes <= 10 * KB
    pager.mlock(1)
    assert pager.proc(1).resident_bytes == 6 * KB
    x = torch.ones(8)
    for _ in range(4):
        b.forward(x)  # b thrashes within the 4 KiB left, never touching a's pages
        assert pager.proc(1).resident_bytes == 6 * KB
    assert pager.proc(1).stats.page_outs == 0
    with pytest.raises(PagerError, match="already locked"):
        pager.mlock(2)
    pager.step_done(2)  # the engine ends each step so; until then b's current page is protected
    pager.set_budget("cpu", 14 * KB)
    pager.attach(3, TensorSource([3 * KB], seed=30))
    with pytest.raises(PagerError, match="pid 3 3 needs 3.0 KiB to run"):
        pager.mlock(2)  # 6 KiB locked + 6 KiB would leave 2 KiB, too little for the third process
    pager.detach(3)
    pager.set_budget("cpu", 10 * KB)
    pager.munlock(1)
    new = TensorSource([4 * KB] * 2, seed=10)
    pager.attach(3, new)  # 8 KiB: a must give way now
    assert pager.proc(1).resident_bytes < 6 * KB


def test_budget_smaller_than_largest_page_is_a_clear_error(pager: Pager) -> None:
    with pytest.raises(PagerError) as e:
        pager.attach(1, TensorSource([2 * KB, 16 * KB]))
    assert "smaller than the largest page" in str(e.value) and "block.1" in str(e.value) and "--mem-budget" in str(e.value)
    assert 1 not in pager.procs and pager.used.get("cpu", 0) == 0


def test_load_that_cannot_fit_names_the_holders(pager: Pager) -> None:
    a = TensorSource([3 * KB] * 3, seed=11)
    pager.attach(1, a, name="big", locked=True)
    with pytest.raises(PagerError) as e:
        pager.make_room("cpu", 6 * KB, largest=4 * KB, who="load new")
    msg = str(e.value)
    assert "needs 4.0 KiB" in msg and "pid 1 big 9.0 KiB (mlocked)" in msg and "\n" not in msg


def test_make_room_pages_out_idle_first_then_lower_priority(pager: Pager) -> None:
    pager.set_budget("cpu", 12 * KB)
    busy_lo, idle_hi, busy_hi = (TensorSource([2 * KB] * 2, seed=s) for s in (12, 13, 14))
    pager.attach(1, busy_lo, nice=5)
    pager.attach(2, idle_hi, nice=-10)
    pager.attach(3, busy_hi, nice=-10)
    busy = {1, 3}
    pager.busy_probe = lambda pid: pid in busy
    pager.make_room("cpu", 4 * KB, nice=0, largest=2 * KB)
    assert pager.proc(2).resident_bytes == 0 and pager.proc(1).resident_bytes == 4 * KB
    pager.make_room("cpu", 8 * KB, nice=0, largest=2 * KB)  # then the lower-priority busy one
    assert pager.proc(1).resident_bytes == 0 and pager.proc(3).resident_bytes == 4 * KB
    # higher-priority busy work keeps its pages: the newcomer runs paged in what is left
    freed = pager.make_room("cpu", 12 * KB, nice=0, largest=2 * KB)
    assert freed == 0 and pager.proc(3).resident_bytes == 4 * KB


def test_oom_during_page_in_fails_that_access_and_recovers(pager: Pager) -> None:
    src = TensorSource([3 * KB] * 5, seed=15)
    x = torch.ones(8)
    ref = src.forward(x)
    pager.attach(1, src)
    src.fail_next_read = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3 KiB")
    with pytest.raises(PageInError, match="out of memory reading page block.3"):
        src.forward(x)
    assert pager.used["cpu"] == pager.proc(1).resident_bytes  # the failed reservation was given back
    assert torch.equal(src.forward(x), ref)  # the next request works


def test_keep_alive_releases_idle_and_comes_back(pager: Pager) -> None:
    src = TensorSource([2 * KB] * 3, seed=16)
    x = torch.ones(8)
    ref = src.forward(x)
    pager.attach(1, src, keep_alive=5.0)
    src.forward(x)
    last = pager.proc(1).last_active
    assert pager.reap_idle(now=last + 1) == []
    assert pager.reap_idle(now=last + 6) == [1]
    assert pager.proc(1).state == "paged-out" and pager.used["cpu"] == 0 and not any(src.live)
    assert torch.equal(src.forward(x), ref)
    assert pager.proc(1).state == "resident"


def test_detach_gives_bytes_back(pager: Pager) -> None:
    src = TensorSource([2 * KB] * 3, seed=17)
    pager.attach(1, src)
    assert pager.used["cpu"] == 6 * KB
    pager.detach(1)
    assert pager.used["cpu"] == 0 and src.hook is None
    snap = pager.snapshot()
    assert snap["procs"] == [] and snap["devices"]["cpu"]["budget"] == 10 * KB


def test_prefetch_overlaps_and_keeps_output() -> None:
    pager = Pager({"cpu": 10 * KB}, prefetch=True)
    try:
        seen = _budget_checker(pager)
        a, b = TensorSource([3 * KB] * 3, seed=18), TensorSource([3 * KB] * 3, seed=19)
        x = torch.ones(8)
        ref_a, ref_b = a.forward(x), b.forward(x)
        pager.attach(1, a)
        pager.attach(2, b)
        a.read_delay = b.read_delay = 0.01
        for _ in range(4):
            assert torch.equal(a.forward(x), ref_a)
            assert torch.equal(b.forward(x), ref_b)
        assert pager.totals.prefetched > 0
        assert max(u for _, u, _ in seen) <= 10 * KB
    finally:
        pager.close()


def test_prefetch_reads_ahead_while_the_engine_reads_the_first_page() -> None:
    """A model coming back from disk: while the engine thread reads the page it needs now, the prefetch thread is
    already reading the next ones (it was queued before the engine's read, not after)."""
    pager = Pager({"cpu": 12 * KB}, prefetch=True)
    try:
        a, b = TensorSource([3 * KB] * 4, seed=21), TensorSource([3 * KB] * 4, seed=22)
        x = torch.ones(8)
        ref_a = a.forward(x)
        pager.attach(1, a)
        pager.attach(2, b)
        b.forward(x)                                      # a is paged out
        in_flight, most = 0, 0
        guard = threading.Lock()
        real_read = a.read

        def read(index, device, **kw):
            nonlocal in_flight, most
            with guard:
                in_flight += 1
                most = max(most, in_flight)
            try:
                time.sleep(0.05)                          # a read long enough for the other thread to start one
                return real_read(index, device, **kw)
            finally:
                with guard:
                    in_flight -= 1

        a.read = read  # type: ignore[method-assign]
        assert torch.equal(a.forward(x), ref_a)
        assert most >= 2
    finally:
        pager.close()


def test_concurrent_engines_never_exceed_budget() -> None:
    pager = Pager({"cpu": 9 * KB}, prefetch=True)
    try:
        _budget_checker(pager)
        srcs = [TensorSource([3 * KB] * 3, seed=20 + i) for i in range(3)]
        x = torch.ones(8)
        refs = [s.forward(x) for s in srcs]
        for i, s in enumerate(srcs):
            pager.attach(i + 1, s)
        errors: list[BaseException] = []

        def work(s: TensorSource, ref: torch.Tensor) -> None:
            try:
                for _ in range(10):
                    assert torch.equal(s.forward(x), ref)
            except BaseException as e:  # noqa: BLE001 — reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(s, r)) for s, r in zip(srcs, refs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
    finally:
        pager.close()
