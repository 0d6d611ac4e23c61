"""llmsh against llama.cpp (through llama-cpp-python) on the same GGUF files, same thread count, in one run.

A random-weight Llama (default ~1.1 B parameters, TinyLlama's shape; --shape 1.2b-tied: Llama 3.2 1B's, whose 128k
embedding table is also the head; --quick: ~110 M) is written once per type as GGUF (BF16, Q8_0, Q4_0, Q4_K_M: Q4_K
with Q6_K attn_v/ffn_down/output, as llama.cpp's Q4_K_M; F32 with --f32) with the gguf package. For each type and
thread count both engines are timed alternately (best of --repeats):
  decode: batch-1 steps after a 16-token prompt, greedy argmax outside the timing (llama.cpp: `eval([token])`,
          llmsh: `Model.decode_step`), tokens/s; and the fraction of the memory-bandwidth limit this reaches
          (weight bytes read per token / read bandwidth: the same threads summing a buffer of the file's size,
          capped at 1 GiB; a decode step only reads weights, so this is its physical limit, not a copy's read + write);
  prompt: 512 prompt tokens through the model (llama.cpp `eval` with n_batch=512, llmsh `Model.prefill`), tokens/s;
  load:   from a warm page cache to the first token's logits (llama.cpp `Llama(...)` + one eval, llmsh `load` + one
          prefill), seconds; warm as a model file on disk is once read: each written file is flushed, dropped from
          the page cache and read back, since the gguf writer's one write per tensor leaves it cached in small
          folios that every mapping of it then faults in 4 KiB at a time (as a file read from disk is not: its
          read-ahead fills 2 MiB folios; both engines map the same file). The first forward's part of it is printed
          too: its page faults on the fresh mappings are part of the load. And the file bytes / load time against the
          memcpy bandwidth of a buffer that size with the same threads (a load at one thread is held to what one
          thread copies; both are printed). The first llmsh load of each file, which writes its layout cache once
          (q|k|v and gate|up fused, float matrices reshaped) and may compile the C kernels for this CPU (~5 s, once
          per machine and source version), is printed apart and not in the ratio: the timed loads are the ones a user
          makes every day.
Ratios are llmsh / llama.cpp (load: llama.cpp time / llmsh time, so > 1 means llmsh is faster everywhere).

llama-cpp-python is not a dependency: install it with
  CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python
(it compiles llama.cpp from source for this CPU). Without it the script prints one line and exits 0.
On CPUs with AMX (Sapphire Rapids and later) llama.cpp 0.3.36 built that way segfaults in its AMX matrix product on
the first eval of a Q8_0 file (ggml-org/llama.cpp#20824; seen here on an AMX Xeon). Each file is first tried in a
child process; a file llama.cpp crashes on is reported in one line and skipped. Build without its AMX path (it
then runs its AVX512-VNNI kernels, which keep its runtime repacking):
  CMAKE_ARGS="-DGGML_NATIVE=ON -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8" \
      pip install --force-reinstall --no-deps --no-cache-dir llama-cpp-python
Last line: key=value ratios per type (decode_<type>_t<threads>, prompt_…, load_…).
Usage: python scripts/bench/peer.py [--quick | --shape 1.1b|1.2b-tied] [--threads 1,2] [--types bf16,q8_0,q4_0,q4_k_m]
       [--f32]
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from llmsh.runtime import gguf_file, layout_cache  # noqa: E402

SHAPES = {  # (vocab, dim, layers, heads, kv heads, ffn, tied embeddings)
    "1.1b": (32000, 2048, 22, 32, 4, 5632, False),             # TinyLlama
    "1.2b-tied": (128256, 2048, 16, 32, 8, 8192, True),         # Llama 3.2 1B: a 128k table that is also the head
    "110m": (32000, 768, 12, 12, 4, 2048, False),
}
PROMPT, NEW, PP = 16, 128, 512


def write_gguf(path: Path, shape: tuple, kind: str, seed: int = 0) -> Path:
    """A random-weight llama GGUF of `kind` (f32, bf16, q8_0, q4_0, q4_k_m) with an SPM vocabulary llama.cpp takes."""
    import gguf
    from gguf import GGMLQuantizationType as T

    from llmsh.runtime import quant

    vocab, dim, n_layer, n_head, n_kv, ffn, tied = shape
    hd = dim // n_head
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("peer-bench")
    for fn, v in ((w.add_context_length, 2048), (w.add_embedding_length, dim), (w.add_block_count, n_layer),
                  (w.add_feed_forward_length, ffn), (w.add_head_count, n_head), (w.add_head_count_kv, n_kv),
                  (w.add_rope_dimension_count, hd)):
        fn(v)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"▁t{i}" for i in range(vocab - len(tokens))]
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 3 + [0.0] * 256 + [-float(i) for i in range(vocab - 259)])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (vocab - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    rng = np.random.default_rng(seed)
    base = {"f32": T.F32, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_k_m": T.Q4_K}[kind]

    def add(name: str, shape2: tuple, qtype: T) -> None:
        a = (rng.standard_normal(shape2, dtype=np.float32) * 0.02)
        if qtype == T.F32 or a.ndim == 1:
            w.add_tensor(name, a.astype(np.float32) if a.ndim > 1 else np.ones(shape2, np.float32))
        elif qtype == T.BF16:
            w.add_tensor(name, gguf.quants.quantize(a, T.BF16), raw_dtype=T.BF16)
        else:
            w.add_tensor(name, quant.quantize(a, qtype), raw_dtype=qtype)

    big = T.Q6_K if kind == "q4_k_m" else base
    add("token_embd.weight", (vocab, dim), big if tied else base if kind != "q4_k_m" else T.Q4_K)   # (a tied one:
                                                                   # llama.cpp gives it the output's type)
    for i in range(n_layer):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", (dim,), T.F32)
        add(p + "attn_q.weight", (dim, dim), base)
        add(p + "attn_k.weight", (n_kv * hd, dim), base)
        add(p + "attn_v.weight", (n_kv * hd, dim), big)
        add(p + "attn_output.weight", (dim, dim), base)
        add(p + "ffn_norm.weight", (dim,), T.F32)
        add(p + "ffn_gate.weight", (ffn, dim), base)
        add(p + "ffn_up.weight", (ffn, dim), base)
        add(p + "ffn_down.weight", (dim, ffn), big)
    add("output_norm.weight", (dim,), T.F32)
    if not tied:
        add("output.weight", (vocab, dim), big)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def copy_bandwidth(nbytes: int, threads: int, repeats: int = 3) -> float:
    """Bytes/s `threads` threads copy a buffer of nbytes (read + write, as STREAM's Copy), best of repeats."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    torch.set_num_threads(before)
    return 2 * nbytes / best


def read_bandwidth(nbytes: int, threads: int, repeats: int = 3) -> float:
    """Bytes/s `threads` threads read summing a float32 buffer of nbytes (best of repeats): a weight stream's limit."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    buf = torch.ones(nbytes // 4)
    buf.sum()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    torch.set_num_threads(before)
    return 4 * (nbytes // 4) / best


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def as_read_from_disk(path: Path) -> None:
    """Leave path in the page cache as a file read from disk is (see the module docstring): written back, dropped,
    read again."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    warm(path)


class LlamaCpp:
    """llama.cpp through llama-cpp-python: load, decode, prompt processing on token ids."""

    def __init__(self, path: Path, threads: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(str(path), n_ctx=1024, n_batch=PP, n_ubatch=PP, n_threads=threads,
                                   n_threads_batch=threads, verbose=False, use_mmap=True, logits_all=False)

    def first_token(self) -> None:
        self.llm.reset()
        self.llm.eval([1])

    def decode(self, prompt: list[int], n: int) -> float:
        llm = self.llm
        llm.reset()
        llm.eval(prompt)
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t0 = time.perf_counter()
        for _ in range(n):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return n / (time.perf_counter() - t0)

    def prompt(self, ids: list[int]) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        return len(ids) / (time.perf_counter() - t0)


class Llmsh:
    """llmsh's runtime on the same file."""

    def __init__(self, path: Path, threads: int) -> None:
        from llmsh.runtime import load

        self.model = load(str(path))
        self.cache = self.model.new_cache(1, 1024)

    def first_token(self) -> None:
        self.cache.lengths[0] = 0
        self.model.prefill(self.cache, [0], [[1]])

    def decode(self, prompt: list[int], n: int) -> float:
        m, c = self.model, self.cache
        c.lengths[0] = 0
        tok = int(m.prefill(c, [0], [prompt])[0].argmax())
        t0 = time.perf_counter()
        for _ in range(n):
            tok = int(m.decode_step(c, [0], [tok])[0].argmax())
        return n / (time.perf_counter() - t0)

    def prompt(self, ids: list[int]) -> float:
        self.cache.lengths[0] = 0
        t0 = time.perf_counter()
        self.model.prefill(self.cache, [0], [ids])
        return len(ids) / (time.perf_counter() - t0)


def llama_cpp_crash(path: Path, threads: int) -> str | None:
    """Load the file and eval a few tokens in llama.cpp in a child process: None if that works, else how it died
    (a crash there would otherwise take this whole run with it)."""
    code = (f"import llama_cpp; m = llama_cpp.Llama({str(path)!r}, n_ctx=64, n_threads={threads}, "
            f"n_threads_batch={threads}, verbose=False); m.eval([1, 2, 3]); m.eval([4])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode == 0:
        return None
    if done.returncode < 0:
        return f"killed by {signal.Signals(-done.returncode).name}"
    return (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]


def timed_load(cls: type, path: Path, threads: int) -> tuple[float, float, Any]:
    """Seconds to first token, the part of them the first token's forward took, and the engine."""
    gc.collect()
    t0 = time.perf_counter()
    eng = cls(path, threads)
    t1 = time.perf_counter()
    eng.first_token()
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1, eng


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="~110M model, 32 new tokens, 128-token prompt, 1 thread")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1.1b",
                    help="the model's shape (default 1.1b, TinyLlama's; 1.2b-tied: Llama 3.2 1B's, a tied 128k table)")
    ap.add_argument("--threads", default=None, help="comma list (default 1,2; --quick 1)")
    ap.add_argument("--types", default="bf16,q8_0,q4_0,q4_k_m")
    ap.add_argument("--f32", action="store_true", help="also F32 (4.4 GB at 1.1B)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the GGUF files are written (default: a temporary folder)")
    args = ap.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("peer: skipped: llama-cpp-python is not installed (CMAKE_ARGS=-DGGML_NATIVE=ON pip install "
              "llama-cpp-python builds it from source)")
        return 0
    shape = SHAPES["110m" if args.quick else args.shape]
    threads = [int(t) for t in (args.threads or ("1" if args.quick else "1,2")).split(",")]
    new, pp = (32, 128) if args.quick else (NEW, PP)
    kinds = (["f32"] if args.f32 else []) + args.types.split(",")
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"llama-cpp-python {llama_cpp.__version__}; model {shape}; shared machine: numbers are noisy")
    keys: list[str] = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        rng = np.random.default_rng(1)
        prompt = rng.integers(300, shape[0], PROMPT).tolist()
        pp_ids = rng.integers(300, shape[0], pp).tolist()
        for kind in kinds:
            path = write_gguf(Path(tmp) / f"peer-{kind}.gguf", shape, kind)
            size = path.stat().st_size
            crash = llama_cpp_crash(path, threads[0])
            if crash:
                print(f"{kind:7s} skipped: llama.cpp fails on this file ({crash}); on an AMX CPU, rebuild it without "
                      "its AMX path (see this script's docstring)", flush=True)
                path.unlink()
                continue
            as_read_from_disk(path)
            first_s, _, eng = timed_load(Llmsh, path, threads[0])   # once per file: llmsh's layout cache is built
            del eng
            gc.collect()
            print(f"{kind:7s} llmsh's first load of the file (once: writes its layout cache, and compiles the C "
                  f"kernels if this machine has not yet): {first_s:.2f} s", flush=True)
            for t in threads:
                torch.set_num_threads(t)
                warm(path)
                res: dict[str, dict[str, float]] = {"llama.cpp": {}, "llmsh": {}}
                copy_bw: dict[int, float] = {}       # measured beside each round of loads: this machine drifts
                for _ in range(args.repeats):
                    for ct in {t, os.cpu_count() or 1}:
                        copy_bw[ct] = max(copy_bw.get(ct, 0.0), copy_bandwidth(min(size, 1 << 30), ct))
                    for name, cls in (("llama.cpp", LlamaCpp), ("llmsh", Llmsh)):
                        load_s, forward_s, eng = timed_load(cls, path, t)
                        r = res[name]
                        if load_s < r.get("load", math.inf):
                            r["load"], r["forward"] = load_s, forward_s
                        r["decode"] = max(r.get("decode", 0.0), eng.decode(prompt, new))
                        r["prompt"] = max(r.get("prompt", 0.0), eng.prompt(pp_ids))
                        if name == "llmsh":
                            r["read"] = eng.model.bytes_read_per_token()
                        del eng
                        gc.collect()
                a, b = res["llmsh"], res["llama.cpp"]
                of_memcpy = {ct: size / a["load"] / (bw / 2) for ct, bw in copy_bw.items()}   # bytes loaded/copied per s
                limit = read_bandwidth(min(size, 1 << 30), t) / a["read"]     # tok/s if every weight byte streams once
                print(f"{kind:7s} t={t}: decode llmsh {a['decode']:6.2f} tok/s, llama.cpp {b['decode']:6.2f} "
                      f"({a['decode'] / b['decode']:.2f}x; of the read-bandwidth limit {limit:.1f} tok/s: llmsh "
                      f"{a['decode'] / limit:.2f}, llama.cpp {b['decode'] / limit:.2f}) | prompt {pp}: "
                      f"{a['prompt']:6.1f} vs {b['prompt']:6.1f} tok/s ({a['prompt'] / b['prompt']:.2f}x) | load "
                      f"{a['load']:.3f} s vs {b['load']:.3f} s (first forward {a['forward']:.3f} vs "
                      f"{b['forward']:.3f}; llmsh {of_memcpy[t]:.2f} of a memcpy at t={t}; "
                      f"{of_memcpy[max(copy_bw)]:.2f} of one at t={max(copy_bw)})", flush=True)
                keys += [f"decode_{kind}_t{t}={a['decode'] / b['decode']:.2f}",
                         f"prompt_{kind}_t{t}={a['prompt'] / b['prompt']:.2f}",
                         f"load_{kind}_t{t}={b['load'] / a['load']:.2f}",
                         f"load_memcpy_{kind}_t{t}={of_memcpy[t]:.2f}"]
            layout_cache.forget(path)                          # (llmsh's reshaped copy of a float file)
            gguf_file.forget(path)                             # (and its index of the file)
            path.unlink()
    print(" ".join(keys))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
