"""Quantized GGUF weights (Q8_0, Q4_0, Q4_K, Q6_K) stay quantized and are decoded in the C kernels; checked against
the `gguf` package's reference `dequantize`: block by block, and as whole tiny models against the float32 model built
from the same file dequantized (logits within a tight tolerance, 32 greedy tokens equal)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

from llmsh.runtime import load, quant  # noqa: E402
from tests.gguf_convert import convert  # noqa: E402

TYPES = [T.Q8_0, T.Q4_0, T.Q4_K, T.Q6_K]
WIDE = dict(hidden_size=256, intermediate_size=512)            # K-quants need rows of 256 weights
Q4_K_M = {f"blk.{i}.{n}.weight": T.Q6_K for i in range(2) for n in ("attn_v", "ffn_down")} | {"output.weight": T.Q6_K}


@pytest.mark.parametrize("qtype", TYPES)
def test_blocks_decode_as_gguf_reference(qtype: T) -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((40, 512)).astype(np.float32)
    q = quant.quantize(w, qtype)
    ref = gguf.quants.dequantize(q, qtype)
    assert np.abs(ref - w).max() < 0.15 * np.abs(w).max()       # the quantizer is sane
    got = quant.dequantize(torch.from_numpy(q), qtype.name, 512)
    assert torch.equal(got, torch.from_numpy(ref))               # the C decoder is exact
    lin = quant.QLinear(512, 40, [(qtype.name, 40)], bias=False)
    lin.weight.data = torch.from_numpy(q).reshape(-1)
    for rows in (1, 3, 16, 17):                                  # decode batches, and the prefill path past 16
        x = torch.randn(rows, 512)
        # (the VNNI path rounds x to 16-bit integers per group: error ~1e-5 per element, ~1e-4 on 512-term sums)
        torch.testing.assert_close(lin(x), x @ torch.from_numpy(ref).t(), atol=3e-3, rtol=3e-4)


@pytest.mark.parametrize("native_bf16", [True, False])
def test_long_prompts_take_the_bf16_gemm_only_where_the_cpu_has_it(native_bf16: bool,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """From BF16_PREFILL_MIN_ROWS rows the GEMM runs in bf16 on CPUs with native bf16 (x and the decoded weights
    rounded to bf16: ~2^-9 relative per term), in float32 elsewhere (exact to float32's own rounding)."""
    monkeypatch.setattr(quant, "cpu_has_native_bf16", lambda: native_bf16)
    rng = np.random.default_rng(4)
    w = rng.standard_normal((300, 512)).astype(np.float32)
    for qtype in TYPES:
        q = quant.quantize(w, qtype)
        ref = torch.from_numpy(gguf.quants.dequantize(q, qtype))
        lin = quant.QLinear(512, 300, [(qtype.name, 300)], bias=False)
        lin.weight.data = torch.from_numpy(q).reshape(-1)
        x = torch.randn(quant.BF16_PREFILL_MIN_ROWS, 512)
        got, want = lin(x), x @ ref.t()
        assert got.dtype == torch.float32 and got.shape == want.shape
        if native_bf16:
            rel = ((got - want).norm() / want.norm()).item()     # ~0.3%: each of 512 terms off by ~2^-9 at random
            assert 1e-4 < rel < 1e-2, rel                            # (and above float32's error: bf16 did run)
        else:
            torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0])
@pytest.mark.parametrize("k", [96, 160, 224, 288])
def test_rows_of_any_block_count(qtype: T, k: int) -> None:
    """The kernels take blocks four at a time: rows of 3, 5, 7 and 9 blocks end in a partial group."""
    rng = np.random.default_rng(k)
    w = rng.standard_normal((13, k)).astype(np.float32)
    q = quant.quantize(w, qtype)
    ref = torch.from_numpy(gguf.quants.dequantize(q, qtype))
    lin = quant.QLinear(k, 13, [(qtype.name, 13)], bias=False)
    lin.weight.data = torch.from_numpy(q).reshape(-1)
    for rows in (1, 2, 16):
        x = torch.randn(rows, k)
        torch.testing.assert_close(lin(x), x @ ref.t(), atol=3e-3, rtol=3e-4)


def test_mixed_segments_and_numpy_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((24, 256)).astype(np.float32), rng.standard_normal((8, 256)).astype(np.float32)
    qa, qb = quant.quantize(a, T.Q4_K), quant.quantize(b, T.Q6_K)
    lin = quant.QLinear(256, 32, [("Q4_K", 24), ("Q6_K", 8)], bias=True)
    lin.weight.data = torch.from_numpy(np.concatenate([qa.reshape(-1), qb.reshape(-1)]))
    lin.bias.data = torch.randn(32)
    ref = torch.from_numpy(np.concatenate([gguf.quants.dequantize(qa, T.Q4_K), gguf.quants.dequantize(qb, T.Q6_K)]))
    x = torch.randn(2, 256)
    want = x @ ref.t() + lin.bias
    torch.testing.assert_close(lin(x), want, atol=3e-3, rtol=3e-4)             # (x rounded to 16 bits per group)
    monkeypatch.setattr(quant, "qlib", lambda: None)             # no C compiler: gguf's numpy decoding
    torch.testing.assert_close(lin(x), want, atol=1e-4, rtol=1e-4)


