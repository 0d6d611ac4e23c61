"""Block-quantized weights (GGUF's Q8_0, Q4_0, Q4_K, Q6_K) kept quantized in memory."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

QUANT_TYPES: tuple[str, ...] = ()


def quantize_module(module: nn.Module, ckpt: Any) -> dict[str, Tensor]:
    """Swap the Linear layers whose file matrices are quantized for QLinear; returns their loaded parameters."""
    return {}
