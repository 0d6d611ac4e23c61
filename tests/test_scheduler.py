"""Pure scheduler logic, stepped by hand (no engine thread, no torch): CFS weights, vruntime picking, token shares by
nice, continuous batching, STOP/CONT, TERM/KILL, cancellation, busy queues and a failing step.

The fake runtime below has the same shape as the real one (`new_batch()` → .add/.remove/.step/.last_batch_size,
`new_sequence()` → .finished), so these tests pin the scheduler's behaviour independently of any model.
"""

from __future__ import annotations

import pytest

from llmsh.engine.process import ProcessTable
from llmsh.engine.scheduler import BusyError, Scheduler
from llmsh.protocol.procs import SCHED_PRIO_TO_WEIGHT, ExitHow, ProcState, StateError, cfs_weight, parse_signal


class FakeSeq:
    def __init__(self, prompt_ids: list[int], max_tokens: int) -> None:
        self.prompt_ids = prompt_ids
        self.max_tokens = max_tokens
        self.generated: list[int] = []
        self.finished: str | None = None


class FakeClock:
    """Device time for fake models: each step advances it by its runtime's `cost` (no wall clock in these tests)."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeBatch:
    """Continuous batching in miniature: every sequence in the batch gets one token per step."""

    def __init__(self, fail_at: int | None = None, clock: FakeClock | None = None, cost: float = 1.0) -> None:
        self.clock, self.cost = clock, cost
        self.seqs: list[FakeSeq] = []
        self.last_batch_size = 0
        self.steps = 0
        self.fail_at = fail_at

    def add(self, seq: FakeSeq) -> None:
        self.seqs.append(seq)

    def remove(self, seq: FakeSeq) -> None:
        self.seqs.remove(seq)

    def step(self) -> list[tuple[FakeSeq, str]]:
        self.steps += 1
        if self.clock is not None:
            self.clock.t += self.cost  # a batched step costs about what one sequence's does: decode reads the weights
        if self.fail_at is not None and self.steps >= self.fail_at:
            raise RuntimeError("boom in forward")
        self.last_batch_size = len(self.seqs)
        out = []
        for s in list(self.seqs):
            tok = (sum(s.prompt_ids) + len(s.generated)) % 97  # "greedy": depends only on the sequence's own state
            s.generated.append(tok)
            if len(s.generated) >= s.max_tokens:
                s.finished = "length"
                self.seqs.remove(s)
            out.append((s, f"<{tok}>"))
        return out


class FakeRuntime:
    def __init__(self, max_batch: int = 8, fail_at: int | None = None, clock: FakeClock | None = None,
                 cost: float = 1.0) -> None:
        self.clock, self.cost = clock, cost
        self.max_batch = max_batch
        self.max_seq_len = 1024
        self.fail_at = fail_at
        self.closed = False

    def new_batch(self) -> FakeBatch:
        return FakeBatch(self.fail_at, self.clock, self.cost)

    def new_sequence(self, prompt_ids: list[int], params: dict) -> FakeSeq:
        if params.get("max_tokens", 1) < 1:
            raise ValueError("max_tokens must be ≥ 1")
        return FakeSeq(prompt_ids, params.get("max_tokens", 10**9))

    def resident_bytes(self) -> int:
        return 0 if self.closed else 1000

    def changed_files(self) -> str | None:
        return None

    def close(self) -> None:
        self.closed = True


class Collect:
    """A request sink that records its events, like the per-request asyncio queue does."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def __call__(self, kind: str, value: object) -> None:
        self.events.append((kind, value))

    @property
    def text(self) -> str:
        return "".join(v for k, v in self.events if k == "token")

    @property
    def last(self) -> tuple[str, object]:
        return self.events[-1]


def make(n: int = 1, nice: tuple[int, ...] = (), costs: tuple[float, ...] = (), **rt) -> tuple[ProcessTable, Scheduler, list]:
    table = ProcessTable()
    clock = FakeClock()
    sched = Scheduler(table, threaded=False, max_queue=4, clock=clock)
    procs = []
    for i in range(n):
        p = table.add(f"m{i}", "/x", nice=nice[i] if i < len(nice) else 0)
        p.runtime = FakeRuntime(clock=clock, cost=costs[i] if i < len(costs) else 1.0, **rt)
        sched.attach(p)
        procs.append(p)
    return table, sched, procs


def run_steps(sched: Scheduler, n: int) -> None:
    eng = sched.engine("cpu")
    for _ in range(n):
        if not eng.tick():
            break


