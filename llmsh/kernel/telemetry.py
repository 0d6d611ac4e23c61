"""Kernel telemetry: node load, the process table, scheduler figures and message traffic, published on iopub.

Every `1 / kernel.args.telemetry_hz` seconds the kernel sends one `display_data` whose only MIME type is
`application/vnd.llmsh.telemetry+json` (the dashboard `llmsh top` subscribes to it; other Jupyter frontends ignore
an unknown MIME type). The payload is built by `build_payload`, a pure function over a kernel-like object, so it is
testable without sockets. Cost matters: the drivers read a few /proc files per tick and the payload is a few KiB;
each tick measures its own CPU time and reports it as `kernel.tick_ms`.

Payload schema `llmsh.telemetry/1` (all sizes in bytes, rates per second):
    schema, seq, t (time.time()), interval_s
    kernel:    pid, started_at, uptime_s, node, clients, telemetry_hz, tick_ms
    nodes:     [{name, local, drivers, cpu: {count, percent, percpu, load, mem: {total, used, available},
                 swap: {total, used}, proc: {pid, rss, threads, cpu_percent}},
                 gpus: [{index, device, name, util, mem_used, mem_total, temp_c, power_w, power_limit_w, procs: [{pid, mem}]}],
                 torch: null | {version, threads, devices: [{device, allocated, reserved}]},
                 memory: [{device, kind, total, used, free, [allocated, reserved]}]}]
    procs:     contract E rows (pid, name, path, state, nice, device, res_bytes, paged_bytes, reqs_active,
               reqs_queued, tok_s, tokens, time_s, node, reason); [] without a process table
    scheduler: `scheduler.stats()` ({"devices": {dev: {steps, last_batch, mean_batch, queue, tok_s}}}) or {}
    traffic:   in/out ({socket: {msg_type: {count, bytes}}}, cumulative), rejected ({reason: n}), clients,
               rates ([{dir, type, count, bytes, msgs_s, bytes_s}] summed over sockets),
               total ({in_msgs_s, out_msgs_s, in_bytes_s, out_bytes_s}),
               recent ([{t, dir, socket, type, bytes, client}] new since the previous tick, at most RECENT_MAX;
               telemetry's own display_data messages are counted in the rates but left out of `recent`)
    errors:    [one line per service that failed this tick]
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import deque
from typing import Any

from llmsh.drivers import Drivers

MIME = "application/vnd.llmsh.telemetry+json"
SCHEMA = "llmsh.telemetry/1"
RECENT_MAX = 50
# jupyter_client's wait_for_ready (used by `jupyter console --existing`) flushes iopub until it has been quiet for
# 0.2 s: at 5 Hz or more it never returns. Faster requests are capped here.
MAX_HZ = 4.0
_SCALARS = (str, int, float, bool, type(None))

log = logging.getLogger("llmsh.telemetry")


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """A process row with every value JSON-able (paths and enums become strings)."""
    return {str(k): (v if isinstance(v, _SCALARS) else str(v)) for k, v in row.items()}


class Traffic:
    """Turns the kernel's cumulative message counters into per-type rates between two ticks."""

    def __init__(self) -> None:
        self._prev: dict[tuple[str, str], tuple[int, int]] = {}
        self._prev_t: float | None = None
        self._last_recent_t = 0.0
        self.own: deque[float] = deque(maxlen=8)  # times of our own telemetry messages: counted, but not logged

    def build(self, counters: Any, now: float) -> dict[str, Any]:
        """The `traffic` section from `counters.snapshot()` and `counters.recent`."""
        snap = counters.snapshot() if counters is not None else {}
        sums: dict[tuple[str, str], list[int]] = {}
        for direction in ("in", "out"):
            for per_type in (snap.get(direction) or {}).values():
                for msg_type, c in per_type.items():
                    acc = sums.setdefault((direction, msg_type), [0, 0])
                    acc[0] += int(c.get("count", 0))
                    acc[1] += int(c.get("bytes", 0))
        dt = (now - self._prev_t) if self._prev_t is not None else 0.0
        rates = []
        total = {"in_msgs_s": 0.0, "out_msgs_s": 0.0, "in_bytes_s": 0.0, "out_bytes_s": 0.0}
        for (direction, msg_type), (count, nbytes) in sorted(sums.items()):
            c0, b0 = self._prev.get((direction, msg_type), (count, nbytes) if dt == 0 else (0, 0))
            msgs_s = (count - c0) / dt if dt > 0 else 0.0
            bytes_s = (nbytes - b0) / dt if dt > 0 else 0.0
            total[f"{direction}_msgs_s"] += msgs_s
            total[f"{direction}_bytes_s"] += bytes_s
            rates.append(
                {"dir": direction, "type": msg_type, "count": count, "bytes": nbytes,
                 "msgs_s": round(msgs_s, 2), "bytes_s": round(bytes_s, 1)}
            )
        self._prev = {k: (v[0], v[1]) for k, v in sums.items()}
        self._prev_t = now
        recent: list[dict[str, Any]] = []
        items = list(getattr(counters, "recent", None) or ())  # one atomic copy (the GIL) of the kernel's deque
        for m in reversed(items):
            if m.get("t", 0.0) <= self._last_recent_t or len(recent) >= RECENT_MAX:
                break
            if m.get("t") not in self.own:
                recent.append(_plain(m))
        recent.reverse()
        if items:
            self._last_recent_t = max(self._last_recent_t, items[-1].get("t", 0.0))
        return {
            "in": snap.get("in", {}),
            "out": snap.get("out", {}),
            "rejected": snap.get("rejected", {}),
            "clients": snap.get("clients", 0),
            "rates": rates,
            "total": {k: round(v, 2) for k, v in total.items()},
            "recent": recent,
        }


