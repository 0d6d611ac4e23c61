"""The HTTP API against llmsh's own ZeroMQ client, on one kernel, the same model and the same requests.

  concurrent  N clients at once, each one greedy request of T tokens (ignore EOS): N `openai.AsyncOpenAI` streaming
              chat-less completions over HTTP vs N llmsh `KernelClient`s sending `run` over ZeroMQ; tokens/s of the whole
  single      one streamed request at a time: time to first token (TTFT) and per-token latency after it
              ((t_last - t_first) / (T - 1)), HTTP vs ZeroMQ
Both sides run interleaved in rounds (medians), from one asyncio loop in this process, against a GPT-2-124M-shaped
random checkpoint (vocabulary of its small tokenizer; built once, cached in the temp dir).
Not compared: the Ollama server and vLLM. Neither binary is installed here and the machine has no network to fetch
them (Ollama is a Go binary from ollama.com; vLLM needs CUDA wheels and a GPU), so they cannot serve the same weights.
Last line: ratio_tps=<HTTP tok/s / ZeroMQ tok/s> ratio_ttft=<HTTP TTFT / ZeroMQ TTFT> ratio_itl=<HTTP per-token /
ZeroMQ per-token> (goals: ratio_tps >= 0.9, the others <= 1.1).
Usage: python scripts/bench/http_api.py [--quick] [--clients 16] [--tokens 64] [--repeat N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchkit import gpt2_checkpoint, isolate

REPO = Path(__file__).resolve().parents[2]
# GPT-2-124M's body with the vocabulary of the small trained tokenizer: every generated id decodes to text, so each
# token is a streamed piece (with 50257 rows most ids are past the tokenizer and decode to nothing)
GPT2_124M_BODY = dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=384)
GPT2_SMALL = dict(n_embd=64, n_layer=2, n_head=4, n_positions=512, vocab_size=384)  # --small: the transport dominates


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_kernel(home: Path, port: int) -> tuple[subprocess.Popen, Path]:
    cf = home / "XDG_RUNTIME_DIR" / "kernel-bench.json"
    cmd = [sys.executable, "-m", "llmsh", "kernel", "start", "--foreground", "--connection-file", str(cf),
           "--telemetry-hz", "0", "--http", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not cf.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("llmsh kernel did not start")
        time.sleep(0.02)
    return proc, cf


class Zmq:
    """llmsh's own asyncio clients, each recording when its stdout pieces arrive."""

    def __init__(self, info: dict[str, Any], n: int) -> None:
        from llmsh.client.kernel_client import KernelClient

        self.times: list[list[float]] = [[] for _ in range(n)]
        self.clients = [KernelClient(info, on_output=self._hook(i)) for i in range(n)]

    def _hook(self, i: int) -> Any:
        def on_output(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "stream" and msg["content"].get("name") == "stdout":
                self.times[i].append(time.perf_counter())
        return on_output

    async def start(self) -> None:
        await asyncio.gather(*(c.start() for c in self.clients))

    async def one(self, i: int, line: str) -> list[float]:
        self.times[i] = []
        reply = await self.clients[i].execute(line)
        if reply.get("status") != "ok":
            raise SystemExit(f"{line!r} failed: {reply.get('evalue')}")
        return self.times[i]

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients))


