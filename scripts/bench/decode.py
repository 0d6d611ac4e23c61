"""Decode throughput of llmsh's runtime against transformers' generate, on the same random weights, in one run.

Models: random weights shaped like GPT-2 124M, like a ~110M Llama with GQA (12 layers, 768 wide, 12 heads / 4 KV
heads), and ~0.5B models shaped like Qwen3, Gemma 2 and a Mixtral-style mixture of 8 experts, top-2
(`family_configs`); saved with transformers' save_pretrained in float32 and in bfloat16 (so each dtype loads
zero-copy). For each model x dtype x batch size (1, 16): greedy, 128 new tokens after a 16-token prompt, tokens/s of
  llmsh:        BatchGenerator (prefill + decode steps over the slotted KV cache)
  transformers: model.generate(do_sample=False, min_new_tokens=max_new_tokens)
timed alternately (best of --repeats) so machine noise hits both alike. Batch-1 is also compared with the
memory-bandwidth limit: weight bytes read per token (all weights but untied embedding tables, of which a token reads
one row, and of a mixture of experts only the chosen experts) / the measured copy bandwidth of a buffer the size of
the weights (read + write bytes, as STREAM counts; the best of copies timed right before each timed llmsh run, so a
busy moment on a shared machine lowers neither alone).
Peak RSS while loading is measured in a fresh child process (load + one forward, which touches every weight).

The machine may be shared: numbers are noisy; ratios measured in the same run are what to compare.
Last line: ratio_bs1=<geo-mean llmsh/transformers at batch 1> ratio_bs16=… limit_bs1=<geo-mean fraction of the
bandwidth limit> plus the minima and rss_load=<peak load RSS / weight bytes, worst case>.
Usage: python scripts/bench/decode.py [--quick] [--threads N] [--new-tokens 128] [--repeats 2] [--profile]

What the profiles (torch.profiler, cProfile) showed and what moved the numbers:
- decode steps of up to 16 sequences run C kernels (llmsh/runtime/kernels/cpu_decode.c, compiled for this CPU on
  first use; llmsh/runtime/fast_decode.py), one ctypes call for all layers plus the head:
  - with torch ops, a batch-1 step spent ~10 ms beyond its GEMVs on ~20 small ops per layer (rms_norm alone 39 us
    for 768 floats, SDPA 35-150 us), about twice what the same Python costs with warm caches, because the weights
    streaming through evict the interpreter's working set; one call per step instead of ~10 per layer removed it;
  - bf16 GEMV: torch's kernel reached ~0.7 of the copy bandwidth on this CPU (no AVX512_BF16); widening bf16 in
    registers over 16-row panels reached ~0.75-0.9 (float32: ~1.0, as MKL). Timing each linear of a step (a
    clock_gettime-instrumented build) showed the narrow matrices (768x768, 2048x768) lowest, at ~0.8: the software
    prefetch ran past each row's end into rows already streaming, while the next panel's rows (16 rows away, beyond
    what the hardware prefetcher guesses) started cold. Prefetching on into the next panel raised them to ~0.95-1.0,
    and Llama-110M bf16 batch-1 from 0.80 to 0.91 of the limit;
  - the per-step Python around the one C call still cost ~0.9 ms (cProfile: building the per-layer ctypes structs
    from ~14 module attributes each); they are now built once per (weights, KV cache): 0.2 ms;
  - attention (a step's ~3% at position 80, more with longer contexts): one horizontal sum per position and head
    made it ~40 ns per head and position (perf annotate); 16 positions' sums in one transpose-add tree, V summed in
    registers and bf16 widened in one instruction made it 10-17 ns;
  - 2-16 rows: MKL's sgemm took 93 ms (4 rows) / 120 ms (16 rows) for GPT-2's linears, which stream in 45 ms; a
    register-blocked GEMM takes 58 / 98 ms (bf16: 44 / 126 against torch's 124 / 252). At 16 rows this VM's FMA
    peak (40 GFLOP/s measured) is the bound. GCC widened bf16 through two 8-lane halves (5 instructions, seen in
    objdump); one AVX512BW instruction instead took bf16 at 16 rows from 69 to 51 ms (float32 55 ms, torch's bf16
    153 ms, same run), and batch-16 bf16 from ~2.1-2.3x transformers to ~3.1-3.2x;
  - bf16 activations stay float32 between the kernels (nearer to a float32 run than the modules, which round each
    op to bf16; tests/test_runtime_kernels.py).
- before that, in the torch modules (still what prefill and larger batches run): GQA decode without
  `repeat_interleave` of K/V (4-9x cheaper attention); q|k|v and gate|up fused into one matrix each at load; RoPE
  on q and k at once with a signed-sin table; torch's `rms_norm`; `matmul` on 3-d inputs; tied embeddings stored
  (dim, vocab) so the vocab head is an (in, out) GEMV (~15% fp32 / ~45% bf16 faster head); batched bf16 as float32
  GEMMs over L2-sized converted blocks (~1.9x, layers.py `_bf16_blocked`).
- threads: on this shared 2-core VM, 2 OpenMP threads made GEMV ~4x slower whenever another process held a core;
  one thread already streams weights near the copy bandwidth (see THREADS below).
- weight layout: GEMV over W stored (in, out) (`x @ W`, HF's Conv1D) streams 5-26% (fp32) / 12-50% (bf16) faster
  than `F.linear` over (out, in) at batch 1 with torch's kernels; llmsh keeps (in, out) and the kernels use it.
- load RSS: mmap'd safetensors, zero-copy when dtype and layout match; otherwise a chunked copy that madvise()s
  away each source chunk, so peak load RSS stays ~1x the weights.
- tried, no gain: transparent huge pages (+0-3%, within noise), oneDNN prepacked weights, a numba bf16 kernel,
  NTA or longer (512-1024 byte) software prefetch in the GEMV, 8-, 32- or 64-column steps, 32-row panels,
  torch.compile (needs a compiler at run time anyway and recompiles per batch shape).
- the newer families (issue 18): Qwen3 and Phi-3/4 run `lm_layers` with the q/k head norms and partial RoPE added;
  Gemma 2/3 first ran their own `lm_gemma_layers`; a mixture of experts runs per layer `lm_attention_half`,
  `lm_route` and one `lm_expert` per chosen expert. With routing in torch (~10 small ops a layer) a Mixtral-shaped bf16 batch-1 step took 22 ms; routing in C
  17 ms for 245 MiB read (of 778 MiB of weights: 2 of 8 experts).
- the newer families' speed goals (issue 18; this machine is now a 2-core Zen 4 VM with AVX512_BF16; numbers from
  the models' own mmap'd weights, one thread, each pair timed in one run):
  - bf16 GEMV: the bf16 weights read at ~0.75 of float32's rate, so widening (vpmovzxwd + shift per 16 weights), not
    memory, was the bound. Reading 32 columns (a cache line of a row) as 16 lanes of even|odd pairs widens with one
    integer op per 16 weights (the sums come out even|odd; y is kept in that order while a product runs), bit-equal
    results. Per matrix on Qwen3-0.6B's shapes: wide (4096-6144 columns) 20 -> 22-23 GB/s at 8-row panels, narrow
    (1024-1152: 2 KB rows) 14.5-15 -> 16-17 GB/s at 16-row panels (row-sequential orders, 4-row panels and longer
    prefetch distances were all slower);
  - bf16 GEMM (2-16 rows, batch 16 was compute-bound at 0.83x transformers for Gemma 2): transformers' bf16 matmul
    is oneDNN's with vdpbf16ps, 32 multiply-adds an instruction against an FMA's 16. Where the CPU has AVX512_BF16
    the kernels use it too (x rounded to bf16, as torch does; rows k, k+1 of W interleaved in registers): Gemma
    2-shaped linears at 16 rows 255 -> 136 ms, oneDNN 156 ms in the same run; other CPUs take the pairs GEMM
    (352 -> 326 ms). The kernel tests also build without AVX512_BF16 to keep that path checked;
  - Gemma 2/3 run the one shared layer loop (lm_layers with Step.gemma), the soft cap vectorised in the shared
    attention (libm's tanhf per score before); a MoE step without a pager is one C call (lm_moe_layers) instead of
    ~3 Python-driven calls per layer, the same floats as the per-expert calls the pager needs.
- batch-1 GEMV prefetch (issue 18, same VM): with 16-row panels and prefetches a fixed distance along each row, the
  narrow matrices (1024 columns: 2 KB rows) read at 15-17 GB/s, the wide ones 21-24. Pairing each load with a
  prefetch of the next 8-row panel's lines in address order reads both at 24-26 GB/s (float32 21.6 -> 24): Qwen3
  bf16 batch-1 went from 0.80 to 0.96 of the limit in the same hour. At 2 threads one row now splits K between
  threads (each a contiguous run of rows) instead of the columns: ~29-31 -> ~32-33 GB/s on 1.1B-Llama shapes.
  The copy bandwidth this VM measures swings between ~19 and ~28 GB/s from one minute to the next, so one run's
  fraction of the limit moves by as much (Qwen3 bf16 0.75-0.96 over three runs at the same ~22 tok/s).
- what is left at batch 1: prefill (16 tokens through torch's GEMMs, ~3-4% of the bf16 runs) and the sampling and
  detokenising around each step (~0.3 ms a token).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

PROMPT_LEN = 16
ALL_MODELS = ("gpt2-124m", "llama-110m-gqa", "qwen3-0.5b", "gemma2-0.5b", "moe-8x2")
# THREADS: batch-1 decode is memory-bound and one core's GEMV already streams weights at the machine's copy bandwidth;
# on a shared 2-core VM a second OpenMP thread made every GEMM ~4x slower whenever another process held a core
# (measured: 7 MB GEMV 0.38 ms at 1 thread vs 1.4 ms at 2). So both engines run with one thread unless told otherwise.


def family_configs() -> dict:
    """The newer families' cases (issue 18), ~0.5B parameters each with random weights: Qwen3-0.6B's shape (head_dim
    128 over 16/8 heads, q/k norms, tied) with a 32k vocabulary; Gemma 2's (soft-caps, alternating 4096 windows,
    pre/post norms, GeGLU); and a Mixtral-shaped mixture of 8 experts, top-2 (of its 0.41B parameters a token
    reads ~0.13B)."""
    import transformers

    return {
        "qwen3-0.5b": transformers.Qwen3Config(
            vocab_size=32000, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
            num_key_value_heads=8, head_dim=128, max_position_embeddings=4096, tie_word_embeddings=True),
        "gemma2-0.5b": transformers.Gemma2Config(
            vocab_size=32000, hidden_size=1152, intermediate_size=4608, num_hidden_layers=22, num_attention_heads=8,
            num_key_value_heads=4, head_dim=128, query_pre_attn_scalar=128, max_position_embeddings=4096,
            sliding_window=4096, pad_token_id=0),
        "moe-8x2": transformers.MixtralConfig(
            vocab_size=32000, hidden_size=768, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=12,
            num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=2048,
            tie_word_embeddings=False),
    }


def make_checkpoints(root: Path, models: list[str], dtypes: list[str]) -> dict[tuple[str, str], Path]:
    """Random-weight checkpoints written by transformers' save_pretrained, one folder per model x dtype."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    configs = {
        "gpt2-124m": transformers.GPT2Config(),  # n_layer=12, n_embd=768, vocab 50257
        "llama-110m-gqa": transformers.LlamaConfig(
            vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
            num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False),
        **(family_configs() if set(models) - {"gpt2-124m", "llama-110m-gqa"} else {}),
    }
    out = {}
    for name in models:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(configs[name]).eval()
        for dt in dtypes:
            folder = root / f"{name}-{dt}"
            model.to(getattr(torch, dt)).save_pretrained(folder)
            out[name, dt] = folder
    return out


