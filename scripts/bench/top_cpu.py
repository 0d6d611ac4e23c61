"""CPU cost of watching: `llmsh top` on an idle kernel at 2 Hz, and the kernel's telemetry itself.

Two idle kernels run side by side over the same window: A publishes telemetry at 2 Hz (watched by `llmsh top` in a
pseudo-terminal of 120x40), B has telemetry off (the reference). The kernel's telemetry cost is A's CPU minus B's;
`llmsh top`'s cost is its own CPU. Goals: top <= 10 % of one core, telemetry <= 1 %. The kernel's self-measured
tick time (payload `kernel.tick_ms`) is printed as a cross-check. Last line: key=value pairs.

    python scripts/bench/top_cpu.py [--seconds 20] [--hz 2]
"""

from __future__ import annotations

import argparse
import fcntl
import os
import platform
import pty
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path
from queue import Empty

import psutil

REPO = Path(__file__).resolve().parents[2]
MIME = "application/vnd.llmsh.telemetry+json"


def cpu_seconds(proc: psutil.Process) -> float:
    """User+system CPU seconds of a process and its children."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def start_kernel(env: dict[str, str], cf: Path, hz: float) -> subprocess.Popen:
    """A foreground kernel with this telemetry rate, ready when its connection file exists and it answers."""
    from jupyter_client import BlockingKernelClient

    proc = subprocess.Popen(
        [sys.executable, "-m", "llmsh", "kernel", "start", "--foreground", "--connection-file", str(cf),
         "--telemetry-hz", str(hz)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    deadline = time.monotonic() + 30
    while not cf.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"kernel did not start (exit {proc.poll()})")
        time.sleep(0.05)
    kc = BlockingKernelClient(connection_file=str(cf))
    kc.load_connection_file()
    kc.start_channels()
    kc.wait_for_ready(timeout=30)
    kc.stop_channels()
    return proc


def start_top(env: dict[str, str], cf: Path, cols: int = 120, rows: int = 40) -> tuple[subprocess.Popen, threading.Thread]:
    """`llmsh top` in a pseudo-terminal whose output is read and dropped (as a terminal would)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmsh", "top", "--kernel", str(cf)],
        stdin=slave, stdout=slave, stderr=slave, env=dict(env, TERM="xterm-256color", COLUMNS=str(cols), LINES=str(rows)),
        start_new_session=True,
    )
    os.close(slave)

    def drain() -> None:
        while True:
            try:
                if not os.read(master, 65536):
                    break
            except OSError:
                break
        os.close(master)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    return proc, reader


def tick_ms(cf: Path, seconds: float) -> list[float]:
    """The kernel's self-measured telemetry tick times seen over `seconds`."""
    from jupyter_client import BlockingKernelClient

    kc = BlockingKernelClient(connection_file=str(cf))
    kc.load_connection_file()
    kc.start_channels(shell=False, stdin=False, hb=False, control=False)
    out: list[float] = []
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            try:
                msg = kc.get_iopub_msg(timeout=max(0.05, deadline - time.monotonic()))
            except Empty:
                continue
            data = msg["content"].get("data", {}) if msg["msg_type"] == "display_data" else {}
            if MIME in data:
                out.append(float(data[MIME]["kernel"]["tick_ms"]))
    finally:
        kc.stop_channels()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="measurement window (default 20)")
    ap.add_argument("--hz", type=float, default=2.0, help="telemetry rate of the watched kernel (default 2)")
    ap.add_argument("--warmup", type=float, default=6.0, help="seconds to let top start before measuring")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="llmsh-bench-"))
    env = dict(os.environ)
    for var in ("XDG_RUNTIME_DIR", "XDG_STATE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME"):
        (tmp / var).mkdir(mode=0o700)
        env[var] = str(tmp / var)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")

    procs: list[subprocess.Popen] = []
    try:
        ka = start_kernel(env, tmp / "a.json", args.hz)
        procs.append(ka)
        kb = start_kernel(env, tmp / "b.json", 0)
        procs.append(kb)
        top, _reader = start_top(env, tmp / "a.json")
        procs.append(top)
        time.sleep(args.warmup)
        if top.poll() is not None:
            raise SystemExit(f"llmsh top exited early (code {top.returncode})")
        ps = {name: psutil.Process(p.pid) for name, p in (("a", ka), ("b", kb), ("top", top))}
        before = {k: cpu_seconds(p) for k, p in ps.items()}
        t0 = time.monotonic()
        ticks = tick_ms(tmp / "a.json", args.seconds)  # also waits out the window
        wall = time.monotonic() - t0
        used = {k: (cpu_seconds(p) - before[k]) / wall * 100 for k, p in ps.items()}
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    tel = used["a"] - used["b"]
    mean_tick = sum(ticks) / len(ticks) if ticks else float("nan")
    print(f"machine: {platform.node()} {platform.machine()}, {psutil.cpu_count()} cores, load {os.getloadavg()[0]:.2f} "
          f"(shared with other work); window {wall:.1f} s; telemetry {args.hz:g} Hz; top in a 120x40 pty")
    print(f"llmsh top:                 {used['top']:6.2f} % of one core   (goal <= 10 %)")
    print(f"kernel A (telemetry on):   {used['a']:6.2f} %")
    print(f"kernel B (telemetry off):  {used['b']:6.2f} %   (reference, same window)")
    print(f"telemetry cost A - B:      {tel:6.2f} %   (goal <= 1 %); self-measured {mean_tick:.2f} ms/tick x "
          f"{args.hz:g} Hz = {mean_tick * args.hz / 10:.2f} % over {len(ticks)} ticks")
    print(f"top_cpu_pct={used['top']:.2f} telemetry_cpu_pct={tel:.2f} kernel_on_pct={used['a']:.2f} "
          f"kernel_off_pct={used['b']:.2f} kernel_on_off_ratio={used['a'] / max(used['b'], 1e-9):.2f} "
          f"tick_ms={mean_tick:.3f} top_goal_ratio={used['top'] / 10:.2f} telemetry_goal_ratio={tel / 1:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
