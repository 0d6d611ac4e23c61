"""The dashboard's meters, panels and screens, one small class each; they render from `model.State`, hold no connection.

Bars and sparklines are drawn as Rich text (cheap to re-render at 2 Hz, deterministic for snapshot tests).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.scrollbar import ScrollBarRender
from textual.widgets import Label, Static

from llmsh.fmt import duration, human_bytes, rate
from llmsh.tui.model import State, spark
from llmsh.tui.tables import MessageLog, RatesTable


def bar(frac: float, width: int, label: str = "", style: str = "green") -> Text:
    """An htop-style meter `[|||||      label]` of `width` cells (brackets included)."""
    inner = max(1, width - 2)
    frac = 0.0 if math.isnan(frac) else min(1.0, max(0.0, frac))
    fill = round(frac * inner)
    label = label[:inner]
    cells = list("|" * fill + " " * (inner - fill))
    cells[inner - len(label) :] = label
    t = Text("[", style="bold")
    t.append("".join(cells[:fill]), style=style)
    t.append("".join(cells[fill:]))
    t.append("]", style="bold")
    return t


def level_style(pct: float) -> str:
    """Green below 60 %, yellow below 85 %, red above."""
    return "green" if pct < 60 else "yellow" if pct < 85 else "red"



class WholeCellScrollBar(ScrollBarRender):
    """A scrollbar whose thumb is drawn in whole cells: Textual's eighth-cell thumb ends are the sparkline glyphs
    (▁▂▃…), which at a panel's edge read as sparkline debris."""

    VERTICAL_BARS: ClassVar[list[str]] = [" "] * 8
    HORIZONTAL_BARS: ClassVar[list[str]] = [" "] * 8

class CpuBars(Static):
    """Per-core CPU meters in as many columns as fit, at most four rows."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.percpu: list[float] = []

    def show(self, percpu: list[float]) -> None:
        """New per-core percentages."""
        self.percpu = [float(p or 0) for p in percpu]
        self.refresh(layout=True)

    @staticmethod
    def _grid(n: int, width: int) -> tuple[int, int]:
        """(rows, columns) for n meters: at most four rows when they fit, meters at least 12 cells wide."""
        cols = max(1, min(width // 12, max(math.ceil(n / 4), width // 40), n))
        rows = math.ceil(n / cols)
        return rows, math.ceil(n / rows)

    def get_content_height(self, container: Any, viewport: Any, width: int) -> int:
        return self._grid(max(1, len(self.percpu)), max(12, width))[0]

    def render(self) -> Text:
        n = len(self.percpu)
        if not n:
            return Text("cpu: no data yet", style="dim")
        width = max(12, self.size.width or 78)
        rows, cols = self._grid(n, width)
        colw = width // cols
        digits = len(str(n - 1))
        out = Text()
        for r in range(rows):
            if r:
                out.append("\n")
            for c in range(cols):
                i = c * rows + r
                if i >= n:
                    break
                p = self.percpu[i]
                out.append(f"{i:>{digits}}", style="cyan")
                out.append_text(bar(p / 100, colw - digits - 1, f"{p:.0f}%", level_style(p)))
                out.append(" ")
        return out


class MemBars(Static):
    """RAM and swap meters side by side, with the kernel process's own RSS and threads."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.cpu: dict[str, Any] = {}

    def show(self, cpu: dict[str, Any]) -> None:
        """New cpu-driver sample."""
        self.cpu = cpu
        self.refresh()

    def render(self) -> Text:
        mem, swap = self.cpu.get("mem") or {}, self.cpu.get("swap") or {}
        width = max(40, self.size.width or 78)
        half = width // 2
        out = Text()
        for name, used, total in (("Mem", mem.get("used"), mem.get("total")), ("Swp", swap.get("used"), swap.get("total"))):
            frac = (used or 0) / total if total else 0.0
            out.append(name, style="cyan")
            out.append_text(bar(frac, half - 4, f"{human_bytes(used)}/{human_bytes(total)}", level_style(100 * frac)))
            out.append(" ")
        return out


