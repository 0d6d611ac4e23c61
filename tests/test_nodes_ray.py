"""Nodes on Ray, with real Ray: a `ray.cluster_utils.Cluster` of two nodes on this machine (custom resources
node-a and node-b, one CPU each) and a real kernel started with `--ray ADDRESS`, one engine actor per node.

What a user sees: placement by free budget (each node's budget is its Ray `memory`: node-a fits one tiny model, node-b
many) and by `--node`; a pipe between processes on different nodes; STOP/CONT/KILL, renice and mlock of a process on
the other node; `ps`, `nodes` and the dashboard's data showing both nodes; Ray restarting a killed engine actor (its
processes come back); and a node removed mid-stream: its processes `lost`, its client told at once in one line, the
other node untouched, and `load` placing elsewhere. One cluster and one kernel for the module (a cluster starts in
seconds, an engine actor in a few more); the tests run in order and the last one removes a node.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_kernel import KernelHandle

ray = pytest.importorskip("ray", reason="Ray is the optional extra llmsh[ray]")
pytestmark = pytest.mark.slow

MiB = 1 << 20


@pytest.fixture(scope="module")
def model(make_tiny_model: Any) -> Path:
    """A tiny GPT-2 with a context long enough for a stream that is still running when its node goes away."""
    return make_tiny_model("gpt2", n_positions=1024)


def _weights(model: Path) -> int:
    return sum(f.stat().st_size for f in model.glob("*.safetensors"))


@pytest.fixture(scope="module")
def cluster(model: Path) -> Iterator[Any]:
    from ray.cluster_utils import Cluster

    size = _weights(model)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"node-a": 1},
                                                      "memory": int(size * 1.5)})
    node_b = c.add_node(num_cpus=1, resources={"node-b": 1}, memory=64 * MiB)
    c.wait_for_nodes()
    c.node_b = node_b
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def rk(cluster: Any, make_kernel: Any) -> KernelHandle:
    k = make_kernel("--ray", cluster.address)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # both engines up (they start in the background), each with a load sample
        out = k.execute("nodes --json")
        engines = [n for n in out["data"] if "state" in n] if out["status"] == "ok" else []
        if sorted(n["state"] for n in engines) == ["up", "up"] and all(n["cpu"].get("count") for n in engines):
            return k
        time.sleep(0.5)
    raise AssertionError(f"engines did not come up: {out}\n{k.log.read_text()[-3000:]}")


def ok(k: KernelHandle, code: str, timeout: float = 120) -> dict[str, Any]:
    out = k.execute(code, timeout=timeout)
    assert out["status"] == "ok", (code, out["error"], out["stderr"])
    return out


def ps(k: KernelHandle) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in ok(k, "ps --json")["data"]}


def test_placement_by_free_budget_and_by_node(rk: KernelHandle, model: Path) -> None:
    ok(rk, f"load {model} --name a1")  # best fit: node-a's budget holds exactly one
    ok(rk, f"load {model} --name b1")  # node-a is full now: node-b
    rows = ps(rk)
    assert (rows["a1"]["node"], rows["b1"]["node"]) == ("node-a", "node-b")
    events = ok(rk, "dmesg --json")["data"]
    placed = [e["text"] for e in events if e["text"].startswith("placed pid")]
    assert any(f"pid {rows['a1']['pid']} on node-a" in t and "free after" in t for t in placed), placed
    full = rk.execute(f"load {model} --node node-a --name x")
    assert full["status"] == "error" and "node node-a has" in full["error"]["evalue"] and "needed" in full["error"]["evalue"]
    ok(rk, f"load {model} --node node-b --name b2")
    assert ps(rk)["b2"]["node"] == "node-b"
    unknown = rk.execute(f"load {model} --node nope")
    assert unknown["status"] == "error"
    assert "no node named 'nope'; the nodes are node-a, node-b" in unknown["error"]["evalue"]
    missing = rk.execute("load /no/such/model --node node-b")
    assert missing["status"] == "error" and "node-b" in missing["error"]["evalue"]
    assert "x" not in ps(rk) and "nope" not in ps(rk)  # refused loads leave no rows


def test_cross_node_pipe(rk: KernelHandle) -> None:
    out = ok(rk, 'run a1 --max-tokens 8 "hello there" | run b1 --max-tokens 8')
    assert out["stdout"].strip()
    rows = ps(rk)
    assert rows["a1"]["tokens"] >= 8 and rows["b1"]["tokens"] >= 8


def test_signals_renice_mlock_of_a_remote_process(rk: KernelHandle) -> None:
    ok(rk, "kill -STOP b2")
    assert ps(rk)["b2"]["state"] == "stopped"
    ok(rk, "kill -CONT b2")
    assert ps(rk)["b2"]["state"] in ("ready", "running")
    ok(rk, "renice 5 b2")
    ok(rk, "mlock b2")
    rows = ps(rk)
    assert rows["b2"]["nice"] == 5 and rows["b2"]["locked"] is True
    ok(rk, "run b2 --max-tokens 4 hi")
    ok(rk, "kill -KILL b2")
    assert "b2" not in ps(rk)
    assert any(r["name"] == "b2" and r["exit"] == "kill" for r in ok(rk, "ps -a --json")["data"])


def test_ps_nodes_and_dashboard_data_show_both_nodes(rk: KernelHandle) -> None:
    from llmsh.tui.model import State

    nodes = {n["name"]: n for n in ok(rk, "nodes --json")["data"]}
    for name in ("node-a", "node-b"):
        n = nodes[name]
        assert n["state"] == "up" and n["address"] and n["engine_pid"] and n["budget_total"] > 0
        assert n["heartbeat_age_s"] is not None and n["heartbeat_age_s"] < 10 and n["cpu"].get("count")
    assert nodes["node-a"]["procs"] == 1 and nodes["node-b"]["procs"] == 1
    text = ok(rk, "nodes")["results"][-1]["text/plain"]
    assert "node-a (remote" in text and "node-b (remote" in text and "heartbeat" in text
    assert "NODE" in ok(rk, "ps")["results"][-1]["text/plain"]
    payload = ok(rk, "top -n 1 --json")["data"]  # what the dashboard draws (its telemetry payload)
    state = State()
    assert state.accept(payload)
    assert {"node-a", "node-b"} <= {n["name"] for n in state.nodes}
    assert {p["node"] for p in state.procs} == {"node-a", "node-b"}


def _engine_pid(k: KernelHandle, node: str) -> int:
    return int(next(n for n in ok(k, "nodes --json")["data"] if n["name"] == node)["engine_pid"])


def test_ray_restarts_a_killed_engine_and_its_processes_come_back(rk: KernelHandle) -> None:
    old = _engine_pid(rk, "node-b")
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        nodes = {n["name"]: n for n in ok(rk, "nodes --json")["data"]}
        if nodes["node-b"]["state"] == "up" and nodes["node-b"]["engine_pid"] != old and ps(rk)["b1"]["state"] != "lost":
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"node-b did not come back: {nodes['node-b']}")
    assert ok(rk, "run b1 --max-tokens 4 again")["stdout"].strip()
    texts = [e["text"] for e in ok(rk, "dmesg --json")["data"]]
    assert any("node node-b lost" in t for t in texts) and any("node node-b is back" in t for t in texts)


class Background:
    """A command run by its own client on a thread (the test's main client stays free), collecting its output."""

    def __init__(self, k: KernelHandle, code: str) -> None:
        self.out: dict[str, Any] = {"stdout": "", "stderr": "", "error": None}
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(k, code), daemon=True)
        self.thread.start()

    def _run(self, k: KernelHandle, code: str) -> None:
        kc = k.client()

        def hook(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "stream":
                self.out[msg["content"]["name"]] += msg["content"]["text"]
                self.started.set()
            elif msg["msg_type"] == "error":
                self.out["error"] = msg["content"]

        try:
            reply = kc.execute_interactive(code, timeout=180, output_hook=hook, allow_stdin=False)
            self.out["status"] = reply["content"]["status"]
        finally:
            kc.stop_channels()
            self.started.set()


def test_a_node_removed_mid_stream(rk: KernelHandle, cluster: Any, model: Path) -> None:
    slow = Background(rk, "run b1 --max-tokens 900 --ignore-eos 'a long story'")
    assert slow.started.wait(60)
    ok(rk, "kill -STOP b1")  # the request is in flight, tokens already streamed: mid-stream for certain
    t0 = time.monotonic()
    cluster.remove_node(cluster.node_b)
    slow.thread.join(60)
    assert not slow.thread.is_alive()
    assert slow.out["status"] == "error"
    line = slow.out["error"]["evalue"]
    assert "node node-b lost" in line and "pid" in line and "\n" not in line.strip()
    assert time.monotonic() - t0 < 30
    rows = ps(rk)
    assert rows["b1"]["state"] == "lost" and "node node-b lost" in rows["b1"]["reason"]
    assert rows["a1"]["state"] in ("ready", "running")
    assert ok(rk, "run a1 --max-tokens 6 still here")["stdout"].strip()  # the other node is untouched
    again = rk.execute("run b1 --max-tokens 4 hello")
    assert again["status"] == "error" and "is lost" in again["error"]["evalue"]
    ok(rk, f"load {model} --name c1")  # placed elsewhere: node-a, the one node up
    assert ps(rk)["c1"]["node"] == "node-a"
    nodes = {n["name"]: n for n in ok(rk, "nodes --json")["data"]}
    assert nodes["node-b"]["state"] == "lost" and nodes["node-a"]["state"] == "up"
    assert json.dumps(nodes)  # plain data for --json
    ok(rk, "kill b1")
    assert "b1" not in ps(rk)
