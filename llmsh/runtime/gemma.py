"""Gemma 2 and Gemma 3 (text) in one module: the same block, switched by config.

    x   = embed(idx) * sqrt(dim)
    h   = x + PostNorm(Attention(PreNorm(x)))     # RoPE; q scaled by query_pre_attn_scalar^-1/2, not head_dim^-1/2
    out = h + PostNorm(GeGLU(PreNorm(h)))         # w2(gelu_tanh(w1 h) * w3 h)
    logits = cap * tanh(head(norm(out)) / cap)    # Gemma 2's final soft-capping (none in Gemma 3)

Every norm is RMSNorm with a (1 + w) gain (Gemma stores w around 0). Layers alternate between sliding-window
(local) and full (global) attention as config `layer_types` says: every other layer in Gemma 2, five local to one
global in Gemma 3. Gemma 2 soft-caps the attention logits (cap * tanh(s / cap)), which SDPA cannot, so its attention
is written out here; Gemma 3 drops the caps and adds an RMSNorm over each q and k head before RoPE, and rotates
local layers with their own base (`rope_local_base_freq`, 10k) where global layers use 1M (and linear scaling in
the 4B and larger models).

Parameter names follow the Llama module's (`attention.wqkv` fused from q, k, v; `feed_forward.w13` from gate, up);
the load hooks below map them to the Hugging Face layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmsh.runtime import llama
from llmsh.runtime.errors import LoadError
from llmsh.runtime.kv_cache import Step, attend
from llmsh.runtime.layers import Linear
from llmsh.runtime.stack import DecoderStack, Rows

MODEL_TYPES = ("gemma2", "gemma3_text", "gemma3")   # gemma3: the multimodal checkpoints (4B+), their text model
# Gemma3TextConfig's defaults: the multimodal checkpoints' text_config lists only what differs from them
GEMMA3_TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6, max_position_embeddings=131072,
    query_pre_attn_scalar=256, sliding_window=4096, rope_theta=1e6, rope_local_base_freq=10000.0)
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")   # all the tanh approximation of GELU


@dataclass
class GemmaConfig:
    """Shape and switches of a Gemma 2 / Gemma 3 text model; derived fields are filled in `__post_init__`."""

    vocab_size: int = 256000
    dim: int = 2304
    n_layer: int = 26
    n_head: int = 8
    n_kv_head: int = 4
    head_dim: int = 256
    intermediate_size: int = 9216
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0               # global (full-attention) layers
    rope_local_theta: float = 10000.0         # sliding-window layers (Gemma 3: 10k against 1M global)
    rope_scaling: dict[str, Any] | None = None  # global layers only (Gemma 3 4B+: linear, factor 8)
    max_seq_len: int = 8192
    query_pre_attn_scalar: float = 256.0      # q is scaled by this^-1/2 (Gemma 2 27B: dim / n_head, not head_dim)
    attn_softcap: float | None = 50.0         # Gemma 2: cap * tanh(scores / cap); Gemma 3: None
    final_softcap: float | None = 30.0        # Gemma 2: the same on the logits; Gemma 3: None
    qk_norm: bool = False                     # Gemma 3: (1 + w) RMSNorm over each q and k head before RoPE
    attention_bias: bool = False
    tie_embeddings: bool = True               # every released Gemma ties its head to the embedding
    windows: list[int | None] = field(default_factory=list)  # per-layer sliding window (None = global)

    def __post_init__(self) -> None:
        if self.n_head % self.n_kv_head:
            raise LoadError(f"num_attention_heads {self.n_head} is not a multiple of num_key_value_heads {self.n_kv_head}")
        if not self.windows:
            self.windows = [None] * self.n_layer

    # what llama.Attention reads, which Gemma's attention extends: biases on q|k|v and o alike, RoPE on whole heads
    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias

    @property
    def rotary_dim(self) -> int:
        return self.head_dim

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> GemmaConfig:
        """Read a transformers Gemma2Config / Gemma3TextConfig config.json (v4 or v5 RoPE keys), or the text model of
        a multimodal Gemma 3 (Gemma3Config: its `text_config`; the vision tower is not loaded)."""
        if cfg.get("model_type") == "gemma3":
            cfg = {**GEMMA3_TEXT_DEFAULTS, **(cfg.get("text_config") or {}), "model_type": "gemma3_text",
                   "tie_word_embeddings": cfg.get("tie_word_embeddings", True)}
        model_type = cfg.get("model_type")
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ACTIVATIONS:
            raise LoadError(f"hidden_activation {act!r} in config.json is not supported for {model_type} "
                            f"(only the tanh GELU: {', '.join(ACTIVATIONS)})")
        if cfg.get("use_bidirectional_attention"):
            raise LoadError(f"use_bidirectional_attention=true in config.json is not supported for {model_type} "
                            "(an embedding model, not a causal LM)")
        n_layer = cfg["num_hidden_layers"]
        gemma3 = model_type == "gemma3_text"
        layer_types = cfg.get("layer_types")
        if not layer_types:   # v4 configs: Gemma 2 slides on even layers, Gemma 3 on all but every 6th
            pattern = cfg.get("sliding_window_pattern", 6) if gemma3 else 2
            layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layer)]
        window = cfg.get("sliding_window")
        windows = [window if t == "sliding_attention" and window else None for t in layer_types]
        rope = cfg.get("rope_parameters") or {}
        if "full_attention" in rope or "sliding_attention" in rope:       # v5: one dict per layer type
            full, local = dict(rope.get("full_attention") or {}), dict(rope.get("sliding_attention") or {})
        else:                                                             # v4: rope_theta, rope_local_base_freq
            full = dict(rope or cfg.get("rope_scaling") or {})
            full.setdefault("rope_theta", cfg.get("rope_theta", 1e6 if gemma3 else 10000.0))
            local = {"rope_theta": cfg.get("rope_local_base_freq", 10000.0)}
        theta = full.pop("rope_theta", 10000.0)
        local_theta = local.pop("rope_theta", 10000.0 if gemma3 else theta)
        for params, where in ((full, "global"), (local, "local")):
            kind = params.get("rope_type", params.get("type", "default"))
            if kind not in ("default", "linear") or (where == "local" and kind != "default"):
                raise LoadError(f"rope scaling {kind!r} on {where} layers in config.json is not supported for "
                                f"{model_type} (supported: linear on global layers)")
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], n_layer=n_layer, n_head=cfg["num_attention_heads"],
            n_kv_head=cfg.get("num_key_value_heads") or cfg["num_attention_heads"], head_dim=head_dim,
            intermediate_size=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=theta,
            rope_local_theta=local_theta,
            rope_scaling=full if full.get("rope_type", full.get("type", "default")) != "default" else None,
            max_seq_len=cfg.get("max_position_embeddings", 8192),
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar") or head_dim,
            attn_softcap=cfg.get("attn_logit_softcapping"), final_softcap=cfg.get("final_logit_softcapping"),
            qk_norm=gemma3, attention_bias=cfg.get("attention_bias", False),
            tie_embeddings=cfg.get("tie_word_embeddings", True), windows=windows,
        )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GemmaConfig:
        """A config from PRESETS (e.g. 'gemma-2-2b', 'bench-gemma')."""
        return cls(**{**PRESETS[name], **overrides})


_G3_LAYERS = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(26)]
PRESETS: dict[str, dict[str, Any]] = {
    "gemma-2-2b": dict(vocab_size=256000, dim=2304, n_layer=26, n_head=8, n_kv_head=4, head_dim=256,
                       intermediate_size=9216, query_pre_attn_scalar=256.0,
                       windows=[4096 if i % 2 == 0 else None for i in range(26)]),
    "gemma-3-1b": dict(vocab_size=262144, dim=1152, n_layer=26, n_head=4, n_kv_head=1, head_dim=256,
                       intermediate_size=6912, rope_theta=1e6, query_pre_attn_scalar=256.0, attn_softcap=None,
                       final_softcap=None, qk_norm=True, max_seq_len=32768,
                       windows=[512 if t == "sliding_attention" else None for t in _G3_LAYERS]),
    # ~0.5B parameters, Gemma-2-shaped (soft-caps, alternating windows): what scripts/bench/decode.py measures
    "bench-gemma": dict(vocab_size=32000, dim=1024, n_layer=16, n_head=8, n_kv_head=4, head_dim=128,
                        intermediate_size=4096, query_pre_attn_scalar=128.0, max_seq_len=4096,
                        windows=[1024 if i % 2 == 0 else None for i in range(16)]),
}


def rope_tables(theta: float, head_dim: int, scaling: dict[str, Any] | None, max_seq_len: int) -> tuple[Tensor, Tensor]:
    """cos / signed-sin tables for one RoPE base (see llama.rope_tables), linear scaling applied if given."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling:
        inv_freq = inv_freq / scaling["factor"]
    return llama.rope_tables(inv_freq, max_seq_len)


