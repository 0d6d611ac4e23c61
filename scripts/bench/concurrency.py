"""Concurrency through the kernel: 16 clients × 64 tokens vs transformers' static batch and sequential generates.

All in one run, on one machine, with the same GPT-2-124M-shaped random checkpoint (built once, cached in the temp dir):
  kernel      16 clients each `run bench --max-tokens 64 --temperature 0 --ignore-eos PROMPT_i` at once (llmsh's own
              asyncio client, or jupyter_client's with --client jupyter); the scheduler batches them continuously
  static      transformers `generate` on the 16 prompts as one left-padded batch (greedy, exactly 64 new tokens)
  sequential  16 transformers `generate` calls, one prompt each
  stream      one request streamed through the kernel vs the same request with the in-process runtime (`Model.stream`):
              the cost of the kernel, ZeroMQ and the client
The kernel and its references are measured interleaved in rounds (medians), all models resident at once, so that a
shared machine's background load hits them alike; the long sequential reference runs once.
--quick: 16 tokens per request, one round, and the sequential time measured on 4 prompts and scaled to all.
Last line: ratio_static=<static s / kernel s> ratio_seq=<sequential s / kernel s> stream_overhead=<kernel/in-process - 1>
(ratios > 1 mean the kernel is faster). Usage: python scripts/bench/concurrency.py [--quick] [--clients 16] [--tokens 64]
[--repeat N]. Progress lines are timestamped; the summary and the key=value line come last.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

from benchkit import client, gpt2_checkpoint, isolate, start_kernel

REPO = Path(__file__).resolve().parents[2]
GPT2_124M = dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257)


def _execute(kc, code: str, timeout: float = 600) -> tuple[str, dict]:
    """Run a line; returns (stdout text, reply content); raises on an error reply."""
    out: list[str] = []

    def hook(msg: dict) -> None:
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
            out.append(msg["content"]["text"])
        elif msg["msg_type"] == "execute_result":
            out.append(msg["content"]["data"].get("text/plain", ""))

    reply = kc.execute_interactive(code, timeout=timeout, output_hook=hook, allow_stdin=False)["content"]
    if reply["status"] != "ok":
        raise SystemExit(f"{code!r} failed: {reply.get('evalue')}")
    return "".join(out), reply


def _kernel_concurrent(clients: list, prompts: list[str], tokens: int) -> float:
    """Wall seconds for every client to finish its own `run` (all sent at once)."""
    barrier = threading.Barrier(len(clients) + 1)
    errors: list[str] = []

    def one(kc, prompt: str) -> None:
        barrier.wait()
        try:
            _execute(kc, f"run bench --max-tokens {tokens} --temperature 0 --ignore-eos {prompt!r}")
        except SystemExit as e:
            errors.append(str(e))

    threads = [threading.Thread(target=one, args=(kc, p)) for kc, p in zip(clients, prompts)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(errors[0])
    return time.perf_counter() - t0


def _proc_row(kc) -> dict:
    """The bench process's `ps --json` row."""
    import json

    stats, _ = _execute(kc, "ps --json")
    return [r for r in json.loads(stats) if r["name"] == "bench"][0]


class LlmshClients:
    """N of llmsh's own asyncio clients (what `llmsh` uses) on one event loop in a background thread."""

    def __init__(self, cf: Path, n: int) -> None:
        import asyncio

        from llmsh.client.kernel_client import KernelClient
        from llmsh.protocol.connection import read_connection_file

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-clients", daemon=True)
        self.thread.start()
        info = read_connection_file(cf)

        async def start() -> list:
            clients = [KernelClient(info, on_output=lambda msg: None) for _ in range(n)]
            await asyncio.gather(*(c.start() for c in clients))
            return clients

        self.clients = self._call(start())

    def _call(self, coro):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def run_all(self, lines: list[str]) -> float:
        """Send every line at once (one per client); wall seconds until the last reply."""
        import asyncio

        async def go() -> float:
            t0 = time.perf_counter()
            replies = await asyncio.gather(*(c.execute(line) for c, line in zip(self.clients, lines)))
            bad = [r for r in replies if r.get("status") != "ok"]
            if bad:
                raise SystemExit(f"a client's run failed: {bad[0].get('evalue')}")
            return time.perf_counter() - t0

        return self._call(go())

    def close(self) -> None:
        import asyncio

        async def close_all() -> None:
            await asyncio.gather(*(c.close() for c in self.clients))

        self._call(close_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


def _hf_inputs(tok, prompts: list[str], pad_id: int):
    import torch

    ids = [tok.encode(p) for p in prompts]
    width = max(len(i) for i in ids)
    input_ids = torch.tensor([[pad_id] * (width - len(i)) + i for i in ids])  # left padding
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    return input_ids, mask


def _hf_generate(model, input_ids, mask, tokens: int) -> None:
    import torch

    with torch.inference_mode():
        model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                       do_sample=False, pad_token_id=model.config.eos_token_id)