def test_weight_table_is_linux_sched_prio_to_weight() -> None:
    assert len(SCHED_PRIO_TO_WEIGHT) == 40
    assert cfs_weight(0) == 1024 and cfs_weight(5) == 335 and cfs_weight(-20) == 88761 and cfs_weight(19) == 15
    assert all(a > b for a, b in zip(SCHED_PRIO_TO_WEIGHT, SCHED_PRIO_TO_WEIGHT[1:]))
    for bad in (-21, 20):
        with pytest.raises(ValueError, match="out of range"):
            cfs_weight(bad)


def test_parse_signal() -> None:
    assert [parse_signal(s) for s in ("-TERM", "SIGKILL", "-9", "15", "stop", "-CONT")] == [
        "TERM", "KILL", "KILL", "TERM", "STOP", "CONT",
    ]
    with pytest.raises(ValueError, match="unknown signal"):
        parse_signal("-HUP")


def test_pick_lowest_vruntime_and_wakeups_start_at_min() -> None:
    _, sched, (a, b) = make(2)
    eng = sched.engine("cpu")
    sched.submit(a, [1], {}, Collect())
    run_steps(sched, 10)
    assert a.vruntime == pytest.approx(10.0) and b.vruntime == 0.0
    sched.submit(b, [2], {}, Collect())  # b wakes up: placed at the queue's minimum, not at 0
    assert eng.pick() is a  # tie on vruntime → lower pid
    assert b.vruntime == pytest.approx(10.0)
    run_steps(sched, 10)
    assert a.tokens == 15 and b.tokens == 5  # strict alternation after the wake-up


def test_device_time_shares_follow_nice_weights() -> None:
    _, sched, (p0, p5) = make(2, nice=(0, 5))
    sched.submit(p0, [1], {}, Collect())
    sched.submit(p5, [2], {}, Collect())
    run_steps(sched, 4000)
    ratio = p0.compute_s / p5.compute_s
    assert p0.tokens + p5.tokens == 4000
    assert ratio == pytest.approx(1024 / 335, rel=0.10)


def test_models_of_different_size_get_equal_device_time() -> None:
    """A model whose steps take 5x longer gets the same device time at equal nice, so 1/5 of the small one's steps."""
    _, sched, (small, large) = make(2, costs=(1.0, 5.0))
    sched.submit(small, [1], {}, Collect())
    sched.submit(large, [2], {}, Collect())
    run_steps(sched, 1200)
    assert small.compute_s / large.compute_s == pytest.approx(1.0, rel=0.10)
    assert small.tokens / large.tokens == pytest.approx(5.0, rel=0.10)


def test_device_time_counts_steps_not_tokens() -> None:
    """A step of 4 batched requests costs the process one step of device time: it gets 4 tokens for it."""
    _, sched, (a, b) = make(2)
    for _ in range(4):
        sched.submit(a, [1], {}, Collect())
    sched.submit(b, [2], {}, Collect())
    run_steps(sched, 1000)
    assert a.compute_s / b.compute_s == pytest.approx(1.0, rel=0.10)
    assert a.tokens / b.tokens == pytest.approx(4.0, rel=0.10)
    assert a.max_batch_seen == 4 and b.max_batch_seen == 1


def test_continuous_batching_join_and_leave() -> None:
    _, sched, (p,) = make(1)
    short, long_ = Collect(), Collect()
    sched.submit(p, [1], {"max_tokens": 2}, short)
    sched.submit(p, [2], {"max_tokens": 6}, long_)
    run_steps(sched, 1)
    assert p.last_batch == 2 and p.state is ProcState.RUNNING
    late = Collect()
    run_steps(sched, 1)  # `short` leaves here
    sched.submit(p, [3], {"max_tokens": 2}, late)  # joins at the next step, without waiting for `long_`
    run_steps(sched, 1)
    assert p.last_batch == 2 and short.last == ("done", "length")
    run_steps(sched, 10)
    assert late.last == ("done", "length") and long_.last == ("done", "length")
    assert p.state is ProcState.READY and p.tokens == 2 + 6 + 2


