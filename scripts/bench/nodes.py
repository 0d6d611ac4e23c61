"""Nodes on Ray: a stream from a process on a second Ray node vs the same on the local engine, `ps` with two nodes
vs one, and the front's limits (messages per second it relays, nodes it tracks), all measured in one run.

Two kernels run side by side in a temporary home: a plain one (one local engine) and one started with
`--ray ADDRESS` against a `ray.cluster_utils.Cluster` of two nodes on this machine (node-a, node-b; as many CPUs as
the machine's cores, the local engine gets as many torch threads). Streams are measured interleaved, local then
remote, so that machine noise hits both alike.

- per-token: wall time of `run P --max-tokens T --ignore-eos` / T (goal: remote ≤ 1.10 × local)
- ps: median round trip of `ps` with a process on each of two nodes vs one node with one process (goal ≤ 1.5x)
- relay: the front's CPU seconds per streamed token message (engine → front → client) → messages/s per core
- nodes: the front's CPU per second per idle node (heartbeats) plus per `ps`/telemetry round trip → how many nodes one
  core tracks with telemetry at 2 Hz, spending at most 10 % of it
Last line: key=value. Usage: python scripts/bench/nodes.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import psutil
from benchkit import client, gpt2_checkpoint, isolate, start_kernel

SHAPE = {"n_embd": 512, "n_layer": 6, "n_head": 8, "n_positions": 1024}  # ~20M parameters: a few ms per token
QUICK = {"n_embd": 256, "n_layer": 4, "n_head": 4, "n_positions": 1024}


def execute(kc, code: str, timeout: float = 300) -> tuple[float, int, dict]:
    """(seconds, stream messages, reply content) of one command."""
    streams = 0

    def hook(msg) -> None:
        nonlocal streams
        if msg["msg_type"] == "stream":
            streams += 1

    t0 = time.perf_counter()
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=hook, allow_stdin=False)
    dt = time.perf_counter() - t0
    if reply["content"]["status"] != "ok":
        raise SystemExit(f"{code!r} failed: {reply['content'].get('evalue')}")
    return dt, streams, reply["content"]


def cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller model, fewer tokens and rounds")
    opts = ap.parse_args()
    tokens, rounds, ps_n, idle_s = (64, 3, 40, 4.0) if opts.quick else (200, 5, 150, 10.0)
    home = isolate()
    cores = len(os.sched_getaffinity(0))
    os.environ["LLMSH_TORCH_THREADS"] = str(cores)  # the local engine and the Ray nodes' engines alike
    model = gpt2_checkpoint(QUICK if opts.quick else SHAPE, "nodes-quick" if opts.quick else "nodes")

    from ray.cluster_utils import Cluster

    t0 = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cores, "resources": {"node-a": 1}})
    cluster.add_node(num_cpus=cores, resources={"node-b": 1})
    cluster.wait_for_nodes()
    cluster_s = time.perf_counter() - t0
    local_proc, local_cf = start_kernel(home, tag="local")
    ray_proc, ray_cf = start_kernel(home, "--ray", cluster.address, tag="ray")
    try:
        lk, rk = client(local_cf), client(ray_cf)
        front_local, front_ray = psutil.Process(local_proc.pid), psutil.Process(ray_proc.pid)
        execute(lk, f"load {model} --name m")
        execute(rk, f"load {model} --name m --node node-b")
        execute(rk, f"load {model} --name a --node node-a")
        run = f"run m --max-tokens {tokens} --ignore-eos --temperature 0 'Once upon a time'"
        execute(lk, run)  # warm-up: first-use paths (C kernels compiled, caches)
        execute(rk, run)
        local_t, remote_t = [], []
        relay_cpu, relay_msgs = 0.0, 0
        for _ in range(rounds):
            dt, _n, _ = execute(lk, run)
            local_t.append(dt / tokens)
            c0 = cpu(front_ray)
            dt, n, _ = execute(rk, run)
            relay_cpu += cpu(front_ray) - c0
            relay_msgs += n
            remote_t.append(dt / tokens)
        local_tok, remote_tok = statistics.median(local_t), statistics.median(remote_t)

        ps_local, ps_ray = [], []
        c_local = c_ray = 0.0
        for _ in range(ps_n):
            c0 = cpu(front_local)
            ps_local.append(execute(lk, "ps")[0])
            c_local += cpu(front_local) - c0
            c0 = cpu(front_ray)
            ps_ray.append(execute(rk, "ps")[0])
            c_ray += cpu(front_ray) - c0
        ps_ratio = statistics.median(ps_ray) / statistics.median(ps_local)
        per_node_ps_cpu = max(c_ray - c_local, 0.0) / ps_n  # one more node's stats round trip, per `ps`

        c0l, c0r = cpu(front_local), cpu(front_ray)
        time.sleep(idle_s)  # idle: the Ray front hears two nodes' heartbeats, the local one its engine's
        idle_per_node = max((cpu(front_ray) - c0r) - (cpu(front_local) - c0l), 0.0) / idle_s / 2
        relay_per_msg = relay_cpu / max(relay_msgs, 1)
        per_node_s = idle_per_node + 2.0 * max(per_node_ps_cpu, 1e-6)  # heartbeats + stats at 2 Hz telemetry
        nodes_at_10pct = int(0.10 / per_node_s) if per_node_s > 0 else 0
    finally:
        for p in (local_proc, ray_proc):
            p.terminate()
        for p in (local_proc, ray_proc):
            try:
                p.wait(20)
            except Exception:
                p.kill()
        cluster.shutdown()

    print(f"machine: {platform.node()} {platform.machine()} {cores} cpus, load {os.getloadavg()[0]:.2f}; "
          f"model {Path(model).name}; cluster of 2 Ray nodes started in {cluster_s:.1f} s")
    print(f"per token: local {local_tok * 1e3:.2f} ms, remote node {remote_tok * 1e3:.2f} ms "
          f"(ratio {remote_tok / local_tok:.3f}; goal ≤ 1.10)")
    print(f"ps round trip: one node {statistics.median(ps_local) * 1e3:.2f} ms, two nodes "
          f"{statistics.median(ps_ray) * 1e3:.2f} ms (ratio {ps_ratio:.2f}; goal ≤ 1.5)")
    print(f"front relay: {relay_per_msg * 1e6:.0f} µs CPU per streamed token message -> "
          f"{1 / relay_per_msg:.0f} messages/s per core")
    print(f"front per node: {idle_per_node * 1e3:.2f} ms CPU/s idle (heartbeats), {per_node_ps_cpu * 1e3:.3f} ms per "
          f"ps/telemetry round trip -> {nodes_at_10pct} nodes at 10 % of a core with telemetry at 2 Hz")
    print(f"token_ratio={remote_tok / local_tok:.3f} ps_ratio={ps_ratio:.2f} relay_msgs_s={1 / relay_per_msg:.0f} "
          f"nodes_10pct={nodes_at_10pct}")


if __name__ == "__main__":
    main()