class GpuRows(Static):
    """One line per GPU: utilisation and memory meters, temperature, power, and a utilisation sparkline."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.node = ""
        self.gpus: list[dict[str, Any]] = []
        self.state: State | None = None

    def show(self, node: str, gpus: list[dict[str, Any]], state: State) -> None:
        """New GPU samples for `node`."""
        self.node, self.gpus, self.state = node, gpus, state
        self.display = bool(gpus)
        self.refresh(layout=True)

    def get_content_height(self, container: Any, viewport: Any, width: int) -> int:
        return max(1, len(self.gpus))

    def render(self) -> Text:
        width = max(60, self.size.width or 78)
        out = Text(no_wrap=True, overflow="crop")  # a narrow terminal crops the sparkline instead of wrapping it
        for k, g in enumerate(self.gpus):
            if k:
                out.append("\n")
            util = float(g.get("util") or 0)
            used, total = g.get("mem_used"), g.get("mem_total")
            frac = (used or 0) / total if total else 0.0
            tail = f" {g.get('temp_c', '-')}°C {g.get('power_w') or 0:.0f}W " if g.get("temp_c") is not None else " "
            meter = (width - 8 - len(tail)) // 3
            out.append(f"{str(g.get('device', '?'))[-6:]:<6} ", style="magenta")
            out.append_text(bar(util / 100, meter, f"{util:.0f}%", level_style(util)))
            out.append_text(bar(frac, meter, f"{human_bytes(used)}/{human_bytes(total)}", level_style(100 * frac)))
            out.append(tail)
            hist: Any = self.state.gpu_util.get(f"{self.node}/{g.get('device')}", []) if self.state else []
            out.append(spark(hist, meter, 100), style="magenta")
        return out


class NodeLoad(Vertical):
    """The top block: the local node's CPU cores, memory and GPUs."""

    def compose(self) -> ComposeResult:
        yield CpuBars(id="cpubars")
        yield MemBars(id="membars")
        yield GpuRows(id="gpurows")

    def show(self, state: State) -> None:
        """Render the first (local) node of the latest payload."""
        if not state.nodes:
            return
        node = state.nodes[0]
        cpu = node.get("cpu") or {}
        self.border_title = f"{node.get('name')} · load {' '.join(f'{x:.2f}' for x in cpu.get('load', []))}"
        me = cpu.get("proc") or {}
        self.border_subtitle = (f"kernel rss {human_bytes(me.get('rss'))} · {me.get('threads', '?')} threads · "
                                f"cpu {float(me.get('cpu_percent') or 0):.1f}%") if me else ""
        self.query_one(CpuBars).show(cpu.get("percpu", []))
        self.query_one(MemBars).show(cpu)
        self.query_one(GpuRows).show(str(node.get("name")), node.get("gpus", []), state)


def scheduler_line(stats: dict[str, Any]) -> str:
    """One line per device of scheduler figures: tokens/s, batch sizes, queue."""
    parts = []
    for dev, st in sorted((stats.get("devices") or {}).items()):
        if isinstance(st, dict):
            parts.append(f"{dev} {rate(st.get('tok_s'))} tok/s · batch {st.get('last_batch', 0)} "
                         f"(mean {float(st.get('mean_batch') or 0):.1f}) · queue {st.get('queue', 0)}")
    return "  |  ".join(parts)


