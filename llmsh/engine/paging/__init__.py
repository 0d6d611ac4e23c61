"""Layer-granular weight paging: budgets, the page table with priority-weighted LRU, prefetch and KV budgets.

`llmsh.engine.pager` ties these together into the kernel service `kernel.services["pager"]`; the modules here
are plain logic that unit tests drive without a kernel.
"""
