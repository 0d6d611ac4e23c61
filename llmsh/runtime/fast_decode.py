"""Decode steps of a few sequences through the C kernels (kernels/cpu_decode.c) instead of torch modules.

A batch-1 decode step should cost the time to stream the weights once. With torch ops it also paid ~10 ms of
dispatch per step for ~20 tiny ops per layer (rms_norm alone took 39 us for 768 floats) and, in bfloat16, a GEMV
that reached ~0.7 of the copy bandwidth on CPUs without native bf16. Here a step is one C call for all the layers
(`lm_layers`, over float32 activations) plus the head, reading the same parameters and the same KV cache as the
torch modules, so the two paths mix freely: prefill and larger batches run the modules, and a sequence may decode
in either. With a page hook (the pager), layers run one call each, the hook first, as the modules do.

Used for decode steps of up to MAX_ROWS sequences of a float32 or bfloat16 model on the CPU, when the kernels
could be built (`kernels.library()`); the family modules stay the reference that tests compare against. Every
family has a decoder: the dense ones (GPT-2, the Llama family with Qwen3's q/k norms and Phi-4's partial RoPE, Gemma
2/3 with its switches in `Step.gemma` and the per-layer structs) through `lm_layers`, mixtures of experts per layer
half and per chosen expert (`_MoE`).
"""

from __future__ import annotations

import ctypes
import weakref
from typing import Any, cast

import torch
from torch import Tensor, nn

from llmsh.runtime import gemma, gpt2, llama, moe, quant
from llmsh.runtime.kernels import MAX_HEAD_DIM, Layer, Step, library
from llmsh.runtime.kv_cache import KVCache
from llmsh.runtime.layers import Linear, TiedEmbedding

# Up to this many rows the kernels' GEMMs beat MKL's on decode shapes (one thread, GPT-2 124M's linears):
# float32 46 ms at 1 row (MKL 48), 58 ms at 4 (MKL 93), 98 ms at 16 (MKL 120); bfloat16 44 ms at 4 (torch 124),
# 126 ms at 16 (torch 252). At 16 rows both are bound by this CPU's FMA rate (measured peak 40 GFLOP/s), so wider
# batches gain nothing here and prefill stays on torch's GEMMs.
MAX_ROWS = 16


def _ptr(t: Tensor | None) -> int | None:
    """The address C reads t at (None for an absent bias). A released page's parameters are meta tensors with no
    storage: the modules would compute nothing from them, C would read address 0, so that is an error here."""
    if t is None:
        return None
    if t.is_meta:
        raise RuntimeError("a weight of this model is not resident (its page was released): page it in first")
    return t.data_ptr()


def holds_every_page(hook: Any) -> bool:
    """Whether a page hook (the pager's) has every page of the model resident and held for this step (then the
    step may run in one call instead of a hook and a call per layer); False without a hook or where it cannot."""
    hold_all = getattr(hook, "hold_all", None)
    return bool(hold_all is not None and hold_all())


def for_model(model: Any) -> FastDecoder | None:
    """A decoder for model, or None where the kernels do not apply (device, dtype, family, no compiler)."""
    net, cfg = model.module, model.config
    if model.device.type != "cpu" or model.dtype not in (torch.float32, torch.bfloat16):
        return None
    if any(isinstance(m, quant.QLinear) for m in net.modules()):  # quantized matrices: quant_decode.py's decoder
        return None
    if cfg.head_dim > MAX_HEAD_DIM or type(net) not in FAMILY_TYPES:
        return None
    lib = library()
    if lib is None:
        return None
    return FAMILY_TYPES[type(net)](net, lib, model.dtype)


def family_decoder(net: nn.Module, lib: ctypes.CDLL, dtype: torch.dtype) -> FastDecoder:
    """The decoder of net's family (Llama or GPT-2); quant_decode.py uses its embed, norms and layer structs."""
    return (_Llama if isinstance(net, llama.Transformer) else _GPT2)(net, lib, dtype)