def test_stop_cont_is_exact() -> None:
    _, sched, (p,) = make(1)
    ref = Collect()
    sched.submit(p, [5, 6], {"max_tokens": 12}, ref)
    run_steps(sched, 20)
    got = Collect()
    sched.submit(p, [5, 6], {"max_tokens": 12}, got)
    run_steps(sched, 4)
    sched.stop(p)
    assert p.state is ProcState.STOPPED
    assert not sched.engine("cpu").tick()  # off the run queue at once
    with pytest.raises(StateError, match="already stopped"):
        sched.stop(p)
    sched.cont(p)
    assert p.state is ProcState.RUNNING
    run_steps(sched, 20)
    assert got.events == ref.events
    before = p.state
    sched.cont(p)  # not stopped: a no-op (POSIX)
    assert p.state is before


def test_kill_fails_waiting_clients_and_frees() -> None:
    table, sched, (p, q) = make(2)
    a, b, other = Collect(), Collect(), Collect()
    sched.submit(p, [1], {}, a)
    sched.submit(p, [2], {}, b)
    sched.submit(q, [3], {"max_tokens": 5}, other)
    run_steps(sched, 3)
    rt = p.runtime
    sched.kill(p)
    assert a.last[0] == "error" and a.last[1][0] == "killed" and b.last[1][0] == "killed"
    assert rt.closed and p.runtime is None and table.get(p.pid) is None
    assert table.exited[-1]["exit"] == ExitHow.KILL.value
    run_steps(sched, 20)
    assert other.last == ("done", "length")  # the other process keeps running


def test_kill_during_a_step_shows_exiting_until_the_step_ends() -> None:
    """`kill -KILL PID; ps` must not show the process still running while the engine finishes its step."""
    table, sched, (p,) = make(1)
    a = Collect()
    sched.submit(p, [1], {}, a)
    run_steps(sched, 1)
    seen: list[dict] = []
    step = p.batch.step

    def step_with_kill_arriving() -> list:
        sched.kill(p)  # the signal lands while the engine thread is inside the step
        seen.extend(r for r in table.snapshot() if r["pid"] == p.pid)
        return step()

    p.batch.step = step_with_kill_arriving
    run_steps(sched, 1)
    assert a.last[1][0] == "killed"
    assert seen and seen[0]["state"] == "exiting" and seen[0]["reqs_active"] == 0, seen
    assert table.get(p.pid) is None and table.exited[-1]["exit"] == ExitHow.KILL.value


def test_ps_all_shows_a_failed_entry_once_as_it_is_reaped() -> None:
    table, sched, (p,) = make(1)
    sched.fail_load(p, "bad weights")
    rows = table.snapshot(reap=True, include_exited=True)  # `ps -a`: shown as failed, reaped behind the scenes
    assert [(r["pid"], r["state"]) for r in rows] == [(p.pid, "failed")]
    rows = table.snapshot(reap=True, include_exited=True)  # the next `ps -a` shows how it ended
    assert [(r["pid"], r.get("exit")) for r in rows] == [(p.pid, ExitHow.REAPED.value)]


def test_term_finishes_accepted_requests_then_unloads() -> None:
    table, sched, (p,) = make(1)
    a = Collect()
    sched.submit(p, [1], {"max_tokens": 3}, a)
    sched.terminate(p)
    assert p.state is ProcState.EXITING
    with pytest.raises(StateError, match="exiting"):
        sched.submit(p, [1], {}, Collect())
    with pytest.raises(StateError, match="already exiting"):
        sched.terminate(p)
    run_steps(sched, 10)
    assert a.last == ("done", "length")
    assert table.get(p.pid) is None and p.exit_how is ExitHow.TERM


def test_term_on_stopped_process_continues_it() -> None:
    table, sched, (p,) = make(1)
    a = Collect()
    sched.submit(p, [1], {"max_tokens": 3}, a)
    sched.stop(p)
    sched.terminate(p)
    run_steps(sched, 10)
    assert a.last == ("done", "length") and table.get(p.pid) is None


def test_cancelled_request_is_removed() -> None:
    _, sched, (p,) = make(1)
    a, b = Collect(), Collect()
    ra = sched.submit(p, [1], {}, a)
    sched.submit(p, [2], {"max_tokens": 4}, b)
    run_steps(sched, 2)
    sched.cancel(ra)
    run_steps(sched, 1)
    assert p.last_batch == 1 and len(p.active) == 1
    run_steps(sched, 10)
    assert b.last == ("done", "length") and p.state is ProcState.READY and not p.has_work()


def test_busy_when_queue_full() -> None:
    _, sched, (p,) = make(1)
    for _ in range(4):
        sched.submit(p, [1], {}, Collect())
    with pytest.raises(BusyError, match="busy: process 1 .* 4 queued"):
        sched.submit(p, [1], {}, Collect())


