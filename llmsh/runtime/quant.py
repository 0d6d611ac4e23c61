"""Block-quantized weights (GGUF's Q8_0, Q4_0, Q4_K, Q6_K) kept quantized in memory.

A quantized matrix is kept exactly as GGUF stores it: (out, in) rows of blocks, each block a few scales and packed
integers (ggml's formats). `QLinear` holds those bytes as one flat uint8 parameter, so paging moves quantized pages,
plus the row segments and their types (a fused q|k|v may mix Q4_K and Q6_K). Its products run in the C kernels
(kernels/quant_decode.c): up to 16 rows of activations decode each block once inside the dot products; more rows
(prefill) decode row ranges to float32 and run torch's GEMM on them. Long prompts (BF16_PREFILL_MIN_ROWS rows and
more) on CPUs with native bf16 run that GEMM in bfloat16 instead: ~2.2x the float32 GEMM's throughput (215 against
95 GFLOP/s on one Zen 4 core), and rounding x and the decoded weights to bf16 (2^-9 relative) adds far less error than
the 4- or 8-bit quantization itself (llama.cpp rounds x to 8 bits per 32 for the same GEMM). Without a C compiler the
`gguf` package's own numpy `dequantize` does the decoding (slow, same numbers).

`quantize` writes Q4_K and Q6_K (the `gguf` package only reads those; its `quantize` covers Q8_0 and Q4_0), for
`load PATH --quant` and tests: a plain min/max fit per sub-block, not llama.cpp's search for the best scales.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from llmsh.runtime.errors import LoadError
from llmsh.runtime.layers import cpu_has_native_bf16

QUANT_TYPES: tuple[str, ...] = ("Q8_0", "Q4_0", "Q4_K", "Q6_K")
TYPE_IDS = {"Q4_0": 2, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14}          # ggml's type ids (quant_decode.c uses them)
BLOCK = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_K": (256, 144), "Q6_K": (256, 210)}   # weights, bytes per block
MAX_ROWS = 16                                # the kernels' batch limit (QMAX_ROWS)
DEQUANT_CHUNK = 4 << 20                      # bytes of float32 rows decoded at a time for a prefill GEMM
BF16_PREFILL_MIN_ROWS = 64                   # from here a prefill GEMM runs in bf16 where the CPU has it natively


class QSeg(ctypes.Structure):
    """lm_qseg: `rows` output features of one type."""

    _fields_ = [("type", ctypes.c_int), ("rows", ctypes.c_long)]


@functools.cache
def qlib() -> ctypes.CDLL | None:
    """quant_decode.c (it includes cpu_decode.c) built for this machine, or None: then decoding uses numpy."""
    from llmsh.runtime import kernels

    lib = kernels.library("quant_decode.c")
    if lib is None:
        return None
    P, L, I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int  # noqa: E741  (ctypes' names, as the C reads)
    sigs = {"lm_qlinear": [P, L, L, P, P, L, L, P, I, I, P, I], "lm_qdequant": [P, P, L, L, L, L, P, I],
            "lm_qlayers": [P, P, P, L, P]}
    for name, argtypes in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    return kernels.declare(lib)


def row_bytes(qtype: str, k: int) -> int:
    """Bytes of one row of k weights in qtype."""
    n, b = BLOCK[qtype]
    return k // n * b


class QLinear(nn.Module):
    """y = x @ W^T + bias with W (out_features, in_features) block-quantized (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, segments: list[tuple[str, int]], bias: bool,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if sum(rows for _, rows in segments) != out_features:
            raise ValueError("segments must cover the output features")
        self.in_features, self.out_features, self.segments = in_features, out_features, list(segments)
        nbytes = sum(row_bytes(t, in_features) * rows for t, rows in segments)
        self.weight = nn.Parameter(torch.empty(nbytes, dtype=torch.uint8, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        self.segs = (QSeg * len(segments))(*(QSeg(TYPE_IDS[t], rows) for t, rows in segments))

    def extra_repr(self) -> str:
        kinds = "+".join(f"{t}x{rows}" for t, rows in self.segments)
        return (f"in_features={self.in_features}, out_features={self.out_features}, {kinds}, "
                f"bias={self.bias is not None}")

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features).float().contiguous()                   # (M, K)
        M, N = x2.shape[0], self.out_features
        lib = qlib()
        if lib is not None and M <= MAX_ROWS:
            y = torch.empty(M, N)
            lib.lm_qlinear(x2.data_ptr(), M, self.in_features, self.weight.data_ptr(), self.segs, len(self.segs), N,
                           None, 0, 0, y.data_ptr(), torch.get_num_threads())
        elif M >= BF16_PREFILL_MIN_ROWS and cpu_has_native_bf16():
            xb = x2.to(torch.bfloat16)
            y = torch.empty(M, N, dtype=torch.bfloat16)
            for r0, r1 in self._chunks():
                torch.mm(xb, self.dequantize(r0, r1).to(torch.bfloat16).t(), out=y[:, r0:r1])
            y = y.float()
        else:
            y = torch.empty(M, N)
            for r0, r1 in self._chunks():
                torch.mm(x2, self.dequantize(r0, r1).t(), out=y[:, r0:r1])
        if self.bias is not None:
            y += self.bias.float()
        return y.to(x.dtype).view(*x.shape[:-1], N)

    def _chunks(self) -> list[tuple[int, int]]:
        """Row ranges of about DEQUANT_CHUNK bytes of float32: decoded one at a time, they stay in cache."""
        rows = max(16, DEQUANT_CHUNK // (4 * self.in_features))
        return [(r0, min(self.out_features, r0 + rows)) for r0 in range(0, self.out_features, rows)]

    def dequantize(self, r0: int = 0, r1: int | None = None) -> Tensor:
        """Rows [r0, r1) of W as float32 (r1 - r0, in_features)."""
        r1 = self.out_features if r1 is None else r1
        lib = qlib()
        if lib is not None:
            out = torch.empty(r1 - r0, self.in_features)
            lib.lm_qdequant(self.weight.data_ptr(), self.segs, len(self.segs), self.in_features, r0, r1,
                            out.data_ptr(), torch.get_num_threads())
            return out
        return dequantize_rows(self.weight, self.segments, self.in_features)[r0:r1]


class QEmbedding(nn.Module):
    """An embedding table that stays block-quantized (a GGUF file's token_embd): a step decodes only the rows
    it looks up. Decoding the whole table instead cost a float32 copy of it in memory and in the layout cache, 262 MB
    against the file's 37 MB for a 32k x 2048 Q4_0 table (2.1 GB for a 128k-token, 4096-wide one)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, qtype: str, out_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.qtype = num_embeddings, embedding_dim, qtype
        self.row_bytes = row_bytes(qtype, embedding_dim)
        self.weight = nn.Parameter(torch.empty(num_embeddings * self.row_bytes, dtype=torch.uint8, device=device),
                                   requires_grad=False)
        self.out_dtype = out_dtype                # the rows' dtype: the model's

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.qtype}"

    def forward(self, idx: Tensor) -> Tensor:
        rows = self.weight.view(self.num_embeddings, self.row_bytes)[idx.reshape(-1).to(self.weight.device)]
        out = dequantize(rows.cpu(), self.qtype, self.embedding_dim)      # (the C decoder reads host memory)
        return out.to(device=self.weight.device, dtype=self.out_dtype).view(*idx.shape, self.embedding_dim)


def dequantize_rows(data: Tensor, segments: list[tuple[str, int]], k: int) -> Tensor:
    """The float32 (rows, k) matrix of quantized bytes, through the gguf package's reference `dequantize`."""
    from gguf import GGMLQuantizationType, quants

    out, at, raw = [], 0, data.numpy().reshape(-1)
    for qtype, rows in segments:
        n = row_bytes(qtype, k) * rows
        block = raw[at:at + n].reshape(rows, row_bytes(qtype, k))
        out.append(torch.from_numpy(quants.dequantize(block, GGMLQuantizationType[qtype]).astype(np.float32)))
        at += n
    return torch.cat(out)


def dequantize(data: Tensor, qtype: str, k: int) -> Tensor:
    """A whole quantized (rows, row_bytes) tensor as float32 (rows, k): the C kernels, else gguf's numpy."""
    rows = data.shape[0]
    lib = qlib()
    if lib is None:
        return dequantize_rows(data.contiguous(), [(qtype, rows)], k)
    out = torch.empty(rows, k)
    segs = (QSeg * 1)(QSeg(TYPE_IDS[qtype], rows))
    src = data.contiguous()
    lib.lm_qdequant(src.data_ptr(), segs, 1, k, 0, rows, out.data_ptr(), torch.get_num_threads())
    return out


def quantize_module(module: nn.Module, ckpt: Any, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Swap the Linear layers whose file matrices are quantized for QLinear (and a quantized embedding table, tied
    or not, for QEmbedding, giving `dtype` rows); returns their weights (file bytes)."""
    from llmsh.runtime.layers import Linear, TiedEmbedding

    weights: dict[str, Tensor] = {}
    for mname, mod in list(module.named_modules()):
        if not isinstance(mod, (Linear, nn.Embedding, TiedEmbedding)) or not ckpt.is_quantized(f"{mname}.weight"):
            continue
        pname = f"{mname}.weight"
        q: nn.Module
        if isinstance(mod, (nn.Embedding, TiedEmbedding)):
            ((qtype, _),) = ckpt.segments(pname)
            q = QEmbedding(mod.num_embeddings, mod.embedding_dim, qtype, dtype, device=mod.weight.device)
        else:
            q = QLinear(mod.in_features, mod.out_features, ckpt.segments(pname), mod.bias is not None,
                        device=mod.weight.device)           # (meta while a loader builds the model: no memory)
        parent, _, attr = mname.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, attr, q)
        weights[pname] = ckpt.quantized_bytes(pname)
        expected = q.get_parameter("weight").numel()
        if weights[pname].numel() != expected:
            raise LoadError(f"the quantized tensors for {pname} in {ckpt.paths()[0].name} have "
                            f"{weights[pname].numel()} bytes, the metadata implies {expected}; "
                            "the file is inconsistent")
    return weights


# ---- writing Q4_K and Q6_K -----------------------------------------------------------------------------------
def _f16(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16).view(np.uint8).reshape(*a.shape[:-1], -1) if a.ndim > 1 else \
        a.astype(np.float16).view(np.uint8)


def quantize(w: np.ndarray, qtype: Any) -> np.ndarray:
    """float (rows, k) -> quantized bytes (rows, row_bytes) in Q8_0, Q4_0 (gguf's quantizer), Q4_K or Q6_K."""
    name = getattr(qtype, "name", str(qtype)).upper()
    if name in ("Q8_0", "Q4_0"):
        from gguf import GGMLQuantizationType, quants

        return quants.quantize(np.ascontiguousarray(w, dtype=np.float32), GGMLQuantizationType[name])
    w = np.ascontiguousarray(w, dtype=np.float32)
    rows, k = w.shape
    if k % 256:
        raise LoadError(f"{name} needs rows of a multiple of 256 weights, these have {k}")
    blocks = w.reshape(-1, 256)
    out = _q4_k(blocks) if name == "Q4_K" else _q6_k(blocks) if name == "Q6_K" else None
    if out is None:
        raise LoadError(f"cannot quantize to {name}; use q8_0, q4_0 or q4_k")
    return out.reshape(rows, -1)


def _q4_k(x: np.ndarray) -> np.ndarray:
    """Q4_K blocks: 8 sub-blocks of 32 with 6-bit scale and min (x = d*sc*q - dmin*m, q in 0..15)."""
    nb = x.shape[0]
    sub = x.reshape(nb, 8, 32)
    lo = np.minimum(sub.min(axis=-1), 0.0)                       # mins are subtracted: keep them <= 0
    hi = sub.max(axis=-1)
    scale = (hi - lo) / 15.0                                     # per sub-block step
    mn = -lo
    d = scale.max(axis=-1, keepdims=True) / 63.0
    dmin = mn.max(axis=-1, keepdims=True) / 63.0
    d16, dmin16 = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(np.divide(scale, d16, out=np.zeros_like(scale), where=d16 > 0)), 0, 63).astype(np.uint8)
    m = np.clip(np.round(np.divide(mn, dmin16, out=np.zeros_like(mn), where=dmin16 > 0)), 0, 63).astype(np.uint8)
    step = (d16 * sc)[..., None]
    off = (dmin16 * m)[..., None]
    q = np.clip(np.round(np.divide(sub + off, step, out=np.zeros_like(sub), where=step > 0)), 0, 15).astype(np.uint8)
    scales = np.zeros((nb, 12), dtype=np.uint8)                  # get_scale_min_k4's packing, inverted
    scales[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
    q = q.reshape(nb, 4, 2, 32)                                  # pairs of sub-blocks share bytes: low | high nibble
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(nb, 128)
    return np.concatenate([_f16(d), _f16(dmin), scales, qs], axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    """Q6_K blocks: 16 sub-blocks of 16 with int8 scales (x = d*sc*(q - 32), q in 0..63)."""
    nb = x.shape[0]
    sub = x.reshape(nb, 16, 16)
    amax_i = np.abs(sub).argmax(axis=-1)
    vmax = np.take_along_axis(sub, amax_i[..., None], axis=-1)[..., 0]
    scale = vmax / -32.0                                          # as ggml: the largest magnitude maps to -32
    d = np.abs(scale).max(axis=-1, keepdims=True) / 127.0
    d16 = d.astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(np.divide(scale, d16, out=np.zeros_like(scale), where=d16 != 0)), -127, 127).astype(np.int8)
    step = (d16 * sc.astype(np.float32))[..., None]
    q = np.clip(np.round(np.divide(sub, step, out=np.zeros_like(sub), where=step != 0)) + 32, 0, 63).astype(np.uint8)
    q = q.reshape(nb, 2, 4, 32)                                  # per 128 half: 4 runs of 32 (l, l+32, l+64, l+96)
    ql = np.concatenate([(q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4),
                         (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)], axis=-1)       # (nb, 2, 64)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6))
    return np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64).astype(np.uint8), sc.view(np.uint8),
                           _f16(d16)], axis=1)


# ---- `load PATH --quant`: a quantized copy of a Hugging Face checkpoint, made once ------------------------------
CACHE_VERSION = "2"          # bump when the quantizers or what they quantize change: older copies are then deleted


class QuantizedCheckpoint:
    """A Hugging Face checkpoint whose matrices come from a cached quantized copy (one safetensors file of uint8
    tensors named by our parameters; a tied head reads its table's); everything else reads through to the original
    checkpoint."""

    def __init__(self, base: Any, cached: Any, qtype: str) -> None:
        self.base, self.cached, self.qtype = base, cached, qtype.upper()
        self._by_hf_key = {base.hf_key(name): name for name in cached.entries}   # (a tied head: the embedding's key)

    def _entry(self, name: str) -> str | None:
        """The cached tensor our parameter is: its own, or the embedding table a tied head multiplies by."""
        return name if name in self.cached.entries else self._by_hf_key.get(self.base.hf_key(name))

    def is_quantized(self, name: str) -> bool:
        return self._entry(name) is not None

    def segments(self, name: str) -> list[tuple[str, int]]:
        return [(self.qtype, int(self.base.shape(name)[-1]))]          # our (in, out): out rows of one type

    def quantized_bytes(self, name: str) -> Tensor:
        entry = self._entry(name)
        assert entry is not None, f"{name} is not quantized"
        return self.cached.tensor(entry)                                # a view of the mapped cache file

    def param_dtype(self, name: str, model_dtype: torch.dtype) -> torch.dtype:
        return torch.uint8 if self.is_quantized(name) else model_dtype

    def hf_key(self, name: str) -> str:
        return self._entry(name) or self.base.hf_key(name)

    def shape(self, name: str) -> list[int]:
        entry = self._entry(name)
        return list(self.cached.entries[entry]["shape"]) if entry else self.base.shape(name)

    def load_tensor(self, name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Tensor:
        if self.is_quantized(name):
            return self.quantized_bytes(name).to(device)
        return self.base.load_tensor(name, device, dtype)

    def read_into(self, name: str, out: Tensor) -> Tensor:
        return out.copy_(self.quantized_bytes(name)) if self.is_quantized(name) else self.base.read_into(name, out)

    def nbytes(self) -> int:
        return self.base.nbytes()

    def paths(self) -> list[Any]:
        return [*self.base.paths(), self.cached.path]

    def dtype(self) -> torch.dtype:
        return self.base.dtype()


def _targets(module: nn.Module, base: Any, qtype: str) -> list[str]:
    """Our weights to quantize: the Linear ones whose rows fit whole blocks, and a tied embedding table of the
    decoder stacks (Llama family, Gemma), whose (vocab, dim) rows are then the head's too (as llama.cpp quantizes
    token_embd): a Llama 3.2 1B head read 525 MB of bfloat16 per token, against 148 MB in Q4_0. The head tied to
    it is not quantized apart; an untied table, only looked up a row per token, stays float."""
    from llmsh.runtime.layers import Linear, TiedEmbedding
    from llmsh.runtime.stack import DecoderStack

    embeds = {base.hf_key(f"{n}.weight") for n, m in module.named_modules()
              if isinstance(m, (nn.Embedding, TiedEmbedding))}
    block = BLOCK[qtype.upper()][0]
    names = [f"{n}.weight" for n, m in module.named_modules()
             if isinstance(m, Linear) and m.in_features % block == 0 and base.hf_key(f"{n}.weight") not in embeds]
    table = getattr(module, "tok_embeddings", None)
    if isinstance(module, DecoderStack) and isinstance(table, TiedEmbedding) and table.embedding_dim % block == 0:
        names.insert(0, "tok_embeddings.weight")
    return names


def quantized_checkpoint(base: Any, module: nn.Module, qtype: str, progress: Any = None) -> QuantizedCheckpoint:
    """`base` with its matrices in qtype, from the cache (paths.cache_dir()/quant, keyed by the checkpoint files'
    sha256, remembered per file identity, and CACHE_VERSION) or quantized now and written there atomically."""
    import hashlib

    from llmsh import paths
    from llmsh.runtime import hash_cache
    from llmsh.runtime.cache_file import write_safetensors
    from llmsh.runtime.checkpoint import SafetensorsFile

    qtype = qtype.lower()
    if qtype.upper() not in ("Q8_0", "Q4_0", "Q4_K"):
        raise LoadError(f"--quant {qtype}: use q8_0, q4_0 or q4_k")
    report = progress or (lambda frac, msg: None)
    key = hashlib.sha256(CACHE_VERSION.encode())
    for i, p in enumerate(base.paths()):
        key.update(hash_cache.sha256(p).encode())
        report(0.3 * (i + 1) / len(base.paths()), f"hashing {p.name}")
    folder = paths.cache_dir() / "quant"
    suffix = f"-v{CACHE_VERSION}.safetensors"
    target = folder / f"{key.hexdigest()[:32]}-{qtype}{suffix}"
    if not target.exists():
        names = _targets(module, base, qtype)
        out: dict[str, Tensor] = {}
        for i, name in enumerate(names):
            w = base.load_tensor(name, "cpu", torch.float32)                      # ours: (in, out)
            out[name] = torch.from_numpy(quantize(w.t().contiguous().numpy(), qtype)).reshape(-1)
            report(0.3 + 0.7 * (i + 1) / len(names), f"quantizing {name} to {qtype}")
        folder.mkdir(parents=True, exist_ok=True)
        write_safetensors(target, out, {"qtype": qtype, "version": CACHE_VERSION})
        for old in folder.glob("*.safetensors"):           # copies an older llmsh made: none would be read again
            if not old.name.endswith(suffix):
                old.unlink(missing_ok=True)
    return QuantizedCheckpoint(base, SafetensorsFile(target), qtype)
