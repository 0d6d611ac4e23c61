"""The decode-tuned layers: (in, out) Linear, the tied head, and bf16 GEMMs done in float32 blocks."""

from __future__ import annotations

import pytest
import torch

from llmsh.runtime import layers
from llmsh.runtime.layers import Linear, TiedHead


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of ~3 rows of a 100-wide matrix, so every product below spans several blocks and a ragged last one."""
    monkeypatch.setattr(layers, "BLOCK_ELEMS", 300)


@pytest.mark.parametrize("rows", [1, 5, 16])
def test_bf16_blocked_equals_float32_product_of_the_bf16_weights(small_blocks, rows):
    torch.manual_seed(0)
    w = torch.randn(37, 100).to(torch.bfloat16)                  # (K, N): 37 = 12 blocks of 3 and one of 1
    x = torch.randn(rows, 37).to(torch.bfloat16)
    ref = (x.float() @ w.float()).to(torch.bfloat16)
    got = layers._bf16_blocked(x, w, transposed=False)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 100)
    torch.testing.assert_close(got, ref, atol=0.05, rtol=0.01)    # float32 sums in another order, one bf16 rounding
    wt = torch.randn(101, 100).to(torch.bfloat16)               # (N, K) as a tied head stores it
    x = torch.randn(rows, 100).to(torch.bfloat16)
    torch.testing.assert_close(layers._bf16_blocked(x, wt, transposed=True), (x.float() @ wt.float().t()).to(torch.bfloat16),
                               atol=0.05, rtol=0.01)


def test_layers_pick_the_blocked_path_for_bf16_batches_only(small_blocks, monkeypatch):
    monkeypatch.setattr(layers, "cpu_has_native_bf16", lambda: False)  # as on this project's CI machines
    calls = []
    real = layers._bf16_blocked
    monkeypatch.setattr(layers, "_bf16_blocked", lambda *a: calls.append(a[0].shape) or real(*a))
    lin, head = Linear(37, 100), TiedHead(100, 101)
    with torch.no_grad():
        for p in (*lin.parameters(), *head.parameters()):
            p.copy_(torch.randn(p.shape))
    for module, width in ((lin, 37), (head, 100)):
        x = torch.randn(5, 1, width)
        out32 = module(x)                                            # float32: torch's GEMM
        module.to(torch.bfloat16)
        one = module(x[:1].to(torch.bfloat16))                      # one row: torch's bf16 GEMV
        assert calls == []
        many = module(x.to(torch.bfloat16))                         # five rows: blocked float32
        assert calls == [(5, width)] and many.shape == out32.shape
        torch.testing.assert_close(many.float(), out32, atol=0.3, rtol=0.02)
        torch.testing.assert_close(one.float(), out32[:1], atol=0.3, rtol=0.02)
        calls.clear()


def test_native_bf16_cpus_keep_torchs_gemm(monkeypatch):
    monkeypatch.setattr(layers, "cpu_has_native_bf16", lambda: True)
    w = torch.empty(8, 8, dtype=torch.bfloat16)
    assert not layers._use_blocked(torch.empty(16, 8, dtype=torch.bfloat16), w)
    monkeypatch.setattr(layers, "cpu_has_native_bf16", lambda: False)
    assert layers._use_blocked(torch.empty(16, 8, dtype=torch.bfloat16), w)
    assert not layers._use_blocked(torch.empty(16, 8), w.float())