class FastDecoder:
    """One model's decode step: embed (torch indexing), lm_layers, final norm and head (C)."""

    def __init__(self, net: nn.Module, lib: ctypes.CDLL, dtype: torch.dtype) -> None:
        # a family's Transformer and its Config: Any, as their attributes differ per family (and nn.Module's
        # __getattr__ would type each one Tensor | Module)
        self.net: Any = net
        self.lib, self.dtype, self.bf16 = lib, dtype, int(dtype == torch.bfloat16)
        self.cfg: Any = net.config
        self._layers: tuple[weakref.ref[KVCache], ctypes.Array[Layer]] | None = None

    def __call__(self, cache: KVCache, slots: list[int], tokens: list[int], pos: list[int]) -> Tensor:
        """Float32 logits (B, vocab) of one token per slot at that slot's position; writes their K/V to cache."""
        cfg, hook = self.cfg, self.net.page_hook
        B = len(tokens)
        # C indexes memory with these without bounds checks: anything torch would reject is rejected here first
        if cache.k[0].dtype != self.dtype:
            raise ValueError(f"KV cache is {cache.k[0].dtype}, this model decodes in {self.dtype}")
        if not all(0 <= s < cache.max_batch for s in slots) or len(set(slots)) != B or len(pos) != B:
            raise ValueError(f"slots must be {B} distinct slots of this cache (0..{cache.max_batch - 1}), one position each")
        if not all(0 <= t < cfg.vocab_size for t in tokens):
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size}) for this model")
        context = min(cache.max_seq_len, self.max_positions())
        if not all(0 <= p < context for p in pos):
            raise ValueError(f"positions must be below the context of {context}")
        slots_t, pos_t = torch.tensor(slots), torch.tensor(pos)          # alive until return: C reads them
        step = self.step_args(B, cache.stride, slots_t, pos_t)
        step.n_threads = threads = torch.get_num_threads()                # as many as torch's own ops would use
        scratch = torch.empty(self.lib.lm_scratch_floats(B, step.dim, step.n_head, step.n_kv, step.head_dim,
                                                          step.hidden, step.max_seq, threads))
        step.scratch = scratch.data_ptr()
        if holds_every_page(hook):
            hook = None                   # every page resident and held for this step: one call, as without a pager
        if hook:
            hook(0)
        x = self.embed(torch.tensor(tokens), pos_t)
        self.run_layers(x, cache, step, hook)
        h = torch.empty_like(x)
        self.final_norm(x, h)
        logits = torch.empty(B, cfg.vocab_size)
        head = self.head()
        self.lib.lm_linear(h.data_ptr(), B, head.weight.shape[0], _ptr(head.weight), head.weight.shape[1], None,
                           self.bf16, 0, logits.data_ptr(), threads)
        return self.finish(logits)

    def run_layers(self, x: Tensor, cache: KVCache, step: Step, hook: Any) -> None:
        """x (B, dim) float32 through every layer, in place; with a page hook, each layer's page (and then the
        head's) is paged in right before it runs."""
        x_ptr = _ptr(x)                                   # (meta if the embedding page was released)
        blocks = self.blocks()
        if hook:                                          # the pager: page in each layer right before it runs
            for i, block in enumerate(blocks):
                hook(1 + i)
                self.lib.lm_layers(x_ptr, ctypes.byref(self.layer_args(block, i, cache)), 1, ctypes.byref(step))
            if self.cfg.tie_embeddings:
                hook(0)                                   # the head reads the embedding page's matrix
            hook(len(blocks) + 1)
        else:
            self.lib.lm_layers(x_ptr, self.all_layer_args(cache), len(blocks), ctypes.byref(step))

    def finish(self, logits: Tensor) -> Tensor:
        """What the family does to the head's logits (Gemma 2: soft-capping); in place, returns them."""
        return logits

    def all_layer_args(self, cache: KVCache) -> ctypes.Array[Layer]:
        """Every layer's Layer struct, built once per (weights, cache): building them reads ~14 module attributes
        and addresses per layer, ~0.9 ms a step for a 12-layer model (5% of a batch-1 step of Llama-110M in bf16).
        Model._set_param calls weights_changed(), the one place parameters are swapped (paging)."""
        if self._layers is None or self._layers[0]() is not cache:     # (a cache's tensors are made once, in init)
            blocks = self.blocks()
            array = (Layer * len(blocks))(*(self.layer_args(block, i, cache) for i, block in enumerate(blocks)))
            self._layers = (weakref.ref(cache), array)
        return self._layers[1]

    def weights_changed(self) -> None:
        """Forget the cached Layer structs: a parameter now lives at another address (or none)."""
        self._layers = None

    def step_args(self, B: int, max_seq: int, slots: Tensor, pos: Tensor) -> Step:
        raise NotImplementedError

    def max_positions(self) -> int:
        """Rows of the position tables (RoPE or learned positions) that the kernels may index."""
        raise NotImplementedError

    def embed(self, tokens: Tensor, pos: Tensor) -> Tensor:
        raise NotImplementedError

    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def layer_args(self, block: Any, i: int, cache: KVCache) -> Layer:
        """block: one of blocks(), of this decoder's family."""
        raise NotImplementedError

    def final_norm(self, x: Tensor, out: Tensor) -> None:
        raise NotImplementedError

    def head(self) -> Linear | quant.QLinear:
        """The output matrix's module (a QLinear in quantized models, which quant_decode.py decodes)."""
        raise NotImplementedError


