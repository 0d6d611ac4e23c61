"""KV-cache budget: when the running requests' caches would outgrow it, the lowest-priority requests are swapped to
host and resume later — with greedy output identical to an uninterrupted run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmsh.engine.paging.core import Pager

PROMPTS = ["The quick brown fox", "Once upon a time there was", "def hello(name):", "Café, naïve"]
MAX_TOKENS = 16


def _run(guards_and_seqs, max_steps: int = 2000) -> dict[int, str]:
    """Step the batches round-robin like the engine until every sequence has finished; returns text by id(seq)."""
    texts: dict[int, str] = {}
    for _ in range(max_steps):
        busy = False
        for g, _ in guards_and_seqs:
            if g.has_work:
                busy = True
                for seq, piece in g.step():
                    texts[id(seq)] = texts.get(id(seq), "") + piece
        if not busy:
            return texts
    raise AssertionError("the batches did not finish")


def test_lowest_priority_requests_are_preempted_and_resume_identically(make_tiny_model: Callable[..., Path],
                                                                      monkeypatch: Any) -> None:
    from llmsh.runtime import kv_cache, load
    from llmsh.runtime.generation import BatchGenerator, Sequence
    from llmsh.runtime.sampling import SamplingParams

    hi_model, lo_model = load(make_tiny_model("llama")), load(make_tiny_model("gpt2"))
    refs = {m: m.generate(PROMPTS, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True) for m in (hi_model, lo_model)}
    pager = Pager({"cpu": 1 << 30}, prefetch=False)
    seen: list[int] = []

    def hook(device: str, used: int, budget: int) -> None:
        assert used <= budget, f"KV {used} > budget {budget}"
        seen.append(used)

    pager.kv.check_hooks.append(hook)
    nices = {hi_model: 0, lo_model: 10}
    guards = []
    for m in (hi_model, lo_model):
        batch = BatchGenerator(m, max_batch=len(PROMPTS), max_seq_len=128)
        g = pager.kv.guard(batch, pid=len(guards) + 1, device="cpu", nice=lambda m=m: nices[m])
        seqs = [Sequence(m, m.tokenizer.encode(p), SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
                for p in PROMPTS]
        for s in seqs:
            g.add(s)
        guards.append((g, seqs))
    monkeypatch.setattr(kv_cache, "BLOCK", 8)  # caches grow in blocks of 8 positions: these requests are short
    # room for about half of all the positions the eight requests will hold at their longest
    longest = sum(len(s.prompt_ids) + MAX_TOKENS for _, seqs in guards for s in seqs)
    bpp = max(g.bytes_per_pos for g, _ in guards)
    pager.set_budget("kv:cpu", longest * bpp // 2)
    texts = _run(guards)
    for (g, seqs), m in zip(guards, (hi_model, lo_model)):
        assert [texts[id(s)] for s in seqs] == refs[m]
    hi, lo = guards[0][0], guards[1][0]
    assert lo.preemptions > 0 and lo.preemptions > hi.preemptions
    assert pager.kv.stats.resumes == pager.kv.stats.preemptions
    assert max(seen) <= pager.budget("kv:cpu") and pager.kv.used("cpu") == 0
    snap = pager.snapshot()
    assert snap["kv"]["preemptions"] > 0 and "kv:cpu" in snap["devices"]


def test_a_request_that_alone_outgrows_the_kv_budget_ends_with_length(make_tiny_model: Callable[..., Path],
                                                                      monkeypatch: Any) -> None:
    from llmsh.runtime import kv_cache, load
    from llmsh.runtime.generation import BatchGenerator, Sequence
    from llmsh.runtime.sampling import SamplingParams

    m = load(make_tiny_model("gpt2"))
    pager = Pager({"cpu": 1 << 30}, prefetch=False)
    g = pager.kv.guard(BatchGenerator(m, 2, 128), pid=1, device="cpu", nice=lambda: 0)
    seq = Sequence(m, m.tokenizer.encode(PROMPTS[0]), SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    g.add(seq)
    monkeypatch.setattr(kv_cache, "BLOCK", 1)  # the cache grows a position at a time: the budget below is exact
    pager.set_budget("kv:cpu", (len(seq.prompt_ids) + 5) * g.bytes_per_pos)
    texts = _run([(g, [seq])])
    assert seq.finished == "length" and 0 < len(seq.token_ids) <= 6 and texts[id(seq)] == seq.text


def test_page_in_out_of_memory_fails_the_steps_requests_only(make_tiny_model: Callable[..., Path], monkeypatch) -> None:
    import torch

    from llmsh.engine.paging.sources import ModelSource
    from llmsh.runtime import load
    from llmsh.runtime.generation import BatchGenerator, Sequence
    from llmsh.runtime.sampling import SamplingParams

    m = load(make_tiny_model("gpt2"))
    ref = m.generate(PROMPTS[:1], max_tokens=8, temperature=0)[0]
    pages = m.pages()
    pager = Pager({"cpu": max(p.nbytes for p in pages) + pages[0].nbytes}, prefetch=False)
    pager.attach(1, ModelSource(m))
    failed: list = []
    g = pager.kv.guard(BatchGenerator(m, 2, 128), pid=1, device="cpu", nice=lambda: 0,
                       on_error=lambda seqs, line: failed.append((seqs, line)), after_step=lambda: pager.step_done(1))
    calls = {"n": 0}

    def flaky(real):  # the first page read fails, whether it copies its tensors or maps them in place
        def read(*args):
            calls["n"] += 1
            if calls["n"] == 1:
                raise torch.OutOfMemoryError("out of memory: tried to allocate 1 MiB")
            return real(*args)
        return read

    monkeypatch.setattr(m.checkpoint, "read_into", flaky(m.checkpoint.read_into))
    monkeypatch.setattr(m.checkpoint, "populate", flaky(m.checkpoint.populate))
    params = SamplingParams(max_tokens=8, temperature=0)
    bad = Sequence(m, m.tokenizer.encode(PROMPTS[0]), params)
    g.add(bad)
    out = g.step()
    assert out == [(bad, "")] and bad.finished == "error" and bad.slot is None
    assert failed and "out of memory" in failed[0][1] and g.batch.cache.free_slots == 2
    good = Sequence(m, m.tokenizer.encode(PROMPTS[0]), SamplingParams(max_tokens=8, temperature=0))
    g.add(good)
    assert "".join(_run([(g, [good])]).values()) == ref and good.finished


def test_spare_cache_capacity_goes_back_before_anything_waits_or_is_preempted(make_tiny_model: Callable[..., Path],
                                                                               monkeypatch: Any) -> None:
    """A cache keeps capacity it no longer needs (up to half of it, so a batch that lost a few sequences need not
    shrink and grow back at the next joins); when another request needs that room under the budget, the capacity is
    given back first: nothing running is swapped out and the new request is not held back."""
    from llmsh.runtime import kv_cache, load
    from llmsh.runtime.generation import BatchGenerator, Sequence
    from llmsh.runtime.sampling import SamplingParams

    monkeypatch.setattr(kv_cache, "BLOCK", 8)
    m = load(make_tiny_model("gpt2"))
    pager = Pager({"cpu": 1 << 30}, prefetch=False)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    a = pager.kv.guard(BatchGenerator(m, 4, 128), pid=1, device="cpu", nice=lambda: 0)
    b = pager.kv.guard(BatchGenerator(m, 4, 128), pid=2, device="cpu", nice=lambda: 0)
    running = Sequence(m, m.tokenizer.encode(PROMPTS[0]), params)
    a.add(running)
    a.step()
    a.batch.cache.reserve(4, 64)                         # room for three more rows, kept: spare capacity
    spare = a.used()
    newcomer = Sequence(m, m.tokenizer.encode(PROMPTS[1]), params)
    b.add(newcomer)
    pager.set_budget("kv:cpu", spare)                    # b's room exists only if a gives its spare rows back
    b.step()
    assert newcomer.slot is not None and newcomer.token_ids            # admitted and prefilled at once
    assert a.preemptions == 0 and running.slot is not None and not b.held
    assert a.used() < spare and pager.kv.used("cpu") <= spare
    texts = _run([(a, [running]), (b, [newcomer])])
    assert running.finished == newcomer.finished == "length" and texts
