"""The pager with a mixture of experts: each expert is a page of its own, paged in only when a token chose it, so a
model whose experts alone are larger than the budget generates what it generates all-resident."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from llmsh.engine.paging.core import Pager
from llmsh.engine.paging.sources import ModelSource

PROMPTS = ["The quick brown fox", "Once upon a time there was"]
GREEDY = dict(max_tokens=16, temperature=0)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_experts_larger_than_the_budget_generate_identically(family, make_tiny_model: Callable[..., Path]) -> None:
    from llmsh.runtime import load

    more = dict(mlp_only_layers=[], num_experts=8, moe_intermediate_size=96) if family == "qwen3_moe" else {}
    folder = make_tiny_model(family, num_hidden_layers=3, **more)
    expected = load(folder).generate(PROMPTS, **GREEDY)
    model = load(folder)
    pages = model.pages()
    experts = [p for p in pages if ".expert." in p.name]
    # room for every non-expert page and two experts: well below the experts alone
    budget = sum(p.nbytes for p in pages if ".expert." not in p.name) + 2 * max(p.nbytes for p in experts)
    assert budget < sum(p.nbytes for p in experts)
    pager = Pager({"cpu": budget}, prefetch=True)
    seen: list[int] = []

    def check(device: str, used: int, limit: int) -> None:
        assert used <= limit, f"tracked resident {used} > budget {limit}"
        seen.append(used)

    pager.check_hooks.append(check)
    try:
        pager.attach(1, ModelSource(model), name=model.name)
        assert model.generate(PROMPTS, **GREEDY) == expected
        snap = pager.snapshot()
        assert seen and snap["totals"]["page_outs"] > 0
        resident = sum(p.nbytes for i, p in enumerate(pages) if model.page_resident(i))
        assert resident <= budget < sum(p.nbytes for p in experts)
    finally:
        pager.close()


def test_cold_experts_are_evicted_before_hot_ones_and_never_prefetched(make_tiny_model: Callable[..., Path]) -> None:
    """Among a running model's pages, an expert page is scored by its age (LRU), not by its distance ahead in the
    forward order: an expert no token has chosen goes before one used in the last step. The prefetcher reads the next
    block, past the experts in between."""
    from llmsh.engine.paging.policy import Candidate, eviction_order
    from llmsh.runtime import load

    model = load(make_tiny_model("mixtral", num_hidden_layers=3))
    infos = ModelSource(model).page_infos()
    n = len(infos)
    assert [i.name for i in infos if i.on_demand] == [p.name for p in model.pages() if ".expert." in p.name]
    running = (1, 1)                                                  # pid 1 computes block.0 (page 1)
    hot, cold = (1, 3), (1, 4)                                        # block.0.expert.1 used at tick 90; expert.2 never
    behind = (1, n - 2)                                               # a dense page just behind: needed next pass
    order = eviction_order([Candidate(hot, 10, 90, 0, n, on_demand=True), Candidate(cold, 10, 0, 0, n, on_demand=True),
                            Candidate(behind, 10, 95, 0, n)], tick=100, requester=running)
    assert [c.key for c in order][0] == cold and order[-1].key == hot

    pager = Pager({"cpu": model.weight_bytes() * 2}, prefetch=True, prefetch_depth=1)
    try:
        proc = pager.attach(1, ModelSource(model), name="m", hook=False)
        pager.page_out(1)
        pager.prefetcher.after(proc, 1)                               # block.0 is about to run
        deadline = time.monotonic() + 10
        while pager.snapshot()["totals"]["prefetched"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [e.name for e in proc.entries if e.state != "out"] == ["block.1"]
    finally:
        pager.close()
