"""The C decode kernels (llmsh/runtime/kernels) against torch, and the fast decode path against the torch modules.

The kernels are compiled on first use; without a C compiler these tests skip, and the runtime falls back to torch.
"""

from __future__ import annotations

import ctypes
import logging
import math
import platform

import pytest
import torch
import torch.nn.functional as F

from llmsh.runtime import kernels, load
from llmsh.runtime.llama import LlamaConfig, apply_rope, rope_inv_freq, rope_tables

native = kernels.library() if kernels.compiler() else None
needs_kernels = pytest.mark.skipif(native is None, reason="needs a C compiler (the kernels could not be built)")


@pytest.fixture(scope="module", params=["native", "avx2", "sse2", "avx512-no-bf16-dot"])
def lib(request, tmp_path_factory):
    """The kernels built for this CPU; on x86 also for plain AVX2 + FMA (most users' CPUs have no AVX-512, and the
    code takes other paths there: two 256-bit halves per vector, float32 tiles of 256-bit vectors, no AVX512BW bf16
    widening), for x86-64's baseline (16-byte vectors, as on NEON), and on CPUs with bf16 dot products
    (AVX512_BF16) also without them, as on AVX-512 CPUs that lack them (other bf16 GEMM)."""
    if native is None:
        pytest.skip("needs a C compiler (the kernels could not be built)")
    if request.param == "native":
        return native
    flags = [f for f in kernels.FLAGS if f not in ("-march=native", "-mprefer-vector-width=512")]
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 builds: needs an x86 CPU")
    if request.param == "avx2":
        if " avx2 " not in kernels._cpu_flags() + " ":
            pytest.skip("AVX2 build: needs an x86 CPU with AVX2")
        flags += ["-mavx2", "-mfma"]
    elif request.param == "sse2":
        pass
    else:
        if " avx512_bf16 " not in kernels._cpu_flags() + " ":
            pytest.skip("a build without bf16 dot products: only differs from native on a CPU that has them")
        flags = kernels.FLAGS + ["-mno-avx512bf16"]
    out = tmp_path_factory.mktemp(request.param)
    try:
        path = kernels.build(kernels.compiler(), out, flags + ["-fopenmp"])
    except RuntimeError:                                          # a compiler without OpenMP
        path = kernels.build(kernels.compiler(), out, flags)
    return kernels.declare(ctypes.CDLL(str(path)))


DTYPES = [torch.float32, torch.bfloat16]


def _bf(dtype: torch.dtype) -> int:
    return int(dtype == torch.bfloat16)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", [(1, 64, 96), (1, 37, 4099), (2, 130, 33), (3, 16, 1), (4, 200, 700), (7, 45, 130),
                                   (16, 70, 8200), (1, 45, 160), (5, 33, 130), (12, 131, 300),
                                   (1, 300, 1000), (1, 1003, 37)])  # (one row, K split between threads)
