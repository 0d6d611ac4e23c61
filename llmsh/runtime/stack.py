"""What the Llama-family, Gemma and mixture-of-experts Transformers share: the stack around their blocks.

    x      = embed(idx)                  # a tied embedding is the head's (dim, vocab) matrix, looked up by column
    x      = block_i(x) for each block   # the family's own blocks (and its RoPE tables, scaling, experts)
    logits = head(norm(x))

Each family subclasses `DecoderStack` and writes its own `forward` from `embed`, its block loop and `head`; the
embedding, head, tying, page list and page-hook calls around the blocks are here once, so a change to how pages are
visited (the pager's contract, `Model.pages`) is made in one place. GPT-2 keeps its own module: learned positions,
LayerNorm and HF's Conv1D names make its stack different.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from llmsh.runtime.layers import Embedding, Linear, TiedEmbedding

Rows = tuple[Tensor, Tensor]  # (row, position) index tensors: the tokens whose outputs a forward returns


def keep_rows(x: Tensor, last: Tensor | None, layer: int, n_layer: int) -> Rows | None:
    """The tokens block `layer` of `n_layer` computes past its attention: all (None) but in the last block of a
    forward that wants only the outputs at positions `last` (a prefill's last tokens), which then returns those
    alone. Every token's keys and values are cached in every layer all the same; the last block's output projection
    and MLP skip the rest (~1/n_layer of a prefill's work)."""
    if last is None or layer != n_layer - 1:
        return None
    return torch.arange(x.shape[0], device=x.device), last


class DecoderStack(nn.Module):
    """Embedding, blocks, final norm and output head, with the page hook called before each page's modules run."""

    def __init__(self, cfg: Any, blocks: Iterable[nn.Module], norm: nn.Module) -> None:
        super().__init__()
        self.config = cfg
        # tied: one (dim, vocab) matrix that is both the lookup table and the head's (in, out) weight
        self.tok_embeddings = TiedEmbedding(cfg.vocab_size, cfg.dim) if cfg.tie_embeddings else \
            Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(blocks)
        self.norm = norm
        self.output = Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.page_hook: Callable[[int], None] | None = None

    def tie_head(self) -> None:
        """At setup, after weights are assigned: a tied head multiplies by the embedding's matrix (a TiedEmbedding's
        (dim, vocab) floats, or a QEmbedding's (vocab, dim) blocks, which are a QLinear head's rows)."""
        if self.config.tie_embeddings:
            table = self.tok_embeddings.weight
            assert isinstance(table, nn.Parameter)                  # (assigned from the checkpoint as one)
            self.output.weight = table

    def head_params(self) -> list[str]:
        """The head page's parameters (a tied head's matrix is on the embedding's page)."""
        return ["norm.weight"] + ([] if self.config.tie_embeddings else ["output.weight"])

    def pages(self) -> list[tuple[str, list[str]]]:
        """(page name, parameter names) in execution order: embed, block.0 …, head."""
        blocks = [(f"block.{i}", [f"layers.{i}.{n}" for n, _ in layer.named_parameters()])
                  for i, layer in enumerate(self.layers)]
        return [("embed", ["tok_embeddings.weight"]), *blocks, ("head", self.head_params())]

    def embed(self, idx: Tensor) -> Tensor:
        """idx (B, T) -> (B, T, dim), the embedding page paged in first."""
        if self.page_hook:
            self.page_hook(0)
        return self.tok_embeddings(idx)

    def keep_rows(self, x: Tensor, last: Tensor | None, layer: int) -> Rows | None:
        """`keep_rows` for block `layer` of this stack."""
        return keep_rows(x, last, layer, len(self.layers))

    def head(self, x: Tensor, head_page: int) -> Tensor:
        """Logits of x (…, dim), the head's pages paged in first."""
        if self.page_hook:
            if self.config.tie_embeddings:
                self.page_hook(0)                                                 # the head reads the embedding's matrix
            self.page_hook(head_page)
        return self.output(self.norm(x))