class TrafficSpark(Static):
    """Messages per second in and out over the last minute."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.state: State | None = None

    def show(self, state: State) -> None:
        """Re-render from the state's histories."""
        self.state = state
        self.refresh()

    def render(self) -> Text:
        s = self.state
        if s is None or not s.msgs_in:
            return Text("msgs/s: no data yet", style="dim")
        top = max(max(s.msgs_in), max(s.msgs_out), 1.0)
        labels = [f"in  {rate(s.msgs_in[-1]):>5} ", f"out {rate(s.msgs_out[-1]):>5} "]
        # the sparkline fills what is left of the line exactly: a character more would wrap onto the next line
        # and leave debris at the panel's edge (the width is 0 before the first layout: draw no sparkline then)
        width = max(0, self.content_size.width - max(map(len, labels)))
        out = Text(no_wrap=True, overflow="crop")
        for label, values, style in zip(labels, (s.msgs_in, s.msgs_out), ("green", "cyan")):
            out.append(label.ljust(max(map(len, labels))), style=style)
            out.append(spark(values, width, top), style=style)
            out.append("\n")
        out.rstrip()
        return out


class TrafficPanel(Horizontal):
    """Message traffic: rates per type with a sparkline, beside the log of recent messages."""

    def __init__(self, utc: bool = False, **kw: Any) -> None:
        super().__init__(**kw)
        self.utc = utc

    def compose(self) -> ComposeResult:
        with Vertical(id="rates-box"):
            yield TrafficSpark(id="trafficspark")
            yield RatesTable(id="rates")
        yield MessageLog(utc=self.utc, id="msglog")


class StatusLine(Static):
    """One line: which kernel, uptime, clients, connection state, ignored telemetry."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.state: State | None = None
        self.conn = "connecting"
        self.where = ""

    def show(self, state: State, conn: str, where: str = "") -> None:
        """Re-render."""
        self.state, self.conn, self.where = state, conn, where
        self.refresh()

    def render(self) -> Text:
        out = Text()
        out.append(" llmsh top ", style="bold reverse")
        p = self.state.payload if self.state else None
        if p:
            k = p["kernel"]
            out.append(f" kernel {k.get('pid')}@{k.get('node')}  up {duration(k.get('uptime_s'))}  "
                       f"{k.get('clients', 0)} clients  {len(p['procs'])} procs")
            if (self.size.width or 80) >= 100:
                out.append(f"  telemetry {k.get('tick_ms', 0):.1f}ms/tick", style="dim")
        badge = {"connected": ("● live", "bold green"), "disconnected": ("✖ disconnected, retrying…", "bold red"),
                 "no-kernel": ("no kernel", "bold red"), "connecting": ("connecting…", "yellow")}
        text, style = badge.get(self.conn, (self.conn, ""))
        if not p and self.conn == "connected":  # telemetry may be off: say so rather than look frozen
            out.append(f" {self.where.rsplit('/', 1)[-1]}")
            text, style = "● connected · no telemetry yet (--telemetry-hz 0?)", "yellow"
        if self.state and self.state.ignored:
            text = f"ignored {self.state.ignored}  " + text
        width = self.size.width or 80
        pad = width - out.cell_len - len(text) - 1
        if pad < 1:
            out.truncate(max(0, width - len(text) - 2))
            pad = 1
        out.append(" " * pad)
        out.append(text, style=style)
        return out


class NoKernel(Static):
    """The screen shown while no kernel answers: how to start one."""

    def show(self, connection_file: str = "") -> None:
        """Say what is missing and what to do."""
        where = f"No llmsh kernel answers at {connection_file}." if connection_file else "No llmsh kernel is running."
        self.update(
            Text.assemble(
                (where + "\n\n", "bold"),
                "Start one in another terminal with:\n\n",
                ("    llmsh kernel start\n\n", "bold cyan"),
                "(or just run `llmsh`, which starts one).\n",
                "This screen connects by itself as soon as a kernel is up.   q quits.",
            )
        )


class Confirm(ModalScreen[bool]):
    """Ask before a destructive signal: y / Enter confirms, n / Esc cancels."""

    BINDINGS = [Binding("y,enter", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm"):
            yield Label(self.question, id="question")
            yield Label("[b]y[/b] yes   [b]n[/b] no", id="answers")

    def action_answer(self, yes: bool) -> None:
        """Close with the answer."""
        self.dismiss(yes)
