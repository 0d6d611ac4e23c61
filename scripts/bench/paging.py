"""Paging benchmark: two GPT-2-124M-shaped random models, a CPU budget the size of one, requests round-robin between
them — tokens/s against the same workload with both resident, in the same run.

Every switch of model pages the other one out (budget = one model), so each request starts by reading ~500 MB of
weights from the mmap'd safetensors while the first step computes (prefetch thread). The paged run's token ids are
checked against the resident run's. With CUDA (only if available): host→device page-in bandwidth from pinned host
copies against torch's pinned copy bandwidth. Last line: key=value pairs. `--quick` runs a reduced workload (< 1 min).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

PROMPT_LEN = 16


def make_checkpoint(folder: Path, seed: int) -> Path:
    """A random GPT-2 124M checkpoint in Hugging Face layout (safetensors written directly: no transformers needed)."""
    from safetensors.torch import save_file

    from llmsh.runtime import gpt2

    folder.mkdir(parents=True, exist_ok=True)
    hf = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
          "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "torch_dtype": "float32"}
    cfg = gpt2.GPT2Config.from_hf(hf)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in gpt2.Transformer(cfg).state_dict().items() if k != "lm_head.weight"}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        shape = tuple(reversed(shape)) if gpt2.transposed(name, cfg) else tuple(shape)
        t = torch.randn(shape, generator=g) * 0.02 if len(shape) > 1 else torch.ones(shape)
        tensors["transformer." + name] = t.contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf))
    return folder


def workload(models: list, requests: int, n_new: int) -> tuple[float, list[list[int]]]:
    """Round-robin requests (batch 1, greedy, n_new tokens each); returns (seconds, token ids per request)."""
    from llmsh.runtime.generation import BatchGenerator, Sequence
    from llmsh.runtime.sampling import SamplingParams

    params = SamplingParams(max_tokens=n_new, temperature=0, ignore_eos=True)
    gens = [BatchGenerator(m, max_batch=1, max_seq_len=PROMPT_LEN + n_new + 1) for m in models]
    out = []
    t0 = time.perf_counter()
    for r in range(requests):
        i = r % len(models)
        seq = Sequence(models[i], [(r * 7 + j) % 50000 + 1 for j in range(PROMPT_LEN)], params)
        gens[i].add(seq)
        while gens[i].has_work:
            gens[i].step()
        out.append(list(seq.token_ids))
    return time.perf_counter() - t0, out


def cuda_bandwidth(folder: Path) -> dict[str, float]:
    """Pinned host→device page-ins of the pager against torch's own pinned copy of the same bytes."""
    from llmsh.engine.paging.core import Pager
    from llmsh.engine.paging.sources import ModelSource
    from llmsh.runtime import load

    model = load(folder, device="cuda")
    size = model.weight_bytes()
    pager = Pager({"cuda:0": size, "cpu": 2 * size}, prefetch=False)
    pager.attach(1, ModelSource(model))
    pager.page_out(1)  # device copies dropped
    proc = pager.proc(1)
    for e in proc.entries:  # host copies (pinned) first, so the timed part is host → device only
        if e.host is None:
            e.host = proc.source.read(e.index, "cpu", pin=True)
            pager.used["cpu"] = pager.used.get("cpu", 0) + e.nbytes
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    pager.page_in_all(1)
    torch.cuda.synchronize()
    pager_bw = size / (time.perf_counter() - t0)
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(size, dtype=torch.uint8, device="cuda")
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    pager.close()
    return {"pagein_gbs": pager_bw / 1e9, "torch_gbs": size / best / 1e9, "bw_ratio": pager_bw * best / size}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="reduced workload, under a minute")
    ap.add_argument("--requests", type=int, help="round-robin requests (default 6, quick 2)")
    ap.add_argument("--tokens", type=int, help="tokens per request (default 32, quick 16)")
    ap.add_argument("--reps", type=int, default=None, help="alternating repetitions (default 2, quick 1)")
    ap.add_argument("--no-prefetch", action="store_true", help="disable the prefetch thread")
    ap.add_argument("--dir", help="where to write the checkpoints (default: a temporary dir)")
    args = ap.parse_args()
    args.requests = args.requests or (2 if args.quick else 6)
    args.tokens = args.tokens or (16 if args.quick else 32)
    args.reps = args.reps or (1 if args.quick else 2)

    from llmsh.engine.loader import configure_torch_threads

    configure_torch_threads()
    if args.dir:
        return run(args, Path(args.dir))
    with tempfile.TemporaryDirectory(prefix="llmsh-bench-paging-") as tmp:   # ~1 GB of checkpoints: removed after
        try:
            return run(args, Path(tmp))
        finally:
            from llmsh.runtime import layout_cache

            layout_cache.forget_under(Path(tmp))      # their transposed embeddings, cached by the loads


