"""Models as processes through a real kernel and real clients, with tiny random checkpoints.

Covers the life cycle (load → ps → run → kill), continuous batching of two clients on one process, STOP/CONT giving
exactly the output of an uninterrupted greedy run, KILL mid-stream, TERM's escalation to KILL, nice/renice, pipes,
chat, threads and models. Concurrency is made deterministic with the signals themselves: a STOPped process queues
requests without running them, so CONT lets them all join the same step.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow


# ---- helpers ----------------------------------------------------------------------------------------------------------


def ok(kernel: Any, code: str, timeout: float = 60) -> dict[str, Any]:
    r = kernel.execute(code, timeout=timeout)
    assert r["status"] == "ok", (code, r["reply"].get("evalue"), r["stderr"])
    return r


def fails(kernel: Any, code: str) -> str:
    """Run a line that must fail; returns its one-line error."""
    r = kernel.execute(code)
    assert r["status"] == "error", (code, r)
    line = r["reply"]["evalue"]
    assert "\n" not in line and "Traceback" not in line and "Traceback" not in r["stderr"]
    return line


def load(kernel: Any, path: Path, *opts: str) -> int:
    return int(ok(kernel, f"load {path} {' '.join(opts)}")["data"]["pid"])


def ps(kernel: Any, *flags: str) -> dict[int, dict[str, Any]]:
    return {row["pid"]: row for row in ok(kernel, " ".join(["ps", *flags]))["data"]}


def wait_until(check: Callable[[], bool], timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Background:
    """A second client running one line in a thread, collecting what its user would see."""

    def __init__(self, kernel: Any, code: str, timeout: float = 60) -> None:
        self.kc = kernel.client()
        self.out: dict[str, Any] = {"stdout": "", "stderr": ""}
        self.thread = threading.Thread(target=self._run, args=(code, timeout), daemon=True)
        self.thread.start()

    def _run(self, code: str, timeout: float) -> None:
        def hook(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "stream":
                self.out[msg["content"]["name"]] += msg["content"]["text"]

        try:
            reply = self.kc.execute_interactive(code, timeout=timeout, output_hook=hook, allow_stdin=False)
            self.out["reply"] = reply["content"]
        finally:
            self.kc.stop_channels()

    def result(self, timeout: float = 60) -> dict[str, Any]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "background client did not finish"
        return self.out


GREEDY = "--temperature 0 --ignore-eos"


# ---- tests --------------------------------------------------------------------------------------------------------------


def test_life_cycle(kernel: Any, tiny_gpt2: Path) -> None:
    pid = load(kernel, tiny_gpt2, "--name life")
    row = ps(kernel)[pid]
    assert (row["name"], row["state"], row["nice"], row["device"]) == ("life", "ready", 0, "cpu")
    assert row["res_bytes"] > 0 and row["path"] == str(tiny_gpt2)
    text = ok(kernel, f"run life --max-tokens 12 {GREEDY} hello world")["stdout"]
    assert text.strip()
    row = ps(kernel)[pid]
    assert row["tokens"] == 12 and row["state"] == "ready" and row["time_s"] > 0
    table = ok(kernel, "ps")["results"][-1]["text/plain"]
    assert table.splitlines()[0].split() == "PID NAME STATE NI DEVICE RES REQS TOK/S TOKENS TIME NODE".split()
    # the real CLI against the same kernel: same greedy text
    cli = kernel.llmsh("-c", f"run {pid} --max-tokens 12 {GREEDY} hello world")
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout == text
    r = ok(kernel, f"kill -TERM --wait {pid}")
    assert r["data"][0]["exit"] == "term"
    assert pid not in ps(kernel) and ps(kernel, "-a")[pid]["exit"] == "term"
    assert "no process with PID" in fails(kernel, f"run {pid} hi")


def test_kill_on_shell_jobs(kernel: Any) -> None:
    """`kill %N` interrupts a job; -STOP/-CONT cannot pause a job, so they fail and leave it running."""
    r = kernel.execute("sleep 5 & kill -STOP %1; jobs --json; kill %1; sleep 0.2; jobs --json")
    assert "llmsh: kill: STOP: %1 is a shell job, which cannot be stopped or continued" in r["stderr"], r
    first, last = [d["application/json"] for d in r["results"] if "application/json" in d][-2:]
    assert first[0]["state"] == "running" and last[0]["state"] == "interrupted", (first, last)


def test_two_clients_are_batched(kernel: Any, tiny_gpt2: Path) -> None:
    pid = load(kernel, tiny_gpt2, "--name batch")
    ref = ok(kernel, f"run batch --max-tokens 40 {GREEDY} the fox")["stdout"]
    ok(kernel, f"kill -STOP {pid}")
    a = Background(kernel, f"run batch --max-tokens 40 {GREEDY} the fox")
    b = Background(kernel, f"run batch --max-tokens 40 {GREEDY} the fox")
    wait_until(lambda: ps(kernel)[pid]["reqs_queued"] == 2, what="two queued requests")
    ok(kernel, f"kill -CONT {pid}")
    ra, rb = a.result(), b.result()
    assert ra["reply"]["status"] == "ok" and rb["reply"]["status"] == "ok"
    assert f"process {pid} (batch) is stopped; the request waits for 'kill -CONT {pid}'" in ra["stderr"]  # not a silent hang
    assert ra["stdout"] == ref and rb["stdout"] == ref  # batched greedy decoding = single greedy decoding
    row = ps(kernel)[pid]
    assert row["max_batch"] == 2  # both requests ran in the same steps
    stats = ok(kernel, "top --json")["data"]["scheduler"]["devices"]["cpu"]
    assert stats["max_batch"] >= 2 and stats["steps"] > 0
    ok(kernel, f"kill -KILL {pid}")


def test_stop_cont_output_identical(kernel: Any, tiny_gpt2: Path) -> None:
    pid = load(kernel, tiny_gpt2, "--name pause")
    line = f"run pause --max-tokens 120 {GREEDY} once upon a time"
    ref = ok(kernel, line)["stdout"]
    for _ in range(5):  # until the STOP lands mid-stream (it nearly always does at the first try)
        ok(kernel, f"kill -STOP {pid}")
        before = ps(kernel)[pid]["tokens"]
        bg = Background(kernel, line)
        wait_until(lambda: ps(kernel)[pid]["reqs_queued"] == 1, what="queued request")
        ok(kernel, f"kill -CONT {pid}; sleep 0.02; kill -STOP {pid}")
        row = ps(kernel)[pid]
        if row["reqs_active"] == 1 and 0 < row["tokens"] - before < 120:
            break
        ok(kernel, f"kill -CONT {pid}")
        bg.result()
    else:
        pytest.fail("could not stop the process mid-stream")
    assert row["state"] == "stopped"
    time.sleep(0.2)
    assert ps(kernel)[pid]["tokens"] == row["tokens"]  # nothing runs while stopped
    assert "already stopped" in fails(kernel, f"kill -STOP {pid}")
    ok(kernel, f"kill -CONT {pid}")
    out = bg.result()
    assert out["reply"]["status"] == "ok"
    assert out["stdout"] == ref
    ok(kernel, f"kill -KILL {pid}")


def test_kill_mid_stream(kernel: Any, tiny_gpt2: Path) -> None:
    pid = load(kernel, tiny_gpt2, "--name victim")
    ok(kernel, f"kill -STOP {pid}")
    bg = Background(kernel, f"run victim --max-tokens 200 {GREEDY} tell me a story")
    wait_until(lambda: ps(kernel)[pid]["reqs_queued"] == 1, what="queued request")
    ok(kernel, f"kill -CONT {pid}; sleep 0.02; kill -STOP {pid}")
    ok(kernel, f"kill -KILL {pid}")
    out = bg.result()
    assert out["reply"]["status"] == "error"
    assert out["reply"]["ename"] == "Killed" and "killed" in out["reply"]["evalue"]
    assert pid not in ps(kernel)
    row = ps(kernel, "-a")[pid]
    assert row["exit"] == "kill" and row["res_bytes"] == 0


def test_term_escalates_to_kill_after_grace(kernel: Any, tiny_gpt2: Path) -> None:
    pid = load(kernel, tiny_gpt2, "--name slow")
    ok(kernel, f"kill -STOP {pid}")
    bg = Background(kernel, f"run slow --max-tokens 200 {GREEDY} a long answer")
    wait_until(lambda: ps(kernel)[pid]["reqs_queued"] == 1, what="queued request")
    r = ok(kernel, f"kill -TERM --grace 0 --wait {pid}")  # TERM continues it; no grace: escalates to KILL
    assert r["data"][0]["exit"] == "kill-after-term"
    out = bg.result()
    assert out["reply"]["status"] == "error" and "killed" in out["reply"]["evalue"]
    assert "killed after TERM grace" in ps(kernel, "-a")[pid]["reason"]


def test_term_refuses_new_requests_and_finishes_accepted(kernel: Any, tiny_gpt2: Path) -> None:
    pid = load(kernel, tiny_gpt2, "--name polite")
    ok(kernel, f"kill -STOP {pid}")
    bg = Background(kernel, f"run polite --max-tokens 30 {GREEDY} hi")
    wait_until(lambda: ps(kernel)[pid]["reqs_queued"] == 1, what="queued request")
    ok(kernel, f"kill -TERM {pid}")  # continues the stopped process; finishes the accepted request
    out = bg.result()
    assert out["reply"]["status"] == "ok" and out["stdout"].strip()
    wait_until(lambda: pid not in ps(kernel), what="exit after TERM")
    assert ps(kernel, "-a")[pid]["exit"] == "term"


@pytest.mark.parametrize("case", ["missing", "not-a-model", "unsupported-arch", "corrupt-weights"])
def test_bad_load(kernel: Any, tiny_gpt2: Path, tmp_path: Path, case: str) -> None:
    import shutil

    folder = tmp_path / case
    if case == "not-a-model":
        folder.mkdir()
        (folder / "notes.txt").write_text("not a model")
    elif case == "unsupported-arch":
        shutil.copytree(tiny_gpt2, folder)
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(model_type="bert", architectures=["BertModel"])
        (folder / "config.json").write_text(json.dumps(cfg))
    elif case == "corrupt-weights":
        shutil.copytree(tiny_gpt2, folder)
        weights = folder / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    line = fails(kernel, f"load {folder} --name bad-{case}")
    assert line.startswith("llmsh: load: ")
    rows = [r for r in ps(kernel).values() if r["name"] == f"bad-{case}"]
    assert len(rows) == 1 and rows[0]["state"] == "failed" and rows[0]["reason"]
    assert rows[0]["res_bytes"] == 0  # no memory held
    assert rows[0]["reason"] in line
    assert not [r for r in ps(kernel).values() if r["name"] == f"bad-{case}"]  # reaped by the ps that showed it


def test_bad_input_one_line_each(kernel: Any, tiny_gpt2: Path) -> None:
    pid = load(kernel, tiny_gpt2, "--name strict")
    assert "no process with PID 999" in fails(kernel, "run 999 hi")
    assert "no process named 'nosuch'" in fails(kernel, "kill -STOP nosuch")
    assert ok(kernel, f"kill -CONT {pid}")["status"] == "ok"  # CONT to a process that is not stopped: a no-op, as in POSIX
    assert ps(kernel)[pid]["state"] == "ready"
    assert "out of range" in fails(kernel, f"renice 25 {pid}")
    assert "out of range" in fails(kernel, f"renice -21 {pid}")
    assert "out of range" in fails(kernel, f"load {tiny_gpt2} --nice 40")
    assert "temperature must be >= 0" in fails(kernel, f"run {pid} --temperature -1 hi")
    assert "top_p" in fails(kernel, f"run {pid} --top-p 2 hi")
    assert "max_tokens" in fails(kernel, f"run {pid} --max-tokens 0 hi")
    assert "no prompt" in fails(kernel, f"run {pid}")
    assert "exceeds the context" in fails(kernel, f"run {pid} --max-tokens 1000 hi")
    assert "unknown signal" in fails(kernel, f"kill -s HUP {pid}")
    assert "already used" in fails(kernel, f"load {tiny_gpt2} --name strict")
    assert ps(kernel)[pid]["state"] == "ready"
    ok(kernel, f"kill -KILL {pid}")


def test_model_without_tokenizer_json_says_so_on_run(kernel: Any, tiny_gpt2: Path, tmp_path: Path) -> None:
    folder = tmp_path / "notok"
    shutil.copytree(tiny_gpt2, folder)
    (folder / "tokenizer.json").unlink()
    pid = load(kernel, folder)
    for line in (f"run {pid} hi", f"chat {pid} hi"):
        assert f"process {pid} (notok) has no tokenizer.json in {folder}" in fails(kernel, line)
    assert ps(kernel)[pid]["state"] == "ready"
    ok(kernel, f"kill -KILL {pid}")


def test_failing_step_fails_that_process_only(kernel: Any, make_tiny_model: Callable[..., Path], tiny_gpt2: Path) -> None:
    # a checkpoint whose tokenizer knows more ids than the model's embedding: loads fine, raises in the forward
    broken = make_tiny_model("gpt2", vocab_size=300)
    bad = load(kernel, broken, "--name broken")
    good = load(kernel, tiny_gpt2, "--name healthy")
    ok(kernel, f"kill -STOP {good}")
    bg = Background(kernel, f"run healthy --max-tokens 20 {GREEDY} the quick brown fox")
    wait_until(lambda: ps(kernel)[good]["reqs_queued"] == 1, what="queued request")
    line = fails(kernel, "run broken --max-tokens 5 The quick brown fox jumps over the lazy dog")
    assert "failed" in line and "step failed" in line
    ok(kernel, f"kill -CONT {good}")
    assert bg.result()["reply"]["status"] == "ok"
    rows = ps(kernel)
    assert rows[bad]["state"] == "failed" and rows[bad]["res_bytes"] == 0
    assert rows[good]["state"] == "ready"
    assert ok(kernel, f"run healthy --max-tokens 5 {GREEDY} hi")["stdout"].strip()
    assert bad not in ps(kernel)  # the failed entry was reaped by the ps that showed it
    ok(kernel, f"kill -KILL {good}")


def test_nice_renice_pipe_and_chat(kernel: Any, tiny_gpt2: Path, tiny_llama: Path) -> None:
    a = int(ok(kernel, f"nice -n 5 load {tiny_gpt2} --name writer")["data"]["pid"])
    b = load(kernel, tiny_llama, "--name talker")
    assert ps(kernel)[a]["nice"] == 5
    assert "old priority 5, new priority -3" in ok(kernel, f"renice -3 {a}")["results"][-1]["text/plain"]
    assert ps(kernel)[a]["nice"] == -3
    before = ps(kernel)[b]["tokens"]
    r = ok(kernel, f"run writer --max-tokens 8 {GREEDY} a question | run talker --max-tokens 6 {GREEDY}")
    assert r["stdout"].strip() and ps(kernel)[b]["tokens"] == before + 6
    first = ok(kernel, f"chat talker --max-tokens 5 {GREEDY} hello there")["stdout"]
    ok(kernel, f"chat talker --max-tokens 5 {GREEDY} and again")
    convo = ok(kernel, "chat talker --show --json")["data"]
    assert [m["role"] for m in convo] == ["user", "assistant", "user", "assistant"]
    assert convo[0]["content"] == "hello there" and convo[1]["content"] == first.strip()
    assert "chat template" in fails(kernel, "chat writer hello")  # GPT-2 has none
    ok(kernel, f"kill -KILL --wait {a} {b}")
    b2 = load(kernel, tiny_llama, "--name talker")
    assert ok(kernel, "chat talker --show --json")["data"] == []  # the exited process's conversation is gone
    ok(kernel, f"kill -KILL {b2}")


def test_threads_and_models(kernel: Any, tiny_gpt2: Path, isolated_home: Path) -> None:
    import shutil

    pid = load(kernel, tiny_gpt2, "--name threads")
    ok(kernel, f"run threads --max-tokens 150 {GREEDY} hi")  # enough steps for the thread to show CPU time
    rows = ok(kernel, "threads")["data"]
    pools = {r["pool"] for r in rows}
    assert {"io-loop", "loader", "engine"} <= pools
    engine = next(r for r in rows if r["pool"] == "engine")
    assert engine["name"] == "llmsh-engine-cpu" and engine["cpu_s"] > 0
    # models: a configured model dir and the HF hub cache; load by name
    cfg = isolated_home / "config" / "llmsh" / "config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(f"model_dirs = [{json.dumps(str(tiny_gpt2.parent))}]\n")
    snap = isolated_home / "hf" / "hub" / "models--acme--tiny-chat" / "snapshots" / "abc123"
    shutil.copytree(tiny_gpt2, snap, dirs_exist_ok=True)
    found = {m["name"]: m for m in ok(kernel, "models")["data"]}
    assert found[tiny_gpt2.name]["path"] == str(tiny_gpt2) and found[tiny_gpt2.name]["arch"] == "gpt2"
    assert found["acme/tiny-chat"]["source"] == "hf-cache"
    byname = int(ok(kernel, "load acme/tiny-chat")["data"]["pid"])
    assert ps(kernel)[byname]["name"] == "tiny-chat"
    ok(kernel, f"kill -KILL {pid} {byname}")


def test_interrupted_or_vanished_client_drops_its_request(kernel: Any, tiny_gpt2: Path) -> None:
    pid = load(kernel, tiny_gpt2, "--name drop")
    ok(kernel, f"kill -STOP {pid}")
    # Ctrl-C: the client interrupts its own foreground `run`
    bg = Background(kernel, f"run drop --max-tokens 50 {GREEDY} hi")
    wait_until(lambda: ps(kernel)[pid]["reqs_queued"] == 1, what="queued request")
    bg.kc.control_channel.send(bg.kc.session.msg("interrupt_request", {}))
    out = bg.result()
    assert out["reply"]["status"] == "error" and out["reply"]["ename"] == "KeyboardInterrupt"
    wait_until(lambda: ps(kernel)[pid]["reqs_queued"] == 0, what="request dropped after interrupt")
    # a client that goes away mid-request: its request leaves the queue too
    kc = kernel.client()
    kc.execute(f"run drop --max-tokens 50 {GREEDY} hi")
    wait_until(lambda: ps(kernel)[pid]["reqs_queued"] == 1, what="queued request")
    kc.stop_channels()
    wait_until(lambda: ps(kernel)[pid]["reqs_queued"] == 0, what="request dropped after disconnect")
    ok(kernel, f"kill -CONT {pid}")
    assert ps(kernel)[pid]["tokens"] == 0  # neither request ever ran
    ok(kernel, f"kill -KILL {pid}")


def test_load_as_job_and_wait(kernel: Any, tiny_gpt2: Path) -> None:
    r = ok(kernel, f"load {tiny_gpt2} --name bgjob &")
    assert "[1]" in r["stderr"] or r["stderr"].startswith("[")
    ok(kernel, "wait")
    row = next(r for r in ps(kernel).values() if r["name"] == "bgjob")
    assert row["state"] == "ready"
    ok(kernel, f"kill -STOP {row['pid']}")
    bg = Background(kernel, f"run bgjob --max-tokens 10 {GREEDY} hi")
    wait_until(lambda: ps(kernel)[row["pid"]]["reqs_queued"] == 1, what="queued request")
    waiter = Background(kernel, f"wait {row['pid']}")  # waits until the process has nothing in flight
    time.sleep(0.2)
    assert waiter.thread.is_alive()
    ok(kernel, f"kill -CONT {row['pid']}")
    assert waiter.result()["reply"]["status"] == "ok" and bg.result()["reply"]["status"] == "ok"
    ok(kernel, f"kill -KILL {row['pid']}")
    assert fails(kernel, f"wait {row['pid']}").endswith("exit status 137")


def test_completion_and_help(kernel: Any, tiny_gpt2: Path) -> None:
    pid = load(kernel, tiny_gpt2, "--name compl")
    kc = kernel.client()
    try:
        for line, expected in (("kill -STOP ", str(pid)), ("run co", "compl"), ("renice 3 ", "compl")):
            msg_id = kc.complete(line, len(line))
            reply = kc.get_shell_msg(timeout=10)
            assert reply["parent_header"]["msg_id"] == msg_id
            assert expected in reply["content"]["matches"], (line, reply["content"])
        folder = str(tiny_gpt2.parent) + "/"
        msg_id = kc.complete(f"load {folder}", len(f"load {folder}"))
        assert f"{folder}{tiny_gpt2.name}/" in kc.get_shell_msg(timeout=10)["content"]["matches"]
    finally:
        kc.stop_channels()
    for name in ("load", "ps", "run", "chat", "kill", "nice", "renice", "threads", "models"):
        text = ok(kernel, f"help {name}")["results"][-1]["text/plain"]
        assert text.startswith(f"usage: {name}"), text
    ok(kernel, f"kill -KILL {pid}")


def test_kill_gives_the_memory_back(kernel: Any, make_tiny_model: Callable[..., Path]) -> None:
    import psutil

    folder = make_tiny_model("gpt2", n_embd=512, n_layer=4, n_head=8)  # ~50 MB of float32 weights
    warm = load(kernel, folder, "--name warm")  # torch and its allocator caches come in once, they stay
    kproc = psutil.Process(kernel.kernel_info()["engine_pid"])  # the models live in the engine process
    ok(kernel, f"run warm --max-tokens 4 {GREEDY} hi; kill -KILL --wait {warm}")
    before = kproc.memory_info().rss
    pid = load(kernel, folder, "--name big")
    ok(kernel, f"run big --max-tokens 4 {GREEDY} hi")
    loaded = kproc.memory_info().rss
    res = ps(kernel)[pid]["res_bytes"]
    assert loaded - before > 0.5 * res > 20e6
    ok(kernel, f"kill -KILL --wait {pid}")
    after = kproc.memory_info().rss
    assert after - before < 0.25 * (loaded - before), (before, loaded, after)