class RMSNorm(nn.Module):
    """x / rms(x) * (1 + weight), in float32 like the reference (Gemma stores the gain as an offset from 1)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        y = F.rms_norm(x.float(), self.weight.shape, None, self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


def softcapped_attention(q: Tensor, k: Tensor, v: Tensor, step: Step, window: int | None, scale: float,
                         cap: float) -> Tensor:
    """softmax(cap * tanh(q k^T scale / cap) + mask) v; q (B, nh, T, hd), k/v (B, n_kv, L, hd) -> (B, nh, T, hd).

    Query heads are grouped by their kv head, (B, n_kv, n_rep, T, hd), so K and V are read in place, never repeated.
    """
    mask, causal = step.mask(window)
    B, nh, T, hd = q.shape
    n_kv, L = k.shape[1], k.shape[2]
    qg = q.view(B, n_kv, nh // n_kv, T, hd)
    scores = (qg @ k[:, :, None].transpose(-1, -2)) * scale                       # (B, n_kv, n_rep, T, L)
    scores = torch.tanh(scores / cap) * cap
    if mask is None and causal:
        mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril(L - T)[None, None]
    if mask is not None:
        scores = scores.masked_fill(~mask[:, :, None], float("-inf"))           # mask (B, 1, 1, T, L)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return (probs @ v[:, :, None]).view(B, nh, T, hd)


class Attention(llama.Attention):
    """Llama's grouped-query attention (fused q|k|v, q/k head norms, RoPE, the KV cache) with Gemma's query scale
    (query_pre_attn_scalar^-1/2), (1 + w) head norms (Gemma 3) and soft-capped logits (Gemma 2)."""

    def __init__(self, cfg: GemmaConfig, layer: int) -> None:
        super().__init__(cast(llama.LlamaConfig, cfg), layer)    # GemmaConfig has every field Attention reads
        self.cap, self.scale = cfg.attn_softcap, cfg.query_pre_attn_scalar ** -0.5
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, step: Step) -> Tensor:
        """softmax(q k^T scale + mask) v, the logits soft-capped first where the model caps them."""
        if self.cap is None or step.in_c:                         # (the C kernels cap the logits themselves)
            return attend(q, k, v, step, self.window, scale=self.scale, cap=self.cap)
        return softcapped_attention(q, k, v, step, self.window, self.scale, self.cap)


class FeedForward(nn.Module):
    """GeGLU: w2(gelu_tanh(w1 x) * w3 x), with w1 | w3 fused into one matrix `w13`."""

    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        self.w13 = Linear(cfg.dim, 2 * cfg.intermediate_size, bias=False)     # gate | up
        self.w2 = Linear(cfg.intermediate_size, cfg.dim, bias=False)          # down

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.gelu(gate, approximate="tanh").mul_(up))


class Block(nn.Module):
    """One layer with norms before and after both attention and MLP."""

    def __init__(self, cfg: GemmaConfig, layer: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer)
        self.post_attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.post_ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, step: Step, keep: Rows | None = None) -> Tensor:
        """With `keep` (see DecoderStack.keep_rows): (B, T, dim) -> (len(keep[1]), dim)."""
        a = self.attention(self.attention_norm(x), cos, sin, step, keep)
        h = (x[keep] if keep is not None else x) + self.post_attention_norm(a)
        return h + self.post_ffn_norm(self.feed_forward(self.ffn_norm(h)))


class Transformer(DecoderStack):
    """Scaled embedding, blocks, final norm, head and final soft-cap; `forward(idx, step)` -> logits."""

    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__(cfg, (Block(cfg, i) for i in range(cfg.n_layer)), RMSNorm(cfg.dim, cfg.norm_eps))
        for name in ("rope_cos", "rope_sin", "rope_local_cos", "rope_local_sin"):
            self.register_buffer(name, torch.empty(0), persistent=False)

    def setup(self, device: torch.device | str) -> None:
        """After weights are assigned: tie the head if configured and build both RoPE tables on device."""
        cfg = self.config
        self.tie_head()
        cos, sin = rope_tables(cfg.rope_theta, cfg.head_dim, cfg.rope_scaling, cfg.max_seq_len)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)
        cos, sin = rope_tables(cfg.rope_local_theta, cfg.head_dim, None, cfg.max_seq_len)
        self.rope_local_cos, self.rope_local_sin = cos.to(device), sin.to(device)

    def forward(self, idx: Tensor, step: Step, last: Tensor | None = None) -> Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab), or (B, vocab) at positions `last` (B,) if given."""
        x = self.embed(idx)                                                       # (B, T, dim)
        x = x * torch.tensor(self.config.dim ** 0.5, dtype=x.dtype)             # rounded to x's dtype, as HF does
        tables = {}
        for window in set(self.config.windows):
            cos, sin = (self.rope_cos, self.rope_sin) if window is None else (self.rope_local_cos, self.rope_local_sin)
            tables[window] = (cos[step.input_pos].to(x.dtype)[:, :, None], sin[step.input_pos].to(x.dtype)[:, :, None])
        for i, layer in enumerate(self.layers):
            if self.page_hook:
                self.page_hook(1 + i)
            x = layer(x, *tables[self.config.windows[i]], step, self.keep_rows(x, last, i))  # cos, sin (B, T, 1, hd)
        logits = self.head(x, len(self.layers) + 1)
        cap = self.config.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap


