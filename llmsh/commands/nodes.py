"""Node commands: `nodes` (each node with its devices and load), `free` (memory per device), `top -n 1` (one-shot snapshot).

They read the same payload the telemetry loop publishes (`llmsh.kernel.telemetry.snapshot`), so the shell, `top -n 1`
and the dashboard always agree. `free` is a small function over a list of per-device rows so that the pager can add
budget columns (append to `FREE_COLUMNS`, put the keys in the rows) without touching the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from llmsh.commands.memory import free_columns  # the pager's BUDGET / PAGED-IN columns
from llmsh.commands.registry import CommandError, Context, arg, command
from llmsh.fmt import duration, human_bytes, proc_table, rate, table
from llmsh.kernel.telemetry import snapshot

# (row key, header) of `free`; sizes are bytes in the rows and human-readable in the text
FREE_COLUMNS: list[tuple[str, str]] = [
    ("device", "DEVICE"),
    ("kind", "KIND"),
    ("total", "TOTAL"),
    ("used", "USED"),
    ("free", "FREE"),
    ("allocated", "ALLOC"),
    ("reserved", "RESERVED"),
    ("budget", "BUDGET"),  # the pager's budget for the device (--mem-budget), when an engine runs
    ("paged_in", "PAGED-IN"),  # weights the pager holds in it
]
_TEXT_KEYS = {"device", "kind", "node"}


def free_rows(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-device memory rows of every node (host RAM, swap when there is any, each GPU), each with its `node`."""
    rows = []
    for node in payload.get("nodes", []):
        for r in node.get("memory", []):
            rows.append(dict(r, node=node.get("name")))
        swap = (node.get("cpu") or {}).get("swap") or {}
        if swap.get("total"):
            rows.append({"device": "swap", "kind": "swap", "total": swap["total"], "used": swap["used"],
                         "free": swap["total"] - swap["used"], "node": node.get("name")})
    return rows


def format_free(rows: list[dict[str, Any]], columns: list[tuple[str, str]] | None = None, raw: bool = False) -> str:
    """`free` as text; columns that no row has are left out; `raw` prints bytes."""
    columns = columns or FREE_COLUMNS
    nodes = {r.get("node") for r in rows}
    if len(nodes) > 1:
        columns = [("node", "NODE"), *columns]
    used = [(k, h) for k, h in columns if k in _TEXT_KEYS or any(r.get(k) is not None for r in rows)]

    def cell(r: dict[str, Any], k: str) -> str:
        v = r.get(k)
        if k in _TEXT_KEYS:
            return str(v or "-")
        if v is None:
            return "-"
        return str(v) if raw else human_bytes(v)

    right = [i for i, (k, _) in enumerate(used) if k not in _TEXT_KEYS]
    return table([[cell(r, k) for k, _ in used] for r in rows], [h for _, h in used], right)


def _gpu_line(g: dict[str, Any]) -> str:
    parts = [f"{g['device']:<8} {g.get('name', 'GPU')}"]
    if g.get("util") is not None:
        parts.append(f"util {g['util']}%")
    parts.append(f"mem {human_bytes(g.get('mem_used'))} / {human_bytes(g.get('mem_total'))}")
    if g.get("temp_c") is not None:
        parts.append(f"{g['temp_c']}°C")
    if g.get("power_w") is not None:
        parts.append(f"{g['power_w']:.0f}W")
    if g.get("procs"):
        parts.append("procs " + ", ".join(f"{p.get('pid')}:{human_bytes(p.get('mem'))}" for p in g["procs"]))
    return "  ".join(parts)


