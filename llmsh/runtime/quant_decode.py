"""Decode steps of quantized models through the C kernels: fast_decode's step with `lm_qlayers` and a QLinear head.

Everything but the four matrices of each layer and the head is what fast_decode's decoders do (embedding lookup in
torch, norms, RoPE, attention and the KV cache in C, in the model's float dtype); the matrices stay GGUF blocks and
are decoded inside the dot products (kernels/quant_decode.c). The family specifics (which parameter is which, the
final norm) come from fast_decode's decoder of the family (`family_decoder`).
"""

from __future__ import annotations

import ctypes
import weakref
from typing import Any

import torch
from torch import Tensor

from llmsh.runtime import gpt2, llama, quant
from llmsh.runtime.fast_decode import holds_every_page
from llmsh.runtime.kernels import MAX_HEAD_DIM, Layer
from llmsh.runtime.kv_cache import KVCache

MAX_ROWS = quant.MAX_ROWS


class QMat(ctypes.Structure):
    """lm_qmat: one quantized matrix (its bytes and row segments)."""

    _fields_ = [("w", ctypes.c_void_p), ("segs", ctypes.c_void_p), ("n_seg", ctypes.c_long)]


class QLayer(ctypes.Structure):
    """lm_qlayer: the four matrices of one layer."""

    _fields_ = [("qkv", QMat), ("o", QMat), ("up", QMat), ("down", QMat)]


def _qmat(lin: quant.QLinear) -> QMat:
    if lin.weight.is_meta:
        raise RuntimeError("a weight of this model is not resident (its page was released): page it in first")
    return QMat(lin.weight.data_ptr(), ctypes.addressof(lin.segs), len(lin.segs))


def for_model(model: Any) -> QuantDecoder | None:
    """A decoder for a quantized Llama-family or GPT-2 model on the CPU, or None (no compiler, other shapes)."""
    net = model.module
    lib = quant.qlib()
    if lib is None or model.config.head_dim > MAX_HEAD_DIM:
        return None
    if not isinstance(net, (llama.Transformer, gpt2.Transformer)):
        return None
    mats = [_matrices(net, b) for b in _blocks(net)]
    if not all(isinstance(m, quant.QLinear) for ms in mats for m in ms):
        return None                                    # partly float matrices: the torch modules run them
    return QuantDecoder(model, lib)


def _blocks(net: Any) -> Any:
    return net.layers if isinstance(net, llama.Transformer) else net.h


def _matrices(net: Any, block: Any) -> tuple[Any, Any, Any, Any]:
    if isinstance(net, llama.Transformer):
        a, ff = block.attention, block.feed_forward
        return a.wqkv, a.wo, ff.w13, ff.w2
    return block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj


class QuantDecoder:
    """One quantized model's decode step: the float decoder's pieces (embed, norms, caches) plus quantized products."""

    def __init__(self, model: Any, lib: ctypes.CDLL) -> None:
        from llmsh.runtime import fast_decode

        self.net, self.lib, self.cfg, self.dtype = model.module, lib, model.config, model.dtype
        self.family = fast_decode.family_decoder(self.net, lib, model.dtype)   # embed, step, layer args, norm
        self._layers: tuple[weakref.ref[KVCache], Any, Any] | None = None

    def weights_changed(self) -> None:
        """Parameters moved (paging): rebuild the per-layer structs on the next step."""
        self._layers = None
        self.family.weights_changed()

    def _args(self, cache: KVCache) -> tuple[Any, Any]:
        if self._layers is None or self._layers[0]() is not cache:
            blocks = _blocks(self.net)
            layers = (Layer * len(blocks))(*(self.family.layer_args(b, i, cache) for i, b in enumerate(blocks)))
            qlayers = (QLayer * len(blocks))(*(QLayer(*map(_qmat, _matrices(self.net, b))) for b in blocks))
            self._layers = (weakref.ref(cache), layers, qlayers)
        return self._layers[1], self._layers[2]

    def __call__(self, cache: KVCache, slots: list[int], tokens: list[int], pos: list[int]) -> Tensor:
        """Float32 logits (B, vocab) of one token per slot at that slot's position; writes their K/V to cache."""
        fam, net, cfg, hook = self.family, self.net, self.cfg, self.net.page_hook
        B = len(tokens)
        # C indexes memory with these without bounds checks: anything torch would reject is rejected here first
        if cache.k[0].dtype != self.dtype:
            raise ValueError(f"KV cache is {cache.k[0].dtype}, this model decodes in {self.dtype}")
        if not all(0 <= s < cache.max_batch for s in slots) or len(set(slots)) != B or len(pos) != B:
            raise ValueError(f"slots must be {B} distinct slots of this cache (0..{cache.max_batch - 1}), "
                             "one position each")
        if not all(0 <= t < cfg.vocab_size for t in tokens):
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size}) for this model")
        context = min(cache.max_seq_len, fam.max_positions())
        if not all(0 <= p < context for p in pos):
            raise ValueError(f"positions must be below the context of {context}")
        slots_t, pos_t = torch.tensor(slots), torch.tensor(pos)          # alive until return: C reads them
        step = fam.step_args(B, cache.stride, slots_t, pos_t)
        step.n_threads = threads = torch.get_num_threads()
        scratch = torch.empty(self.lib.lm_scratch_floats(B, step.dim, step.n_head, step.n_kv, step.head_dim,
                                                          step.hidden, step.max_seq, threads))
        step.scratch = scratch.data_ptr()
        if holds_every_page(hook):
            hook = None                   # every page resident and held for this step: one call, as without a pager
        if hook:
            hook(0)
        x = fam.embed(torch.tensor(tokens), pos_t)
        blocks = _blocks(net)
        if hook:
            for i, block in enumerate(blocks):
                hook(1 + i)
                layer = fam.layer_args(block, i, cache)
                qlayer = QLayer(*map(_qmat, _matrices(net, block)))
                self.lib.lm_qlayers(x.data_ptr(), ctypes.byref(layer), ctypes.byref(qlayer), 1, ctypes.byref(step))
            if cfg.tie_embeddings:
                hook(0)
            hook(len(blocks) + 1)
        else:
            layers, qlayers = self._args(cache)
            self.lib.lm_qlayers(x.data_ptr(), layers, qlayers, len(blocks), ctypes.byref(step))
        h = torch.empty_like(x)
        fam.final_norm(x, h)
        return fam.head()(h).float()                                       # QLinear (C) or a float Linear
