"""Linear layers tuned for decoding on CPUs: the (in, out) weight layout, and bfloat16 GEMMs done in float32 blocks.

Decoding at small batch is a matrix-vector product per layer, bound by how fast the weights stream from memory.
Measured on this project's CPU (MKL, one thread, 400 MB of weights so nothing stays cached): `x @ W` with W stored
(in, out) streamed 5-26% faster (float32) and 12-50% (bfloat16) than `F.linear` with the usual (out, in) layout,
depending on the run. GPT-2's Conv1D checkpoints are already (in, out), so they map with no copy; Llama-family
checkpoints are transposed once at load (in 16 MiB chunks, see `checkpoint._copy_out`). This is HF's Conv1D.

bfloat16 on CPUs without native bf16 instructions (no AVX512_BF16/AMX: `/proc/cpuinfo`) has no fast GEMM in MKL or
oneDNN: at batch 16 a bf16 matmul ran 2x slower than the same matmul in float32, although it reads half the bytes.
So from `BF16_BLOCKED_MIN_ROWS` rows on we convert the weight in blocks that stay in the L2 cache and run float32
GEMMs on them (`_bf16_blocked`); the weight stays bfloat16 in memory and the result is rounded to bfloat16 once, as
a bf16 GEMM with float32 accumulation would. Fewer rows keep torch's bf16 GEMV, and so do CPUs with native bf16.

Where bf16 is native, torch hands bf16 GEMMs to oneDNN, which compiles (JITs) a kernel for every new shape: ~6 ms
for a 768 x 3072 weight on this project's AMX Xeon, against 0.6 ms for the product itself at 136 rows. Prompts of
every length made every prefill a new shape (a 136-token GPT-2 prefill: 52 ms from the cache, ~80 ms new). So the
rows are padded up to one of a few sizes (`padded_rows`: at most 1/8 more, eight sizes an octave), whose kernels
stay in oneDNN's primitive cache; float32 GEMMs (MKL) have no such cost and keep their exact shape.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import Tensor, nn

BF16_BLOCKED_MIN_ROWS = 4          # below this many rows (tokens) torch's own bf16 GEMV is as fast or faster
BLOCK_ELEMS = 384 * 1024           # float32 block: 1.5 MiB, measured best at batch 16 on a 1 MiB-L2 core
PAD_MIN_ROWS = 17                  # fewer rows are decode steps (the C kernels' range): few shapes, all cached


def padded_rows(m: int) -> int:
    """m rounded up to a multiple of 1/16-1/8 of its power of two (16 at least): 136 -> 144, 300 -> 320."""
    step = 1 << max(4, m.bit_length() - 4)
    return -(-m // step) * step


@torch.no_grad()  # inference only: the in-place block products have no autograd formula
def _bf16_blocked(x2: Tensor, w: Tensor) -> Tensor:
    """x2 (M, K) @ w (K, N), both bf16, as float32 GEMMs over blocks of w's rows, accumulated; returns (M, N) bf16."""
    K, N = w.shape
    rows = max(1, BLOCK_ELEMS // N)
    xf = x2.float()
    y = torch.zeros(x2.shape[0], N)
    buf = torch.empty(min(rows, K), N)
    for i in range(0, K, rows):
        blk = buf[:min(rows, K - i)]
        blk.copy_(w[i:i + rows])                           # bf16 -> float32, into a block that stays in L2
        y.addmm_(xf[:, i:i + rows], blk)
    return y.to(torch.bfloat16)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True where oneDNN has real bf16 GEMMs (AVX512_BF16 or AMX, per /proc/cpuinfo); False elsewhere or if unknown."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def _padded_matmul(x2: Tensor, w: Tensor) -> Tensor:
    """x2 (M, K) @ w (K, N) computed on M rounded up by `padded_rows` (zero rows, dropped after): a cached shape."""
    m = x2.shape[0]
    xp = x2.new_zeros(padded_rows(m), x2.shape[1])
    xp[:m] = x2
    return torch.mm(xp, w)[:m]


def _use_padded(x: Tensor, w: Tensor) -> bool:
    return (w.dtype in (torch.bfloat16, torch.float16) and w.device.type == "cpu"
            and x.numel() // x.shape[-1] >= PAD_MIN_ROWS and cpu_has_native_bf16())


def _use_blocked(x: Tensor, w: Tensor) -> bool:
    return (w.dtype == torch.bfloat16 and w.device.type == "cpu"
            and x.numel() // x.shape[-1] >= BF16_BLOCKED_MIN_ROWS and not cpu_has_native_bf16())


class Linear(nn.Module):
    """y = x @ weight + bias with weight (in_features, out_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if _use_blocked(x, self.weight):
            y = _bf16_blocked(x.reshape(-1, self.in_features), self.weight).view(*x.shape[:-1], -1)
        elif _use_padded(x, self.weight):
            y = _padded_matmul(x.reshape(-1, self.in_features), self.weight).view(*x.shape[:-1], -1)
        else:
            y = torch.matmul(x, self.weight)  # folds (B, T) into one GEMM in C++: fewer dispatches than reshape+mm
        return y if self.bias is None else y.add_(self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Embedding(nn.Embedding):
    """nn.Embedding without its random initialisation: loaders build models on the meta device and assign every
    weight, and `normal_` on meta tensors runs torch's Python reference, whose first call imports torch._dynamo: a
    process's first load of a 1.1 B GGUF took 0.88 s with it, 0.16 s without (the second load: 0.03 s)."""

    def reset_parameters(self) -> None:
        """Nothing to do: the weights are assigned from the checkpoint."""


class TiedEmbedding(nn.Module):
    """A token embedding stored (dim, vocab): the same matrix is then the (in, out) weight of a tied output `Linear`.

    A lookup gathers one column per token (a few KiB); the head, which streams the whole matrix every step, gets the
    layout GEMV is fastest on: GPT-2's 50257-wide head ran ~15% (float32) and ~45% (bfloat16) faster than `F.linear`
    over the checkpoint's (vocab, dim). Checkpoints store (vocab, dim), so tied matrices are transposed once at load.
    """

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = vocab_size, dim              # (nn.Embedding's names)
        self.weight = nn.Parameter(torch.empty(dim, vocab_size))

    def forward(self, idx: Tensor) -> Tensor:
        return torch.nn.functional.embedding(idx, self.weight.t())        # (…, dim), gathered from the strided view