_HF_RULES = [   # Gemma's norms around attention and MLP; the rest as in Llama's checkpoints
    (r"^layers\.(\d+)\.post_attention_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^layers\.(\d+)\.ffn_norm\.", r"model.layers.\1.pre_feedforward_layernorm."),
    (r"^layers\.(\d+)\.post_ffn_norm\.", r"model.layers.\1.post_feedforward_layernorm."),
    *llama.HF_RULES,
]


def hf_keys(name: str, cfg: GemmaConfig) -> list[str]:
    """Load hook: candidate Hugging Face keys for our parameter `name` (tied heads read the embedding); each also
    under the prefixes multimodal Gemma 3 checkpoints give their text model (`language_model.model.…`)."""
    keys = [name]
    if name == "output.weight" and cfg.tie_embeddings:
        keys = ["model.embed_tokens.weight", "lm_head.weight"]
    else:
        for pattern, repl in _HF_RULES:
            if re.match(pattern, name):
                keys = [re.sub(pattern, repl, name)]
                break
    return [*keys, *(f"language_model.{k}" for k in keys), *(k.replace("model.", "model.language_model.", 1)
                                                             for k in keys if k.startswith("model."))]


_FUSED = {".attention.wqkv.": (".attention.wq.", ".attention.wk.", ".attention.wv."),
          ".feed_forward.w13.": (".feed_forward.w1.", ".feed_forward.w3.")}


def fused_parts(name: str, cfg: GemmaConfig) -> list[str]:
    """Load hook: the checkpoint parameters our fused `wqkv` / `w13` concatenate (in our naming), else []."""
    for fused, parts in _FUSED.items():
        if fused in name:
            return [name.replace(fused, part) for part in parts]
    return []


def transposed(name: str, cfg: GemmaConfig) -> bool:
    """Stored (out, in) projections become our (in, out) `Linear` weights; so do the head and a tied embedding."""
    if name in ("output.weight", "tok_embeddings.weight"):
        return name == "output.weight" or cfg.tie_embeddings
    return name.endswith(".weight") and (".attention.w" in name or ".feed_forward.w" in name)


Config = GemmaConfig