class _Llama(FastDecoder):
    def max_positions(self) -> int:
        return self.net.rope_cos.shape[0]

    def step_args(self, B: int, max_seq: int, slots: Tensor, pos: Tensor) -> Step:
        c = self.cfg
        return Step(M=B, dim=c.dim, n_head=c.n_head, n_kv=c.n_kv_head, head_dim=c.head_dim,
                    hidden=c.intermediate_size, max_seq=max_seq, is_bf16=self.bf16, is_gpt2=0, exact_gelu=0,
                    eps=c.norm_eps, rope_cos=self.net.rope_cos.data_ptr(), rope_sin=self.net.rope_sin.data_ptr(),
                    pos=pos.data_ptr(), slots=slots.data_ptr(), rotary_dim=c.rotary_dim)

    def embed(self, tokens: Tensor, pos: Tensor) -> Tensor:
        if not isinstance(self.net.tok_embeddings, TiedEmbedding):  # (nn.Embedding, or quant.QEmbedding: tied too)
            return self.net.tok_embeddings(tokens).float().contiguous()
        return self.net.tok_embeddings.weight[:, tokens].t().float().contiguous()

    def blocks(self) -> nn.ModuleList:
        return self.net.layers

    def layer_args(self, block: Any, i: int, cache: KVCache) -> Layer:
        """block: a llama.Block, or the Gemma or MoE family's (Any: their decoders add their own fields to this)."""
        a, ff = block.attention, block.feed_forward
        w13, w2 = getattr(ff, "w13", None), getattr(ff, "w2", None)  # (none in a MoE layer: lm_expert runs those)
        return Layer(norm1=_ptr(block.attention_norm.weight), w_qkv=_ptr(a.wqkv.weight),
                     b_qkv=_ptr(a.wqkv.bias), w_o=_ptr(a.wo.weight), b_o=_ptr(a.wo.bias),
                     norm2=_ptr(block.ffn_norm.weight), w_up=_ptr(None if w13 is None else w13.weight),
                     b_up=_ptr(None if w13 is None else w13.bias), w_down=_ptr(None if w2 is None else w2.weight),
                     b_down=_ptr(None if w2 is None else w2.bias), k_cache=cache.k[i].data_ptr(),
                     v_cache=cache.v[i].data_ptr(), window=a.window or 0, attn_scale=self.cfg.head_dim ** -0.5,
                     q_norm=_ptr(None if a.q_norm is None else a.q_norm.weight),
                     k_norm=_ptr(None if a.k_norm is None else a.k_norm.weight))

    def final_norm(self, x: Tensor, out: Tensor) -> None:
        self.lib.lm_rmsnorm(x.data_ptr(), x.shape[0], x.shape[1], _ptr(self.net.norm.weight), self.bf16,
                            self.cfg.norm_eps, out.data_ptr())

    def head(self) -> Linear | quant.QLinear:
        return self.net.output


class _GPT2(FastDecoder):
    def max_positions(self) -> int:
        return self.net.wpe.weight.shape[0]

    def step_args(self, B: int, max_seq: int, slots: Tensor, pos: Tensor) -> Step:
        c = self.cfg
        return Step(M=B, dim=c.n_embd, n_head=c.n_head, n_kv=c.n_head, head_dim=c.head_dim, hidden=c.n_inner,
                    max_seq=max_seq, is_bf16=self.bf16, is_gpt2=1, exact_gelu=int(c.gelu_approximate == "none"),
                    eps=c.layer_norm_epsilon, pos=pos.data_ptr(), slots=slots.data_ptr())

    def embed(self, tokens: Tensor, pos: Tensor) -> Tensor:
        x = self.net.wte.weight[:, tokens].t().float()                     # wte is stored (C, vocab)
        return x.add_(self.net.wpe.weight[pos]).contiguous()

    def blocks(self) -> nn.ModuleList:
        return self.net.h

    def layer_args(self, block: gpt2.Block, i: int, cache: KVCache) -> Layer:
        a, mlp = block.attn, block.mlp
        return Layer(norm1=_ptr(block.ln_1.weight), norm1_bias=_ptr(block.ln_1.bias),
                     w_qkv=_ptr(a.c_attn.weight), b_qkv=_ptr(a.c_attn.bias),
                     w_o=_ptr(a.c_proj.weight), b_o=_ptr(a.c_proj.bias),
                     norm2=_ptr(block.ln_2.weight), norm2_bias=_ptr(block.ln_2.bias),
                     w_up=_ptr(mlp.c_fc.weight), b_up=_ptr(mlp.c_fc.bias),
                     w_down=_ptr(mlp.c_proj.weight), b_down=_ptr(mlp.c_proj.bias),
                     k_cache=cache.k[i].data_ptr(), v_cache=cache.v[i].data_ptr(), window=0, attn_scale=a.scale)

    def final_norm(self, x: Tensor, out: Tensor) -> None:
        ln = self.net.ln_f
        self.lib.lm_layernorm(x.data_ptr(), x.shape[0], x.shape[1], _ptr(ln.weight), _ptr(ln.bias),
                              self.bf16, ln.eps, out.data_ptr())

    def head(self) -> Linear | quant.QLinear:
        return self.net.lm_head


