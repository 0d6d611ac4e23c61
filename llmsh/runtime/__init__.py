"""llmsh.runtime: GPT-2, the Llama family (with Qwen3, Phi-3/4), Gemma 2/3 and mixtures of experts (Mixtral,
Qwen3-MoE) in plain PyTorch, loaded from Hugging Face checkpoints.

Public API (contract D): `load`, `Model`, `SamplingParams`, `LoadError`. Names are resolved lazily so that importing
`llmsh.runtime.integrity` (used by the torch-free `llmsh checksum`) never imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmsh.runtime.errors import LoadError

if TYPE_CHECKING:
    from llmsh.runtime.loading import load
    from llmsh.runtime.model import Model
    from llmsh.runtime.sampling import SamplingParams

__all__ = ["load", "Model", "SamplingParams", "LoadError"]

_LAZY = {"load": "llmsh.runtime.loading", "Model": "llmsh.runtime.model", "SamplingParams": "llmsh.runtime.sampling"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llmsh.runtime' has no attribute {name!r}")
