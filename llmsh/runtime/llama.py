"""The Llama family in one module: Llama 2/3, Mistral, Qwen2, Qwen3, Phi-3/Phi-4, SmolLM, TinyLlama are switches of
one config.

    h   = x + Attention(RMSNorm(x))          # RoPE on q, k; grouped-query heads (n_kv_head <= n_head)
    out = h + SwiGLU(RMSNorm(h))             # w2(silu(w1 h) * w3 h)

Switches: GQA (`n_kv_head`), q/k/v bias (Qwen2), bias everywhere (`attention_bias`), sliding-window attention
(Mistral, Phi-3, Qwen2/3 `use_sliding_window`), RoPE scaling (linear, llama3, Phi-3's longrope), partial rotary
(Phi-4-mini), RMSNorm of each q and k head before RoPE (Qwen3), tied input/output embeddings (SmolLM, Llama 3.2).
Phi-3 is Llama with q|k|v and gate|up already fused in its checkpoints (`fused_checkpoint`), which is our layout.
Parameter names follow gpt-fast; `hf_keys` is the load hook mapping them to the Hugging Face layout, `transposed`
says which stored (out, in) matrices become our (in, out) `Linear` weights, and `fused_parts` which stored matrices
are concatenated into one (q|k|v as `wqkv`, gate|up as `w13`: fewer, larger GEMMs per decode step).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmsh.runtime.errors import LoadError
from llmsh.runtime.kv_cache import Step, attend
from llmsh.runtime.layers import Linear
from llmsh.runtime.stack import DecoderStack, Rows

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
ROPE_TYPES = ("default", "linear", "llama3", "longrope", "factors")  # factors: per-frequency divisors, as GGUF files store llama3


@dataclass
class LlamaConfig:
    """Shape and switches of a Llama-family model; derived fields are filled in `__post_init__`."""

    vocab_size: int = 32000
    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = None              # None: multi-head attention (n_kv_head = n_head)
    head_dim: int | None = None               # None: dim // n_head (Qwen3/Gemma-style overrides exist)
    intermediate_size: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 4096
    qkv_bias: bool = False                    # Qwen2: bias on q, k, v only
    o_bias: bool = False                      # Llama attention_bias=True: bias on o too
    mlp_bias: bool = False
    tie_embeddings: bool = False              # SmolLM, Llama 3.2 1B/3B, Qwen2 0.5B: output = embedding matrix
    windows: list[int | None] = field(default_factory=list)  # per-layer sliding window (None = full attention)
    qk_norm: bool = False                     # Qwen3: RMSNorm over each q and k head before RoPE
    partial_rotary_factor: float = 1.0        # Phi-4-mini: RoPE on the first 3/4 of each head, the rest passes
    fused_checkpoint: bool = False            # Phi-3: checkpoints store qkv_proj and gate_up_proj already fused
    rotary_dim: int = 0                       # derived: head_dim * partial_rotary_factor

    def __post_init__(self) -> None:
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.dim // self.n_head
        self.rotary_dim = int(self.head_dim * self.partial_rotary_factor)
        if self.n_head % self.n_kv_head:
            raise LoadError(f"num_attention_heads {self.n_head} is not a multiple of num_key_value_heads {self.n_kv_head}")
        if not self.windows:
            self.windows = [None] * self.n_layer

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> LlamaConfig:
        """Read a transformers config.json (v4 `rope_theta`/`rope_scaling` or v5 `rope_parameters`)."""
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise LoadError(f"hidden_act {act!r} in config.json is not supported for {cfg.get('model_type')} (only silu)")
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0)
        partial = rope.pop("partial_rotary_factor", None) or cfg.get("partial_rotary_factor", 1.0)
        n_layer = cfg["num_hidden_layers"]
        model_type = cfg.get("model_type", "llama")
        if rope.get("rope_type", rope.get("type")) in ("su", "longrope", "yarn") and model_type == "phi3":
            rope["rope_type"] = "longrope"               # Phi-3's old names for it (transformers renames them too)
            rope.setdefault("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
            rope["max_position_embeddings"] = cfg.get("max_position_embeddings", 4096)
        window = cfg.get("sliding_window")
        if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
            window = None
        layer_types = cfg.get("layer_types") or ["sliding_attention" if window else "full_attention"] * n_layer
        if model_type in ("qwen2", "qwen3") and window and not cfg.get("layer_types"):  # v4 configs: window from max_window_layers on
            first = cfg.get("max_window_layers", 0)
            layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layer)]
        if model_type in ("mistral", "phi3") and window:
            layer_types = ["sliding_attention"] * n_layer
        windows = [window if t == "sliding_attention" and window else None for t in layer_types]
        return cls(
            vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], n_layer=n_layer, n_head=cfg["num_attention_heads"],
            n_kv_head=cfg.get("num_key_value_heads"), head_dim=cfg.get("head_dim"),
            intermediate_size=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=theta,
            rope_scaling=rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None,
            max_seq_len=cfg.get("max_position_embeddings", 4096),
            qkv_bias=model_type == "qwen2" or cfg.get("attention_bias", False), o_bias=cfg.get("attention_bias", False),
            mlp_bias=cfg.get("mlp_bias", False), tie_embeddings=cfg.get("tie_word_embeddings", False),
            windows=windows, qk_norm=model_type == "qwen3", partial_rotary_factor=partial,
            fused_checkpoint=model_type == "phi3",
        )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LlamaConfig:
        """A config from PRESETS (e.g. 'llama-3.2-1b', 'bench-110m')."""
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(dim=4096, n_layer=32, n_head=32, intermediate_size=11008, norm_eps=1e-5),
    "llama-3.2-1b": dict(vocab_size=128256, dim=2048, n_layer=16, n_head=32, n_kv_head=8, intermediate_size=8192,
                         rope_theta=500000.0, max_seq_len=131072, tie_embeddings=True,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "mistral-7b": dict(dim=4096, n_layer=32, n_head=32, n_kv_head=8, intermediate_size=14336, max_seq_len=32768),
    "qwen2-0.5b": dict(vocab_size=151936, dim=896, n_layer=24, n_head=14, n_kv_head=2, intermediate_size=4864,
                       rope_theta=1000000.0, qkv_bias=True, tie_embeddings=True, max_seq_len=32768, norm_eps=1e-6),
    "smollm-135m": dict(vocab_size=49152, dim=576, n_layer=30, n_head=9, n_kv_head=3, intermediate_size=1536,
                        tie_embeddings=True, max_seq_len=2048),
    "tinyllama-1.1b": dict(dim=2048, n_layer=22, n_head=32, n_kv_head=4, intermediate_size=5632, max_seq_len=2048),
    # ~110M parameters with GQA: what scripts/bench/decode.py measures
    "bench-110m": dict(vocab_size=32000, dim=768, n_layer=12, n_head=12, n_kv_head=4, intermediate_size=2048,
                       max_seq_len=2048),
}


def rope_inv_freq(cfg: LlamaConfig, long: bool = False) -> Tensor:
    """Inverse frequencies theta^(-2i/d) over the rotary dims, rescaled as config.rope_scaling says (linear, llama3,
    longrope: its short factors, or its long ones with `long`)."""
    hd = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "factors":                                    # GGUF's rope_freqs tensor (llama.cpp's llama3 scaling)
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32)
    if kind == "longrope":
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32)
        return 1.0 / (factors * cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    if kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)   # long waves: slowed by factor
        smooth = (old_len / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled                    # in between: interpolate
        medium = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
        return torch.where(medium, blended, scaled)
    raise LoadError(f"rope scaling {kind!r} in config.json is not supported (supported: {', '.join(ROPE_TYPES)})")


def model_rope_tables(cfg: LlamaConfig) -> tuple[Tensor, Tensor]:
    """The model's cos / signed-sin tables (max_seq_len, rotary_dim).

    Phi-3's longrope rotates with its short factors up to `original_max_position_embeddings` and its long ones beyond,
    and scales cos and sin by sqrt(1 + ln(factor) / ln(original)). Transformers picks one set for a whole forward
    (long as soon as any position passes the original length, re-rotating only the new tokens); here each position
    keeps its own, so results equal transformers' for sequences within the original length (4096 for Phi-3-mini-128k).
    """
    cos, sin = rope_tables(rope_inv_freq(cfg), cfg.max_seq_len)
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") != "longrope":
        return cos, sin
    old_len = scaling["original_max_position_embeddings"]
    long_cos, long_sin = rope_tables(rope_inv_freq(cfg, long=True), cfg.max_seq_len)
    cos[old_len:], sin[old_len:] = long_cos[old_len:], long_sin[old_len:]
    factor = scaling.get("factor") or scaling["max_position_embeddings"] / old_len
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_len))
    return cos * attention_factor, sin * attention_factor


def rope_tables(inv_freq: Tensor, max_seq_len: int) -> tuple[Tensor, Tensor]:
    """cos and *signed* sin tables (max_seq_len, head_dim) for `apply_rope`.

    Hugging Face's RoPE is x*cos + rotate_half(x)*sin with rotate_half(x1, x2) = (-x2, x1). That equals
    x*cos + roll(x, hd/2)*sin_signed with sin_signed = (-sin, sin) on the two halves: 4 ops instead of 6 per call, the
    same float operations in the same order (so results match to the bit).
    """
    t = torch.arange(max_seq_len, dtype=torch.int64).float()
    freqs = torch.outer(t, inv_freq)                                          # (max_seq, hd/2)
    return torch.cat((freqs, freqs), dim=-1).cos(), torch.cat((-freqs.sin(), freqs.sin()), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """Rotate x (..., hd) by position angles; cos/sin_signed broadcast against x (see `rope_tables`)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 like the reference."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:  # one fused op; same result as below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE over the slotted KV cache; q, k, v come from one fused projection."""

    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__()
        n_kv_head, head_dim = cfg.n_kv_head, cfg.head_dim
        assert n_kv_head is not None and head_dim is not None            # filled in by LlamaConfig.__post_init__
        self.layer, self.n_head, self.n_kv_head, self.head_dim = layer, cfg.n_head, n_kv_head, head_dim
        self.window = cfg.windows[layer]
        # wq | wk | wv as one (dim, (n_head + 2 n_kv_head) * head_dim) matrix: one GEMM instead of three per layer
        self.wqkv = Linear(cfg.dim, (cfg.n_head + 2 * n_kv_head) * head_dim, bias=cfg.qkv_bias)
        self.wo = Linear(cfg.n_head * head_dim, cfg.dim, bias=cfg.o_bias)
        self.rotary_dim = cfg.rotary_dim
        self.q_norm: nn.Module | None = RMSNorm(head_dim, cfg.norm_eps) if cfg.qk_norm else None   # (Gemma's: 1 + w)
        self.k_norm: nn.Module | None = RMSNorm(head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, step: Step, keep: Rows | None = None) -> Tensor:
        """(B, T, dim) -> (B, T, dim); with `keep` (row, position index tensors), only the output at those tokens."""
        B, T, _ = x.shape
        nh, nqk = self.n_head, self.n_head + self.n_kv_head
        qkv = self.wqkv(x).view(B, T, nqk + self.n_kv_head, self.head_dim)
        qk = qkv[:, :, :nqk]
        if self.q_norm is not None and self.k_norm is not None:                   # Qwen3: per-head RMSNorm first
            qk = torch.cat((self.q_norm(qk[:, :, :nh]), self.k_norm(qk[:, :, nh:])), dim=2)
        if self.rotary_dim == self.head_dim:
            qk = apply_rope(qk, cos, sin)                                         # q and k heads rotated at once
        else:                                                                     # partial: the rest passes through
            r = self.rotary_dim
            qk = torch.cat((apply_rope(qk[..., :r], cos, sin), qk[..., r:]), dim=-1)
        q, k = qk[:, :, :nh].transpose(1, 2), qk[:, :, nh:].transpose(1, 2)      # (B, nh, T, hd), (B, n_kv, T, hd)
        k, v = step.update(self.layer, k, qkv[:, :, nqk:].transpose(1, 2))       # (B, n_kv, L, hd)
        y = self.attend(q, k, v, step).transpose(1, 2)                             # (B, T, nh, hd)
        return self.wo(y[keep].reshape(-1, nh * self.head_dim) if keep is not None else
                       y.reshape(B, T, nh * self.head_dim))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, step: Step) -> Tensor:
        """softmax(q k^T / sqrt(hd) + mask) v over the cache (Gemma's attention overrides this)."""
        return attend(q, k, v, step, self.window)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), with w1 | w3 fused into one matrix `w13`."""

    def __init__(self, cfg: LlamaConfig, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or cfg.intermediate_size                                   # (a MoE expert's is smaller)
        self.w13 = Linear(cfg.dim, 2 * hidden, bias=cfg.mlp_bias)                  # gate | up
        self.w2 = Linear(hidden, cfg.dim, bias=cfg.mlp_bias)                       # down

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate).mul_(up))


class Block(nn.Module):
    """One pre-norm transformer layer."""

    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, step: Step, keep: Rows | None = None) -> Tensor:
        """With `keep` (see DecoderStack.keep_rows): (B, T, dim) -> (len(keep[1]), dim)."""
        h = (x[keep] if keep is not None else x) + self.attention(self.attention_norm(x), cos, sin, step, keep)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(DecoderStack):
    """Embedding, blocks, final norm and output head; `forward(idx, step)` -> logits."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__(cfg, (Block(cfg, i) for i in range(cfg.n_layer)), RMSNorm(cfg.dim, cfg.norm_eps))
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)    # signed: see rope_tables

    def setup(self, device: torch.device | str) -> None:
        """After weights are assigned: tie the head if configured and build the RoPE tables on device."""
        self.tie_head()
        cos, sin = model_rope_tables(self.config)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def forward(self, idx: Tensor, step: Step, last: Tensor | None = None) -> Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab), or (len(last), vocab) at positions `last` if given."""
        x = self.embed(idx)                                                       # (B, T, dim)
        cos = self.rope_cos[step.input_pos].to(x.dtype)[:, :, None]               # (B, T, 1, hd)
        sin = self.rope_sin[step.input_pos].to(x.dtype)[:, :, None]
        for i, layer in enumerate(self.layers):
            if self.page_hook:
                self.page_hook(1 + i)
            x = layer(x, cos, sin, step, self.keep_rows(x, last, i))
        return self.head(x, len(self.layers) + 1)


HF_RULES = [                   # (pattern, replacement) on our names; the first that matches
    (r"^tok_embeddings\.", "model.embed_tokens."),
    (r"^layers\.(\d+)\.attention\.w([qkvo])\.", r"model.layers.\1.self_attn.\2_proj."),
    (r"^layers\.(\d+)\.attention\.([qk]_norm)\.", r"model.layers.\1.self_attn.\2."),
    (r"^layers\.(\d+)\.feed_forward\.w1\.", r"model.layers.\1.mlp.gate_proj."),
    (r"^layers\.(\d+)\.feed_forward\.w3\.", r"model.layers.\1.mlp.up_proj."),
    (r"^layers\.(\d+)\.feed_forward\.w2\.", r"model.layers.\1.mlp.down_proj."),
    (r"^layers\.(\d+)\.attention_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^layers\.(\d+)\.ffn_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^norm\.", "model.norm."),
    (r"^output\.", "lm_head."),
]


_PHI3_RULES = [
    (r"^layers\.(\d+)\.attention\.wqkv\.", r"model.layers.\1.self_attn.qkv_proj."),
    (r"^layers\.(\d+)\.feed_forward\.w13\.", r"model.layers.\1.mlp.gate_up_proj."),
]


def hf_keys(name: str, cfg: LlamaConfig) -> list[str]:
    """Load hook: candidate Hugging Face keys for our parameter `name` (tied heads read the embedding)."""
    if name == "output.weight" and cfg.tie_embeddings:
        return ["model.embed_tokens.weight", "lm_head.weight"]
    for pattern, repl in (_PHI3_RULES if cfg.fused_checkpoint else []) + HF_RULES:
        if re.match(pattern, name):
            return [re.sub(pattern, repl, name)]
    return [name]


_FUSED = {".attention.wqkv.": (".attention.wq.", ".attention.wk.", ".attention.wv."),
          ".feed_forward.w13.": (".feed_forward.w1.", ".feed_forward.w3.")}


def fused_parts(name: str, cfg: LlamaConfig) -> list[str]:
    """Load hook: the checkpoint parameters our fused `wqkv` / `w13` concatenate (in our naming), else []."""
    if cfg.fused_checkpoint:
        return []
    for fused, parts in _FUSED.items():
        if fused in name:
            return [name.replace(fused, part) for part in parts]
    return []


def transposed(name: str, cfg: LlamaConfig) -> bool:
    """Checkpoints store projections (out, in); our `Linear` keeps (in, out) (see layers.py). The output head is one
    too, and a tied embedding is stored as that head's weight (layers.TiedEmbedding); an untied embedding is not."""
    if name in ("output.weight", "tok_embeddings.weight"):
        return name == "output.weight" or cfg.tie_embeddings
    return name.endswith(".weight") and (".attention.w" in name or ".feed_forward.w" in name)


Config = LlamaConfig