def copy_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Bytes/s moved copying a buffer of nbytes, counting read + write like STREAM's Copy (best of repeats)."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def run_llmsh(model, prompts: list[list[int]], n_new: int) -> float:
    """Seconds for llmsh to generate n_new greedy tokens for every prompt as one continuous batch."""
    from llmsh.runtime.generation import BatchGenerator, Sequence
    from llmsh.runtime.sampling import SamplingParams

    params = SamplingParams(max_tokens=n_new, ignore_eos=True)
    gen = BatchGenerator(model, max_batch=len(prompts), max_seq_len=PROMPT_LEN + n_new)
    seqs = [Sequence(model, p, params) for p in prompts]
    t0 = time.perf_counter()
    for s in seqs:
        gen.add(s)
    while gen.has_work:
        gen.step()
    elapsed = time.perf_counter() - t0
    assert all(len(s.token_ids) == n_new for s in seqs)
    return elapsed


def run_hf(model, prompts: list[list[int]], n_new: int) -> float:
    """Seconds for transformers' generate to produce n_new greedy tokens for the batch."""
    ids = torch.tensor(prompts)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                             do_sample=False, pad_token_id=0)
    elapsed = time.perf_counter() - t0
    assert out.shape[1] == PROMPT_LEN + n_new
    return elapsed


