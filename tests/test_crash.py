"""A kernel that survives its models: real processes, real signals.

The engine (where the models run) is killed, truncated under, or the whole front is `kill -9`ed; the tests check what
a user sees: one line naming the cause, the kernel still answering, the table back with the same PIDs, the notice
after a restart, `dmesg`, and exactly one kernel when many clients start at once.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_kernel import KernelHandle, kernel_env, start_kernel

GREEDY = "--temperature 0 --ignore-eos"
pytestmark = pytest.mark.slow


def _env(tmp_path: Path) -> dict[str, str]:
    """Kernel dirs of this test's own, so the journal it restores from is not another test kernel's."""
    env = kernel_env()
    for var, sub in (("XDG_RUNTIME_DIR", "run"), ("XDG_STATE_HOME", "state")):
        (tmp_path / sub).mkdir(mode=0o700, exist_ok=True)
        env[var] = str(tmp_path / sub)
    return env


def _ok(k: KernelHandle, code: str, timeout: float = 60) -> dict[str, Any]:
    out = k.execute(code, timeout=timeout)
    assert out["status"] == "ok", (code, out)
    return out


def _engine_pid(k: KernelHandle) -> int:
    pid = k.kernel_info()["engine_pid"]
    assert pid, "no engine running"
    return int(pid)


def _ps(k: KernelHandle) -> dict[int, dict[str, Any]]:
    return {r["pid"]: r for r in _ok(k, "ps --json")["data"]}


def _wait(check: Callable[[], bool], timeout: float = 30, what: str | Callable[[], str] = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        time.sleep(0.05)


def _stream_in_thread(k: KernelHandle, code: str) -> tuple[threading.Thread, dict[str, Any], threading.Event]:
    """Run `code` on its own client in a thread; `first` is set when the first token arrives."""
    box: dict[str, Any] = {}
    first = threading.Event()
    kc = k.client()  # made here: jupyter_client's channel threads do not like being started from two threads at once

    def run() -> None:
        try:
            out = {"stdout": "", "stderr": ""}

            def hook(msg: dict[str, Any]) -> None:
                if msg["msg_type"] == "stream":
                    out[msg["content"]["name"]] += msg["content"]["text"]
                    if msg["content"]["name"] == "stdout":
                        first.set()

            reply = kc.execute_interactive(code, timeout=120, output_hook=hook, allow_stdin=False)
            box.update(out, reply=reply["content"], t_end=time.monotonic())
        finally:
            kc.stop_channels()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box, first


def test_engine_killed_mid_stream(tmp_path: Path, make_tiny_model: Callable[..., Path]) -> None:
    """kill -9 of the engine: the streaming client gets the cause within a second; PIDs, names, nice come back."""
    folder = make_tiny_model("gpt2", n_embd=256, n_layer=4, n_head=4, n_positions=4096)
    k = start_kernel(env=_env(tmp_path))
    try:
        _ok(k, f"load {folder} --name a")
        _ok(k, f"nice -n 5 load {folder} --name b")
        old_engine = _engine_pid(k)
        t, box, first = _stream_in_thread(k, f"run a --max-tokens 2000 {GREEDY} hello")
        assert first.wait(60)
        t_kill = time.monotonic()
        os.kill(old_engine, signal.SIGKILL)
        t.join(30)
        assert box["reply"]["status"] == "error"
        assert box["t_end"] - t_kill < 1.0, box["t_end"] - t_kill
        assert "engine exited: SIGKILL while running pid 1 (a)" in box["reply"]["evalue"]
        rows = _ps(k)  # the kernel answers at once; both processes are still there, not on any engine yet
        assert {p: (r["name"], r["nice"]) for p, r in rows.items()} == {1: ("a", 0), 2: ("b", 5)}
        assert {r["state"] for r in rows.values()} == {"paged-out"}
        out = _ok(k, f"run b --max-tokens 5 {GREEDY} hi")  # restored on first use, on a new engine
        assert out["stdout"].strip()
        assert _engine_pid(k) != old_engine
        rows = _ps(k)
        assert rows[2]["state"] == "ready" and rows[1]["state"] == "paged-out"
        log = _ok(k, "dmesg")["stdout"]
        assert "engine-crash: engine exited: SIGKILL while running pid 1 (a)" in log
        assert "restore: pid 2 (b) restored" in log
    finally:
        k.stop()


def test_engine_sigbus_names_the_checkpoint(tmp_path: Path, make_tiny_model: Callable[..., Path]) -> None:
    folder = make_tiny_model("gpt2", n_positions=4096)
    k = start_kernel(env=_env(tmp_path))
    try:
        _ok(k, f"load {folder} --name a")
        t, box, first = _stream_in_thread(k, f"run a --max-tokens 2000 {GREEDY} hello")
        assert first.wait(60)
        os.kill(_engine_pid(k), signal.SIGBUS)
        t.join(30)
        assert "engine exited: SIGBUS while running pid 1 (a); its checkpoint file changed on disk?" in box["reply"]["evalue"]
    finally:
        k.stop()


def test_truncated_checkpoint_fails_that_process_only(tmp_path: Path, make_tiny_model: Callable[..., Path]) -> None:
    """The weights file of a loaded model is truncated: its next request fails naming the file; the other model and
    the engine carry on."""
    victim = tmp_path / "victim"
    shutil.copytree(make_tiny_model("gpt2"), victim)
    other = make_tiny_model("llama", max_position_embeddings=4096)
    k = start_kernel(env=_env(tmp_path))
    try:
        _ok(k, f"load {victim} --name v")
        _ok(k, f"load {other} --name o")
        engine = _engine_pid(k)
        t, box, first = _stream_in_thread(k, f"run o --max-tokens 1500 {GREEDY} hello")
        assert first.wait(60)
        weights = next(victim.glob("*.safetensors"))
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size // 2)
        out = k.execute(f"run v --max-tokens 5 {GREEDY} hi", timeout=60)
        assert out["status"] == "error" and "changed on disk since it was loaded" in out["reply"]["evalue"], out
        t.join(60)
        assert box["reply"]["status"] == "ok" and box["stdout"].strip()  # the other stream finished
        assert _engine_pid(k) == engine  # no engine crash
        assert _ps(k)[2]["state"] in ("ready", "running")
    finally:
        k.stop()


def _llmsh(env: dict[str, str], *argv: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmsh", *argv], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _running_kernels(env: dict[str, str]) -> list[int]:
    run = Path(env["XDG_RUNTIME_DIR"]) / "llmsh"
    import json

    pids = []
    for f in run.glob("kernel-*.json"):
        try:
            pids.append(int(json.loads(f.read_text())["pid"]))
        except (OSError, ValueError, KeyError):
            pass
    return pids


def test_kernel_kill9_restores_table_and_tells_the_first_client(tmp_path: Path, make_tiny_model: Callable[..., Path]) -> None:
    env = _env(tmp_path)
    folder = make_tiny_model("gpt2")
    first = _llmsh(env, "-c", f"load {folder} --name a; nice -n 3 load {folder} --name b; keepalive b 10m")
    assert first.returncode == 0, first.stderr
    (kernel_pid,) = _running_kernels(env)
    os.kill(kernel_pid, signal.SIGKILL)
    _wait(lambda: not _pid_alive(kernel_pid), what="the kernel to die")
    again = _llmsh(env, "-c", "ps --json")
    try:
        assert again.returncode == 0, again.stderr
        assert "kernel restarted after a crash at" in again.stderr and "2 processes restored" in again.stderr
        import json

        rows = {r["pid"]: r for r in json.loads(again.stdout)}
        assert {p: (r["name"], r["nice"], r["state"]) for p, r in rows.items()} == {
            1: ("a", 0, "paged-out"), 2: ("b", 3, "paged-out")}
        run = _llmsh(env, "-c", f"run a --max-tokens 3 {GREEDY} hi; load {folder} --name c")
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip().splitlines()[-1] == "3"  # PIDs continue after the restored ones
        assert "kernel restarted" not in run.stderr  # told once
    finally:
        _llmsh(env, "kernel", "stop")


def test_clean_stop_starts_empty_unless_restore(tmp_path: Path, make_tiny_model: Callable[..., Path]) -> None:
    env = _env(tmp_path)
    folder = make_tiny_model("gpt2")
    assert _llmsh(env, "-c", f"load {folder} --name a").returncode == 0
    assert _llmsh(env, "kernel", "stop").returncode == 0
    out = _llmsh(env, "-c", "ps --json")
    assert out.returncode == 0 and out.stdout.strip() == "[]" and "restarted" not in out.stderr
    assert _llmsh(env, "-c", f"load {folder} --name b").returncode == 0
    assert _llmsh(env, "kernel", "stop").returncode == 0
    started = _llmsh(env, "kernel", "start", "--restore")
    try:
        assert started.returncode == 0, started.stderr
        import json

        rows = json.loads(_llmsh(env, "-c", "ps --json").stdout)
        assert [(r["pid"], r["name"]) for r in rows] == [(2, "b")]
    finally:
        _llmsh(env, "kernel", "stop")


def test_many_clients_start_exactly_one_kernel(tmp_path: Path) -> None:
    env = _env(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-m", "llmsh", "-c", "echo hi"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(8)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        assert sum("started kernel" in err for _, err in outs) == 1
        assert len(_running_kernels(env)) == 1
    finally:
        _llmsh(env, "kernel", "stop")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def test_interactive_shell_reconnects_after_its_kernel_died(tmp_path: Path) -> None:
    import pexpect

    env = dict(_env(tmp_path), PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm", NO_COLOR="1")
    child = pexpect.spawn(sys.executable, ["-m", "llmsh"], env=env, encoding="utf-8", dimensions=(40, 150), timeout=60)
    try:
        child.expect_exact("'help' lists the commands")
        child.expect("llmsh>")
        (kernel_pid,) = _running_kernels(env)
        os.kill(kernel_pid, signal.SIGKILL)
        _wait(lambda: not _pid_alive(kernel_pid), what="the kernel to die")
        child.sendline("echo one")
        child.expect_exact("the kernel went away")
        child.expect("llmsh")
        child.sendline("echo two")  # reconnects: a new kernel is started and the command runs there
        child.expect_exact("started kernel")
        child.expect_exact("two\r\n")
        child.expect("llmsh>")
        assert child.isalive()
        child.send("\x04")  # Ctrl-D leaves
        child.expect(pexpect.EOF)
    finally:
        if child.isalive():
            child.terminate(force=True)
        _llmsh(env, "kernel", "stop")


def _shares(k: KernelHandle, names: tuple[str, str], window: float = 1.5) -> tuple[float, float]:
    """Device seconds (ps TIME) each of two processes gets over `window` seconds of running side by side: both are
    stopped while their requests queue, then continued together, so neither starts or finishes alone."""
    _ok(k, f"kill -STOP {names[0]} {names[1]}")
    streams = [_stream_in_thread(k, f"run {n} --max-tokens 2000 {GREEDY} hello") for n in names]
    _wait(lambda: all(r["reqs_queued"] for r in _ps(k).values() if r["name"] in names), what=lambda: f"both requests queued: {[(r['name'], r['state'], r['reqs_queued']) for r in _ps(k).values()]} {[b for _, b, _ in streams]}")
    _ok(k, f"kill -CONT {names[0]} {names[1]}")
    for _, box, first in streams:
        assert first.wait(60), box
    t1 = {r["name"]: r["time_s"] for r in _ps(k).values()}
    time.sleep(window)
    rows = _ps(k)
    assert all(r["reqs_active"] for r in rows.values() if r["name"] in names), "a run ended inside the window"
    t2 = {r["name"]: r["time_s"] for r in rows.values()}
    _ok(k, f"kill -KILL --wait {names[0]} {names[1]}")
    for t, _, _ in streams:
        t.join(60)
    return t2[names[0]] - t1[names[0]], t2[names[1]] - t1[names[1]]


def test_device_time_is_shared_fairly_between_model_sizes_and_by_nice(tmp_path: Path,
                                                                       make_tiny_model: Callable[..., Path]) -> None:
    """Two models of different size at nice 0 get equal device time (not equal tokens); nice 0 vs 5 gets 1024:335.
    Device time is what the scheduler hands out, so the shares hold however fast the machine is."""
    small = make_tiny_model("gpt2", n_embd=256, n_layer=4, n_head=4, n_positions=4096)
    large = make_tiny_model("gpt2", n_embd=768, n_layer=6, n_head=12, n_positions=4096)
    k = start_kernel(env=_env(tmp_path))
    try:
        _ok(k, f"load {small} --name s; load {large} --name l; load {small} --name s0; nice -n 5 load {small} --name s5")
        a, b = _shares(k, ("s", "l"))
        assert 0.75 < a / b < 1.33, (a, b)
        a, b = _shares(k, ("s0", "s5"))
        assert 0.75 < (a / b) / (1024 / 335) < 1.33, (a, b)
    finally:
        k.stop()


def test_the_process_limit_is_a_setting_and_its_error_names_it(tmp_path: Path,
                                                              make_tiny_model: Callable[..., Path]) -> None:
    env = _env(tmp_path)
    config = tmp_path / "config"
    (config / "llmsh").mkdir(parents=True)
    (config / "llmsh" / "config.toml").write_text("max_procs = 2\n")
    env["XDG_CONFIG_HOME"] = str(config)
    folder = make_tiny_model("gpt2")
    try:
        r = _llmsh(env, "-c", f"load {folder} --name a; load {folder} --name b; load {folder} --name c")
        assert r.returncode != 0 and "2 processes already loaded (the limit, max_procs in config.toml)" in r.stderr
        (config / "llmsh" / "config.toml").write_text("max_procs = 0\n")
        _llmsh(env, "kernel", "stop")
        r = _llmsh(env, "-c", "ps")
        assert r.returncode != 0 and "max_procs = 0; give a whole number ≥ 1" in r.stderr
    finally:
        _llmsh(env, "kernel", "stop")
