"""Drivers against the real machine (psutil), the absent-GPU paths of NVML, and torch's lazy presence."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import types
from typing import Any

import psutil
import pytest

from llmsh.drivers import CpuDriver, Drivers, NvidiaDriver, TorchDriver, merge_torch, probe_all
from tests.fixtures_kernel import kernel_env


def _gpu_present() -> bool:
    drv = NvidiaDriver.probe()
    if drv is None:
        return False
    drv.close()
    return True


def test_cpu_sample_matches_psutil() -> None:
    drv = CpuDriver.probe()
    time.sleep(0.05)
    s = drv.sample()
    assert s["count"] == psutil.cpu_count() == len(s["percpu"])
    assert all(0.0 <= p <= 100.0 for p in s["percpu"])
    assert 0.0 <= s["percent"] <= 100.0
    assert len(s["load"]) == 3
    vm = psutil.virtual_memory()
    assert s["mem"]["total"] == vm.total
    assert 0 < s["mem"]["used"] <= vm.total
    assert s["swap"]["total"] == psutil.swap_memory().total
    assert s["proc"]["pid"] == os.getpid()
    assert s["proc"]["rss"] == pytest.approx(psutil.Process().memory_info().rss, rel=0.2)
    assert s["proc"]["threads"] == psutil.Process().num_threads()
    assert drv.memory_rows(s) == [
        {"device": "cpu", "kind": "host", "total": vm.total, "used": s["mem"]["used"], "free": s["mem"]["available"]}
    ]


def test_cpu_driver_sees_a_busy_process() -> None:
    """The process's own CPU% rises while it spins (measured from cpu_times deltas, not psutil's global baseline)."""
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        drv = CpuDriver(child.pid)
        time.sleep(0.6)
        busy = drv.sample()
        assert busy["proc"]["pid"] == child.pid
        assert busy["proc"]["cpu_percent"] > 10.0
        assert max(busy["percpu"]) > 10.0
        child.send_signal(19)  # SIGSTOP: a stopped process uses no CPU
        drv.sample()
        time.sleep(0.4)
        assert drv.sample()["proc"]["cpu_percent"] < 5.0
    finally:
        child.kill()
        child.wait()


def test_two_cpu_drivers_do_not_disturb_each_other() -> None:
    a, b = CpuDriver(), CpuDriver()
    time.sleep(0.2)
    b.sample()
    b.sample()  # a tiny interval for b must not reset a's
    assert len(a.sample()["percpu"]) == psutil.cpu_count()


def test_nvidia_absent_library_is_not_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    assert NvidiaDriver.probe() is None
    assert "nvidia" not in [d.name for d in probe_all()]


def test_nvidia_library_without_driver_is_not_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    import pynvml

    def no_lib() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_lib)
    assert NvidiaDriver.probe() is None
    assert Drivers().names()[0] == "cpu" and "nvidia" not in Drivers().names()


def test_nvidia_zero_gpus_is_not_listed_and_shuts_nvml_down(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    fake = types.SimpleNamespace(
        nvmlInit=lambda: calls.append("init"),
        nvmlDeviceGetCount=lambda: 0,
        nvmlShutdown=lambda: calls.append("shutdown"),
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert NvidiaDriver.probe() is None
    assert calls == ["init", "shutdown"]


@pytest.mark.skipif(_gpu_present(), reason="this machine has an NVIDIA GPU")
def test_this_machine_without_gpu_lists_cpu_only() -> None:
    """The real absent-GPU path here: pynvml is installed, libnvidia-ml is not (or no board)."""
    drivers = Drivers()
    names = drivers.names()
    assert names[0] == "cpu" and "nvidia" not in names
    load = drivers.sample()
    assert load["gpus"] == [] and [r["device"] for r in load["memory"]] == ["cpu"]


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_present(), reason="no NVIDIA GPU")
def test_nvidia_real_gpu_sample() -> None:
    drv = NvidiaDriver.probe()
    assert drv is not None
    try:
        s = drv.sample()
        assert s["gpus"] and s["gpus"][0]["device"] == "cuda:0"
        g = s["gpus"][0]
        assert 0 < g["mem_total"] and 0 <= g["mem_used"] <= g["mem_total"]
        assert g["util"] is None or 0 <= g["util"] <= 100
        assert drv.memory_rows(s)[0]["free"] == g["mem_total"] - g["mem_used"]
    finally:
        drv.close()


def test_torch_driver_only_when_torch_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert TorchDriver.probe() is None
    drivers = Drivers()
    assert "torch" not in drivers.names()
    assert drivers.sample()["torch"] is None
    monkeypatch.undo()
    import torch  # noqa: F401  (the kernel imports torch at the first `load`; the driver appears then)

    load = drivers.sample()
    assert "torch" in drivers.names()
    assert load["torch"]["threads"] == torch.get_num_threads()
    assert load["torch"]["version"] == torch.__version__
    if not torch.cuda.is_available():
        assert load["torch"]["devices"] == []


def test_merge_torch_adds_allocator_columns() -> None:
    rows = [{"device": "cpu", "kind": "host", "total": 8, "used": 2, "free": 6},
            {"device": "cuda:0", "kind": "gpu", "total": 80, "used": 20, "free": 60}]
    merged = merge_torch(rows, {"devices": [{"device": "cuda:0", "allocated": 5, "reserved": 8},
                                            {"device": "mps", "allocated": 1, "reserved": 2}]})
    assert merged[1]["allocated"] == 5 and merged[1]["reserved"] == 8
    assert "allocated" not in merged[0]
    assert merged[2] == {"device": "mps", "kind": "gpu", "total": None, "used": None, "free": None,
                         "allocated": 1, "reserved": 2}


def test_sampling_is_cheap() -> None:
    """A node sample is a few /proc reads: far below the 5 ms a 2 Hz, 1 %-of-a-core budget allows per tick."""
    drivers = Drivers()
    drivers.sample()
    t0 = time.process_time()
    for _ in range(50):
        drivers.sample()
    per_sample = (time.process_time() - t0) / 50
    assert per_sample < 0.005, f"{per_sample * 1000:.2f} ms of CPU per sample"


@pytest.mark.parametrize("module", ["llmsh.drivers", "llmsh.kernel.telemetry", "llmsh.tui.app"])
def test_no_torch_import(module: str) -> None:
    """Drivers and telemetry only look at torch when the kernel has loaded it; the dashboard never imports it."""
    code = (f"import sys, {module}\n"
            "from llmsh.drivers import Drivers\n"
            "Drivers().sample()\n"
            "from llmsh.tui.source import find_connection\n"
            "find_connection(None)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    r: Any = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=kernel_env(), timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
