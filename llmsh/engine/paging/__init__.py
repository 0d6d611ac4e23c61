"""Layer-granular weight paging: budgets, the page table with priority-weighted LRU, prefetch and KV budgets.

`llmsh.engine.pager` ties these to the engine's processes (`PagerService`); the modules here are plain logic that
unit tests drive without an engine.
"""