def test_linear_matches_torch(dtype, M, K, N, threads, lib):
    g = torch.Generator().manual_seed(M * K + N)
    x, w, b = torch.randn(M, K, generator=g), torch.randn(K, N, generator=g).to(dtype), torch.randn(N, generator=g)
    b = b.to(dtype)
    if dtype == torch.bfloat16 and M > 1 and lib.lm_bf16_dot():  # bf16 dot products: x is rounded to bf16 first
        x_used = x.bfloat16().float()
    else:
        x_used = x
    expected = x_used @ w.float() + b.float()
    y = torch.full((M, N), float("nan"))
    lib.lm_linear(x.data_ptr(), M, K, w.data_ptr(), N, b.data_ptr(), _bf(dtype), 0, y.data_ptr(), threads)
    torch.testing.assert_close(y, expected, atol=1e-4 * math.sqrt(K), rtol=1e-5)
    residual = torch.randn(M, N, generator=g)
    y = residual.clone()
    lib.lm_linear(x.data_ptr(), M, K, w.data_ptr(), N, None, _bf(dtype), 1, y.data_ptr(), threads)  # y += x @ w
    torch.testing.assert_close(y, residual + x_used @ w.float(), atol=1e-4 * math.sqrt(K), rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("M,K,N", [(2, 64, 64), (5, 33, 130), (16, 300, 1000), (16, 768, 2304), (3, 31, 8200)])
def test_amx_tiles_give_the_dot_products_sums(M, K, N):
    """On CPUs with AMX, several bf16 rows run on tiles (gemm_bf16_amx): the same bf16-rounded x and float sums as
    the vdpbf16ps GEMM, in another order. Off, then on again, in one process."""
    if not native.lm_amx(1):
        pytest.skip("needs AMX (and a kernel that grants its tile state)")
    g = torch.Generator().manual_seed(M + K + N)
    x, w = torch.randn(M, K, generator=g), torch.randn(K, N, generator=g).bfloat16()
    residual = torch.randn(M, N, generator=g)
    out = []
    try:
        for amx in (0, 1):
            native.lm_amx(amx)
            y = residual.clone()
            native.lm_linear(x.data_ptr(), M, K, w.data_ptr(), N, None, 1, 1, y.data_ptr(), 2)
            out.append(y)
    finally:
        native.lm_amx(1)
    torch.testing.assert_close(out[1], out[0], atol=2e-6 * math.sqrt(K), rtol=1e-5)
    torch.testing.assert_close(out[1], residual + x.bfloat16().float() @ w.float(), atol=1e-4 * math.sqrt(K),
                               rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_norms_match_torch(dtype, lib):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 70, generator=g) * 3 + 1
    w, b = torch.randn(70, generator=g).to(dtype), torch.randn(70, generator=g).to(dtype)
    y = torch.empty_like(x)
    lib.lm_rmsnorm(x.data_ptr(), 3, 70, w.data_ptr(), _bf(dtype), 1e-5, y.data_ptr())
    torch.testing.assert_close(y, F.rms_norm(x, (70,), w.float(), 1e-5), atol=1e-5, rtol=1e-5)
    lib.lm_layernorm(x.data_ptr(), 3, 70, w.data_ptr(), b.data_ptr(), _bf(dtype), 1e-5, y.data_ptr())
    torch.testing.assert_close(y, F.layer_norm(x, (70,), w.float(), b.float(), 1e-5), atol=1e-5, rtol=1e-5)


def test_activations_match_torch_over_the_whole_float_range(lib):
    x = torch.cat([torch.linspace(-120, 120, 4001), torch.randn(999)])
    for exact, approximate in [(0, "tanh"), (1, "none")]:
        y = x.clone()
        lib.lm_gelu(y.data_ptr(), y.numel(), exact)
        torch.testing.assert_close(y, F.gelu(x, approximate=approximate), atol=1e-5, rtol=1e-5)
    gate_up = torch.cat([x, x.flip(0)]).view(1, -1)
    out = torch.empty(1, x.numel())
    lib.lm_silu_mul(gate_up.data_ptr(), 1, x.numel(), out.data_ptr())
    torch.testing.assert_close(out[0], F.silu(x) * x.flip(0), atol=1e-5, rtol=1e-5)


def test_rope_matches_the_modules_rope(lib):
    cfg = LlamaConfig(dim=64, n_head=4, n_kv_head=2, max_seq_len=64)
    cos, sin = rope_tables(rope_inv_freq(cfg), 64)
    x = torch.randn(2, 8 * 16)                             # 2 rows: 6 rotated heads of 16 + 2 heads left alone (v)
    pos = torch.tensor([5, 63])
    expected = x.clone().view(2, 8, 16)
    expected[:, :6] = apply_rope(expected[:, :6], cos[pos][:, None], sin[pos][:, None])
    lib.lm_rope(x.data_ptr(), 2, 128, 6, 16, cos.data_ptr(), sin.data_ptr(), pos.data_ptr())
    torch.testing.assert_close(x.view(2, 8, 16), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("hd", [16, 64, 40])                         # 40: not a whole number of vectors
@pytest.mark.parametrize("cap", [0.0, 2.0])                           # 2.0: Gemma 2's soft cap, small enough to bite
def test_attention_writes_the_cache_and_matches_sdpa(dtype, window, threads, hd, cap, lib):
    """GQA (6 query heads on 2 kv heads), two rows at different positions in non-adjacent slots: 10 positions (part
    of one block of 16) and 38 (two whole blocks and part of a third); with a soft cap, cap * tanh(s / cap) of the
    logits s before the softmax."""
    g = torch.Generator().manual_seed(window + hd)
    nh, nkv, S = 6, 2, 48
    kc = torch.randn(4, nkv, S, hd, generator=g).to(dtype)
    vc = torch.randn(4, nkv, S, hd, generator=g).to(dtype)
    qkv = torch.randn(2, (nh + 2 * nkv) * hd, generator=g)
    slots, pos = torch.tensor([3, 1]), torch.tensor([9, 37])
    expected_k, expected_v = kc.clone(), vc.clone()
    out, scores = torch.empty(2, nh * hd), torch.empty(threads, S)
    if cap:
        lib.lm_attention_softcap(qkv.data_ptr(), 2, nh, nkv, hd, kc.data_ptr(), vc.data_ptr(), _bf(dtype), S,
                                 slots.data_ptr(), pos.data_ptr(), window, 0.3, cap, scores.data_ptr(), out.data_ptr(),
                                 threads)
    else:
        lib.lm_attention(qkv.data_ptr(), 2, nh, nkv, hd, kc.data_ptr(), vc.data_ptr(), _bf(dtype), S,
                         slots.data_ptr(), pos.data_ptr(), window, 0.3, scores.data_ptr(), out.data_ptr(), threads)
    for m, (slot, p) in enumerate(zip(slots.tolist(), pos.tolist())):
        q, k_new, v_new = qkv[m].split([nh * hd, nkv * hd, nkv * hd])
        expected_k[slot, :, p] = k_new.view(nkv, hd).to(dtype)                    # rounded like torch rounds
        expected_v[slot, :, p] = v_new.view(nkv, hd).to(dtype)
        lo = max(0, p - window + 1) if window else 0
        k = expected_k[slot, :, lo:p + 1].float().repeat_interleave(nh // nkv, 0)
        v = expected_v[slot, :, lo:p + 1].float().repeat_interleave(nh // nkv, 0)
        if cap:
            logits = torch.tanh(q.view(nh, 1, hd) @ k.transpose(1, 2) * 0.3 / cap) * cap
            ref = torch.softmax(logits, dim=-1) @ v
        else:
            ref = F.scaled_dot_product_attention(q.view(nh, 1, hd), k, v, scale=0.3)
        torch.testing.assert_close(out[m], ref.flatten(), atol=1e-5, rtol=1e-5)
    assert torch.equal(kc, expected_k) and torch.equal(vc, expected_v)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window,cap", [(None, None), (5, None), (None, 2.0), (5, 2.0)])
def test_a_decode_steps_attention_in_c_matches_torchs(dtype, window, cap):
    """The modules' decode step on the CPU (more rows than fast_decode takes) attends through lm_attend: three rows
    at different positions in unordered slots, GQA (6 query heads on 2 kv heads), a sliding window, Gemma 2's soft
    cap: the same as torch's attention over the same cache (SDPA, or gemma's soft-capped attention)."""
    from dataclasses import replace

    from llmsh.runtime.gemma import softcapped_attention
    from llmsh.runtime.kv_cache import KVCache, Step, attend

    g = torch.Generator().manual_seed(7)
    nh, nkv, hd = 6, 2, 40
    cache = KVCache(1, 5, nkv, 48, hd, dtype, "cpu")
    for buf in cache.k + cache.v:
        buf.copy_(torch.randn(buf.shape, generator=g))
    pos = torch.tensor([[9], [37], [20]])
    step = Step.build(pos, cache, [4, 1, 2])
    assert step.in_c
    q = torch.randn(3, nh, 1, hd, generator=g).to(dtype)
    k_new, v_new = (torch.randn(3, nkv, 1, hd, generator=g).to(dtype) for _ in range(2))
    got = attend(q, *step.update(0, k_new, v_new), step, window, scale=0.3, cap=cap)
    plain = replace(step, in_c=False)
    k, v = plain.update(0, k_new, v_new)                             # (the same writes again), the rows gathered
    if cap is None:
        want = attend(q, k, v, plain, window, scale=0.3)
    else:
        want = softcapped_attention(q, k, v, plain, window, 0.3, cap)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


FAMILIES = ["gpt2", "llama", "llama3", "mistral", "qwen2", "qwen3", "phi3", "phi4", "gemma2", "gemma3", "mixtral", "qwen3_moe"]


def _decode_both_ways(model, prompts, steps, hook=None):
    """Logits of `steps` decode steps of all prompts as one batch, through the kernels and through the modules; both
    paths are fed the same tokens."""
    out = []
    for fast in (model.fast_decode, None):
        model.fast_decode = fast
        model.set_page_hook(hook)
        cache = model.new_cache(2 * len(prompts), 64)
        slots = [cache.alloc() for _ in range(2 * len(prompts))][::-2]   # every other slot, last first
        for s, p in zip(slots, prompts):
            model.prefill(cache, [s], [p])
        tokens, logits = [p[-1] for p in prompts], []
        for _ in range(steps):
            step = model.decode_step(cache, slots, tokens)
            logits.append(step)
            tokens = [(t * 7 + 1) % model.config.vocab_size for t in tokens]
        out.append(torch.stack(logits))
    model.set_page_hook(None)
    return out


@pytest.fixture
def torch_threads(request):
    """Run the test with torch.get_num_threads() == request.param (the kernels take torch's count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@needs_kernels
@pytest.mark.parametrize("torch_threads", [1, 2], indirect=True)
@pytest.mark.parametrize("family", FAMILIES)
def test_fast_decode_matches_the_modules(family, make_tiny_model, torch_threads):
    """Six sequences at different lengths (mistral's 24-token window is crossed), float32: same logits."""
    model = load(make_tiny_model(family))
    assert model.fast_decode is not None
    prompts = [list(range(3, 23)), list(range(40, 45)), [7] * 9, list(range(100, 131)), [1, 2], list(range(60, 76))]
    fast, modules = _decode_both_ways(model, prompts, 12)
    torch.testing.assert_close(fast, modules, atol=1e-4, rtol=0)


@needs_kernels
@pytest.mark.parametrize("family", ["gpt2", "llama3", "gemma2", "mixtral"])
def test_fast_decode_in_bfloat16_is_closer_to_float32_than_the_modules(family, make_tiny_model):
    """bf16: the kernels keep activations in float32 where the modules round each op to bf16, so against a float32
    run over the same bf16-rounded weights the kernels' logits are nearer (measured ~2x) than the modules'."""
    folder = make_tiny_model(family)
    prompts = [list(range(3, 13)), list(range(20, 27))]
    reference = load(folder)
    for p in reference.module.parameters():
        p.data.copy_(p.data.bfloat16().float())
    expected, _ = _decode_both_ways(reference, prompts, 6)
    fast, modules = _decode_both_ways(load(folder, dtype="bfloat16"), prompts, 6)
    fast_error, modules_error = (fast - expected).abs().max(), (modules - expected).abs().max()
    assert fast_error < modules_error and fast_error < 0.1 * expected.std()


@needs_kernels
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_a_moe_step_in_one_call_gives_the_floats_of_the_per_expert_calls(family, make_tiny_model):
    """Without a page hook a MoE step is one C call (lm_moe_layers); with one (the pager), a call per chosen expert
    after its hook. Both add the experts in the same order, so their logits are equal, not just close."""
    model = load(make_tiny_model(family))
    prompts = [list(range(3, 13)), list(range(20, 27)), [5] * 4]
    fast = model.fast_decode
    one_call, _ = _decode_both_ways(model, prompts, 6)
    model.fast_decode = fast                                              # (_decode_both_ways leaves it None)
    per_expert, modules = _decode_both_ways(model, prompts, 6, hook=lambda i: None)
    assert torch.equal(one_call, per_expert)
    torch.testing.assert_close(one_call, modules, atol=1e-4, rtol=0)


@needs_kernels
def test_fast_decode_calls_the_page_hook_like_the_modules(make_tiny_model):
    model = load(make_tiny_model("llama3"))                     # tied: the head pages the embedding back in
    calls: list[list[int]] = [[], []]
    which = iter([0, 1])
    current: list[int] = []

    def hook(i: int) -> None:
        current.append(i)

    for fast in (model.fast_decode, None):
        current = calls[next(which)]
        model.fast_decode = fast
        model.set_page_hook(hook)
        cache = model.new_cache(1, 16)
        slot = cache.alloc()
        model.prefill(cache, [slot], [[1, 2, 3]])
        current.clear()
        model.decode_step(cache, [slot], [4])
    model.set_page_hook(None)
    assert calls[0] == calls[1] == [0, 1, 2, 0, 3]


@pytest.fixture
def rebuilt_library(monkeypatch):
    """`kernels.library()` is cached per process: clear it so the test's environment decides, and again after. A
    user's own LLMSH_KERNELS=0 is removed first: the tests set what they need."""
    monkeypatch.delenv("LLMSH_KERNELS", raising=False)
    kernels.library.cache_clear()
    yield kernels.library
    kernels.library.cache_clear()


def test_without_kernels_decoding_uses_the_modules(make_tiny_model, monkeypatch, rebuilt_library):
    monkeypatch.setenv("LLMSH_KERNELS", "0")
    model = load(make_tiny_model("gpt2"))
    assert model.fast_decode is None
    assert len(model.generate(["hello"], max_tokens=4)) == 1


def test_a_broken_compiler_means_torch_only_and_one_warning(monkeypatch, tmp_path, caplog, rebuilt_library):
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: error: no such target' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    with caplog.at_level(logging.WARNING, logger="llmsh.runtime.kernels"):
        assert rebuilt_library() is None
    assert "no such target" in caplog.text
    assert not list((tmp_path.parent).glob("**/*.so.tmp"))


@needs_kernels
def test_the_build_is_cached_per_source_and_reused(tmp_path):
    first = kernels.build(kernels.compiler(), tmp_path)
    mtime = first.stat().st_mtime_ns
    assert kernels.build(kernels.compiler(), tmp_path) == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]                 # no temporary left behind


@needs_kernels
def test_a_released_page_is_an_error_not_a_crash(make_tiny_model):
    """Without the pager's hook nothing pages a released layer back in: one clear error, the cache untouched."""
    model = load(make_tiny_model("llama"))
    cache = model.new_cache(1, 16)
    slot = cache.alloc()
    model.prefill(cache, [slot], [[1, 2, 3]])
    expected = model.decode_step(cache, [slot], [4])
    cache.lengths[slot] = 3
    model.release_page(1)
    with pytest.raises(RuntimeError, match="not resident"):
        model.decode_step(cache, [slot], [4])
    assert cache.lengths[slot] == 3
    model.materialize_page(1)
    torch.testing.assert_close(model.decode_step(cache, [slot], [4]), expected)


@needs_kernels
def test_fast_decode_follows_weights_that_paging_swapped(make_tiny_model):
    """The kernels' per-layer parameter addresses are cached between steps: a page moved to new tensors (as the
    pager does) must be read there, not at the old, freed addresses."""
    model = load(make_tiny_model("llama"))
    cache = model.new_cache(1, 16)
    slot = cache.alloc()
    model.prefill(cache, [slot], [[1, 2, 3]])
    before = model.decode_step(cache, [slot], [4])                          # caches the addresses
    halved = {name: t * 0.5 for name, t in model.page_tensors(1).items()}
    model.release_page(1)
    model.materialize_page(1, host=halved)
    logits = []
    for fast in (model.fast_decode, None):
        model.fast_decode = fast
        cache.lengths[slot] = 3
        logits.append(model.decode_step(cache, [slot], [4]))
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=0)
    assert not torch.allclose(logits[0], before, atol=1e-3)


@needs_kernels
@pytest.mark.parametrize("slots,tokens,error", [
    ([5], [1], "distinct slots"), ([0, 0], [1, 2], "distinct slots"), ([0], [10_000], "token ids"),
    ([0], [-1], "token ids")])
def test_bad_decode_arguments_are_rejected_before_c_reads_memory(make_tiny_model, slots, tokens, error):
    model = load(make_tiny_model("gpt2"))
    cache = model.new_cache(2, 16)
    for _ in range(2):
        cache.alloc()
    with pytest.raises(ValueError, match=error):
        model.fast_decode(cache, slots, tokens, [0] * len(slots))
    with pytest.raises(ValueError, match="positions"):
        model.fast_decode(cache, [0], [1], [16])
    assert cache.lengths == [0, 0]


@pytest.mark.skipif(kernels.compiler() is None, reason="needs a C compiler to get as far as the cache directory")
def test_an_unwritable_cache_directory_means_torch_only(monkeypatch, tmp_path, caplog, rebuilt_library):
    not_a_dir = tmp_path / "cache"
    not_a_dir.write_text("a file where the cache directory should be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(not_a_dir))
    with caplog.at_level(logging.WARNING, logger="llmsh.runtime.kernels"):
        assert rebuilt_library() is None
    assert "could not build" in caplog.text


@pytest.mark.skipif(kernels.compiler() is None, reason="needs a C compiler")
@pytest.mark.parametrize("source", ["cpu_decode.c", "quant_decode.c"])
def test_every_kernel_library_compiles(source: str, tmp_path) -> None:
    """A kernel source that stops compiling (a changed helper's signature) must fail here: at run time it only logs a
    line and decodes through torch ops, which every other test would still pass."""
    path = kernels.build(kernels.compiler(), tmp_path, kernels.FLAGS, kernels.SOURCE.with_name(source))
    assert ctypes.CDLL(str(path))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int16])
@pytest.mark.parametrize("rows,cols", [(1, 1), (16, 16), (37, 70), (130, 17), (64, 200), (2500, 70), (1030, 33)])  # (bands of 1024)
def test_transpose_matches_torch(dtype, rows, cols, lib):
    """lm_transpose (loading and paging in (out, in) checkpoint matrices): whole 16 x 16 blocks and the edges, into
    a slice of a wider matrix (a fused q|k|v part), bit for bit."""
    src = torch.randn(rows, cols + 3).to(dtype)[:, :cols]                   # rows cols + 3 apart
    out = torch.zeros(cols, rows + 5, dtype=dtype)
    assert lib.lm_transpose(src.data_ptr(), rows, cols, src.stride(0), out[:, 2:].data_ptr(), out.stride(0),
                            src.element_size()) == 0
    assert torch.equal(out[:, 2:2 + rows], src.t()) and not out[:, :2].any() and not out[:, 2 + rows:].any()
    assert lib.lm_transpose(src.data_ptr(), rows, cols, src.stride(0), out.data_ptr(), out.stride(0), 8) == -1
