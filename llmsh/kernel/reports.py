"""What the front asks its engines for reports: live numbers (`ps`), memory (`mem`, `mlock`…), tokenizer questions
(`map --split`, `reduce`) and threads, over every node.

A mixin of `llmsh.kernel.front.Processes`: a question about one process goes to its node's engine; a question about
everything goes to every engine that runs, all at once (so `ps` with two nodes costs about one round trip), and the
answers are merged. With one node the answers are exactly that engine's.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from llmsh.kernel.engines import EngineLink, EngineRequestError
from llmsh.kernel.errors import KernelError

if TYPE_CHECKING:
    from llmsh.kernel.journal import Journal
    from llmsh.kernel.nodes import Nodes
    from llmsh.kernel.table import Entry, ProcessTable


class StateError(KernelError):
    ename = "StateError"


async def _ask_all(links: list[EngineLink], what: str) -> list[tuple[EngineLink, Any]]:
    """`what` of every link at once; a link that fails is left out (it is reported as down elsewhere)."""
    answers = await asyncio.gather(*(link.request(what) for link in links), return_exceptions=True)
    return [(link, a) for link, a in zip(links, answers, strict=True) if not isinstance(a, BaseException)]


def _merge_mem(answers: list[tuple[EngineLink, Any]]) -> dict[str, Any]:
    """Several pagers' `mem` snapshots as one: devices named NODE/DEVICE, process rows with their node, totals summed
    (the hit rate averaged)."""
    out: dict[str, Any] = {"devices": {}, "procs": [], "totals": {}, "kv": {}}
    rates = []
    for link, snap in answers:
        for dev, d in snap.get("devices", {}).items():
            out["devices"][f"{link.node}/{dev}"] = d
        out["procs"] += [dict(p, node=link.node) for p in snap.get("procs", [])]
        for part in ("totals", "kv"):
            for k, v in (snap.get(part) or {}).items():
                if k == "hit_rate":
                    if v is not None:
                        rates.append(float(v))
                elif isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[part][k] = out[part].get(k, 0) + v
    out["totals"]["hit_rate"] = sum(rates) / len(rates) if rates else None
    return out


class Reports:
    """Reports over the nodes (mixed into `Processes`, which provides these attributes)."""

    table: ProcessTable
    journal: Journal | None
    nodes: Nodes
    _events: asyncio.Queue[dict[str, Any]]

    def link(self, entry: Entry) -> EngineLink:
        raise NotImplementedError

    async def ensure_loaded(self, entry: Entry) -> None:
        raise NotImplementedError

    def _running(self) -> list[EngineLink]:
        return [link for link in self.nodes if link.running]

    async def refresh(self) -> None:
        """Fresh live numbers from every running engine into the table (none running: nothing to refresh)."""
        links = self._running()
        if not links:
            return
        answers = await _ask_all(links, "stats")
        await self._events.join()  # the events each engine sent before its reply are applied first (same socket, in order)
        rows: dict[str, Any] = {}
        devices: dict[str, Any] = {}
        multi = len(self.nodes.links) > 1
        for link, data in answers:
            rows.update(data["rows"])
            for dev, st in (data["scheduler"].get("devices") or {}).items():
                devices[f"{link.node}/{dev}" if multi else dev] = st
        if answers:
            self.table.merge_live(rows, {"devices": devices} if multi else answers[0][1]["scheduler"])

    async def memory(self, what: str, entry: Entry | None = None, **fields: Any) -> Any:
        """mem, mlock, munlock, keepalive, pageout: the pager of the process's node answers (`mem`: every node's)."""
        if entry is None and what == "mem":
            answers = await _ask_all(self._running(), "mem")
            if not answers:
                return None
            return answers[0][1] if len(self.nodes.links) == 1 else _merge_mem(answers)
        if entry is not None:
            if not entry.on_engine:
                if what == "keepalive":
                    await self.table.update(entry, keep_alive=fields["seconds"])
                    return {"pid": entry.pid, "keep_alive_s": fields["seconds"]}
                if what in ("mlock",):
                    await self.ensure_loaded(entry)
                else:
                    raise StateError(f"process {entry.pid} ({entry.name}) is {entry.state.value} (not on an engine "
                                     "since a restart or a lost node)")
            fields["pid"] = entry.pid
        link = self.link(entry) if entry is not None else self.nodes.single or next(iter(self.nodes))
        try:
            data = await link.request(what, **fields)
        except EngineRequestError as e:
            raise KernelError(str(e), ename=e.ename) from None
        if entry is not None and what in ("mlock", "munlock"):
            await self.table.update(entry, locked=(what == "mlock"))
        elif entry is not None and what == "keepalive":
            await self.table.update(entry, keep_alive=fields["seconds"])
        return data

    async def tokens(self, what: str, entry: Entry, **fields: Any) -> Any:
        """Tokenizer questions for `map --split` and `reduce` ("split" or "count"), answered by the process's engine."""
        link = self.link(entry)
        await self.ensure_loaded(entry)
        await link.ensure_started()
        try:
            return await link.request(what, pid=entry.pid, **fields)
        except EngineRequestError as e:
            raise KernelError(str(e), ename=e.ename, status=e.status) from None

    async def threads(self) -> list[dict[str, Any]]:
        """Every running engine's threads, each row naming its engine (and node, with several)."""
        multi = len(self.nodes.links) > 1
        out: list[dict[str, Any]] = []
        for link, rows in await _ask_all(self._running(), "threads"):
            label = f"engine {link.engine_pid}" + (f"@{link.node}" if multi else "")
            out += [dict(r, process=label) for r in rows]
        return out