RSS_CHILD = """
import json, sys, psutil, torch
torch.set_num_threads(int(sys.argv[3]))
import llmsh.runtime.model
from llmsh.runtime import load
with torch.device("meta"):          # the first meta-device init imports ~75 MB of torch's Python meta kernels, once per
    torch.nn.Embedding(2, 2)        # process: not part of a load
def hwm():                          # VmHWM is this process's own peak (ru_maxrss would include the forking parent's)
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
base = psutil.Process().memory_info().rss
m = load(sys.argv[1], dtype=sys.argv[2])
after_load = psutil.Process().memory_info().rss
m.forward(list(range(8)))           # touches every weight page
print(json.dumps({"base": base, "after_load": after_load, "peak": hwm(), "weights": m.weight_bytes()}))
"""


def load_rss(folder: Path, dtype: str, threads: int) -> dict:
    """Peak RSS of loading folder in a fresh process, minus what the interpreter + torch held before load()."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(folder), dtype, str(threads)], env=env,
                         capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["ratio"] = (r["peak"] - r["base"]) / r["weights"]
    return r


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="GPT-2 shape, float32 only, 32 new tokens (under a minute)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads for both engines (default 1: see THREADS)")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per engine (best is kept)")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--models", default=None,
                    help="comma list of gpt2-124m,llama-110m-gqa,qwen3-0.5b,gemma2-0.5b,moe-8x2 (default: all; "
                         "--quick: gpt2-124m)")
    ap.add_argument("--dtypes", default=None, help="comma list of float32,bfloat16")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of one llmsh batch-1 run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # deliberate (see THREADS): the same count for both engines
    n_new = args.new_tokens or (32 if args.quick else 128)
    repeats = args.repeats or (1 if args.quick else 2)
    models = (args.models or ("gpt2-124m" if args.quick else ",".join(ALL_MODELS))).split(",")
    dtypes = (args.dtypes or ("float32" if args.quick else "float32,bfloat16")).split(",")
    batches = [int(b) for b in args.batches.split(",")]

    import transformers

    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__} "
          f"threads={torch.get_num_threads()}, transformers {transformers.__version__}; shared machine: numbers are noisy")
    root = Path(tempfile.mkdtemp(prefix="llmsh-bench-decode-"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # (`timeout` stops a long run: still clean up below)
    try:
        return _run(args, root, models, dtypes, batches, n_new, repeats)
    finally:
        from llmsh.runtime import layout_cache

        layout_cache.forget_under(root)          # their transposed matrices, cached by the loads
        shutil.rmtree(root, ignore_errors=True)  # up to 1.5 GB of checkpoints


def _run(args: argparse.Namespace, root: Path, models: list[str], dtypes: list[str], batches: list[int], n_new: int,
         repeats: int) -> int:
    import transformers

    from llmsh.runtime import load

    folders = make_checkpoints(root, models, dtypes)
    ratios: dict[int, list[float]] = {b: [] for b in batches}
    limits: list[float] = []
    rss: list[float] = []
    g = torch.Generator().manual_seed(0)
    for (name, dt), folder in folders.items():
        ours = load(folder, dtype=dt)
        ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dt)).eval()
        wbytes = ours.weight_bytes()
        r = load_rss(folder, dt, args.threads)
        rss.append(r["ratio"])
        print(f"{name} {dt}: weights {wbytes / 2**20:.0f} MiB, a batch-1 step reads "
              f"{ours.bytes_read_per_token() / 2**20:.0f} MiB; load peak RSS +{(r['peak'] - r['base']) / 2**20:.0f} MiB "
              f"= {r['ratio']:.2f}x weights (after load() alone: +{(r['after_load'] - r['base']) / 2**20:.0f} MiB, mmap)")
        for b in batches:
            prompts = torch.randint(0, ours.config.vocab_size, (b, PROMPT_LEN), generator=g).tolist()
            run_llmsh(ours, prompts, 4), run_hf(ref, prompts, 4)          # warm-up both
            t_ours, t_ref, bw = math.inf, math.inf, 0.0
            for _ in range(repeats):                                       # interleaved, best of
                if b == 1:
                    bw = max(bw, copy_bandwidth(wbytes, repeats=3))
                t_ours = min(t_ours, run_llmsh(ours, prompts, n_new))
                t_ref = min(t_ref, run_hf(ref, prompts, n_new))
            tps_ours, tps_ref = b * n_new / t_ours, b * n_new / t_ref
            ratios[b].append(tps_ours / tps_ref)
            line = (f"  bs={b:<2} llmsh {tps_ours:8.1f} tok/s   transformers {tps_ref:8.1f} tok/s   "
                    f"ratio {tps_ours / tps_ref:.2f}")
            if b == 1:
                limit = bw / ours.bytes_read_per_token()
                limits.append(tps_ours / limit)
                line += f"   bandwidth limit {limit:.1f} tok/s ({bw / 1e9:.1f} GB/s copy) -> {tps_ours / limit:.2f}"
            print(line, flush=True)
        if args.profile:
            profile(ours, n_new)
        del ours, ref
    keys = [f"ratio_bs{b}={geomean(ratios[b]):.2f}" for b in batches]
    keys.append(f"limit_bs1={geomean(limits):.2f}" if 1 in batches else "limit_bs1=nan")
    keys += [f"min_ratio_bs{b}={min(ratios[b]):.2f}" for b in batches]
    keys.append(f"rss_load={max(rss):.2f}")
    print(" ".join(keys))
    return 0


def profile(model, n_new: int) -> None:
    """torch.profiler table of one batch-1 llmsh generation (what the time goes to)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    prompts = [list(range(1, PROMPT_LEN + 1))]
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        run_llmsh(model, prompts, min(n_new, 32))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    sys.exit(main())
