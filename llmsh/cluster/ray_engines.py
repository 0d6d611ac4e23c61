"""The front's side of Ray: join the cluster, one engine actor per Ray node, and an encrypted link to each.

`llmsh kernel start --ray auto|ADDRESS` makes the front a Ray driver (`ray.init(address=…)`). `RayCluster` reads
Ray's node table and gives every alive node a `RayEngineLink` (a node joining later is found at the next `load` or
`nodes`). Each link binds its own ROUTER on the front's node IP as a CurveZMQ server, with a ZAP handler that admits
exactly the client key issued to that node's engine; the actor (`llmsh.cluster.ray_actor.EngineActor`, pinned with
`NodeAffinitySchedulingStrategy`, `max_restarts=-1`, holding the node's GPUs) gets the front's public key and its key pair, connects and says
hello. So the front ↔ engine frames are encrypted and authenticated across machines, never plaintext; the keys
themselves ride Ray's control channel (turn on Ray's TLS if that network is not yours).

A node's llmsh name is its custom Ray resource (`ray start --resources '{"gpu-box": 1}'` → `gpu-box`), else its IP
(with a short node id when several share one). Its CPU budget is its Ray `memory` resource unless `--mem-budget`
sets one.

Liveness: the link's socket monitor sees the engine's connection close (confirmed by a send, which fails at once for
a peer that is gone), and a silent engine (no heartbeat for `LOST_AFTER_S`) counts as gone too; then the node is
`lost` (the front fails its requests and marks its processes lost). A new hello (Ray restarted the actor) or a
heartbeat from the same engine brings it back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from llmsh.cluster import ClusterError
from llmsh.kernel.engines import EngineDied, EngineLink, glibc_tunables
from llmsh.kernel.errors import KernelError
from llmsh.kernel.nodes import Nodes

log = logging.getLogger("llmsh.cluster.ray")
HELLO_TIMEOUT_S = 120.0  # a new Ray worker starts Python, imports Ray and llmsh; a busy machine takes its time
LOST_AFTER_S = 15.0  # no message from an engine for this long: its node is lost (heartbeats come every 2 s)
CONFIRM_S = 3.0  # after a disconnect, how long a request may take to show the engine is still there (a gone peer
# fails at once). A disconnect within LOST_AFTER_S of a new engine's hello is left to the heartbeats: it may be its
# predecessor's (Ray restarted it), seen after the new one already said hello
HEARTBEAT_S = 2.0
_RAY_BUILTIN = ("CPU", "GPU", "memory", "object_store_memory", "TPU", "NPU", "HPU")


def import_ray() -> Any:
    """Ray, or one line naming the extra."""
    try:
        import ray
    except ImportError:
        raise ClusterError("--ray needs Ray: pip install 'llmsh[ray]'") from None
    return ray


def node_names(nodes: list[dict[str, Any]]) -> dict[str, str]:
    """Ray node id → llmsh node name (see the module docstring), for the nodes of `ray.nodes()`."""
    ips: dict[str, int] = {}
    for n in nodes:
        ips[n["NodeManagerAddress"]] = ips.get(n["NodeManagerAddress"], 0) + 1
    out = {}
    for n in nodes:
        custom = sorted(k for k in n.get("Resources", {}) if k not in _RAY_BUILTIN and not k.startswith(("node:", "accelerator_type:")))
        ip = n["NodeManagerAddress"]
        out[n["NodeID"]] = custom[0] if custom else (ip if ips[ip] == 1 else f"{ip}-{n['NodeID'][:6]}")
    return out


def with_cpu_budget(spec: str | None, nbytes: int) -> str | None:
    """`--mem-budget` with a cpu budget of `nbytes` added when it has none (None: keep the engine's default)."""
    parts = [p.strip() for p in (spec or "").split(",") if p.strip()]
    if any("=" not in p or p.partition("=")[0].strip().lower() == "cpu" for p in parts) or nbytes <= 0:
        return spec
    return ",".join([*parts, f"cpu={nbytes}"])


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A HOST:PORT address must answer TCP before Ray is asked (Ray itself retries an unreachable head for minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto", or a scheme Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ClusterError(f"--ray {address}: cannot reach a Ray head there ({e.strerror or e}); check the address "
                           "('ray status' on the head prints it)") from None


class _Keys:
    """ZAP credentials: node name (the socket's ZAP domain) → the one client key admitted there."""

    def __init__(self) -> None:
        self.admitted: dict[str, bytes] = {}

    def callback(self, domain: str, key: bytes) -> bool:
        return self.admitted.get(domain) == key


class RayCluster:
    """The Ray side of `Nodes`: the driver connection, the keys, the node table and the actors."""

    def __init__(self, address: str, *, mem_budget: str | None = None) -> None:
        ray = import_ray()
        check_reachable(address)
        try:
            ray.init(address=address, namespace="llmsh", log_to_driver=False, ignore_reinit_error=True)
        except (ConnectionError, RuntimeError, ValueError) as e:
            hint = "start one with 'ray start --head'" if address == "auto" else "check the address ('ray status')"
            raise ClusterError(f"--ray {address}: cannot join the Ray cluster ({str(e).splitlines()[0]}); {hint}") from None
        self.ray = ray
        self.address = address
        self.mem_budget = mem_budget
        self.bind_ip = ray.util.get_node_ip_address()
        self.ctx = zmq.asyncio.Context()
        self.server_public, self.server_secret = zmq.curve_keypair()
        self.keys = _Keys()
        from zmq.auth.asyncio import AsyncioAuthenticator

        self.auth = AsyncioAuthenticator(self.ctx)
        self.auth.start()
        self.alive: dict[str, bool] = {}  # node name → alive in Ray's node table (as of the last look)
        self.node_ids: dict[str, str] = {}
        log.info("joined the Ray cluster at %s (this node %s)", address, self.bind_ip)

    # ---- node table -----------------------------------------------------------------------------------------------
    def discover(self, nodes: Nodes) -> None:
        """Read Ray's node table now (blocking; at start) and add a link for each new alive node."""
        self._apply(nodes, self.ray.nodes())

    async def refresh(self, nodes: Nodes) -> None:
        """Read Ray's node table off the loop and add links for nodes that joined."""
        self._apply(nodes, await asyncio.to_thread(self.ray.nodes))

    def _apply(self, nodes: Nodes, table: list[dict[str, Any]]) -> None:
        names = node_names(table)
        self.alive = {}
        for n in table:
            name = names[n["NodeID"]]
            self.alive[name] = self.alive.get(name, False) or bool(n.get("Alive"))
            if not n.get("Alive"):
                continue
            link = nodes.links.get(name)
            if isinstance(link, RayEngineLink) and link.node_id != n["NodeID"] and link.lost:
                link.move_to(n["NodeID"])  # the same name came back as a new Ray node: start its engine there
            elif link is None:
                res = n.get("Resources", {})
                link = RayEngineLink(self, name, n["NodeID"], n["NodeManagerAddress"],
                                     with_cpu_budget(self.mem_budget, int(res.get("memory", 0))), int(res.get("CPU", 0)),
                                     int(res.get("GPU", 0)))
                nodes.add(link)
        if not nodes.links:
            raise ClusterError(f"--ray {self.address}: the Ray cluster has no alive node")

    def node_alive(self, name: str) -> bool | None:
        return self.alive.get(name)

    def spawn(self, link: RayEngineLink) -> Any:
        """The engine actor of `link`'s node (pinned there; Ray restarts it if it dies)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from llmsh.cluster.ray_actor import EngineActor

        public, secret = zmq.curve_keypair()
        self.keys.admitted[link.node] = public
        root = str(Path(__file__).resolve().parents[2])  # this llmsh, where the workers can import it from
        path = os.pathsep.join([root, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])
        curve = {"serverkey": self.server_public.decode(), "publickey": public.decode(), "secretkey": secret.decode()}
        return EngineActor.options(  # type: ignore[attr-defined]
            scheduling_strategy=NodeAffinitySchedulingStrategy(link.node_id, soft=False),
            num_gpus=link.gpus,  # the node's GPUs are the engine's (an actor without GPUs gets CUDA_VISIBLE_DEVICES="")
            runtime_env={"env_vars": {"PYTHONPATH": path, "GLIBC_TUNABLES": glibc_tunables()}},
        ).remote(link.url, link.node, link.budget, curve, HEARTBEAT_S, link.cpus)

    def kill(self, actor: Any) -> None:
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception as e:  # already gone with its node
            log.info("killing an engine actor: %s", e)

    async def close(self) -> None:
        """Stop the authenticator, the shared context, and leave the cluster (actors we own end with us)."""
        self.auth.stop()
        self.ctx.term()
        await asyncio.to_thread(self.ray.shutdown)


class RayEngineLink(EngineLink):
    """The link to the engine actor of one Ray node (see the module docstring)."""

    remote = True

    def __init__(self, cluster: RayCluster, node: str, node_id: str, address: str, budget: str | None,
                 cpus: int, gpus: int = 0) -> None:
        super().__init__(node, Path(os.devnull), Path(os.devnull), mem_budget=budget, ctx=cluster.ctx)
        self.cluster = cluster
        self.node_id = node_id
        self.address = address
        self.budget = budget
        self.cpus, self.gpus = cpus, gpus
        self.url = ""
        self.actor: Any = None
        self.lost_line = ""
        self._fd = -1
        self._since = 0.0  # time.monotonic() of the current engine's hello
        self._seen = asyncio.Event()
        self._monitor: zmq.asyncio.Socket | None = None

    @property
    def running(self) -> bool:
        return self._sock is not None and self._hello is not None and self._hello.done() \
            and not self._hello.cancelled() and not self.lost

    async def ensure_started(self) -> None:
        """Fail at once while the node is lost; else start its actor (once) and wait for its hello."""
        if self.lost:
            raise EngineDied(self.lost_line or f"node {self.node} lost: {self.lost}")
        await super().ensure_started()

    def _bind(self) -> zmq.asyncio.Socket:
        """A ROUTER on the front's node IP: CurveZMQ server, ZAP domain = the node's name."""
        sock = self._ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a gone engine raises at once
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted engine (same routing id) takes the connection over
        sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)  # a machine that vanished without closing TCP is disconnected
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10000)
        sock.curve_server = True
        sock.curve_secretkey = self.cluster.server_secret
        sock.zap_domain = self.node.encode()
        self.cluster.auth.configure_curve_callback(domain=self.node, credentials_provider=self.cluster.keys)
        port = sock.bind_to_random_port(f"tcp://{self.cluster.bind_ip}")
        self.url = f"tcp://{self.cluster.bind_ip}:{port}"
        self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._spawn_task(self._watch_disconnects(), f"watch node {self.node}")
        self._spawn_task(self._watch_heartbeats(), f"heartbeats of node {self.node}")
        return sock

    async def _launch(self) -> None:
        """Create the node's actor (once: Ray restarts it) and wait for its engine's hello."""
        assert self._hello is not None
        if self.actor is None:
            self.actor = self.cluster.spawn(self)
        try:
            msg = await asyncio.wait_for(asyncio.shield(self._hello), HELLO_TIMEOUT_S)
        except TimeoutError:
            self._hello = None
            raise EngineDied(f"the engine on node {self.node} did not say hello within {HELLO_TIMEOUT_S:g} s; see "
                             "Ray's worker logs (/tmp/ray/session_latest/logs on that node)") from None
        self.engine_pid = int(msg["pid"])
        self.generation += 1
        log.info("engine on node %s started: pid %s", self.node, self.engine_pid)

    def move_to(self, node_id: str) -> None:
        """The node rejoined as a new Ray node: a new actor there (its hello brings the node back)."""
        if self.actor is not None:
            self.cluster.kill(self.actor)
        self.node_id, self.actor = node_id, None
        self.actor = self.cluster.spawn(self)

    async def _recv(self) -> tuple[list[bytes], int]:
        assert self._sock is not None
        frames = await self._sock.recv_multipart(copy=False)
        self._seen.set()
        try:
            fd = int(frames[0].get(zmq.SRCFD))
        except zmq.ZMQError:
            fd = -1
        return [f.bytes for f in frames], fd

    def on_hello(self, msg: dict[str, Any], fd: int) -> None:
        if self._hello is not None and not self._hello.done():
            self._fd, self._since = fd, time.monotonic()
            self._hello.set_result(msg)
            return
        if int(msg["pid"]) != self.engine_pid or self.lost:  # Ray restarted the actor: a new engine
            self._spawn_task(self._restarted(msg, fd), f"node {self.node} restarted")

    def on_heartbeat(self, msg: dict[str, Any], fd: int) -> None:
        super().on_heartbeat(msg, fd)
        if self.lost and self._hello is not None and self._hello.done() and int(msg["pid"]) == self.engine_pid:
            self._back(int(msg["pid"]), fd)  # the same engine reachable again (a network blip, a stall)

    async def _restarted(self, msg: dict[str, Any], fd: int) -> None:
        if not self.lost:
            await self.lose(f"its engine restarted (pid {self.engine_pid} -> {msg['pid']})")
        self._back(int(msg["pid"]), fd)

    def _back(self, pid: int, fd: int) -> None:
        self.lost = self.lost_line = ""
        self.engine_pid, self._fd, self._since = pid, fd, time.monotonic()
        self.generation += 1
        if self._hello is None or self._hello.done():
            self._hello = asyncio.get_running_loop().create_future()
        self._hello.set_result({"pid": pid})
        log.info("node %s is back: engine pid %s", self.node, pid)
        if self.on_back is not None:
            self._spawn_task(self.on_back(), f"node {self.node} back")

    async def lose(self, cause: str) -> None:
        """The node is gone: fail its requests in flight with one line, and tell the front (once)."""
        if self.lost or self.closing:
            return
        self.lost = cause
        self.lost_line = f"node {self.node} lost: {cause}"
        log.error("node %s lost: %s", self.node, cause)
        self.lost_line = await self.on_exit(cause)
        self.fail_inflight(self.lost_line)

    async def _watch_disconnects(self) -> None:
        """The engine's connection closed: confirm with a request (a gone peer fails at once), then lose the node."""
        assert self._monitor is not None
        while True:
            try:
                event = parse_monitor_message(await self._monitor.recv_multipart())
            except zmq.ZMQError:
                return
            if event["event"] != zmq.EVENT_DISCONNECTED or int(event["value"]) != self._fd or not self.running:
                continue
            if time.monotonic() - self._since < LOST_AFTER_S:
                continue  # a new engine: this may be its predecessor's socket number; its heartbeats will tell
            try:
                await asyncio.wait_for(self.request("stats"), CONFIRM_S)
            except (KernelError, TimeoutError):
                await self.lose("its engine disconnected" + self._ray_says())

    async def _watch_heartbeats(self) -> None:
        """No message at all for LOST_AFTER_S while up: the node is lost."""
        while True:
            self._seen.clear()
            try:
                await asyncio.wait_for(self._seen.wait(), LOST_AFTER_S)
            except TimeoutError:
                if self.running:
                    await self.lose(f"no heartbeat for {LOST_AFTER_S:g} s" + self._ray_says())

    def _ray_says(self) -> str:
        """What Ray's node table said at the last look, when it says the node is dead."""
        return " (Ray: node dead)" if self.cluster.alive.get(self.node) is False else ""

    async def close(self) -> None:
        """Ask the engine to stop, kill the actor (no restart), close the socket."""
        if self.running:
            try:
                await asyncio.wait_for(self.request("shutdown"), 5)
            except (TimeoutError, KernelError, zmq.ZMQError):
                pass
        self.closing = True
        if self.actor is not None:
            self.cluster.kill(self.actor)
        for t in list(self._tasks):
            t.cancel()
        if self._monitor is not None:
            self._monitor.close(linger=0)
        if self._sock is not None:
            self._sock.close(linger=0)


def connect(address: str, *, mem_budget: str | None) -> Nodes:
    """`--ray ADDRESS`: join the cluster and return the front's `Nodes` with a link per alive Ray node (their
    engines start in the background: `Nodes.start_all`)."""
    t0 = time.monotonic()
    cluster = RayCluster(address, mem_budget=mem_budget)
    nodes = Nodes(discovery=cluster)
    cluster.discover(nodes)
    log.info("Ray cluster %s: nodes %s (joined in %.1f s)", address, ", ".join(nodes.names), time.monotonic() - t0)
    return nodes