class _Gemma(_Llama):
    """Gemma 2 / 3: `lm_layers` with Step.gemma set ((1 + w) norms, GeGLU) and each layer's post norms, soft cap
    and RoPE tables in its Layer struct; the embedding scaled by sqrt(dim) as the modules do."""

    def embed(self, tokens: Tensor, pos: Tensor) -> Tensor:
        scale = torch.tensor(self.cfg.dim ** 0.5, dtype=self.dtype).item()   # rounded to the model dtype, as HF does
        return super().embed(tokens, pos).mul_(scale)

    def step_args(self, B: int, max_seq: int, slots: Tensor, pos: Tensor) -> Step:
        c = self.cfg
        return Step(M=B, dim=c.dim, n_head=c.n_head, n_kv=c.n_kv_head, head_dim=c.head_dim,
                    hidden=c.intermediate_size, max_seq=max_seq, is_bf16=self.bf16, is_gpt2=0, exact_gelu=0,
                    eps=c.norm_eps, rope_cos=self.net.rope_cos.data_ptr(), rope_sin=self.net.rope_sin.data_ptr(),
                    pos=pos.data_ptr(), slots=slots.data_ptr(), gemma=1)

    def layer_args(self, block: Any, i: int, cache: KVCache) -> Layer:
        """block: a gemma.Block: Llama's fields, and its query scale, post norms, soft cap and local RoPE tables."""
        layer, a, net = super().layer_args(block, i, cache), block.attention, self.net
        layer.attn_scale, layer.softcap = a.scale, a.cap or 0.0
        layer.post_norm1, layer.post_norm2 = _ptr(block.post_attention_norm.weight), _ptr(block.post_ffn_norm.weight)
        if a.window is not None:                                          # sliding-window layers: local RoPE base
            layer.rope_cos, layer.rope_sin = net.rope_local_cos.data_ptr(), net.rope_local_sin.data_ptr()
        return layer

    def final_norm(self, x: Tensor, out: Tensor) -> None:
        self.lib.lm_rmsnorm_plus_one(x.data_ptr(), x.shape[0], x.shape[1], _ptr(self.net.norm.weight), self.bf16,
                                     self.cfg.norm_eps, out.data_ptr())

    def finish(self, logits: Tensor) -> Tensor:
        cap = self.cfg.final_softcap
        return logits if cap is None else logits.div_(cap).tanh_().mul_(cap)


class MoELayer(ctypes.Structure):
    """lm_moe: one layer's router and experts (gate NULL: a dense layer, which runs the Layer's w_up and w_down)."""

    _fields_ = [("gate", ctypes.c_void_p), ("w13", ctypes.POINTER(ctypes.c_void_p)),
                ("w2", ctypes.POINTER(ctypes.c_void_p))]


class MoEStep(ctypes.Structure):
    """lm_moe_step: the experts' shape and routing switches, the same in every layer."""

    _fields_ = [(name, ctypes.c_long) for name in ("n_experts", "top_k", "expert_size")] + \
        [(name, ctypes.c_int) for name in ("norm_topk", "round_bf16")]