def node_rows(kernel: Any, payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The payload's node rows, each with its engine's side (state, engine pid, heartbeat age, budget in use,
    processes, tok/s) where it runs one; with Ray the front's own machine is marked `front` (it runs none)."""
    services = kernel.services
    nodes = services.procs.nodes
    counts: dict[str, int] = {}
    for e in services.table:
        counts[e.node] = counts.get(e.node, 0) + 1
    rows = []
    for r in payload.get("nodes", []):
        name = str(r.get("name"))
        link = nodes.links.get(name)
        if r.get("local") and link is not None and not link.remote:
            r = {**r, **nodes.engine_row(link, counts.get(name, 0))}
        elif r.get("local"):
            r = {**r, "front": True}
        else:
            r = {**r, "procs": counts.get(name, 0)}
        rows.append(r)
    return rows


def _engine_line(node: dict[str, Any]) -> str:
    """`budget 1.2M / 64M used  2 processes  15.3 tok/s  0 queued  heartbeat 0.4s ago`."""
    age = node.get("heartbeat_age_s")
    return (f"  {'engine':<8} pid {node.get('engine_pid') or '-'}  budget {human_bytes(node.get('budget_used'))} / "
            f"{human_bytes(node.get('budget_total'))} used  {node.get('procs', 0)} processes  "
            f"{rate(node.get('tok_s'))} tok/s  {node.get('queued', 0)} queued  "
            f"heartbeat {'-' if age is None else f'{age:.1f}s ago'}")


def format_nodes(payload: dict[str, Any]) -> str:
    """Each node, then one line per device with its load (and its engine's line)."""
    out = []
    kpid = (payload.get("kernel") or {}).get("pid")
    for node in payload.get("nodes", []):
        cpu = node.get("cpu") or {}
        mem = cpu.get("mem") or {}
        if node.get("front"):
            where = f"the front, kernel pid {kpid}; its engines run on the nodes below"
        elif node.get("local"):
            where = f"local, kernel pid {kpid}" + (f", {node['state']}" if node.get("state") else "")
        else:
            where = "remote" + (f" {node['address']}" if node.get("address") else "") \
                + (f", {node['state']}" if node.get("state") else "") + (f": {node['reason']}" if node.get("reason") else "")
        drivers = node.get("drivers") or []
        out.append(f"{node.get('name')} ({where}" + (f"; drivers: {', '.join(drivers)})" if drivers else ")"))
        load = " ".join(f"{x:.2f}" for x in cpu.get("load", []))
        out.append(
            f"  {'cpu':<8} {cpu.get('count', '?')} cores  {cpu.get('percent', 0):.1f}%  load {load}  "
            f"mem {human_bytes(mem.get('used'))} / {human_bytes(mem.get('total'))}"
        )
        for g in node.get("gpus", []):
            out.append("  " + _gpu_line(g))
        t = node.get("torch")
        if t:
            out.append(f"  {'torch':<8} {t.get('version')}  {t.get('threads')} threads")
        if "state" in node:
            out.append(_engine_line(node))
    return "\n".join(out)


def format_top(payload: dict[str, Any]) -> str:
    """A `top -b -n 1` style snapshot: summary lines, then the process table."""
    k = payload.get("kernel") or {}
    tr = payload.get("traffic") or {}
    tot = tr.get("total") or {}
    lines = [
        f"top - {time.strftime('%H:%M:%S', time.localtime(payload.get('t', time.time())))} "
        f"up {duration(k.get('uptime_s'))},  kernel pid {k.get('pid')},  {k.get('clients', 0)} clients"
    ]
    for node in payload.get("nodes", []):
        cpu = node.get("cpu") or {}
        mem, swap = cpu.get("mem") or {}, cpu.get("swap") or {}
        cores = " ".join(f"{p:.0f}" for p in cpu.get("percpu", []))
        load = ", ".join(f"{x:.2f}" for x in cpu.get("load", []))
        lines.append(f"{node.get('name')}: %Cpu {cpu.get('percent', 0):.1f} [{cores}]  load average: {load}")
        lines.append(
            f"  Mem {human_bytes(mem.get('total'))} total, {human_bytes(mem.get('used'))} used, "
            f"{human_bytes(mem.get('available'))} avail;  Swap {human_bytes(swap.get('total'))} total, "
            f"{human_bytes(swap.get('used'))} used"
        )
        for g in node.get("gpus", []):
            lines.append("  " + _gpu_line(g))
    procs = payload.get("procs", [])
    states: dict[str, int] = {}
    for p in procs:
        states[str(p.get("state"))] = states.get(str(p.get("state")), 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
    lines.append(f"Procs: {len(procs)} total" + (f", {summary}" if summary else ""))
    for dev, st in sorted(((payload.get("scheduler") or {}).get("devices") or {}).items()):
        lines.append(
            f"  sched {dev}: {rate(st.get('tok_s'))} tok/s, batch {st.get('last_batch', 0)} "
            f"(mean {st.get('mean_batch', 0):.1f}), queue {st.get('queue', 0)}, steps {st.get('steps', 0)}"
        )
    rejected = sum((tr.get("rejected") or {}).values())
    lines.append(
        f"Msgs: in {rate(tot.get('in_msgs_s'))}/s ({human_bytes(tot.get('in_bytes_s'))}/s), "
        f"out {rate(tot.get('out_msgs_s'))}/s ({human_bytes(tot.get('out_bytes_s'))}/s), rejected {rejected}"
    )
    lines.append("")
    lines.append(proc_table(procs))
    return "\n".join(lines)


@command(
    "nodes",
    "list the nodes with their devices and load",
    description="Each node of this kernel (one without Ray; with 'kernel start --ray', every Ray node) with its "
    "address, devices (CPU cores and load, RAM, GPUs) and its engine: state (up, lost, idle), engine pid, memory "
    "budget used, processes, tokens/s, queue and heartbeat age.",
    structured=True,
    group="nodes",
)
async def nodes_cmd(ctx: Context, args: argparse.Namespace) -> int:
    """`nodes`."""
    await ctx.kernel.services.procs.nodes.refresh()  # nodes that joined the cluster since
    payload = await snapshot(ctx.kernel)
    payload["nodes"] = node_rows(ctx.kernel, payload)
    ctx.result(payload["nodes"], format_nodes(payload) + "\n")
    return 0


@command(
    "free",
    "memory per device (host RAM, swap, GPUs)",
    arg("-b", "--bytes", action="store_true", help="print sizes in bytes"),
    description="Total, used and free memory of every device; ALLOC/RESERVED are torch's allocator figures.",
    structured=True,
    group="nodes",
)
async def free_cmd(ctx: Context, args: argparse.Namespace) -> int:
    """`free [-b]`."""
    rows = await free_columns(ctx.kernel, free_rows(await snapshot(ctx.kernel)))
    ctx.result(rows, format_free(rows, raw=args.bytes) + "\n")
    return 0


@command(
    "top",
    "one-shot snapshot of load, processes and traffic (the live view is `llmsh top`)",
    arg("-n", "--iterations", type=int, default=1, metavar="N", help="number of snapshots (default 1)"),
    arg("-d", "--delay", type=float, default=1.0, metavar="SECS", help="seconds between snapshots (default 1)"),
    arg("-b", "--batch", action="store_true", help="accepted for habit: output is always batch text"),
    description="Like `top -b -n 1`: uptime, per-core CPU, memory, GPUs, scheduler and message rates, then the "
    "process table. For the live dashboard run `llmsh top` in a terminal.",
    structured=True,
    group="nodes",
)
async def top_cmd(ctx: Context, args: argparse.Namespace) -> int:
    """`top [-n N] [-d SECS]`."""
    if args.iterations < 1:
        raise CommandError(f"-n {args.iterations}: the number of snapshots must be at least 1")
    if args.delay < 0.1 and args.iterations > 1:
        raise CommandError(f"-d {args.delay}: the delay must be at least 0.1 seconds")
    for i in range(args.iterations):
        if i:
            await asyncio.sleep(args.delay)
        payload = await snapshot(ctx.kernel)
        ctx.result(payload, format_top(payload) + "\n")
    return 0
