"""The README says the limits (processes, context, message size) and where the kernel's files are (issue 14), with
the numbers the code uses: a default changed in one place and not the other fails here."""

from __future__ import annotations

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _limits() -> str:
    """The README's 'Limits' list item (up to the next top-level item)."""
    start = README.index("- Limits:")
    end = README.index("\n- ", start + 1)
    return README[start:end]


def test_the_limits_are_documented_with_the_codes_numbers() -> None:
    from llmsh.engine.loader import DEFAULT_MAX_BATCH
    from llmsh.engine.scheduler import DEFAULT_MAX_QUEUE
    from llmsh.kernel.table import DEFAULT_MAX_PROCS
    from llmsh.protocol.limits import DEFAULT_MAX_MESSAGE

    limits = _limits()
    assert f"at most {DEFAULT_MAX_PROCS} model processes" in limits and "`max_procs = N` in config.toml" in limits
    assert f"is at most {DEFAULT_MAX_MESSAGE >> 20} MiB" in limits and "--max-message SIZE" in limits
    assert f"together per process: {DEFAULT_MAX_BATCH}" in limits and f"a queue of {DEFAULT_MAX_QUEUE}" in limits
    from llmsh.kernel.mapjobs import DEFAULT_IN_FLIGHT

    # map keeps its process's default batch full and a few lines queued behind it, within the queue
    assert DEFAULT_MAX_BATCH < DEFAULT_IN_FLIGHT <= DEFAULT_MAX_BATCH + DEFAULT_MAX_QUEUE
    # the context is the model's own: named where it comes from, how to lower it, where to see it; no silent cap
    for needle in ("`max_position_embeddings`", "`n_positions`", "`context_length`", "--ctx N", "`ctx`"):
        assert needle in limits, needle
    assert not re.search(r"capped at \d+ tokens", README)


def test_the_kv_budget_is_documented_with_the_codes_block() -> None:
    from llmsh.runtime.kv_cache import BLOCK

    assert f"by blocks of {BLOCK} positions" in README and "refused with one line naming the budget" in README
    assert "the same figure as `ps`" in README


def test_the_kernels_files_are_listed() -> None:
    table = README[README.index("| What | Where | Mode |"):]
    for needle in ("kernel-*.json", "journal.sqlite", "logs/", "config.toml", "engine-PID.sock", "start.lock",
                   "history", "$XDG_CACHE_HOME/llmsh/"):
        assert needle in table, needle