TIE = 1e-3      # a reference step whose top two logits are closer than this has no well-defined greedy token


def assert_decodes_alike(qm, fm, prompts: list[list[int]], n: int = 32, atol: float = 1e-2,
                         rtol: float = 5e-3) -> None:
    """Decode n steps of all prompts together (one batch: the C kernels) in both models, feeding both the reference's
    greedy tokens: every step's logits close (the VNNI kernels round x to 16 bits per group: ~1e-3 per step, more as the
    K/V caches drift apart over 32 steps; the weights' own quantization moves logits by ~1), and the same greedy
    token wherever the reference has no near tie (tiny random models have ties of ~1e-4, which any kernel summing in
    another order may flip)."""
    B = len(prompts)
    caches = [m.new_cache(B, 64) for m in (qm, fm)]
    got, ref = (m.prefill(c, list(range(B)), prompts) for m, c in zip((qm, fm), caches))
    for step in range(n):
        torch.testing.assert_close(got, ref, atol=atol, rtol=rtol, msg=lambda m: f"step {step}: {m}")
        top2 = ref.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > TIE
        assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear]), f"greedy tokens differ at step {step}"
        tokens = ref.argmax(-1).tolist()
        got, ref = (m.decode_step(c, list(range(B)), tokens) for m, c in zip((qm, fm), caches))


CASES = [("llama", T.Q8_0, {}, None), ("gpt2", T.Q8_0, {}, None), ("llama3", T.Q4_0, {}, None),
         ("qwen2", T.Q4_0, {}, None), ("llama", T.Q4_K, WIDE, None), ("smollm", T.Q6_K, WIDE, None),
         ("llama", T.Q4_K, WIDE, Q4_K_M)]


@pytest.mark.parametrize("family,qtype,shape,types", CASES,
                         ids=[f"{c[0]}-{c[1].name}{'-M' if c[3] else ''}" for c in CASES])
def test_quantized_model_matches_its_dequantized_float32(family: str, qtype: T, shape: dict, types,
                                                         make_tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    folder = make_tiny_model(family, **shape)
    qfile = convert(folder, tmp_path / "q.gguf", qtype, types=types)
    ffile = convert(folder, tmp_path / "f.gguf", qtype, types=types, dequantized=True)
    qm, fm = load(str(qfile)), load(str(ffile))
    quantized = [m for m in qm.module.modules() if isinstance(m, quant.QLinear)]
    assert quantized and all(m.weight.dtype == torch.uint8 for m in quantized)
    assert qm.weight_bytes() < 0.6 * fm.weight_bytes()            # the matrices stay blocks in memory
    assert type(qm.fast_decode).__name__ == "QuantDecoder"
    ids = list(range(3, 40))
    torch.testing.assert_close(qm.forward(ids), fm.forward(ids), atol=2e-4, rtol=1e-4)   # prefill path
    assert_decodes_alike(qm, fm, [[5, 9, 23], [7, 11, 13, 17, 19], [3]])    # decode path (C kernels), batch 3
    assert_decodes_alike(qm, fm, [[40, 41]])                                 # and batch 1


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_K])
def test_load_quant_quantizes_a_hf_checkpoint_once(qtype: T, make_tiny_model, tmp_path: Path, monkeypatch) -> None:
    folder = make_tiny_model("llama", **(WIDE if qtype == T.Q4_K else {}))
    qm = load(folder, quant=qtype.name.lower())
    assert all(isinstance(qm.module.layers[i].feed_forward.w13, quant.QLinear) for i in range(2))
    assert type(qm.fast_decode).__name__ == "QuantDecoder"
    # reference: the same matrices through gguf's dequantize (embeddings stay float with --quant)
    ffile = convert(folder, tmp_path / "f.gguf", qtype, types={"token_embd.weight": T.F32}, dequantized=True)
    fm = load(str(ffile))
    ids = list(range(3, 40))
    torch.testing.assert_close(qm.forward(ids), fm.forward(ids), atol=2e-4, rtol=1e-4)
    assert_decodes_alike(qm, fm, [[5, 9, 23]])

    def no_quantizing(*a):
        raise AssertionError("quantized again instead of using the cached copy")

    monkeypatch.setattr(quant, "quantize", no_quantizing)
    again = load(folder, quant=qtype.name.lower())                 # from the cache (keyed by the checkpoint's hash)
    torch.testing.assert_close(again.forward(ids), qm.forward(ids), atol=0, rtol=0)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_K])