def run(args: argparse.Namespace, root: Path) -> int:
    """The benchmark with its checkpoints in root (made there unless they exist)."""
    from llmsh.engine.paging.core import Pager
    from llmsh.engine.paging.sources import ModelSource
    from llmsh.runtime import load

    requests, n_new = args.requests, args.tokens
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    folders = [p if (p / "model.safetensors").exists() else make_checkpoint(p, seed)
               for seed, p in enumerate([root / "gpt2-a", root / "gpt2-b"])]
    print(f"checkpoints in {root} ({time.perf_counter() - t0:.1f}s); machine: {platform.machine()}, "
          f"{os.cpu_count()} cpus ({threads} torch threads), torch {torch.__version__}; shared machine, numbers are noisy",
          flush=True)

    resident = [load(f) for f in folders]
    paged = [load(f) for f in folders]
    size = max(m.weight_bytes() for m in paged)
    pager = Pager({"cpu": size}, prefetch=not args.no_prefetch)
    for pid, m in enumerate(paged, 1):
        pager.attach(pid, ModelSource(m), name=f"gpt2-{pid}")
    workload(resident, 2, 2)  # warm-up: touch every page of both files, allocate caches
    workload(paged, 2, 2)
    # alternate the two configurations so that load from other processes on the machine hits both alike; best of reps
    t_res, t_pag, moved, moved_in, hits, misses, stall, recycled, page_ins = [], [], 0, 0, 0, 0, 0.0, 0, 0
    same = True
    for rep in range(args.reps):
        t, ids_res = workload(resident, requests, n_new)
        t_res.append(t)
        before = pager.snapshot()["totals"]
        t, ids_pag = workload(paged, requests, n_new)
        t_pag.append(t)
        after = pager.snapshot()["totals"]
        moved += after["bytes_moved"] - before["bytes_moved"]
        moved_in += after["bytes_in"] - before["bytes_in"]
        hits += after["hits"] - before["hits"]
        misses += after["misses"] - before["misses"]
        stall += after["stall_s"] - before["stall_s"]
        recycled += after["recycled"] - before["recycled"]
        page_ins += after["page_ins"] - before["page_ins"]
        same = same and ids_pag == ids_res
        print(f"rep {rep + 1}: resident {requests * n_new / t_res[-1]:.1f} tok/s, paged {requests * n_new / t_pag[-1]:.1f} tok/s",
              flush=True)
    tps_res, tps_pag = requests * n_new / min(t_res), requests * n_new / min(t_pag)
    hit = hits / max(1, hits + misses)
    print(f"resident: {requests} requests x {n_new} tokens, best {tps_res:.1f} tok/s", flush=True)
    print(f"paged (budget {size / 2**20:.0f} MiB = one model, prefetch {'off' if args.no_prefetch else 'on'}): best "
          f"{tps_pag:.1f} tok/s; moved {moved / 2**30:.2f} GiB (in + out; {moved_in / args.reps / requests / size:.2f} models paged in per request), "
          f"hit rate {hit:.3f}, engine stalled {stall:.2f}s for pages, {recycled}/{page_ins} page-ins refilled evicted buffers",
          flush=True)
    pager.close()
    keys = {"ratio": f"{tps_pag / tps_res:.2f}", "tok_s_resident": f"{tps_res:.1f}", "tok_s_paged": f"{tps_pag:.1f}",
            "moved_gib": f"{moved / 2**30:.2f}", "hit_rate": f"{hit:.3f}", "identical": str(same).lower()}
    if torch.cuda.is_available():
        bw = cuda_bandwidth(folders[0])
        print(f"cuda: page-in {bw['pagein_gbs']:.1f} GB/s vs torch pinned copy {bw['torch_gbs']:.1f} GB/s", flush=True)
        keys.update({k: f"{v:.2f}" for k, v in bw.items()})
    print(" ".join(f"{k}={v}" for k, v in keys.items()))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
