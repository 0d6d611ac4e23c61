"""The first `load` imports torch in a loader thread; telemetry sampling meanwhile must not touch the half-imported
module (it logged "partially initialized module 'torch'" tracebacks, issue 14)."""

from __future__ import annotations

import importlib.machinery
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from llmsh.drivers import torchmem


def test_a_torch_still_being_imported_counts_as_not_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    half = types.ModuleType("torch")
    half.__spec__ = importlib.machinery.ModuleSpec("torch", None)
    half.__spec__._initializing = True  # what the import system sets until torch/__init__.py has run
    monkeypatch.setitem(sys.modules, "torch", half)
    assert torchmem.loaded() is None and torchmem.TorchDriver.probe() is None
    half.__spec__._initializing = False
    assert torchmem.loaded() is half


@pytest.mark.slow
def test_first_load_with_fast_telemetry_logs_no_traceback(make_kernel: Any, tiny_gpt2: Path) -> None:
    from llmsh.kernel.lifecycle import log_file

    k = make_kernel("--telemetry-hz", "100")  # samples every 10 ms while torch is being imported
    assert not k.kernel_info()["torch_loaded"]
    r = k.execute(f"load {tiny_gpt2} --name first")
    assert r["status"] == "ok", r
    logged = log_file(k.connection_file).read_text(errors="replace") + k.log.read_text(errors="replace")
    assert "partially initialized" not in logged and "Traceback" not in logged