def test_load_quant_keeps_a_tied_table_in_blocks_for_the_head_too(qtype: T, make_tiny_model, tmp_path: Path) -> None:
    """A tied embedding (SmolLM, Llama 3.2, Qwen2.5) is quantized with the matrices, as llama.cpp quantizes
    token_embd: the head multiplies by its blocks (a float head streamed 3.5x the bytes of a Q4_0 one); the model
    equals the float32 one built from a GGUF of the same blocks, dequantized."""
    folder = make_tiny_model("smollm", **WIDE)
    qm = load(folder, quant=qtype.name.lower())
    net = qm.module
    assert isinstance(net.tok_embeddings, quant.QEmbedding) and isinstance(net.output, quant.QLinear)
    assert net.output.weight is net.tok_embeddings.weight and net.output.weight.dtype == torch.uint8
    assert type(qm.fast_decode).__name__ == "QuantDecoder"
    fm = load(str(convert(folder, tmp_path / "f.gguf", qtype, dequantized=True)))
    ids = list(range(3, 40))
    torch.testing.assert_close(qm.forward(ids), fm.forward(ids), atol=2e-4, rtol=1e-4)
    assert_decodes_alike(qm, fm, [[5, 9, 23], [7]])
    again = load(folder, quant=qtype.name.lower())                 # from the cache: the same blocks
    assert isinstance(again.module.tok_embeddings, quant.QEmbedding)
    torch.testing.assert_close(again.forward(ids), qm.forward(ids), atol=0, rtol=0)


