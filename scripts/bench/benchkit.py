"""Pieces shared by the benchmark scripts: start an llmsh kernel process and connect jupyter_client to it.

The scripts run as `python scripts/bench/NAME.py`, so this folder is on sys.path and `import benchkit` finds it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def isolate() -> Path:
    """Run against a private kernel in a temporary XDG/Jupyter home, never a user's; this checkout importable."""
    home = Path(tempfile.mkdtemp(prefix="llmsh-bench-"))
    for var in ("XDG_RUNTIME_DIR", "XDG_STATE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "JUPYTER_RUNTIME_DIR"):
        (home / var).mkdir(mode=0o700)
        os.environ[var] = str(home / var)
    os.environ["PYTHONPATH"] = str(REPO) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"
    sys.path.insert(0, str(REPO))
    from llmsh.engine.threads import set_openmp_spin

    set_openmp_spin()  # what the engine sets for itself: references on the same footing
    return home


def gpt2_checkpoint(shape: dict, tag: str) -> Path:
    """A random HF-format GPT-2 of `shape` with a small trained tokenizer, cached in the temp dir between runs."""
    folder = Path(tempfile.gettempdir()) / f"llmsh-bench-gpt2-{tag}"
    if not (folder / "model.safetensors").exists():
        from tests.fixtures_models import build_tiny_model

        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        build_tiny_model(tmp, "gpt2", initializer_range=0.02, **shape)
        tmp.rename(folder)
    return folder


def start_kernel(home: Path, *extra: str, tag: str = "bench") -> tuple[subprocess.Popen, Path]:
    """A foreground kernel (telemetry off; `extra` options of `kernel start`) whose connection file lives under
    `home`'s XDG_RUNTIME_DIR."""
    cf = home / "XDG_RUNTIME_DIR" / f"kernel-{tag}.json"
    cmd = [sys.executable, "-m", "llmsh", "kernel", "start", "--foreground", "--connection-file", str(cf), "--telemetry-hz", "0",
           *extra]
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
