"""Refuse a config.json whose sizes cannot describe a model, before any arithmetic on them.

`n_layer: 0` loaded an empty model that failed on its first step, and `n_head: 0` was a ZeroDivisionError; each is
one line at `load` now, naming the key and what it must be. Torch-free, and independent of the model family: the
keys below are the size keys of both GPT-2 and the Llama family configs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmsh.runtime.errors import LoadError

SIZE_KEYS = (
    "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",  # GPT-2
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",  # Llama family
    "intermediate_size", "max_position_embeddings",
)
OPTIONAL = ("n_inner", "num_key_value_heads", "head_dim")  # null means "derive it"
_HEADS = (("n_embd", "n_head"), ("hidden_size", "num_attention_heads"))


def check_sizes(cfg: dict[str, Any], where: Path) -> None:
    """LoadError (one line) unless every size key present in `cfg` is a whole number ≥ 1 and the width splits into heads."""
    for key in SIZE_KEYS:
        if key not in cfg or (cfg[key] is None and key in OPTIONAL):
            continue
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LoadError(f"{key} is {value!r} in {where}; it must be a whole number of at least 1 "
                            "(the config is broken: fix or re-download it)")
    for width, heads in _HEADS:
        if width in cfg and heads in cfg and cfg.get("head_dim") is None and cfg[width] % cfg[heads]:
            raise LoadError(f"{width} {cfg[width]} in {where} is not a multiple of {heads} {cfg[heads]}; "
                            "the config is broken: fix or re-download it")