async def http_one(oa: Any, prompt: str, tokens: int) -> list[float]:
    """One streamed completion; the arrival time of each chunk with text, and of the finish chunk (ZeroMQ's side
    likewise ends with the newline `run` writes after the last token)."""
    times = []
    stream = await oa.completions.create(model="bench", prompt=prompt, max_tokens=tokens, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and (chunk.choices[0].text or chunk.choices[0].finish_reason):
            times.append(time.perf_counter())
    return times


def latency(t0: float, times: list[float], tokens: int) -> tuple[float, float]:
    """(time to first token, per-token latency after it)."""
    return times[0] - t0, (times[-1] - times[0]) / max(1, tokens - 1)


async def bench(opts: argparse.Namespace, cf: Path, port: int, folder: Path, note: Any) -> dict[str, Any]:
    import openai

    from llmsh.protocol.connection import read_connection_file

    tokens, n = opts.tokens, opts.clients
    zmq = Zmq(read_connection_file(cf), n)
    await zmq.start()
    oa = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600,
                            http_client=None)
    prompts = [f"Request {i}: once upon a time there was a little model that could" for i in range(n)]
    lines = [f"run bench --max-tokens {tokens} --temperature 0 --ignore-eos {p!r}" for p in prompts]
    try:
        await zmq.one(0, f"load {folder} --name bench --max-batch {max(n, 1)} --ctx 256")
        await zmq.one(0, "run bench --max-tokens 4 --temperature 0 warm up")
        await asyncio.gather(*(http_one(oa, p, 4) for p in prompts))  # connections and first-step allocations
        out: dict[str, list[float]] = {k: [] for k in ("zmq_s", "http_s", "zmq_ttft", "http_ttft", "zmq_itl", "http_itl")}
        for r in range(opts.repeat):
            t0 = time.perf_counter()
            await asyncio.gather(*(zmq.one(i, line) for i, line in enumerate(lines)))
            out["zmq_s"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await asyncio.gather(*(http_one(oa, p, tokens) for p in prompts))
            out["http_s"].append(time.perf_counter() - t0)
            for _ in range(opts.singles):
                t0 = time.perf_counter()
                ttft, itl = latency(t0, await zmq.one(0, lines[0]), tokens)
                out["zmq_ttft"].append(ttft)
                out["zmq_itl"].append(itl)
                t0 = time.perf_counter()
                ttft, itl = latency(t0, await http_one(oa, prompts[0], tokens), tokens)
                out["http_ttft"].append(ttft)
                out["http_itl"].append(itl)
            note(f"round {r + 1}: {n} clients: ZeroMQ {out['zmq_s'][-1]:.2f} s, HTTP {out['http_s'][-1]:.2f} s; "
                 f"single TTFT ZeroMQ {out['zmq_ttft'][-1] * 1e3:.1f} ms, HTTP {out['http_ttft'][-1] * 1e3:.1f} ms")
        return {k: statistics.median(v) for k, v in out.items()}
    finally:
        await oa.close()
        await zmq.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 tokens, one round")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=None, help="tokens per request (default 64, quick 16)")
    ap.add_argument("--repeat", type=int, default=None, help="interleaved rounds (default 3, quick 1)")
    ap.add_argument("--small", action="store_true",
                    help="a 2-layer model whose steps take well under a millisecond: what is left is the transports' cost")
    ap.add_argument("--singles", type=int, default=None, help="single-stream pairs per round (default 6, quick 2)")
    opts = ap.parse_args()
    opts.tokens = opts.tokens or (16 if opts.quick else 64)
    opts.repeat = max(1, opts.repeat or (1 if opts.quick else 3))
    opts.singles = max(1, opts.singles or (2 if opts.quick else 6))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start = time.perf_counter()

    def note(text: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {text}", flush=True)

    home = isolate()
    folder = gpt2_checkpoint(GPT2_SMALL, "small-v384") if opts.small else gpt2_checkpoint(GPT2_124M_BODY, "124m-v384")
    port = free_port()
    proc, cf = start_kernel(home, port)
    try:
        m = asyncio.run(bench(opts, cf, port, folder, note))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    total = opts.clients * opts.tokens
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus (affinity "
          f"{len(os.sched_getaffinity(0))}), load {os.getloadavg()[0]:.2f}")
    shape = "2-layer GPT-2 (--small)" if opts.small else "GPT-2-124M-shaped"
    print(f"model: {shape} random weights (vocab 384) ({folder}); {opts.clients} clients x {opts.tokens} tokens, "
          f"median of {opts.repeat} interleaved round(s)")
    print(f"concurrent: ZeroMQ {total / m['zmq_s']:.0f} tok/s ({m['zmq_s']:.2f} s), HTTP (openai, SSE) "
          f"{total / m['http_s']:.0f} tok/s ({m['http_s']:.2f} s)")
    print(f"single stream: TTFT ZeroMQ {m['zmq_ttft'] * 1e3:.1f} ms, HTTP {m['http_ttft'] * 1e3:.1f} ms; per token "
          f"ZeroMQ {m['zmq_itl'] * 1e3:.2f} ms, HTTP {m['http_itl'] * 1e3:.2f} ms")
    print("not compared: Ollama's server and vLLM (no binaries here and no network to fetch them)")
    print(f"ratio_tps={m['zmq_s'] / m['http_s']:.3f} ratio_ttft={m['http_ttft'] / m['zmq_ttft']:.3f} "
          f"ratio_itl={m['http_itl'] / m['zmq_itl']:.3f}")


if __name__ == "__main__":
    main()