def test_batch_size_bounded_by_runtime_max_batch() -> None:
    _, sched, (p,) = make(1, max_batch=2)
    for _ in range(3):
        sched.submit(p, [1], {"max_tokens": 3}, Collect())
    run_steps(sched, 1)
    assert p.last_batch == 2 and len(p.pending) == 1


def test_step_exception_fails_that_process_only() -> None:
    table, sched, (bad, good) = make(2)
    bad.runtime.fail_at = 3
    bad.batch.fail_at = 3
    x, y = Collect(), Collect()
    sched.submit(bad, [1], {}, x)
    sched.submit(good, [2], {"max_tokens": 8}, y)
    run_steps(sched, 30)
    assert bad.state is ProcState.FAILED and "boom in forward" in bad.reason
    assert x.last[0] == "error" and x.last[1][0] == "failed"
    assert bad.runtime is None and table.get(bad.pid) is bad  # entry kept with its reason until reaped
    assert y.last == ("done", "length")
    rows = table.snapshot(reap=True)
    assert [r["state"] for r in rows] == ["failed", "ready"]
    assert table.get(bad.pid) is None and [r["pid"] for r in table.snapshot()] == [good.pid]


def test_rejected_request_fails_alone() -> None:
    _, sched, (p,) = make(1)
    bad, good = Collect(), Collect()
    sched.submit(p, [1], {"max_tokens": 0}, bad)
    sched.submit(p, [1], {"max_tokens": 2}, good)
    run_steps(sched, 5)
    assert bad.last[0] == "error" and good.last == ("done", "length")


def test_state_machine_rejects_bad_transitions() -> None:
    table = ProcessTable()
    p = table.add("m", "/x")
    with pytest.raises(StateError, match="loading; cannot become stopped"):
        p.transition(ProcState.STOPPED)
    p.transition(ProcState.READY)
    p.transition(ProcState.FAILED, "x")
    with pytest.raises(StateError):
        p.transition(ProcState.READY)


def test_pids_increase_and_names_resolve() -> None:
    table = ProcessTable(max_procs=2)
    a = table.add("a", "/x")
    b = table.add(table.unique_name("a"), "/x")
    assert (a.pid, b.pid, b.name) == (1, 2, "a-2")
    assert table.resolve("a-2") is b and table.resolve(1) is a
    with pytest.raises(LookupError, match="no process with PID 9"):
        table.resolve("9")
    with pytest.raises(LookupError, match="no process named 'zz'"):
        table.resolve("zz")
    with pytest.raises(RuntimeError, match="busy: 2 processes"):
        table.add("c", "/x")
    table.remove(a, ExitHow.KILL)
    assert table.add("c", "/x").pid == 3  # never reused


def test_request_failed_from_outside_leaves_the_batch() -> None:
    _, sched, (p,) = make(1)
    a, b = Collect(), Collect()
    ra = sched.submit(p, [1], {}, a)
    sched.submit(p, [2], {"max_tokens": 3}, b)
    run_steps(sched, 1)
    ra.fail("failed", "no memory for its KV cache")  # as the pager does
    run_steps(sched, 1)
    assert p.last_batch == 1 and a.last == ("error", ("failed", "no memory for its KV cache"))
    run_steps(sched, 5)
    assert b.last == ("done", "length") and not p.has_work()


def test_blocked_step_is_not_counted() -> None:
    _, sched, (p,) = make(1)
    sched.submit(p, [1], {"max_tokens": 3}, Collect())
    p.batch.step = lambda: []  # a batch waiting for memory produces nothing
    eng = sched.engine("cpu")
    eng.tick()
    assert not eng.progressed and eng.steps == 0 and p.steps == 0


def test_idle_device_coalesces_a_burst() -> None:
    import time

    _, sched, (p,) = make(1)
    sched.coalesce_s = 0.05
    eng = sched.engine("cpu")
    sched.submit(p, [1], {"max_tokens": 3}, Collect())
    assert eng.tick() and p.steps == 0  # waited for more (a burst in the making)
    sched.submit(p, [2], {"max_tokens": 3}, Collect())
    time.sleep(0.06)
    eng.tick()
    assert p.steps == 1 and p.last_batch == 2  # the burst ran as one batch
    sched.submit(p, [3], {"max_tokens": 3}, Collect())
    eng.tick()
    assert p.steps == 2  # a running batch never waits: the newcomer joins the next step
