"""Issue 14: the KV cache lives within its budget and the context is the model's own.

A process's KV cache starts empty, grows with what its requests hold (never past the `kv` budget) and is given back
when they end, so `mem` reports the bytes really held and `ps` RES and `mem` RES are one figure (weights + KV cache).
A prompt that could never fit the budget is refused with one line naming it. The context comes from the model's
config (no 2048 cap); `load --ctx N` may lower it, not raise it; `ps --json` shows it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# ---- the cache itself (fast) ------------------------------------------------------------------------------------------


def test_a_models_cache_starts_empty_grows_with_its_sequences_and_gives_memory_back(tiny_gpt2: Path) -> None:
    from llmsh.runtime import load
    from llmsh.runtime.generation import BatchGenerator, Sequence
    from llmsh.runtime.kv_cache import BLOCK
    from llmsh.runtime.sampling import SamplingParams

    model = load(tiny_gpt2)
    gen = BatchGenerator(model, max_batch=16, max_seq_len=256)
    cache = gen.cache
    assert cache.nbytes == 0 and (cache.n_slots, cache.context) == (16, 256)  # not 16 x 256 positions up front
    params = SamplingParams(max_tokens=70, temperature=0, ignore_eos=True)
    seqs = [Sequence(model, model.tokenizer.encode(p), params) for p in ("once upon a time", "def f(x):")]
    for s in seqs:
        gen.add(s)
    gen.step()
    assert cache.max_batch == 2 and cache.max_seq_len == BLOCK  # two rows, one block of positions
    assert cache.nbytes == 2 * BLOCK * cache.bytes_per_position
    while gen.has_work:
        gen.step()
        assert cache.max_seq_len >= max((cache.lengths[s.slot] for s in gen.running), default=0)
    assert cache.nbytes == 0 and cache.max_batch == 0  # both ended: everything given back
    ref = model.generate(["once upon a time", "def f(x):"], max_tokens=70, temperature=0, ignore_eos=True)
    assert [s.text for s in seqs] == ref


def test_the_rows_are_compacted_when_a_low_slot_leaves(tiny_gpt2: Path) -> None:
    from llmsh.runtime import load
    from llmsh.runtime.generation import BatchGenerator, Sequence
    from llmsh.runtime.sampling import SamplingParams

    model = load(tiny_gpt2)
    ref = model.generate(["a long one"], max_tokens=40, temperature=0, ignore_eos=True)[0]
    gen = BatchGenerator(model, max_batch=4, max_seq_len=256)
    short = Sequence(model, model.tokenizer.encode("short"), SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    long = Sequence(model, model.tokenizer.encode("a long one"),
                    SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    gen.add(short)
    gen.add(long)
    gen.step()
    assert (short.slot, long.slot, gen.cache.max_batch) == (0, 1, 2)
    while not short.finished:
        gen.step()
    assert long.slot == 0 and gen.cache.max_batch == 1  # moved down into the free row; the second row given back
    while gen.has_work:
        gen.step()
    assert long.text == ref


def test_growth_stays_within_what_the_budget_leaves(tiny_gpt2: Path) -> None:
    from llmsh.runtime import load

    cache = load(tiny_gpt2).new_cache(4, 256)
    bpp = cache.bytes_per_position
    assert cache.plan(1, 65, max_bytes=None) == (1, 128)  # a block at a time (or half the capacity)
    assert cache.plan(1, 65, max_bytes=100 * bpp) == (1, 100)  # as much as the budget leaves room for
    assert cache.plan(1, 65, max_bytes=10 * bpp) == (1, 65)  # or what is asked, when the caller made room for it
    assert cache.plan(1, 300) == (1, 256)  # never past the context
    cache.reserve(2, 64)
    assert cache.plan(3, 64) == (3, 64) and cache.plan(3, 64, max_bytes=10**9) == (3, 64)
    cache.reserve(3, 64)
    assert cache.plan(4, 64) == (4, 64)  # rows grow by half too (capped by the slots)


def test_a_new_request_waits_for_kv_room_and_the_budget_is_never_passed(tiny_gpt2: Path) -> None:
    from llmsh.engine.paging.core import Pager
    from llmsh.runtime import load
    from llmsh.runtime.generation import BatchGenerator, Sequence
    from llmsh.runtime.sampling import SamplingParams

    model = load(tiny_gpt2)
    prompts = ["once upon a time", "def f(x):"]
    refs = model.generate(prompts, max_tokens=60, temperature=0, ignore_eos=True)
    pager = Pager({"cpu": 1 << 30}, prefetch=False)
    seen: list[int] = []
    pager.kv.check_hooks.append(lambda device, used, budget: seen.append(used))
    g = pager.kv.guard(BatchGenerator(model, 4, 256), pid=1, device="cpu", nice=lambda: 0)
    budget = 100 * g.bytes_per_pos  # one request of up to 100 positions, not two
    pager.set_budget("kv:cpu", budget)
    seqs = [Sequence(model, model.tokenizer.encode(p), SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))
            for p in prompts]
    g.add(seqs[0])
    for _ in range(3):
        g.step()
    assert g.batch.cache.max_seq_len == 64  # it took a block: more than two requests' room is left
    g.add(seqs[1])
    while g.has_work:
        g.step()
        assert pager.kv.used("cpu") <= budget
        if not seqs[0].finished:
            assert seqs[1].slot is None  # it waits until the first is done
    assert [s.text for s in seqs] == refs and max(seen) <= budget
    assert pager.kv.stats.held >= 1 and pager.kv.stats.preemptions == 0  # the newer one waited, nobody was cut
    assert pager.snapshot()["devices"]["kv:cpu"]["used"] == 0


# ---- through the kernel -------------------------------------------------------------------------------------------------


def _ok(k: Any, code: str, timeout: float = 120) -> dict[str, Any]:
    r = k.execute(code, timeout=timeout)
    assert r["status"] == "ok", (code, r["reply"].get("evalue"), r["stderr"])
    return r


def _fails(k: Any, code: str) -> str:
    r = k.execute(code, timeout=120)
    assert r["status"] == "error", (code, r)
    line = r["reply"]["evalue"]
    assert "\n" not in line.strip() and "Traceback" not in r["stderr"]
    return line


def _row(k: Any, cmd: str, pid: int) -> dict[str, Any]:
    data = _ok(k, f"{cmd} --json")["data"]
    return next(r for r in (data["procs"] if isinstance(data, dict) else data) if r["pid"] == pid)


@pytest.mark.slow
def test_the_kv_cache_lives_within_its_budget_and_ps_and_mem_agree(make_kernel: Callable[..., Any],
                                                                   tiny_llama: Path) -> None:
    from llmsh.runtime import load

    model = load(tiny_llama)
    bpp = 2 * model.config.n_layer * model.config.n_kv_head * model.config.head_dim * 4
    budget = 120 * bpp  # room for one request of up to 120 positions
    k = make_kernel("--mem-budget", f"kv={budget}B")
    pid = _ok(k, f"load {tiny_llama} --name t")["data"]["pid"]
    weights = model.weight_bytes()
    assert _row(k, "ps", pid)["res_bytes"] == _row(k, "mem", pid)["res_bytes"] == weights  # no KV held when idle

    # a request in flight: its cache is counted once, in both, and stays within the budget
    c = k.client()
    c.execute("run t --max-tokens 100 --temperature 0 --ignore-eos 'once upon a time'", reply=False)
    deadline = time.monotonic() + 30
    while _row(k, "ps", pid)["tokens"] < 2:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.01)
    _ok(k, "kill -STOP t")
    ps_row, mem = _row(k, "ps", pid), _ok(k, "mem --json")["data"]
    mem_row = next(r for r in mem["procs"] if r["pid"] == pid)
    kv_used = mem["devices"]["kv:cpu"]["used"]
    assert 0 < kv_used <= budget and mem_row["kv_bytes"] == kv_used
    assert ps_row["res_bytes"] == mem_row["res_bytes"] == weights + kv_used
    _ok(k, "kill -CONT t")
    assert c.get_shell_msg(timeout=60)["content"]["status"] == "ok"  # the other client's run ends on its own
    c.stop_channels()
    deadline = time.monotonic() + 30
    while _ok(k, "mem --json")["data"]["devices"]["kv:cpu"]["used"]:
        assert time.monotonic() < deadline, "the KV cache was not given back"
        time.sleep(0.05)

    # a prompt that could never fit the budget is refused with one line naming it, and the process goes on
    text = "once upon a time " * 15
    assert 120 < len(model.tokenizer.encode(text)) < 250  # over the budget, within the context
    line = _fails(k, f"run t --max-tokens 1 '{text}'")
    assert "KV budget of cpu" in line and "--mem-budget kv=" in line
    assert _ok(k, "run t --max-tokens 3 --temperature 0 hi")["stdout"].strip()


@pytest.mark.slow
def test_the_context_is_the_models_own_and_load_ctx_lowers_it(make_kernel: Callable[..., Any],
                                                             make_tiny_model: Callable[..., Path]) -> None:
    from llmsh.runtime import load

    folder = make_tiny_model("llama", max_position_embeddings=3000)
    tok = load(folder).tokenizer
    text = "once upon a time there was a model " * 150
    n = len(tok.encode(text))
    assert 2100 < n < 2990, n  # longer than the old 2048 cap, within the model's 3000
    k = make_kernel()
    pid = _ok(k, f"load {folder} --name big")["data"]["pid"]
    assert _row(k, "ps", pid)["ctx"] == 3000
    assert _ok(k, f"run big --max-tokens 2 --temperature 0 '{text}'")["stdout"].strip()

    line = _fails(k, f"load {folder} --name over --ctx 5000")
    assert "--ctx 5000 is over the model's context of 3000 tokens" in line
    small = _ok(k, f"load {folder} --name small --ctx 64")["data"]
    assert small["ctx"] == 64 and _row(k, "ps", small["pid"])["ctx"] == 64
    line = _fails(k, "run small --max-tokens 2 'once upon a time there was a model once upon a time there was a "
                     "model once upon a time there was a model once upon a time there was a model'")
    assert "exceeds the context of 64 tokens" in line
