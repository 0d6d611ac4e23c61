"""Pieces shared by the benchmark scripts: start an llmsh kernel process and connect jupyter_client to it.

The scripts run as `python scripts/bench/NAME.py`, so this folder is on sys.path and `import benchkit` finds it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def start_kernel(home: Path) -> tuple[subprocess.Popen, Path]:
    """A foreground kernel (telemetry off) whose connection file lives under `home`'s XDG_RUNTIME_DIR."""
    cf = home / "XDG_RUNTIME_DIR" / "kernel-bench.json"
    cmd = [sys.executable, "-m", "llmsh", "kernel", "start", "--foreground", "--connection-file", str(cf), "--telemetry-hz", "0"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not cf.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("llmsh kernel did not start")
        time.sleep(0.02)
    return proc, cf


def client(cf: Path | str):
    """A ready jupyter_client BlockingKernelClient for the connection file `cf`."""
    from jupyter_client import BlockingKernelClient

    kc = BlockingKernelClient(connection_file=str(cf))
    kc.load_connection_file()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    return kc
