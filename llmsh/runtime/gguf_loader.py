"""Load a GGUF file (llama.cpp's format, what Ollama stores) into a `Model`: hyper-parameters, weights, tokenizer.

The file is read with the `gguf` package (llama.cpp's own reader, through `gguf_file`), memory-mapped copy-on-write,
so tensors are views of the page cache. The metadata becomes the config.json a Hugging Face folder would have
(`hf_config`), so the families' own `Config.from_hf` checks it; tensor names map onto ours with the inverse of what
llama.cpp's converter does: `llama`-architecture q/k rows are un-permuted (ggml rotates adjacent pairs, HF and we
rotate halves), GPT-2's (out, in) matrices and the Llama family's become our (in, out) `Linear` weights, q|k|v and
gate|up are fused.

Float types (F32, F16, BF16) load as the runtime's float32 or bfloat16; the block-quantized types listed in
`quant.QUANT_TYPES` stay quantized in memory (`quant.QLinear`). Any other type is refused with one line naming it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llmsh.runtime import gguf_tokenizer, gpt2, llama
from llmsh.runtime.errors import LoadError
from llmsh.runtime.gguf_file import GGUFFile

ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}   # GGUF arch -> HF model_type
FLOAT_TYPES = ("F32", "F16", "BF16")


def hf_config(g: GGUFFile) -> dict[str, Any]:
    """The config.json (transformers' keys) this GGUF's metadata describes."""
    arch = g.arch
    model_type = ARCHS.get(arch)
    if model_type is None:
        raise LoadError(f"{g.path.name} holds a {arch or 'unknown'!r} model; llmsh loads GGUF architectures "
                        f"{', '.join(sorted(ARCHS))} (GPT-2 and the Llama family)")

    def need(key: str) -> Any:
        v = g.meta(f"{arch}.{key}")
        if v is None:
            raise LoadError(f"{g.path.name} lacks metadata {arch}.{key}; the file is incomplete or not a model")
        return v

    n_vocab = g.meta(f"{arch}.vocab_size") or g.length("tokenizer.ggml.tokens") or \
        int(g.tensors["token_embd.weight"].shape[1])
    common = {"model_type": model_type, "vocab_size": int(n_vocab),
              "bos_token_id": g.meta("tokenizer.ggml.bos_token_id"),
              "eos_token_id": g.meta("tokenizer.ggml.eos_token_id")}
    if model_type == "gpt2":
        return {**common, "n_embd": need("embedding_length"), "n_layer": need("block_count"),
                "n_head": need("attention.head_count"), "n_positions": need("context_length"),
                "n_inner": g.meta(f"{arch}.feed_forward_length"),
                "layer_norm_epsilon": g.meta(f"{arch}.attention.layer_norm_epsilon", 1e-5)}
    n_head = need("attention.head_count")
    cfg = {**common, "hidden_size": need("embedding_length"), "num_hidden_layers": need("block_count"),
           "num_attention_heads": n_head, "num_key_value_heads": g.meta(f"{arch}.attention.head_count_kv", n_head),
           "intermediate_size": need("feed_forward_length"),
           "rms_norm_eps": g.meta(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
           "rope_theta": g.meta(f"{arch}.rope.freq_base", 10000.0),
           "max_position_embeddings": need("context_length"),
           "tie_word_embeddings": "output.weight" not in g.tensors,
           "attention_bias": "blk.0.attn_output.bias" in g.tensors}
    if g.meta(f"{arch}.attention.key_length"):
        cfg["head_dim"] = g.meta(f"{arch}.attention.key_length")
    if g.meta(f"{arch}.attention.sliding_window"):
        cfg["sliding_window"] = g.meta(f"{arch}.attention.sliding_window")
        cfg["use_sliding_window"] = True
    if "rope_freqs.weight" in g.tensors:        # llama3 scaling, stored by llama.cpp as per-frequency divisors
        cfg["rope_scaling"] = {"rope_type": "factors", "factors": g.float_tensor("rope_freqs.weight").float().tolist()}
    elif g.meta(f"{arch}.rope.scaling.type") == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": g.meta(f"{arch}.rope.scaling.factor", 1.0)}
    elif g.meta(f"{arch}.rope.scaling.type") not in (None, "none"):
        raise LoadError(f"{g.path.name} uses RoPE scaling {g.meta(f'{arch}.rope.scaling.type')!r}, which llmsh does "
                        "not support (supported: linear, llama3)")
    return cfg


@dataclass
class Spec:
    """Where one of our parameters comes from: GGUF tensors concatenated along the output dimension (each with the
    head count to un-permute its rows by, or 0), and how the result is laid out."""

    parts: list[tuple[str, int]]
    layout: str                         # "linear": (out, in) -> our (in, out); "embed_t": (vocab, dim) -> (dim, vocab);
                                        # "as_is": same shape as stored


_LLAMA = {"attention_norm.weight": "attn_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
          "attention.wo.weight": "attn_output.weight", "attention.wo.bias": "attn_output.bias",
          "feed_forward.w2.weight": "ffn_down.weight", "feed_forward.w2.bias": "ffn_down.bias"}
_GPT2 = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
         "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def spec(name: str, arch: str, cfg: Any) -> Spec:
    """Our parameter `name` in GGUF terms (see Spec); `cfg` is the family config."""
    if arch == "gpt2":
        if name in ("wte.weight", "lm_head.weight"):
            return Spec([("token_embd.weight", 0)], "embed_t")
        if name == "wpe.weight":
            return Spec([("position_embd.weight", 0)], "as_is")
        if name.startswith("ln_f."):
            return Spec([("output_norm." + name.split(".")[-1], 0)], "as_is")
        _, i, rest = name.split(".", 2)
        mod, kind = rest.rsplit(".", 1)
        linear = kind == "weight" and not mod.startswith("ln_")
        return Spec([(f"blk.{i}.{_GPT2[mod]}.{kind}", 0)], "linear" if linear else "as_is")
    if name in ("tok_embeddings.weight", "output.weight"):
        if name == "output.weight" and not cfg.tie_embeddings:
            return Spec([("output.weight", 0)], "linear")
        return Spec([("token_embd.weight", 0)], "embed_t" if cfg.tie_embeddings else "as_is")
    if name == "norm.weight":
        return Spec([("output_norm.weight", 0)], "as_is")
    _, i, rest = name.split(".", 2)
    blk, kind = f"blk.{i}.", rest.rsplit(".", 1)[1]
    permute = arch == "llama"          # llama.cpp permutes q/k rows of the llama architecture only
    if rest.startswith("attention.wqkv."):
        return Spec([(f"{blk}attn_q.{kind}", cfg.n_head if permute else 0),
                     (f"{blk}attn_k.{kind}", cfg.n_kv_head if permute else 0), (f"{blk}attn_v.{kind}", 0)],
                    "linear" if kind == "weight" else "as_is")
    if rest.startswith("feed_forward.w13."):
        return Spec([(f"{blk}ffn_gate.{kind}", 0), (f"{blk}ffn_up.{kind}", 0)],
                    "linear" if kind == "weight" else "as_is")
    return Spec([(blk + _LLAMA[rest], 0)], "linear" if rest.endswith(".weight") and ".w" in rest else "as_is")


def unpermute(rows: Tensor, n_head: int) -> Tensor:
    """Undo llama.cpp's q/k row permutation (adjacent-pair RoPE back to rotate-half); works on quantized rows too."""
    out = rows.shape[0]
    return rows.reshape(n_head, out // n_head // 2, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


class GGUFCheckpoint:
    """The tensors of one GGUF file under our parameter names: what `Model` and the pager read pages from."""

    def __init__(self, g: GGUFFile, arch: str, cfg: Any, keep_quantized: bool = True) -> None:
        from llmsh.runtime.quant import QUANT_TYPES

        self.g, self.arch, self.cfg = g, arch, cfg
        self.keep_quantized = keep_quantized  # False: block-quantized matrices are decoded at load (see `load_gguf`)
        # A tied embedding stored in blocks stays in them: looked up as a QEmbedding, multiplied as the head's QLinear
        # (both its (vocab, dim) rows, one Parameter). Decoded instead, a Llama 3.2 1B Q4_0 head read 1.05 GB of float32
        # per token against the file's 148 MB, and the first load wrote that to the layout cache.
        self.quantized_tie = (keep_quantized and arch != "gpt2" and bool(getattr(cfg, "tie_embeddings", False))
                              and "token_embd.weight" in g.tensors and g.type_name("token_embd.weight") in QUANT_TYPES)
        self.layout: Any = None             # layout_cache's file of our reshaped matrices (a SafetensorsFile)
        self._specs: dict[str, Spec] = {}   # asked for several times per parameter at every load
        self._quantized: dict[str, bool] = {}

    def layout_name(self, name: str) -> str | None:
        """The name our parameter has in the layout cache, or None if it is used as the file stores it (a float
        tensor as is, a quantized matrix of one tensor whose rows need no reordering, an untied embedding table).
        A float parameter stored quantized (a tied embedding, which the head multiplies by) is decoded once and
        cached: decoding 32000 x 2048 rows took half of a 1.1B Q4_0 file's load (the Llama family keeps a tied table
        in its blocks, see `quantized_tie`; GPT-2's tied table is decoded)."""
        from llmsh.runtime.quant import QUANT_TYPES

        s = self.spec(name)
        single = len(s.parts) == 1 and not s.parts[0][1]
        if self.is_quantized(name):
            return None if single else f"q:{'+'.join(p for p, _ in s.parts)}"       # fused or row-permuted blocks
        decoded = any(self.g.type_name(p) in QUANT_TYPES for p, _ in s.parts)
        as_stored = s.layout == "as_is" and single and not decoded
        return None if as_stored else f"{s.layout}:{'+'.join(p for p, _ in s.parts)}"

    def _cached(self, name: str, dtype: torch.dtype | None) -> Tensor | None:
        key = self.layout_name(name) if self.layout is not None else None
        if key is None or key not in self.layout.entries:
            return None
        t = self.layout.tensor(key)
        if list(t.shape) != self.shape(name):                       # an entry not of this file: built again
            return None
        return t if dtype is None or t.dtype == dtype else None

    def spec(self, name: str) -> Spec:
        if (known := self._specs.get(name)) is not None:
            return known
        if self.quantized_tie and name in ("tok_embeddings.weight", "output.weight"):
            s = Spec([("token_embd.weight", 0)], "as_is" if name == "tok_embeddings.weight" else "linear")
        else:
            s = spec(name, self.arch, self.cfg)
        for part, _ in s.parts:
            if part not in self.g.tensors:
                raise LoadError(f"{self.g.path.name} has no tensor {part} (needed for {name}); the file is incomplete "
                                "or its architecture metadata is wrong")
        self._specs[name] = s
        return s

    def key(self, name: str) -> tuple:
        """Parameters with equal keys are the same tensor (a tied head and the embedding)."""
        s = self.spec(name)
        return tuple(s.parts), s.layout

    def stored_type(self, name: str) -> str:
        """The GGUF type of our parameter (of its parts, which must agree for a float parameter)."""
        return self.g.type_name(self.spec(name).parts[0][0])

    def is_quantized(self, name: str) -> bool:
        """True if our parameter stays quantized: a matrix whose parts are all block-quantized (a QLinear weight), or
        an embedding table stored quantized (a QEmbedding weight; tied, it is also the head's QLinear weight)."""
        from llmsh.runtime.quant import QUANT_TYPES

        if (known := self._quantized.get(name)) is not None:
            return known
        if not self.keep_quantized:
            return False
        s = self.spec(name)
        kinds = {self.g.type_name(p) in QUANT_TYPES for p, _ in s.parts}
        if kinds == {True, False}:
            raise LoadError(f"{self.g.path.name} mixes float and quantized tensors in {name} "
                            f"({', '.join(p for p, _ in s.parts)}); llmsh cannot fuse them")
        looked_up = s.layout == "as_is" and name == "tok_embeddings.weight"   # the embedding table: QEmbedding
        self._quantized[name] = (s.layout == "linear" or looked_up) and kinds == {True}
        return self._quantized[name]

    def segments(self, name: str) -> list[tuple[str, int]]:
        """(type, rows) of each part of a quantized parameter, in order."""
        return [(self.g.type_name(p), int(self.g.tensors[p].shape[-1])) for p, _ in self.spec(name).parts]

    def quantized_bytes(self, name: str) -> Tensor:
        """A quantized parameter's rows (un-permuted, parts concatenated) as flat bytes: a view of the file when it
        is one tensor whose rows need no reordering, or of the layout cache's copy."""
        if (cached := self._cached(name, torch.uint8)) is not None:
            return cached
        pieces = []
        for part, heads in self.spec(name).parts:
            t = torch.from_numpy(self.g.array(part))                                  # (out, row_bytes) uint8
            pieces.append((unpermute(t, heads) if heads else t).reshape(-1))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _part(self, part: str) -> Tensor:
        """A float tensor of the file; a quantized one (an embedding, say) decoded to float32."""
        from llmsh.runtime import quant

        kind = self.g.type_name(part)
        if kind in quant.QUANT_TYPES:
            k = int(self.g.tensors[part].shape[0])
            return quant.dequantize(torch.from_numpy(self.g.array(part)), kind, k)
        return self.g.float_tensor(part)

    def rows(self, name: str) -> Tensor:
        """Our parameter's parts as stored (out, …), un-permuted and concatenated along the output dimension."""
        pieces = []
        for part, heads in self.spec(name).parts:
            t = self._part(part)
            pieces.append(unpermute(t, heads) if heads else t)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def shape(self, name: str) -> list[int]:
        """Our parameter's shape (after the layout change); a quantized one's is its byte count."""
        s = self.spec(name)
        if self.is_quantized(name):
            return [sum(int(self.g.tensors[p].n_bytes) for p, _ in s.parts)]
        shapes = [list(int(d) for d in reversed(self.g.tensors[p].shape.tolist())) for p, _ in s.parts]
        out = shapes[0][:]
        out[0] = sum(sh[0] for sh in shapes)
        return out[::-1] if s.layout in ("linear", "embed_t") else out

    def load_tensor(self, name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Tensor:
        """Our parameter as a tensor on device in dtype: a view of the file where nothing changes, else one copy.
        A quantized parameter comes as its bytes (dtype does not apply)."""
        if self.is_quantized(name):
            return self.quantized_bytes(name).to(device)
        if (cached := self._cached(name, dtype)) is not None:
            return cached.to(device)                                      # (a view of the map on the CPU)
        t = self.rows(name)
        dtype, device = dtype or t.dtype, torch.device(device)
        if self.spec(name).layout != "as_is":
            t = t.t()
        if t.dtype == dtype and device.type == "cpu" and t.is_contiguous():
            return t
        return t.to(device=device, dtype=dtype).contiguous()

    def param_dtype(self, name: str, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype our parameter has in memory: uint8 bytes if it stays quantized, else the model's."""
        return torch.uint8 if self.is_quantized(name) else model_dtype

    def read_into(self, name: str, out: Tensor) -> Tensor:
        """Copy our parameter into `out` (the pager's buffers)."""
        if self.is_quantized(name):
            return out.copy_(self.quantized_bytes(name))
        if (cached := self._cached(name, out.dtype)) is not None:
            return out.copy_(cached)
        t = self.rows(name)
        return out.copy_(t.t() if self.spec(name).layout != "as_is" else t)

    def nbytes(self) -> int:
        return sum(int(t.n_bytes) for t in self.g.tensors.values())

    def paths(self) -> list[Path]:
        return [self.g.path]

    def dtype(self) -> torch.dtype:
        """The float dtype most matrix bytes have (F16 counts as float16)."""
        by: dict[str, int] = {}
        for t in self.g.tensors.values():
            by[t.tensor_type.name] = by.get(t.tensor_type.name, 0) + int(t.n_bytes)
        by = {k: v for k, v in by.items() if k in FLOAT_TYPES} or {"F32": 0}    # quantized: activations in float32
        best = max(by, key=lambda k: by[k])
        return {"BF16": torch.bfloat16, "F16": torch.float16}.get(best, torch.float32)


def _check_types(g: GGUFFile, supported: tuple[str, ...]) -> None:
    for name, t in g.tensors.items():
        if t.tensor_type.name not in supported:
            raise LoadError(f"tensor {name} in {g.path.name} is {t.tensor_type.name}, a type llmsh cannot load "
                            f"(supported: {', '.join(supported)}); convert the model to one of those")


def keeps_blocks(device: torch.device) -> bool:
    """Whether quantized matrices stay in their blocks on `device`: on CPUs, whose C kernels decode them inside the
    dot products. Elsewhere (CUDA) they are decoded at load into the model's float dtype: the kernels read host
    memory, and llmsh has no GPU block kernels."""
    return device.type == "cpu"


def load_gguf(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None, *,
              progress: Callable[[float, str], None] | None = None, name: str | None = None) -> Any:
    """Load a GGUF file into a `Model` (LoadError, one line, for every user-facing failure)."""
    from llmsh.runtime import layout_cache, quant
    from llmsh.runtime import model as model_mod

    report = progress or (lambda frac, msg: None)
    started = time.perf_counter()
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"no GGUF file at {path}")
    report(0.0, f"reading {path.name}")
    g = GGUFFile(path)
    cfg_json = hf_config(g)
    _check_types(g, FLOAT_TYPES + quant.QUANT_TYPES)
    family = {"gpt2": gpt2, "llama": llama, "qwen2": llama}[cfg_json["model_type"]]
    try:
        cfg = family.Config.from_hf(cfg_json)
    except KeyError as e:
        raise LoadError(f"{path.name} lacks metadata for {e.args[0]!r}, which {g.arch} models need") from None
    dev = model_mod.resolve_device(device)
    ckpt = GGUFCheckpoint(g, g.arch, cfg, keep_quantized=keeps_blocks(dev))
    stored = ckpt.dtype()
    if not ckpt.keep_quantized and any(t.tensor_type.name in quant.QUANT_TYPES for t in g.tensors.values()):
        stored = torch.float16               # decoded blocks (a scale times a small integer) fit float16 closely
        report(0.0, f"decoding the quantized matrices of {path.name} for {dev} (the block kernels run on CPUs)")
    dt = model_mod.resolve_dtype(dtype, stored, dev)
    if dev.type == "cpu":
        ckpt.layout = layout_cache.open_cached(path, dt)       # our reshaped matrices from an earlier load
    built: dict[str, Tensor] = {}

    def keep(pname: str, t: Tensor) -> None:                 # built here, not cached yet: written after the load
        lname = ckpt.layout_name(pname)
        if dev.type == "cpu" and lname and (ckpt.layout is None or lname not in ckpt.layout.entries):
            built[lname] = t

    with torch.device("meta"):
        module = family.Transformer(cfg)
    quantized = quant.quantize_module(module, ckpt, dt)      # Linear -> QLinear where the file's matrix is quantized
    for pname, data in quantized.items():                     # (fused q|k|v, gate|up blocks are copies too)
        keep(pname, data)
    expected = module.state_dict()
    state: dict[str, Tensor] = {}
    by_key: dict[tuple, Tensor] = {}
    for i, pname in enumerate(expected):
        if pname in quantized:
            state[pname] = quantized[pname]
            continue
        key = ckpt.key(pname)
        shape = ckpt.shape(pname)
        if list(expected[pname].shape) != shape:
            raise LoadError(f"tensor {ckpt.spec(pname).parts[0][0]} in {path.name} has shape {shape} but the "
                            f"metadata implies {list(expected[pname].shape)}; the file is inconsistent")
        if key not in by_key:
            by_key[key] = ckpt.load_tensor(pname, dev, dt)
            keep(pname, by_key[key])
        state[pname] = by_key[key]
        report(0.1 + 0.85 * (i + 1) / len(expected), f"loading {pname}")
    module.load_state_dict(state, assign=True, strict=True)
    if built and ckpt.layout is None:
        report(0.95, "caching the reshaped matrices for the next load")
        layout_cache.write(path, dt, built)
        ckpt.layout = layout_cache.open_cached(path, dt)    # pages re-read from it (the same values)
    module.setup(dev)
    module.eval().requires_grad_(False)
    tokenizer, tok_json = gguf_tokenizer.build(g.meta, g.cached_tokenizer)
    if not g.indexed or tok_json != g.cached_tokenizer:
        g.save_index(tok_json)
    gen_cfg = {k: v for k, v in (("bos_token_id", cfg_json.get("bos_token_id")),
                                 ("eos_token_id", sorted(tokenizer.eos_token_ids) if tokenizer else None)) if v}
    display = name or path.name
    m = model_mod.Model(module, name=display, path=path, hf_config=cfg_json, checkpoint=ckpt,  # type: ignore[arg-type]  # the same interface
                        tokenizer=tokenizer,
                        generation_config=gen_cfg, device=dev, dtype=dt)
    report(1.0, f"loaded {display} in {time.perf_counter() - started:.2f}s")
    return m


def load_source(source: str, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None, *,
                verify: bool = True, progress: Callable[[float, str], None] | None = None) -> Any:
    """`load`'s entry for GGUF sources: a .gguf path, or `ollama:NAME[:TAG]` resolved in Ollama's store."""
    if source.startswith("ollama:"):
        from llmsh.runtime import ollama

        ref = ollama.resolve(source.removeprefix("ollama:"))
        if verify:
            ollama.verify(ref, progress=lambda f, m: (progress or (lambda a, b: None))(0.05 * f, m))
        return load_gguf(ref.model_path, device, dtype, progress=progress, name=ref.display_name)
    return load_gguf(Path(source).expanduser(), device, dtype, progress=progress)
