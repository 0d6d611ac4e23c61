"""Mixtures of experts: Mixtral and Qwen3-MoE, the Llama block with its MLP replaced by routed experts.

    h   = x + Attention(RMSNorm(x))                      # llama.Attention (Qwen3-MoE: with q/k head norms)
    p   = softmax(router(RMSNorm(h)))                    # (tokens, n_experts), in float32
    w, e = top_k(p)                                      # Mixtral renormalises w to sum 1; Qwen3-MoE if norm_topk_prob
    out = h + sum_k w_k * SwiGLU_{e_k}(RMSNorm(h))       # each expert is a llama.FeedForward

Only the experts some token chose run, each on its tokens alone, so a decode step reads top_k / n_experts of the
expert weights (Mixtral 8x7B: 2 of 8, ~13 of its ~47 B parameters per token with attention and embeddings).
Every expert is a page of its own (`pages()`), paged in by the hook right before it runs: a model larger than the
pager's budget keeps running with its hot experts resident.

Checkpoints store one tensor per expert (`block_sparse_moe.experts.{j}.w1` in Mixtral, `mlp.experts.{j}.gate_proj`
in Qwen3-MoE), as transformers' save_pretrained writes them; the router's (n_experts, dim) matrix becomes our (in,
out) `Linear` weight like every projection.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from llmsh.runtime import llama
from llmsh.runtime.errors import LoadError
from llmsh.runtime.kv_cache import Step
from llmsh.runtime.layers import Linear
from llmsh.runtime.stack import DecoderStack, Rows

MODEL_TYPES = ("mixtral", "qwen3_moe")


@dataclass
class MoEConfig(llama.LlamaConfig):
    """A Llama config plus the experts: how many, how many per token, their size, and which layers have them."""

    n_experts: int = 8
    top_k: int = 2
    expert_size: int = 14336                  # a Mixtral expert's hidden size; Qwen3-MoE: moe_intermediate_size
    norm_topk: bool = True                    # renormalise the chosen experts' weights to sum 1 (Mixtral: always)
    weights_in_model_dtype: bool = False      # Qwen3-MoE rounds routing weights to the model dtype; Mixtral: float32
    dense_layers: list[int] = field(default_factory=list)   # Qwen3-MoE mlp_only_layers: a plain MLP there
    naming: str = "mixtral"                   # checkpoint key layout: "mixtral" or "qwen3_moe"

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> MoEConfig:
        """Read a transformers MixtralConfig / Qwen3MoeConfig config.json."""
        model_type: str = cfg["model_type"]      # present: load() picked this family by it
        qwen = model_type == "qwen3_moe"
        if cfg.get("shared_expert_intermediate_size"):
            raise LoadError(f"shared experts (shared_expert_intermediate_size) are not supported for {model_type}")
        # the attention half is Qwen3's (q/k norms) or Mistral's (optional window on every layer)
        base = llama.LlamaConfig.from_hf({**cfg, "model_type": "qwen3" if qwen else "mistral"})
        n_layer = base.n_layer
        step = cfg.get("decoder_sparse_step", 1) or 1
        dense = sorted(set(cfg.get("mlp_only_layers") or []) | {i for i in range(n_layer) if (i + 1) % step})
        n_experts = cfg.get("num_experts") or cfg["num_local_experts"]
        top_k = cfg["num_experts_per_tok"]
        if not 0 < top_k <= n_experts:
            raise LoadError(f"num_experts_per_tok {top_k} in config.json must be between 1 and the {n_experts} experts")
        return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(llama.LlamaConfig)},
                   n_experts=n_experts, top_k=top_k,
                   expert_size=cfg["moe_intermediate_size"] if qwen else cfg["intermediate_size"],
                   norm_topk=cfg.get("norm_topk_prob", False) if qwen else True, weights_in_model_dtype=qwen,
                   dense_layers=dense, naming=model_type)


PRESETS: dict[str, dict[str, Any]] = {
    "mixtral-8x7b": dict(vocab_size=32000, dim=4096, n_layer=32, n_head=32, n_kv_head=8, intermediate_size=14336,
                         expert_size=14336, rope_theta=1e6, max_seq_len=32768),
    "qwen3-30b-a3b": dict(vocab_size=151936, dim=2048, n_layer=48, n_head=32, n_kv_head=4, head_dim=128,
                          intermediate_size=6144, expert_size=768, n_experts=128, top_k=8, norm_topk=True,
                          weights_in_model_dtype=True, qk_norm=True, rope_theta=1e6, naming="qwen3_moe"),
    # 8 experts, top-2, ~0.5B parameters of which ~0.2B are read per token: what scripts/bench/decode.py measures
    "bench-moe": dict(vocab_size=32000, dim=768, n_layer=12, n_head=12, n_kv_head=4, intermediate_size=1536,
                      expert_size=1536, max_seq_len=2048),
}


class SparseMoE(nn.Module):
    """Router and experts; forward runs each chosen expert once, on the tokens that chose it."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.top_k, self.norm_topk, self.round_weights = cfg.top_k, cfg.norm_topk, cfg.weights_in_model_dtype
        self.gate = Linear(cfg.dim, cfg.n_experts, bias=False)                     # the router
        self.experts = nn.ModuleList(llama.FeedForward(cfg, cfg.expert_size) for _ in range(cfg.n_experts))

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, dim) -> routing weights (N, top_k) and chosen experts (N, top_k)."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)                       # (N, n_experts)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights.to(x.dtype) if self.round_weights else weights), chosen

    def forward(self, x: Tensor, on_expert: Callable[[int], None] | None = None) -> Tensor:
        """x (…, dim); on_expert(j) is called right before expert j runs (the pager's hook)."""
        xs = x.reshape(-1, x.shape[-1])
        weights, chosen = self.route(xs)
        out = torch.zeros_like(xs)
        for j in torch.unique(chosen).tolist():                                   # only the chosen experts' weights
            token, k = torch.where(chosen == j)                                   # tokens that chose j, and as which
            if on_expert:
                on_expert(j)
            y = self.experts[j](xs[token]) * weights[token, k, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out.view(x.shape)


class Block(nn.Module):
    """One pre-norm layer: attention, then the experts (or a plain MLP on Qwen3-MoE's mlp_only_layers)."""

    def __init__(self, cfg: MoEConfig, layer: int) -> None:
        super().__init__()
        self.attention_norm = llama.RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = llama.Attention(cfg, layer)
        self.ffn_norm = llama.RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = llama.FeedForward(cfg) if layer in cfg.dense_layers else SparseMoE(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, step: Step,
                on_expert: Callable[[int], None] | None = None, keep: Rows | None = None) -> Tensor:
        """With `keep` (see DecoderStack.keep_rows): (B, T, dim) -> (len(keep[1]), dim)."""
        h = (x[keep] if keep is not None else x) + self.attention(self.attention_norm(x), cos, sin, step, keep)
        if isinstance(self.feed_forward, SparseMoE):
            return h + self.feed_forward(self.ffn_norm(h), on_expert)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(DecoderStack):
    """Embedding, blocks, final norm and output head; `forward(idx, step)` -> logits."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__(cfg, (Block(cfg, i) for i in range(cfg.n_layer)), llama.RMSNorm(cfg.dim, cfg.norm_eps))
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        # page indices (see pages()): block i's own page, and each of its experts' pages
        self.block_page: list[int] = []
        self.expert_pages: list[list[int]] = []
        self.on_demand_pages = {f"block.{i}.expert.{j}" for i, layer in enumerate(self.layers)
                                for j in range(len(getattr(layer.feed_forward, "experts", [])))}
        for layer in self.layers:
            self.block_page.append(1 + sum(1 + len(p) for p in self.expert_pages))
            n = len(layer.feed_forward.experts) if isinstance(layer.feed_forward, SparseMoE) else 0
            self.expert_pages.append([self.block_page[-1] + 1 + j for j in range(n)])

    def setup(self, device: torch.device | str) -> None:
        """After weights are assigned: tie the head if configured and build the RoPE tables on device."""
        self.tie_head()
        cos, sin = llama.model_rope_tables(self.config)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def pages(self) -> list[tuple[str, list[str]]]:
        """(page name, parameter names): embed, then per block its attention, norms and router ('block.i') followed by
        one page per expert ('block.i.expert.j'), then head. Experts run only when chosen, so their pages are
        visited out of this order: `on_demand_pages` names them for the pager (never prefetched in order, evicted
        least recently used first)."""
        pages: list[tuple[str, list[str]]] = [("embed", ["tok_embeddings.weight"])]
        for i, layer in enumerate(self.layers):
            own = [f"layers.{i}.{n}" for n, _ in layer.named_parameters() if ".experts." not in f".{n}"]
            pages.append((f"block.{i}", own))
            for j, expert in enumerate(getattr(layer.feed_forward, "experts", [])):
                pages.append((f"block.{i}.expert.{j}",
                              [f"layers.{i}.feed_forward.experts.{j}.{n}" for n, _ in expert.named_parameters()]))
        return [*pages, ("head", self.head_params())]

    def forward(self, idx: Tensor, step: Step, last: Tensor | None = None) -> Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab), or (B, vocab) at positions `last` (B,) if given."""
        hook = self.page_hook
        x = self.embed(idx)                                                       # (B, T, dim)
        cos = self.rope_cos[step.input_pos].to(x.dtype)[:, :, None]               # (B, T, 1, hd)
        sin = self.rope_sin[step.input_pos].to(x.dtype)[:, :, None]
        for i, layer in enumerate(self.layers):
            on_expert = None
            if hook:
                hook(self.block_page[i])
                on_expert = functools.partial(_page_expert, hook, self.expert_pages[i])
            x = layer(x, cos, sin, step, on_expert, self.keep_rows(x, last, i))
        return self.head(x, self.block_page[-1] + len(self.expert_pages[-1]) + 1)


_EXPERT_PARTS = {"mixtral": {"1": "w1", "2": "w2", "3": "w3"},
                 "qwen3_moe": {"1": "gate_proj", "2": "down_proj", "3": "up_proj"}}
_MOE_PREFIX = {"mixtral": "block_sparse_moe", "qwen3_moe": "mlp"}


def hf_keys(name: str, cfg: MoEConfig) -> list[str]:
    """Load hook: candidate Hugging Face keys for our parameter `name` (router and experts; the rest as Llama)."""
    prefix = _MOE_PREFIX[cfg.naming]
    if m := re.match(r"^layers\.(\d+)\.feed_forward\.gate\.(\w+)$", name):
        return [f"model.layers.{m[1]}.{prefix}.gate.{m[2]}"]
    if m := re.match(r"^layers\.(\d+)\.feed_forward\.experts\.(\d+)\.w([123])\.(\w+)$", name):
        return [f"model.layers.{m[1]}.{prefix}.experts.{m[2]}.{_EXPERT_PARTS[cfg.naming][m[3]]}.{m[4]}"]
    return llama.hf_keys(name, cfg)


def fused_parts(name: str, cfg: MoEConfig) -> list[str]:
    """Load hook: an expert's `w13` is its w1 (gate) and w3 (up) stacked; the attention's `wqkv` as in Llama."""
    if ".experts." in name and ".w13." in name:
        return [name.replace(".w13.", ".w1."), name.replace(".w13.", ".w3.")]
    return llama.fused_parts(name, cfg)


def transposed(name: str, cfg: MoEConfig) -> bool:
    """Stored (out, in) projections become our (in, out) `Linear` weights: the router and experts too."""
    if ".feed_forward." in name and name.endswith(".weight"):
        return True
    return llama.transposed(name, cfg)


Config = MoEConfig


def _page_expert(hook: Any, pages: list[int], j: int) -> None:
    """The page hook for expert `j` of a layer whose expert pages are `pages`."""
    hook(pages[j])
