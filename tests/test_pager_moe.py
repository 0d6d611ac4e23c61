"""The pager with a mixture of experts: each expert is a page of its own, paged in only when a token chose it, so a
model whose experts alone are larger than the budget generates what it generates all-resident."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from llmsh.kernel.paging.core import Pager
from llmsh.kernel.paging.sources import ModelSource

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
        assert sum(model.page_resident(i) for i, p in enumerate(pages) if ".expert." in p.name) <= 2 + 1
    finally:
        pager.close()
