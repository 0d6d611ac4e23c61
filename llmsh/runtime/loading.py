"""`llmsh.runtime.load`: any model a user names, by its form: a GGUF file or `ollama:NAME` (gguf_loader.py), else a
Hugging Face folder or hub-cache name (model.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmsh.runtime.errors import LoadError

if TYPE_CHECKING:
    from llmsh.runtime.model import Model


def is_gguf_source(source: str) -> bool:
    """True for what gguf_loader loads: `ollama:NAME[:TAG]` or a path ending in .gguf."""
    return source.startswith("ollama:") or source.lower().endswith(".gguf")


def load(path_or_name: str | Path, device: Any = "cpu", dtype: Any = None, *, verify: bool = True,
         progress: Callable[[float, str], None] | None = None, quant: str | None = None) -> Model:
    """Load a model (LoadError, one line, for every user-facing failure); see the module docstring."""
    if is_gguf_source(str(path_or_name)):
        from llmsh.runtime import gguf_loader

        if quant:
            raise LoadError(f"--quant applies to Hugging Face checkpoints; {path_or_name} is GGUF, already in its "
                            "own types")
        return gguf_loader.load_source(str(path_or_name), device, dtype, verify=verify, progress=progress)
    from llmsh.runtime import model

    return model.load_hf(path_or_name, device, dtype, verify=verify, progress=progress, quant=quant)
