"""GPT-2 in plain PyTorch, nanoGPT-style.

    h   = x + Attention(LayerNorm(x))        # learned absolute positions, fused q/k/v projection `c_attn`
    out = h + MLP(LayerNorm(h))              # c_proj(gelu_tanh(c_fc h))

Hugging Face stores GPT-2's projections as `Conv1D` with weights shaped (in, out), which is exactly our `Linear`
(layers.py), so they are used straight from the mmap'd file with no copy. The output head always shares the
token-embedding matrix, which is transposed once at load to serve as the head's (in, out) weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from llmsh.runtime.errors import LoadError
from llmsh.runtime.kv_cache import Step, attend
from llmsh.runtime.layers import Embedding, Linear, TiedEmbedding
from llmsh.runtime.stack import Rows, keep_rows

MODEL_TYPES = ("gpt2",)
ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}


@dataclass
class GPT2Config:
    """Shape of a GPT-2 model; `n_inner` None means 4 * n_embd."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    gelu_approximate: str = "tanh"           # HF "gelu_new" is the tanh approximation
    scale_by_layer: bool = False              # scale_attn_by_inverse_layer_idx

    def __post_init__(self) -> None:
        self.n_inner = self.n_inner or 4 * self.n_embd
        self.head_dim = self.n_embd // self.n_head
        self.n_kv_head = self.n_head
        self.max_seq_len = self.n_positions   # learned positions: no sequence may be longer
        self.tie_embeddings = True

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> GPT2Config:
        """Read a transformers GPT-2 config.json."""
        act = cfg.get("activation_function", "gelu_new")
        if act not in ACTIVATIONS:
            raise LoadError(f"activation_function {act!r} in config.json is not supported for gpt2 "
                            f"(supported: {', '.join(ACTIVATIONS)})")
        if not cfg.get("scale_attn_weights", True):
            raise LoadError("scale_attn_weights=false in config.json is not supported for gpt2")
        return cls(vocab_size=cfg["vocab_size"], n_positions=cfg.get("n_positions", 1024), n_embd=cfg["n_embd"],
                   n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_inner=cfg.get("n_inner"),
                   layer_norm_epsilon=cfg.get("layer_norm_epsilon", 1e-5), gelu_approximate=ACTIVATIONS[act],
                   scale_by_layer=cfg.get("scale_attn_by_inverse_layer_idx", False))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPT2Config:
        """A config from PRESETS ('gpt2' is the 124M model)."""
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),          # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),   # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),      # 1558M
}


class Attention(nn.Module):
    """Multi-head causal self-attention over the slotted KV cache."""

    def __init__(self, cfg: GPT2Config, layer: int) -> None:
        super().__init__()
        self.layer, self.n_head, self.n_embd = layer, cfg.n_head, cfg.n_embd
        self.scale = (cfg.head_dim ** -0.5) / (layer + 1 if cfg.scale_by_layer else 1)
        self.c_attn = Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: Tensor, step: Step, keep: Rows | None = None) -> Tensor:
        """(B, T, C) -> (B, T, C); with `keep` (row, position index tensors), only the output at those tokens."""
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                            # each (B, nh, T, hd), views
        k, v = step.update(self.layer, k, v)                             # (B, nh, L, hd)
        y = attend(q, k, v, step, scale=self.scale).transpose(1, 2)       # (B, T, nh, hd)
        return self.c_proj(y[keep].reshape(-1, C) if keep is not None else y.reshape(B, T, C))


class MLP(nn.Module):
    """c_proj(gelu(c_fc x))."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.approximate = cfg.gelu_approximate
        inner = cfg.n_inner or 4 * cfg.n_embd  # __post_init__ filled it in
        self.c_fc = Linear(cfg.n_embd, inner)
        self.c_proj = Linear(inner, cfg.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        # in place: the product is ours, and a second (tokens, 4C) tensor costs page faults and a pass of memory
        return self.c_proj(torch.ops.aten.gelu_(self.c_fc(x), approximate=self.approximate))


class Block(nn.Module):
    """One pre-LayerNorm GPT-2 layer."""

    def __init__(self, cfg: GPT2Config, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, step: Step, keep: Rows | None = None) -> Tensor:
        """With `keep` (the last layer of a prefill), every token's keys and values are cached but the rest of the
        layer runs only for the tokens kept: (B, T, C) -> (len(keep[1]), C)."""
        h = self.attn(self.ln_1(x), step, keep).add_(x[keep] if keep is not None else x)   # residuals added in place
        return self.mlp(self.ln_2(h)).add_(h)


class Transformer(nn.Module):
    """Token + position embeddings, blocks, final LayerNorm, tied head; `forward(idx, step)` -> logits."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.config = cfg
        self.wte = TiedEmbedding(cfg.vocab_size, cfg.n_embd)                 # (C, vocab): also the head's weight
        self.wpe = Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.page_hook: Callable[[int], None] | None = None

    def setup(self, device: torch.device | str) -> None:
        """After weights are assigned: tie the head to the token embedding."""
        self.lm_head.weight = self.wte.weight

    def pages(self) -> list[tuple[str, list[str]]]:
        """(page name, parameter names) in execution order: embed, block.0 …, head (the head reuses embed's matrix)."""
        blocks = [(f"block.{i}", [f"h.{i}.{n}" for n, _ in layer.named_parameters()]) for i, layer in enumerate(self.h)]
        return [("embed", ["wte.weight", "wpe.weight"]), *blocks, ("head", ["ln_f.weight", "ln_f.bias"])]

    def forward(self, idx: Tensor, step: Step, last: Tensor | None = None) -> Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab), or (B, vocab) at positions `last` (B,) if given."""
        hook = self.page_hook
        if hook:
            hook(0)
        x = self.wte(idx) + self.wpe(step.input_pos)                         # (B, T, C)
        for i, block in enumerate(self.h):
            if hook:
                hook(1 + i)
            # with `last`, the last block's projection and MLP run only at those tokens (9 of its 12 C^2
            # multiply-adds a token skipped for the rest: ~6% of a 12-layer prefill)
            x = block(x, step, keep_rows(x, last, i, len(self.h)))
        if hook:
            hook(0)  # the head reads the embedding page's matrix
            hook(len(self.h) + 1)
        return self.lm_head(self.ln_f(x))


def hf_keys(name: str, cfg: GPT2Config) -> list[str]:
    """Load hook: HF keys for our parameter (with or without the `transformer.` prefix of GPT2LMHeadModel)."""
    if name == "lm_head.weight":
        name = "wte.weight"
    return ["transformer." + name, name]


def transposed(name: str, cfg: GPT2Config) -> bool:
    """Conv1D weights are stored (in, out), like our Linear; only the tied token embedding is transposed, so that the
    head can use it as an (in, out) weight (see layers.TiedEmbedding)."""
    return name in ("wte.weight", "lm_head.weight")


def fused_parts(name: str, cfg: GPT2Config) -> list[str]:
    """The checkpoint already fuses q/k/v (`c_attn`): no parameter is assembled from several."""
    return []


Config = GPT2Config