def _in_thread(fn, *args):
    """Run fn in a fresh thread, as the kernel runs its steps on an engine thread (torch's speed in the main thread
    differs from other threads' on an oversubscribed machine, so the references get the same footing)."""
    box: list = []
    t = threading.Thread(target=lambda: box.append(fn(*args)), name="bench-reference")
    t.start()
    t.join()
    if not box:
        raise SystemExit("reference run failed (see the traceback above)")
    return box[0]


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def _drain(it) -> None:
    for _ in it:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens and one repetition (under a minute)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--client", choices=("llmsh", "jupyter"), default="llmsh",
                    help="the concurrent clients: llmsh's asyncio client (default) or jupyter_client's blocking one")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per request (default 64, quick 16)")
    ap.add_argument("--repeat", type=int, default=None, help="interleaved rounds (default 3, quick 1)")
    opts = ap.parse_args()
    tokens = opts.tokens or (16 if opts.quick else 64)
    repeat = max(1, opts.repeat or (1 if opts.quick else 3))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `timeout` still stops the kernel in `finally`
    t_start = time.perf_counter()

    def note(text: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {text}", flush=True)

    home = isolate()
    folder = gpt2_checkpoint(GPT2_124M, "124m")

    import torch
    import transformers

    from llmsh.engine.loader import configure_torch_threads
    from llmsh.runtime import load

    threads = configure_torch_threads()  # the same intra-op thread count the kernel uses
    prompts = [f"Request {i}: once upon a time there was a little model that could" for i in range(opts.clients)]

    # everything resident at once, so the measurements can be interleaved: on a shared machine the background load
    # then hits the kernel and its references alike (pairs are compared within a round, medians over rounds)
    model = load(str(folder))
    tok = model.tokenizer
    transformers.utils.logging.set_verbosity_error()
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    input_ids, mask = _hf_inputs(tok, prompts, hf.config.eos_token_id)
    seq_n = min(4, opts.clients) if opts.quick else opts.clients  # --quick times 4 of them and scales to all
    singles = [_hf_inputs(tok, [p], hf.config.eos_token_id) for p in prompts[:seq_n]]

    def sequential() -> None:
        for ids, m in singles:
            _hf_generate(hf, ids, m, tokens)

    stream_line = f"run bench --max-tokens {tokens} --temperature 0 --ignore-eos {prompts[0]!r}"
    kernel_runs, static, stream_kernel, stream_local, seq = [], [], [], [], []
    proc, cf = start_kernel(home)
    clients = []
    lines = [f"run bench --max-tokens {tokens} --temperature 0 --ignore-eos {p!r}" for p in prompts]
    try:
        main_kc = client(cf)
        _execute(main_kc, f"load {folder} --name bench --max-batch {opts.clients} --ctx 256")
        if opts.client == "jupyter":
            clients = [client(cf) for _ in range(opts.clients)]
            concurrent = lambda: _kernel_concurrent(clients, prompts, tokens)  # noqa: E731
        else:
            pool = LlmshClients(cf, opts.clients)
            concurrent = lambda: pool.run_all(lines)  # noqa: E731
        _execute(main_kc, "run bench --max-tokens 4 --temperature 0 warm up")  # first-step allocations
        _in_thread(_drain, model.stream(prompts[0], max_tokens=4, temperature=0))  # page the mmap'd weights in
        _in_thread(_hf_generate, hf, input_ids[:1], mask[:1], 2)
        note(f"ready; {repeat} round(s)")
        steps_s = []
        for r in range(repeat):
            t_before = _proc_row(main_kc)["time_s"]
            kernel_runs.append(concurrent())
            steps_s.append(_proc_row(main_kc)["time_s"] - t_before)
            static.append(_in_thread(_timed, _hf_generate, hf, input_ids, mask, tokens))
            note(f"round {r + 1}: kernel {opts.clients} clients {kernel_runs[-1]:.2f} s ({steps_s[-1]:.2f} s in model steps), "
                 f"transformers static batch {static[-1]:.2f} s")
            for _ in range(2):
                t0 = time.perf_counter()
                _execute(main_kc, stream_line)
                stream_kernel.append(time.perf_counter() - t0)
                stream_local.append(
                    _in_thread(_timed, _drain, model.stream(prompts[0], max_tokens=tokens, temperature=0, ignore_eos=True)))
            note(f"round {r + 1}: one streamed request: kernel {stream_kernel[-1]:.2f} s, "
                 f"in-process runtime {stream_local[-1]:.2f} s")
        row = _proc_row(main_kc)
        seq.append(_in_thread(_timed, sequential) * opts.clients / seq_n)  # long: once, the kernel idle meanwhile
        note(f"transformers sequential: {seq[-1]:.2f} s")
        _execute(main_kc, "kill -KILL bench")
    finally:
        for kc in clients:
            kc.stop_channels()
        if opts.client == "llmsh" and "pool" in locals():
            pool.close()
        proc.terminate()
        proc.wait(timeout=30)

    kernel_s = statistics.median(kernel_runs)
    total = opts.clients * tokens
    static_s, seq_s = statistics.median(static), min(seq)
    sk, sl = statistics.median(stream_kernel), statistics.median(stream_local)
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus (affinity {len(os.sched_getaffinity(0))}), "
          f"load {os.getloadavg()[0]:.2f}, torch {torch.__version__} {threads} threads, transformers {transformers.__version__}")
    print(f"model: GPT-2-124M-shaped random weights ({folder}); {opts.clients} {opts.client} clients x {tokens} tokens, "
          f"median of {repeat} interleaved round(s)")
    print(f"kernel (continuous batching): {kernel_s:.2f} s  {total / kernel_s:.0f} tok/s  "
          f"(max batch {row['max_batch']}; {statistics.median(steps_s):.2f} s of it in model steps)")
    print(f"transformers static batch-{opts.clients}: {static_s:.2f} s  {total / static_s:.0f} tok/s")
    scaled = f" (timed {seq_n}, scaled to {opts.clients})" if seq_n != opts.clients else ""
    print(f"transformers {opts.clients} sequential: {seq_s:.2f} s  {total / seq_s:.0f} tok/s{scaled}")
    print(f"one streamed request: kernel {sk * 1e3:.0f} ms, in-process runtime {sl * 1e3:.0f} ms (median of {len(stream_kernel)}, interleaved)")
    print(f"ratio_static={static_s / kernel_s:.3f} ratio_seq={seq_s / kernel_s:.3f} stream_overhead={sk / sl - 1:.3f}")


if __name__ == "__main__":
    main()
