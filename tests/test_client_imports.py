"""The client side never imports torch (nor jupyter_client's traitlets/tornado stack), so `llmsh -c` starts fast."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

HEAVY = ("torch", "numpy", "transformers", "jupyter_client", "traitlets", "tornado", "textual")


def test_batch_client_path_is_light(kernel: Any) -> None:
    code = f"""
import sys
from llmsh.cli import main
rc = main(["--kernel", {str(kernel.connection_file)!r}, "-c", "echo hi; uname"])
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
print("RC", rc, "HEAVY", heavy)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=kernel.env, timeout=60)
    assert r.stdout.splitlines()[0] == "hi"
    assert r.stdout.splitlines()[-1] == "RC 0 HEAVY []", r.stdout + r.stderr


def test_interactive_client_modules_do_not_import_torch(kernel: Any) -> None:
    code = f"""
import sys
import llmsh.cli, llmsh.client.main, llmsh.client.repl, llmsh.client.kernel_client, llmsh.client.batch
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
print("HEAVY", heavy)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=kernel.env, timeout=60)
    assert r.stdout.strip() == "HEAVY []", r.stdout + r.stderr


def test_importtime_shows_no_torch(kernel: Any) -> None:
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import llmsh.cli, llmsh.client.main, llmsh.client.repl"],
        capture_output=True, text=True, env=kernel.env, timeout=60,
    )
    modules = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")]
    assert "llmsh.client.repl" in modules and not [m for m in modules if m.split(".")[0] == "torch"]