def test_quant_cache_drops_copies_of_an_older_version(make_tiny_model, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmsh import paths

    folder = make_tiny_model("llama")
    monkeypatch.setattr(quant, "CACHE_VERSION", "0")
    load(folder, quant="q8_0")
    old = set((paths.cache_dir() / "quant").glob("*.safetensors"))
    assert len(old) == 1
    monkeypatch.undo()
    load(folder, quant="q8_0")
    new = set((paths.cache_dir() / "quant").glob("*.safetensors"))
    assert len(new) == 1 and not new & old


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_K])
def test_a_device_without_block_kernels_gets_the_matrices_decoded(qtype: T, make_tiny_model, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """What a CUDA load takes (the C kernels read host memory): every matrix decoded at load, no block module left;
    run here on the CPU, the model equals the float32 one built from the file dequantized by gguf's reference."""
    from llmsh.runtime import gguf_loader

    folder = make_tiny_model("llama", **WIDE)
    qfile = convert(folder, tmp_path / "q.gguf", qtype, types=Q4_K_M if qtype == T.Q4_K else None)
    ffile = convert(folder, tmp_path / "f.gguf", qtype, types=Q4_K_M if qtype == T.Q4_K else None, dequantized=True)
    monkeypatch.setattr(gguf_loader, "keeps_blocks", lambda device: False)
    decoded, fm = load(str(qfile)), load(str(ffile))
    assert not [m for m in decoded.module.modules() if isinstance(m, (quant.QLinear, quant.QEmbedding))]
    assert all(p.dtype == torch.float32 for p in decoded.module.parameters())
    assert type(decoded.fast_decode).__name__ != "QuantDecoder"
    ids = list(range(3, 40))
    torch.testing.assert_close(decoded.forward(ids), fm.forward(ids), atol=1e-5, rtol=1e-5)


def test_quant_needs_the_cpu_kernels(make_tiny_model, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmsh.runtime import LoadError, model

    monkeypatch.setattr(model, "resolve_device", lambda device: torch.device("cuda"))   # (checked before any use)
    with pytest.raises(LoadError, match="--quant q8_0 keeps matrices in blocks for the CPU kernels"):
        load(make_tiny_model("llama"), device="cuda", quant="q8_0")


def test_quant_refuses_what_it_cannot_do(make_tiny_model, tmp_path: Path) -> None:
    from llmsh.runtime import LoadError

    with pytest.raises(LoadError, match="--quant q5_1: use q8_0, q4_0 or q4_k"):
        load(make_tiny_model("gpt2"), quant="q5_1")
    gguf_file = convert(make_tiny_model("gpt2"), tmp_path / "g.gguf")
    with pytest.raises(LoadError, match="--quant applies to Hugging Face checkpoints"):
        load(str(gguf_file), quant="q8_0")


def test_pager_moves_quantized_pages(make_tiny_model, tmp_path: Path) -> None:
    from llmsh.engine.paging.core import Pager
    from llmsh.engine.paging.sources import ModelSource

    files = [convert(make_tiny_model(f), tmp_path / f"{f}.gguf", T.Q8_0) for f in ("llama", "qwen2")]
    refs = [load(str(f)).generate(["Once upon", "The fox"], max_tokens=12, temperature=0) for f in files]
    models = [load(str(f)) for f in files]
    pager = Pager({"cpu": int(sum(m.weight_bytes() for m in models) / 2)}, prefetch=True)
    try:
        for pid, m in enumerate(models, 1):
            pager.attach(pid, ModelSource(m), name=m.name)
        for _ in range(2):
            for m, ref in zip(models, refs):
                assert m.generate(["Once upon", "The fox"], max_tokens=12, temperature=0) == ref
        snap = pager.snapshot()
        assert snap["totals"]["page_outs"] > 0 and snap["totals"]["page_ins"] > 0   # quantized blocks moved
    finally:
        pager.close()


def _cpu_has(*flags: str) -> bool:
    try:
        line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return set(flags) <= set(line.split())


@pytest.mark.parametrize(("path", "extra_flags", "atol", "rtol"), [
    ("avx2", ["-mno-avx512f"], 3e-3, 3e-4),                    # integer dots, x in two planes (as VNNI's)
    ("float", ["-mno-avx512vnni", "-DLLMSH_FLOAT_QUANT"], 1e-4, 1e-4),   # blocks widened to floats (NEON, old x86)
])
def test_kernels_of_other_cpus_decode_alike(path: str, extra_flags: list[str], atol: float, rtol: float,
                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """quant_decode.c picks its dot products by what the compiler targets: AVX512-VNNI (quant_vnni.c), AVX2
    (quant_avx2.c) or floats. This CPU runs one of them; build the others here (where it can run them) and check."""
    import ctypes

    from llmsh.runtime import kernels

    cc = kernels.compiler()
    if cc is None:
        pytest.skip("no C compiler")
    if path == "avx2" and not _cpu_has("avx2", "fma"):
        pytest.skip("this CPU has no AVX2")
    lib = ctypes.CDLL(str(kernels.build(cc, tmp_path, kernels.FLAGS + extra_flags,
                                        kernels.SOURCE.with_name("quant_decode.c"))))
    P, L, I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int  # noqa: E741
    for name, argtypes in (("lm_qlinear", [P, L, L, P, P, L, L, P, I, I, P, I]),
                           ("lm_qdequant", [P, P, L, L, L, L, P, I])):
        getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, None
    monkeypatch.setattr(quant, "qlib", lambda: lib)
    rng = np.random.default_rng(3)
    w = rng.standard_normal((38, 512)).astype(np.float32)
    for qtype in TYPES:
        q = quant.quantize(w, qtype)
        ref = torch.from_numpy(gguf.quants.dequantize(q, qtype))
        lin = quant.QLinear(512, 38, [(qtype.name, 38)], bias=False)
        lin.weight.data = torch.from_numpy(q).reshape(-1)
        for rows in (1, 5, 16):                     # (batch 1 runs four weight rows at a time: 38 leaves two)
            x = torch.randn(rows, 512)
            torch.testing.assert_close(lin(x), x @ ref.t(), atol=atol, rtol=rtol)
    mixed = quant.QLinear(512, 38, [("Q4_K", 24), ("Q6_K", 14)], bias=False)          # a Q4_K_M q|k|v
    q4k, q6k = quant.quantize(w[:24], T.Q4_K), quant.quantize(w[24:], T.Q6_K)
    mixed.weight.data = torch.from_numpy(np.concatenate([q4k.reshape(-1), q6k.reshape(-1)]))
    ref = torch.from_numpy(np.concatenate([gguf.quants.dequantize(q4k, T.Q4_K), gguf.quants.dequantize(q6k, T.Q6_K)]))
    for rows in (1, 3):                         # (one row of x: Q4_K and Q6_K read x in different forms)
        x = torch.randn(rows, 512) * torch.linspace(0.01, 10, 512)              # groups of very different scales
        torch.testing.assert_close(mixed(x), x @ ref.t(), atol=atol * 10, rtol=rtol)


@pytest.mark.parametrize("family", ["qwen3", "phi4"])
def test_quantized_c_layers_run_qk_norms_and_partial_rotary(family: str, make_tiny_model) -> None:
    """Qwen3's q/k norms and Phi-4's partial RoPE in the quantized C layers: the same decode as the torch modules."""
    folder = make_tiny_model(family)
    qm, ref = load(folder, quant="q8_0"), load(folder, quant="q8_0")
    assert type(qm.fast_decode).__name__ == "QuantDecoder"
    ref.fast_decode = None                                          # the torch modules (same quantized matrices)
    assert_decodes_alike(qm, ref, [[5, 9, 23], [7, 11]])     # (a missing norm or rotation moves logits by ~1)
