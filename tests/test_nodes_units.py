"""The front's nodes without Ray: placement through `Nodes.choose` over nodes that answer probes, the names Ray nodes
get, budgets from Ray's `memory`, the `ray` setting, and the one line `--ray` gives without Ray installed. The same
behaviour against a real Ray cluster is in test_nodes_ray.py."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llmsh.kernel.errors import KernelError
from llmsh.kernel.nodes import Nodes
from tests.fixtures_kernel import kernel_env

GiB = 1 << 30


class FakeLink:
    """An engine link that answers `probe` like an engine with `budget`/`used` bytes and a load."""

    remote = True

    def __init__(self, node: str, budget: int, used: int, *, load: float = 0.0, readable: bool = True) -> None:
        self.node, self.budget, self.used, self.load, self.readable = node, budget, used, load, readable
        self.running, self.lost, self.address, self.engine_pid, self.last_seen = True, "", "10.0.0.1", 7, 0.0
        self.beat: dict[str, Any] = {}
        self.probes = 0

    async def request(self, what: str, **fields: Any) -> Any:
        assert what == "probe"
        self.probes += 1
        await asyncio.sleep(0)
        return {"readable": self.readable, "bytes": 2 * GiB, "why": "" if self.readable else f"no such file {fields['path']}",
                "budget": self.budget, "used": self.used, "queued": 0, "load": self.load, "nices": []}

    async def ensure_started(self) -> None:
        return None

    async def close(self) -> None:
        return None


class FakeDiscovery:
    async def refresh(self, nodes: Nodes) -> None:
        return None

    def node_alive(self, name: str) -> bool | None:
        return True

    async def close(self) -> None:
        return None


def cluster(*links: FakeLink) -> Nodes:
    return Nodes(links, FakeDiscovery())  # type: ignore[arg-type]


def test_best_fit_then_reservations_spread_loads_started_together() -> None:
    async def go() -> list[str]:
        nodes = cluster(FakeLink("a", 3 * GiB, 0), FakeLink("b", 10 * GiB, 0))
        first = await nodes.choose("/m", device="cpu", nice=0, node=None, pid=1)
        second = await nodes.choose("/m", device="cpu", nice=0, node=None, pid=2)  # a's room is reserved by the first
        nodes.release(first)
        return [first.node, second.node, first.reason]

    a, b, reason = asyncio.run(go())
    assert (a, b) == ("a", "b")
    assert reason.startswith("placed pid 1 on a: 1.0 GiB free after, load 0.00")


def test_node_overrides_and_says_why_it_cannot() -> None:
    async def go(node: str) -> str:
        nodes = cluster(FakeLink("a", 3 * GiB, 2 * GiB), FakeLink("b", 10 * GiB, 0, readable=False))
        try:
            return (await nodes.choose("/m", device="cpu", nice=0, node=node, pid=4)).reason
        except KernelError as e:
            return f"error: {e}"

    assert asyncio.run(go("nope")) == "error: no node named 'nope'; the nodes are a, b (see 'nodes')"
    assert asyncio.run(go("a")).startswith("error: node a has 1.0 GiB free, 2.0 GiB needed")
    assert asyncio.run(go("b")).startswith("error: node b cannot read the checkpoint: no such file /m")


def test_when_nothing_fits_the_roomiest_node_takes_it_paged() -> None:
    async def go() -> str:
        nodes = cluster(FakeLink("a", GiB, 0), FakeLink("b", GiB, GiB // 2))
        return (await nodes.choose("/m", device="cpu", nice=0, node=None, pid=9)).reason

    assert asyncio.run(go()).startswith("placed pid 9 on a: 1.0 GiB free of 2.0 GiB needed (the rest is paged)")


def test_one_machine_never_probes() -> None:
    link = FakeLink("here", GiB, 0)

    async def go() -> str:
        nodes = Nodes([link])  # type: ignore[list-item]
        choice = await nodes.choose("/m", device="cpu", nice=0, node=None, pid=1)
        with pytest.raises(KernelError, match="no node named 'there'; the nodes are here"):
            await nodes.choose("/m", device="cpu", nice=0, node="there", pid=2)
        return choice.node

    assert asyncio.run(go()) == "here" and link.probes == 0


def test_ray_node_names_and_budgets() -> None:
    pytest.importorskip("zmq")
    from llmsh.cluster.ray_engines import node_names, with_cpu_budget

    table = [
        {"NodeID": "aaaaaaaa11", "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 4.0, "gpu-box": 1.0, "node:10.0.0.1": 1.0}},
        {"NodeID": "bbbbbbbb22", "NodeManagerAddress": "10.0.0.2", "Resources": {"CPU": 4.0, "memory": 8e9}},
        {"NodeID": "cccccccc33", "NodeManagerAddress": "10.0.0.3", "Resources": {"accelerator_type:A100": 1.0}},
        {"NodeID": "dddddddd44", "NodeManagerAddress": "10.0.0.3", "Resources": {}},
    ]
    assert node_names(table) == {"aaaaaaaa11": "gpu-box", "bbbbbbbb22": "10.0.0.2", "cccccccc33": "10.0.0.3-cccccc",
                                 "dddddddd44": "10.0.0.3-dddddd"}
    assert with_cpu_budget(None, 1000) == "cpu=1000"
    assert with_cpu_budget("cuda:0=20GiB", 1000) == "cuda:0=20GiB,cpu=1000"
    assert with_cpu_budget("cpu=4GiB", 1000) == "cpu=4GiB"
    assert with_cpu_budget("4GiB", 1000) == "4GiB"  # a bare size is the CPU's
    assert with_cpu_budget(None, 0) is None


def test_ray_setting_in_config(isolated_home: Path) -> None:
    from llmsh.config import ConfigError, config_path, ray_address

    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.write_text('ray = "auto"\n')
        assert ray_address(None) == "auto" and ray_address("10.0.0.5:6379") == "10.0.0.5:6379"
        path.write_text("ray = 5\n")
        with pytest.raises(ConfigError, match="ray = 5; give \"auto\" or a Ray address"):
            ray_address(None)
        path.write_text("")
        assert ray_address(None) is None
    finally:
        path.unlink(missing_ok=True)


def test_the_local_path_never_imports_ray() -> None:
    code = ("import sys; import llmsh.kernel.server, llmsh.kernel.front, llmsh.kernel.nodes, llmsh.commands, "
            "llmsh.cli; print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=kernel_env(), timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_ray_option_without_ray_is_one_line(tmp_path: Path) -> None:
    fake = tmp_path / "ray"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('No module named ray')\n")  # as if the extra were missing
    env = kernel_env()
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    cf = tmp_path / "kernel-noray.json"
    out = subprocess.run([sys.executable, "-m", "llmsh", "kernel", "start", "--foreground", "--connection-file", str(cf),
                          "--telemetry-hz", "0", "--ray", "auto"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == "llmsh: kernel: --ray needs Ray: pip install 'llmsh[ray]'"
