"""Which C decode step a model gets: quantized matrices → quant_decode.py, float ones → fast_decode.py (or none:
torch ops). One place decides, so neither decoder module needs the other's dispatch."""

from __future__ import annotations

from typing import Any

from llmsh.runtime import fast_decode, quant, quant_decode


def decoder_for(model: Any) -> Any:
    """The model's decoder, or None where the kernels do not apply (device, dtype, family, no compiler)."""
    if any(isinstance(m, quant.QLinear) for m in model.module.modules()):
        return quant_decode.for_model(model)
    return fast_decode.for_model(model)