def extra_nodes(kernel: Any, errors: list[str]) -> list[dict[str, Any]]:
    """Node loads of other nodes, from the cluster service when there is one (Ray placement)."""
    cluster = kernel.services.cluster
    if cluster is None:
        return []
    try:
        rows = cluster.node_loads()
    except Exception as exc:  # a broken service must not stop telemetry
        errors.append(f"cluster: {type(exc).__name__}: {exc}")
        return []
    return [dict(r, local=False) for r in rows if isinstance(r, dict)]


def _table_rows(kernel: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The process rows and scheduler stats as the front's table has them (live numbers as of the last refresh)."""
    table = kernel.services.table
    if table is None:  # a kernel-like object without a process table (tools, tests)
        return [], {}
    return table.snapshot(), dict(table.scheduler_stats)


def build_payload(
    kernel: Any, node_load: dict[str, Any], traffic: Traffic, *, seq: int, now: float, interval_s: float, tick_ms: float
) -> dict[str, Any]:
    """One telemetry payload (schema `llmsh.telemetry/1`) from a kernel-like object and this node's driver sample."""
    errors: list[str] = []
    procs, sched = _table_rows(kernel)
    started = float(getattr(kernel, "started_at", now))
    return {
        "schema": SCHEMA,
        "seq": seq,
        "t": now,
        "interval_s": interval_s,
        "kernel": {
            "pid": getattr(kernel, "pid", None),
            "started_at": started,
            "uptime_s": round(now - started, 1),
            "node": node_load.get("name"),
            "clients": len(getattr(kernel, "clients", {}) or {}),
            "telemetry_hz": round(1.0 / interval_s, 3) if interval_s > 0 else 0.0,  # the rate in effect
            "tick_ms": round(tick_ms, 3),
        },
        "nodes": [node_load, *extra_nodes(kernel, errors)],
        "procs": [_plain(r) for r in procs if isinstance(r, dict)],
        "scheduler": sched if isinstance(sched, dict) else {},
        "traffic": traffic.build(getattr(kernel, "counters", None), now),
        "errors": errors,
    }


class Telemetry:
    """The kernel's telemetry service (`kernel.services.telemetry`): drivers, the latest payload, the publish loop."""

    def __init__(self, kernel: Any, hz: float) -> None:
        self.kernel = kernel
        self.hz = hz
        self.drivers = Drivers(pid=getattr(kernel, "pid", None))
        self.traffic = Traffic()
        self.seq = 0
        self.last: dict[str, Any] | None = None
        self._tick_ms = 0.0
        self.cpu_s = 0.0  # CPU seconds spent building and publishing, all ticks together

    def node_load(self) -> dict[str, Any]:
        """A fresh driver sample of this node (utilisation is averaged since the previous sample)."""
        return self.drivers.sample()

    def tick(self) -> dict[str, Any]:
        """Build one payload and publish it on iopub; returns the payload."""
        c0 = time.thread_time()
        self.seq += 1
        payload = build_payload(
            self.kernel, self.node_load(), self.traffic, seq=self.seq, now=time.time(),
            interval_s=(1.0 / self.hz) if self.hz > 0 else 0.0, tick_ms=self._tick_ms,
        )
        self.kernel.publish("display_data", {"data": {MIME: payload}, "metadata": {}, "transient": {}})
        recent = getattr(getattr(self.kernel, "counters", None), "recent", None)
        if recent and recent[-1].get("type") == "display_data":  # published synchronously on this thread
            self.traffic.own.append(recent[-1]["t"])
        self.last = payload
        spent = time.thread_time() - c0
        self.cpu_s += spent
        self._tick_ms = spent * 1000.0
        return payload

    async def run(self) -> None:
        """Publish at `hz` until cancelled (kernel shutdown)."""
        interval = 1.0 / self.hz
        loop = asyncio.get_running_loop()
        next_t = loop.time()
        while True:
            try:
                await self.kernel.services.procs.refresh()
                self.tick()
            except Exception:  # keep publishing; a bad tick is logged, not fatal
                log.exception("telemetry tick failed")
            next_t += interval
            now = loop.time()
            if next_t < now:  # fell behind (suspended laptop, busy loop): skip, don't burst
                next_t = now + interval
            await asyncio.sleep(next_t - now)

    def close(self) -> None:
        """Release the drivers."""
        self.drivers.close()


def setup(kernel: Any) -> None:
    """Attach `kernel.services.telemetry` and start publishing at `--telemetry-hz` (called once the services exist)."""
    hz = float(getattr(getattr(kernel, "args", None), "telemetry_hz", 2.0) or 0.0)
    if hz > MAX_HZ:
        log.warning("telemetry: %.1f Hz capped to %.1f Hz (Jupyter clients wait for 0.2 s of quiet on iopub)", hz, MAX_HZ)
        hz = MAX_HZ
    tel = Telemetry(kernel, hz)
    kernel.services.telemetry = tel
    if hz > 0:
        kernel.spawn(tel.run(), name="telemetry")
    kernel.on_shutdown.append(lambda _k: tel.close())


class _Probe:
    """Private drivers and traffic state for one-shot commands, so they never disturb the publish loop's deltas."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.drivers = Drivers(pid=getattr(kernel, "pid", None))
        self.traffic = Traffic()
        self.seq = 0
        self.t = 0.0

    def prime(self) -> None:
        """Start a new averaging interval for utilisation and rates."""
        self.drivers.sample()
        self.traffic.build(getattr(self.kernel, "counters", None), time.time())
        self.t = time.monotonic()


_PROBES: weakref.WeakKeyDictionary[Any, _Probe] = weakref.WeakKeyDictionary()  # one per kernel, for one-shot commands


async def snapshot(kernel: Any, settle_s: float = 0.25) -> dict[str, Any]:
    """A current payload for `nodes`/`free`/`top -n 1`: the publish loop's latest when fresh, else a new sample."""
    services = kernel.services
    await services.procs.refresh()
    tel = services.telemetry
    now = time.time()
    if tel is not None and tel.hz > 0 and tel.last is not None and now - tel.last["t"] <= 2.5 / tel.hz:
        # loads and rates from the loop's latest tick; processes and scheduler as they are right now
        errors: list[str] = []
        fresh = dict(tel.last, t=now, errors=errors)
        fresh["kernel"] = dict(tel.last["kernel"], uptime_s=round(now - fresh["kernel"]["started_at"], 1))
        procs, sched = _table_rows(kernel)
        fresh["procs"] = [_plain(r) for r in procs]
        fresh["scheduler"] = sched
        return fresh
    probe = _PROBES.get(kernel)
    if probe is None:
        probe = _PROBES[kernel] = _Probe(kernel)
    if time.monotonic() - probe.t > 5.0:  # utilisation and rates are averages: give them a fresh, short interval
        probe.prime()
        await asyncio.sleep(settle_s)
    probe.seq += 1
    probe.t = time.monotonic()
    return build_payload(kernel, probe.drivers.sample(), probe.traffic, seq=probe.seq, now=time.time(),
                         interval_s=0.0, tick_ms=0.0)
