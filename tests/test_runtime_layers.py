"""The decode-tuned layers: (in, out) Linear, the transposed tied embedding, and bf16 GEMMs in float32 blocks."""

from __future__ import annotations

import pytest
import torch

from llmsh.runtime import layers
from llmsh.runtime.layers import Linear, TiedEmbedding


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of ~3 rows of a 100-wide matrix, so every product below spans several blocks and a ragged last one."""
    monkeypatch.setattr(layers, "BLOCK_ELEMS", 300)


@pytest.mark.parametrize("rows", [1, 5, 16])
def test_bf16_blocked_equals_float32_product_of_the_bf16_weights(small_blocks, rows):
    torch.manual_seed(0)
    w = torch.randn(37, 100).to(torch.bfloat16)                  # (K, N): 37 = 12 blocks of 3 and one of 1
    x = torch.randn(rows, 37).to(torch.bfloat16)
    got = layers._bf16_blocked(x, w)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 100)
    # float32 sums in another order, then one bf16 rounding
    torch.testing.assert_close(got, (x.float() @ w.float()).to(torch.bfloat16), atol=0.05, rtol=0.01)


def test_linear_picks_the_blocked_path_for_bf16_batches_only(small_blocks, monkeypatch):
    monkeypatch.setattr(layers, "cpu_has_native_bf16", lambda: False)  # as on this project's CI machines
    calls = []
    real = layers._bf16_blocked
    monkeypatch.setattr(layers, "_bf16_blocked", lambda *a: calls.append(a[0].shape) or real(*a))
    lin = Linear(37, 100)
    with torch.no_grad():
        for p in lin.parameters():
            p.copy_(torch.randn(p.shape))
    x = torch.randn(5, 1, 37)
    out32 = lin(x)                                               # float32: torch's GEMM
    lin.to(torch.bfloat16)
    one = lin(x[:1].to(torch.bfloat16))                         # one row: torch's bf16 GEMV
    assert calls == []
    many = lin(x.to(torch.bfloat16))                            # five rows: blocked float32
    assert calls == [(5, 37)] and many.shape == out32.shape
    torch.testing.assert_close(many.float(), out32, atol=0.3, rtol=0.02)
    torch.testing.assert_close(one.float(), out32[:1], atol=0.3, rtol=0.02)


def test_tied_embedding_looks_up_columns_of_the_heads_weight():
    emb = TiedEmbedding(50, 8)
    table = torch.randn(50, 8)                                   # (vocab, dim) as checkpoints store it
    with torch.no_grad():
        emb.weight.copy_(table.t())
    idx = torch.tensor([[3, 0, 49], [7, 7, 1]])
    assert torch.equal(emb(idx), torch.nn.functional.embedding(idx, table))
    head = Linear(8, 50, bias=False)
    head.weight = emb.weight                                     # tied: one Parameter
    x = torch.randn(2, 8)
    torch.testing.assert_close(head(x), x @ table.t())


def test_native_bf16_cpus_keep_torchs_gemm(monkeypatch):
    monkeypatch.setattr(layers, "cpu_has_native_bf16", lambda: True)
    w = torch.empty(8, 8, dtype=torch.bfloat16)
    assert not layers._use_blocked(torch.empty(16, 8, dtype=torch.bfloat16), w)
    monkeypatch.setattr(layers, "cpu_has_native_bf16", lambda: False)
    assert layers._use_blocked(torch.empty(16, 8, dtype=torch.bfloat16), w)
    assert not layers._use_blocked(torch.empty(16, 8), w.float())


def test_padded_rows_round_up_by_at_most_an_eighth_to_few_sizes() -> None:
    padded_rows = layers.padded_rows
    assert [padded_rows(m) for m in (17, 31, 32, 136, 144, 145, 300, 1000)] == [32, 32, 32, 144, 144, 160, 320, 1024]
    sizes = {padded_rows(m) for m in range(128, 4097)}
    assert all(padded_rows(m) - m <= m / 8 for m in range(128, 4097)) and len(sizes) <= 8 * 5 + 1  # 8 an octave


def test_a_padded_product_equals_the_product_of_its_rows() -> None:
    padded_rows, _padded_matmul = layers.padded_rows, layers._padded_matmul
    torch.manual_seed(0)
    w = torch.randn(64, 96, dtype=torch.bfloat16)
    for m in (17, 40, 137):
        x = torch.randn(m, 64, dtype=torch.bfloat16)
        y = _padded_matmul(x, w)
        assert y.shape == (m, 96) and torch.equal(y, torch.mm(torch.cat([x, x.new_zeros(padded_rows(m) - m, 64)]), w)[:m])
        torch.testing.assert_close(y.float(), x.float() @ w.float(), rtol=2e-2, atol=2e-2)


def test_linear_pads_bf16_rows_where_bf16_is_native(monkeypatch):
    monkeypatch.setattr(layers, "cpu_has_native_bf16", lambda: True)
    calls = []
    real = layers._padded_matmul
    monkeypatch.setattr(layers, "_padded_matmul", lambda x, w: calls.append(x.shape[0]) or real(x, w))
    lin = Linear(64, 32).to(torch.bfloat16)
    torch.nn.init.normal_(lin.weight)
    x = torch.randn(3, 7, 64, dtype=torch.bfloat16)                    # 21 rows: padded to 32
    y = lin(x)
    assert calls == [21] and y.shape == (3, 7, 32)
    torch.testing.assert_close(y, torch.matmul(x, lin.weight) + lin.bias, atol=0.05, rtol=0.01)
    lin(torch.randn(2, 64, dtype=torch.bfloat16))                      # a few rows keep their shape
    lin.float()(torch.randn(40, 64))                                   # float32 (MKL) keeps its shape too
    assert calls == [21]
