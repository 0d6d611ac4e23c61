"""Round-trip latency of a trivial command: llmsh kernel vs ipykernel, both through jupyter_client, in one run.

Also the one-shot CLI (`llmsh -c 'echo hi'` against a running kernel) vs `python -c pass`.
Both kernels are started here, in a temporary XDG/Jupyter home, and measured interleaved so that machine noise
hits both alike. Prints absolute numbers, then a last line of key=value ratios:
    p50_ratio=<llmsh p50 / ipykernel p50> p99_ratio=… oneshot_ms=… python_ms=…
Usage: python scripts/bench/roundtrip.py [-n 300]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchkit import client, isolate, start_kernel

REPO = Path(__file__).resolve().parents[2]


def _roundtrip(kc, code: str) -> float:
    """Seconds from sending execute_request to receiving its execute_reply."""
    t0 = time.perf_counter()
    msg_id = kc.execute(code)
    while kc.get_shell_msg(timeout=30)["parent_header"].get("msg_id") != msg_id:
        pass
    return time.perf_counter() - t0


def _drain(kc) -> None:
    while True:
        try:
            kc.get_iopub_msg(timeout=0)
        except Exception:
            return


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _wall(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=300, help="round trips per kernel")
    ap.add_argument("--oneshot-runs", type=int, default=10)
    opts = ap.parse_args()
    home = isolate()
    from jupyter_client.manager import start_new_kernel

    proc, cf = start_kernel(home)
    ipy_km, ipy = start_new_kernel(kernel_name="python3")
    ours = client(cf)
    try:
        for _ in range(30):  # warm-up: imports, JIT-free but caches and sockets
            _roundtrip(ours, "echo hi")
            _roundtrip(ipy, "pass")
        t_ours, t_ipy = [], []
        for i in range(opts.n):
            t_ours.append(_roundtrip(ours, "echo hi"))
            t_ipy.append(_roundtrip(ipy, "pass"))
            if i % 50 == 0:
                _drain(ours)
                _drain(ipy)
        python_s = _wall([sys.executable, "-c", "pass"], opts.oneshot_runs)
        oneshot_s = float("nan")
        try:
            import llmsh.client.main  # noqa: F401  (the SHELL engineer's client)

            probe = subprocess.run([sys.executable, "-m", "llmsh", "--kernel", str(cf), "-c", "echo hi"], capture_output=True, text=True)
            if probe.returncode == 0 and probe.stdout.strip() == "hi":
                oneshot_s = _wall([sys.executable, "-m", "llmsh", "--kernel", str(cf), "-c", "echo hi"], opts.oneshot_runs)
            else:
                print(f"llmsh -c failed: {probe.stderr.strip()[-200:]}")
        except ImportError:
            print("llmsh client not available yet; oneshot_ms=nan")
    finally:
        ours.stop_channels()
        ipy.stop_channels()
        ipy_km.shutdown_kernel(now=True)
        from llmsh.kernel.lifecycle import stop_kernel

        stop_kernel(cf)
        proc.wait(timeout=10)
    p50o, p99o = _pct(t_ours, 0.5) * 1e3, _pct(t_ours, 0.99) * 1e3
    p50i, p99i = _pct(t_ipy, 0.5) * 1e3, _pct(t_ipy, 0.99) * 1e3
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, load {os.getloadavg()[0]:.2f}, python {platform.python_version()}")
    print(f"llmsh 'echo hi':  p50 {p50o:.3f} ms  p99 {p99o:.3f} ms  (n={opts.n})")
    print(f"ipykernel 'pass': p50 {p50i:.3f} ms  p99 {p99i:.3f} ms  (n={opts.n})")
    print(f"llmsh -c 'echo hi': {oneshot_s * 1e3:.1f} ms   python -c pass: {python_s * 1e3:.1f} ms  (median of {opts.oneshot_runs})")
    print(f"p50_ratio={p50o / p50i:.3f} p99_ratio={p99o / p99i:.3f} oneshot_ms={oneshot_s * 1e3:.1f} python_ms={python_s * 1e3:.1f}")


if __name__ == "__main__":
    main()
