"""`map` against its references: many prompts of mixed lengths through one model process.

All in one run, same random GPT-2-shaped checkpoint (cached in the temp dir), same prompts:
  map         `map bench --input prompts.jsonl --output out.jsonl` through a kernel (continuous batching, greedy)
  static      transformers `generate` over the same prompts in static batches of 16, sorted by length (its best case:
              little padding), each batch run until its longest request is done
  sequential  one `llmsh -c 'run bench …'` per prompt (what a hand-written loop does), timed on a sample, scaled
Prompts have 16–256 tokens in and 16–128 out (each JSON line carries its own max_tokens); transformers gets them
grouped by output length as well as sorted by input length, so that no batch runs past what its requests need.
Last line: ratio_static=<static s / map s> ratio_seq=<sequential s / map s>  (goals: ≥ 1.5 and ≥ 5), and
prefill_share (of map's time spent on the prompts alone) and ratio_seq_bound (sequential s / prefill-alone s: the
most any batching can gain where prefill is compute-bound).
--dtype bfloat16 runs all three (llmsh's load, transformers, the prefill floor) in bfloat16 on the same weights, as
a bfloat16 checkpoint would load (float32 by default, as GPT-2's own checkpoints are stored).
Usage: python scripts/bench/map.py [--quick] [--prompts 512] [--shape small|124m] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchkit import client, gpt2_checkpoint, isolate, start_kernel

REPO = Path(__file__).resolve().parents[2]
SHAPES = {"124m": dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257),
          "small": dict(n_embd=256, n_layer=4, n_head=4, n_positions=1024)}
OUT_BUCKETS = (16, 32, 64, 128)


def _prompts(tok, n: int, rng: random.Random) -> list[tuple[str, int]]:
    """n (prompt, new tokens) pairs: 16–256 tokens in (cut from a word soup), 16–128 out."""
    words = "the quick brown fox jumps over a lazy dog while schedulers batch tokens on busy devices".split()
    out = []
    for _ in range(n):
        want = rng.randint(16, 256)
        text = " ".join(rng.choice(words) for _ in range(want))
        ids = tok.encode(text)[:want]
        out.append((tok.decode(ids), rng.choice(OUT_BUCKETS)))
    return out


def _execute(kc, code: str) -> dict:
    reply = kc.execute_interactive(code, timeout=3600, allow_stdin=False, output_hook=lambda m: None)["content"]
    if reply["status"] != "ok":
        raise SystemExit(f"{code[:80]!r} failed: {reply.get('evalue')}")
    return reply


def _prefill_floor(folder: Path, work: list[tuple[str, int]], sample: int, dtype: str) -> float:
    """Seconds to prefill every prompt once, one at a time, in llmsh's runtime (scaled from an evenly spread sample).

    Both `map` and the sequential loop must do this work, so t_seq / this is the most any batching could gain over
    the loop: on a CPU, where prefill is bound by the FMA rate, it bounds ratio_seq from above."""
    from llmsh.runtime import load

    model = load(folder, dtype=dtype)
    picked = work[:: max(1, len(work) // sample)]
    cache = model.new_cache(1, 1024)
    slot = cache.alloc()
    model.prefill(cache, [slot], [model.tokenizer.encode("warm up")])
    t0 = time.perf_counter()
    for q, _ in picked:
        cache.free(slot)
        slot = cache.alloc()
        model.prefill(cache, [slot], [model.tokenizer.encode(q)])
    return (time.perf_counter() - t0) * len(work) / len(picked)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="64 prompts of a small model, sequential sample of 4")
    p.add_argument("--prompts", type=int, default=512)
    p.add_argument("--shape", choices=sorted(SHAPES), default="124m")
    p.add_argument("--seq-sample", type=int, default=16, help="prompts timed through `llmsh -c run` (then scaled)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = p.parse_args()
    if args.quick:
        args.prompts, args.shape, args.seq_sample = min(args.prompts, 64), "small", 4
    home = isolate()
    folder = gpt2_checkpoint(SHAPES[args.shape], f"map-{args.shape}")
    import torch
    import transformers

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    work = _prompts(tok, args.prompts, random.Random(0))
    buckets = {n: [w for w, k in work if k == n] for n in OUT_BUCKETS}

    proc, cf = start_kernel(home)
    kc = client(cf)
    try:
        _execute(kc, f"load {folder} --name bench --dtype {args.dtype}; run bench --max-tokens 2 --temperature 0 hi")
        src = home / "in.jsonl"
        src.write_text("".join(json.dumps({"id": i, "prompt": q, "max_tokens": n}) + "\n" for i, (q, n) in enumerate(work)))
        t0 = time.perf_counter()
        _execute(kc, f"map bench --input {src} --output {home / 'out.jsonl'} --temperature 0 --ignore-eos")
        t_map = time.perf_counter() - t0
        print(f"map: {args.prompts} prompts in {t_map:.2f} s", file=sys.stderr)
        env = dict(os.environ)
        sample = work[: args.seq_sample]
        t0 = time.perf_counter()
        for q, n in sample:
            r = subprocess.run([sys.executable, "-m", "llmsh", "--kernel", str(cf), "-c",
                                f"run bench --max-tokens {n} --temperature 0 --ignore-eos {json.dumps(q)}"],
                               capture_output=True, text=True, env=env)
            if r.returncode != 0:
                raise SystemExit(f"llmsh -c run failed: {r.stderr[-300:]}")
        t_seq = (time.perf_counter() - t0) * len(work) / len(sample)
        print(f"sequential llmsh -c run: {t_seq:.2f} s (timed {len(sample)}, scaled)", file=sys.stderr)
    finally:
        kc.stop_channels()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()

    transformers.utils.logging.set_verbosity_error()
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype)).eval()
    pad = hf.config.eos_token_id

    def static() -> float:
        t0 = time.perf_counter()
        for n, prompts in buckets.items():
            ordered = sorted(prompts, key=lambda q: len(tok.encode(q)))
            for i in range(0, len(ordered), 16):
                batch = [tok.encode(q) for q in ordered[i:i + 16]]
                width = max(len(b) for b in batch)
                ids = torch.tensor([[pad] * (width - len(b)) + b for b in batch])
                mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch])
                with torch.inference_mode():
                    hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, pad_token_id=pad)
        return time.perf_counter() - t0

    box: list[float] = []
    t = threading.Thread(target=lambda: box.append(static()))  # the kernel steps on a thread too: same footing
    t.start()
    t.join()
    t_static = box[0]
    print(f"transformers static batches of 16 (sorted by length): {t_static:.2f} s", file=sys.stderr)
    t_floor = _prefill_floor(folder, work, args.seq_sample * 4, args.dtype)
    print(f"prefill alone (every prompt through the model once, no decoding): {t_floor:.2f} s (scaled from a sample)",
          file=sys.stderr)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus; model {args.shape}; "
          f"{args.prompts} prompts; {args.dtype}")
    print(f"ratio_static={t_static / t_map:.2f} ratio_seq={t_seq / t_map:.2f} map_s={t_map:.2f} "
          f"prefill_share={t_floor / t_map:.2f} ratio_seq_bound={t_seq / t_floor:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
