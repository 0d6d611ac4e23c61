"""Recovery: time from an engine's death to the first token of a restored process, against a cold `load` + first token.

One GPT-2-shaped random checkpoint (cached in the temp dir). Each round starts a new kernel (not timed), then:
  cold     `load` of the model, then `run NAME --max-tokens 1`: the kernel's first load, so it pays what a load
           without a journal pays (an engine process, torch, the weights)
  recovery `kill -9` of that engine, then `run NAME --max-tokens 1` on the process that was loaded: the front notices
           the exit, starts a new engine and restores the process from the journal at its first use
The two alternate within each round so that a shared machine's load hits both alike; medians are reported. A first,
untimed round warms the page cache (torch's libraries, the checkpoint).
Last line: recovery_s=<median> cold_s=<median> ratio=<recovery / cold> (goal ≤ 1.2).
Usage: python scripts/bench/recovery.py [--quick] [--rounds N] [--shape small|124m]
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchkit import client, gpt2_checkpoint, isolate, start_kernel

REPO = Path(__file__).resolve().parents[2]
SHAPES = {"124m": dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257),
          "small": dict(n_embd=256, n_layer=4, n_head=4, n_positions=512)}


def _execute(kc, code: str) -> dict:
    reply = kc.execute_interactive(code, timeout=600, allow_stdin=False, output_hook=lambda m: None)["content"]
    if reply["status"] != "ok":
        raise SystemExit(f"{code!r} failed: {reply.get('evalue')}")
    return reply


def _state(kc) -> str:
    import json

    out: list[str] = []

    def hook(msg: dict) -> None:
        if msg["msg_type"] == "execute_result":
            out.append(msg["content"]["data"]["text/plain"])

    kc.execute_interactive("ps --json", timeout=60, allow_stdin=False, output_hook=hook)
    rows = json.loads(out[0]) if out else []
    return rows[0]["state"] if rows else "gone"


def _engine_pid(kc) -> int:
    msg_id = kc.kernel_info()
    while True:
        reply = kc.get_shell_msg(timeout=30)
        if reply["parent_header"].get("msg_id") == msg_id:
            return int(reply["content"]["llmsh"]["engine_pid"])


def _wait_gone(pid: int) -> None:
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    return
        except OSError:
            return
        time.sleep(0.001)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small model, 2 rounds")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--shape", choices=sorted(SHAPES), default="124m")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.shape = min(args.rounds, 2), "small"
    home = isolate()
    folder = gpt2_checkpoint(SHAPES[args.shape], f"recovery-{args.shape}")
    cold: list[float] = []
    recovery: list[float] = []
    run = "--max-tokens 1 --temperature 0 --ignore-eos hello"
    for i in range(args.rounds + 1):
        proc, cf = start_kernel(home)
        kc = client(cf)
        try:
            t0 = time.perf_counter()
            _execute(kc, f"load {folder} --name m; run m {run}")
            t_cold = time.perf_counter() - t0
            engine = _engine_pid(kc)
            os.kill(engine, signal.SIGKILL)
            t0 = time.perf_counter()  # the clock starts at the engine's death, as a user's would
            _wait_gone(engine)
            while _state(kc) != "paged-out":  # the front has noticed (a request sent before that fails with the cause)
                time.sleep(0.002)
            _execute(kc, f"run m {run}")
            t_rec = time.perf_counter() - t0
        finally:
            kc.stop_channels()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if i == 0:
            continue  # warm-up
        cold.append(t_cold)
        recovery.append(t_rec)
        print(f"round {i}: cold {t_cold:.3f}s recovery {t_rec:.3f}s", file=sys.stderr)
    rec, col = statistics.median(recovery), statistics.median(cold)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus; model {args.shape}; "
          f"{args.rounds} rounds")
    print(f"recovery_s={rec:.3f} cold_s={col:.3f} ratio={rec / col:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