class _MoE(_Llama):
    """Mixtral / Qwen3-MoE. Without a page hook, a step is one C call for all layers (`lm_moe_layers`: attention
    half, router, the chosen experts), as for the dense families. With one (the pager must page each chosen expert in
    first), per layer the attention half in C (`lm_attention_half`), the router (`lm_route`), then `lm_expert` once
    per chosen expert, each right after its page hook. A step reads the attention weights, the routers and only the
    chosen experts."""

    def __init__(self, net: nn.Module, lib: ctypes.CDLL, dtype: torch.dtype) -> None:
        super().__init__(net, lib, dtype)
        self._moe: tuple[ctypes.Array[MoELayer], list[Any]] | None = None

    def weights_changed(self) -> None:
        super().weights_changed()
        self._moe = None

    def moe_args(self) -> ctypes.Array[MoELayer]:
        """Every layer's router and expert addresses, built once per weights (see all_layer_args)."""
        if self._moe is None:
            keep: list[Any] = []                                            # the address arrays C reads
            layers = []
            for block in self.net.layers:
                ff = block.feed_forward
                if not isinstance(ff, moe.SparseMoE):
                    layers.append(MoELayer())
                    continue
                experts = [cast(llama.FeedForward, e) for e in ff.experts]
                w13 = (ctypes.c_void_p * len(experts))(*(_ptr(e.w13.weight) for e in experts))
                w2 = (ctypes.c_void_p * len(experts))(*(_ptr(e.w2.weight) for e in experts))
                keep += [w13, w2]
                layers.append(MoELayer(gate=_ptr(ff.gate.weight), w13=w13, w2=w2))
            self._moe = ((MoELayer * len(layers))(*layers), keep)
        return self._moe[0]

    def run_layers(self, x: Tensor, cache: KVCache, step: Step, hook: Any) -> None:
        net, cfg, lib = self.net, self.cfg, self.lib
        if not hook:
            shape = MoEStep(n_experts=cfg.n_experts, top_k=cfg.top_k, expert_size=cfg.expert_size,
                            norm_topk=int(cfg.norm_topk), round_bf16=int(cfg.weights_in_model_dtype and self.bf16))
            if lib.lm_moe_layers(_ptr(x), self.all_layer_args(cache), self.moe_args(), len(net.layers),
                                 ctypes.byref(step), ctypes.byref(shape)):
                raise MemoryError("lm_moe_layers: no memory for a decode step's scratch")
            return
        B, D = x.shape
        h = torch.empty_like(x)
        chosen, weights = torch.empty(B * cfg.top_k, dtype=torch.int64), torch.empty(B * cfg.top_k)
        logits = torch.empty(B * cfg.n_experts)
        x_ptr, h_ptr = _ptr(x), h.data_ptr()
        for i, block in enumerate(net.layers):
            hook(net.block_page[i])
            layer = self.layer_args(block, i, cache)
            lib.lm_attention_half(x_ptr, ctypes.byref(layer), ctypes.byref(step), h_ptr)
            ff = block.feed_forward
            if not isinstance(ff, moe.SparseMoE):                          # Qwen3-MoE's dense layers
                self.expert(h, x, list(range(B)), 1, torch.ones(B), ff, step)
                continue
            lib.lm_route(h_ptr, B, D, _ptr(ff.gate.weight), cfg.n_experts, cfg.top_k, int(cfg.norm_topk),
                         int(cfg.weights_in_model_dtype and self.bf16), self.bf16, chosen.data_ptr(),
                         weights.data_ptr(), logits.data_ptr())
            by_expert: dict[int, list[int]] = {}
            for s, j in enumerate(chosen.tolist()):                          # s: (row, choice) = divmod(s, top_k)
                by_expert.setdefault(j, []).append(s)
            for j in sorted(by_expert):
                hook(net.expert_pages[i][j])
                expert_ff = cast(llama.FeedForward, ff.experts[j])          # (a ModuleList's items type as Module)
                self.expert(h, x, by_expert[j], cfg.top_k, weights, expert_ff, step)
        if cfg.tie_embeddings:
            hook(0)                                                         # the head reads the embedding's matrix
        hook(net.block_page[-1] + len(net.expert_pages[-1]) + 1)

    def expert(self, h: Tensor, x: Tensor, sel: list[int], k: int, weights: Tensor, ff: llama.FeedForward,
               step: Step) -> None:
        """x[s // k] += weights[s] * ff(h[s // k]) for s in sel, in C."""
        n, D, F = len(sel), h.shape[1], ff.w2.weight.shape[0]
        scratch, sel_t = torch.empty(n * (2 * D + 3 * F)), torch.tensor(sel, dtype=torch.int64)
        self.lib.lm_expert(h.data_ptr(), D, sel_t.data_ptr(), n, k, weights.data_ptr(), _ptr(ff.w13.weight),
                           _ptr(ff.w2.weight), F, self.bf16, x.data_ptr(), scratch.data_ptr(), step.n_threads)


FAMILY_TYPES: dict[type, type[FastDecoder]] = {llama.Transformer: _Llama, gpt2.Transformer: _GPT2,
                                               gemma.Transformer: _Gemma, moe.Transformer: _MoE}
