"""`llmsh top`: the live dashboard of a kernel — node load, the process table, message traffic.

The app gets its connection through `__init__` (a `Source`), so tests drive it with a real kernel or with scripted
telemetry. Keys follow htop/nvitop: k TERM and K KILL (both ask first), s STOP, c CONT, +/- renice, / filter, Tab next panel,
q quit; a key acts on the selected row of the process table only while that panel is the active one; each
signal is sent as a command line (`kill -STOP 3`) like a user would type it. Torch is never imported here.
"""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.reactive import var
from textual.widgets import Footer, Input

from llmsh.tui.model import State
from llmsh.tui.source import Event, KernelSource, Source
from llmsh.tui.tables import FitTable, MessageLog, NodesTable, ProcessTable, RatesTable
from llmsh.tui.widgets import (
    Confirm,
    NodeLoad,
    NoKernel,
    StatusLine,
    TrafficPanel,
    TrafficSpark,
    WholeCellScrollBar,
    scheduler_line,
)

PANELS = ("procs", "traffic", "nodes")
COMPACT_HEIGHT = 34  # below this many rows only the active panel is shown


class TopApp(App[int]):
    """The dashboard."""

    CSS_PATH = "top.tcss"
    TITLE = "llmsh top"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("tab", "next_panel", "Panel", priority=True),
        Binding("slash", "filter", "Filter"),
        Binding("k", "signal('TERM')", "TERM"),
        Binding("K", "signal('KILL')", "KILL"),
        Binding("s", "signal('STOP')", "STOP"),
        Binding("c", "signal('CONT')", "CONT"),
        Binding("plus", "renice(1)", "nice+"),
        Binding("minus", "renice(-1)", "nice-"),
        Binding("escape", "close_filter", "", show=False),
    ]

    conn: var[str] = var("connecting")
    panel: var[str] = var("procs")
    compact: var[bool] = var(True)  # set from the terminal height on every resize
    multinode: var[bool] = var(False)

    def __init__(self, source: Source, *, utc: bool = False, where: str = "") -> None:
        super().__init__()
        self.source = source
        self.utc = utc  # message-log times in UTC (deterministic snapshots)
        self.where = where
        self.state = State()
        self.sent: list[tuple[str, bool, str]] = []  # (command line, ok, message) of every action, newest last

    def compose(self) -> ComposeResult:
        yield StatusLine(id="status")
        yield NoKernel(id="nokernel")
        with Vertical(id="main"):
            yield NodeLoad(id="load")
            yield ProcessTable(id="procs", classes="panel")
            yield TrafficPanel(utc=self.utc, id="traffic", classes="panel")
            yield NodesTable(id="nodes", classes="panel")
        yield Input(placeholder="filter (Enter keeps it, Esc clears)", id="filter")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#procs", ProcessTable).border_title = "Processes"
        self.query_one("#traffic", TrafficPanel).border_title = "Messages"
        self.query_one("#nodes", NodesTable).border_title = "Nodes"
        self.query_one(NoKernel).show(self.where)
        for table in self.query(FitTable):  # whole-cell thumbs: no ▁▂▃ glyphs at the panels' edges
            table.vertical_scrollbar.renderer = WholeCellScrollBar  # type: ignore[misc]  # Textual's documented hook
            table.horizontal_scrollbar.renderer = WholeCellScrollBar  # type: ignore[misc]
        self._apply_panel()
        self.watch_conn(self.conn)
        self.watch_compact(self.compact)
        self.consume()

    def on_resize(self, event: Any) -> None:
        self.compact = event.size.height < COMPACT_HEIGHT

    # --- state → CSS classes (the watchers only toggle classes) ---
    def watch_conn(self, conn: str) -> None:
        self.screen.set_class(conn == "no-kernel", "-nokernel")
        self.screen.set_class(conn == "disconnected", "-disconnected")
        self._status()

    def watch_compact(self, compact: bool) -> None:
        self.screen.set_class(compact, "-compact")

    def watch_multinode(self, multi: bool) -> None:
        self.screen.set_class(multi, "-multinode")
        if not multi and self.panel == "nodes":
            self.panel = "procs"

    def watch_panel(self, panel: str) -> None:
        self._apply_panel()

    def _apply_panel(self) -> None:
        for name in PANELS:
            self.query_one(f"#{name}").set_class(name == self.panel, "-active")
        target = {"procs": "#procs", "traffic": "#msglog", "nodes": "#nodes"}[self.panel]
        self.query_one(target).focus()

    def _status(self) -> None:
        self.query_one(StatusLine).show(self.state, self.conn, self.where)

    # --- data ---
    @work(exclusive=True, group="source")
    async def consume(self) -> None:
        """Apply the source's events until the app exits."""
        try:
            async for event in self.source.events():
                self.apply(event)
        finally:
            await self.source.close()

    def apply(self, event: Event) -> None:
        """One connection event or telemetry payload → the screen."""
        if event.kind == "telemetry":
            if self.state.accept(event.data):
                try:
                    self._render_payload()
                except Exception:  # a valid-looking payload with odd values: skip it, keep the screen
                    self.state.ignored += 1
            self.conn = "connected"
            self._status()
            return
        if event.kind == "connected":
            self.where = event.text
        elif event.kind == "no-kernel" and event.text:
            self.query_one(NoKernel).show(event.text)
        self.conn = event.kind
        self._status()

    def _render_payload(self) -> None:
        s = self.state
        self.query_one(NodeLoad).show(s)
        procs = self.query_one(ProcessTable)
        procs.set_multinode(len(s.nodes) > 1)
        procs.show(s.procs)
        procs.border_subtitle = scheduler_line(s.payload.get("scheduler") or {}) if s.payload else ""
        tr = s.payload["traffic"] if s.payload else {}
        self.query_one(RatesTable).show(tr.get("rates", []), s.rates)
        self.query_one(TrafficSpark).show(s)
        self.query_one(MessageLog).append(tr.get("recent", []))
        self.multinode = len(s.nodes) > 1
        if self.multinode:
            self.query_one(NodesTable).show(s.nodes)

    # --- actions ---
    def action_next_panel(self) -> None:
        """Tab: the next panel (processes → messages → nodes when there are several)."""
        if self.query_one("#filter", Input).has_focus:
            self.action_close_filter(keep=True)
            return
        order = [p for p in PANELS if p != "nodes" or self.multinode]
        self.panel = order[(order.index(self.panel) + 1) % len(order)] if self.panel in order else "procs"

    def action_filter(self) -> None:
        """/: type a filter for the active panel's rows."""
        box = self.query_one("#filter", Input)
        box.add_class("-open")
        box.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        self.query_one(ProcessTable).set_filter(event.value)
        self.query_one(MessageLog).set_filter(event.value)
        self._show_filter(event.value)

    def _show_filter(self, text: str) -> None:
        """An active filter is named in the panel titles, so hidden rows are never a surprise."""
        suffix = f" (filter: {escape(text)})" if text else ""  # border titles are markup: '[' in a filter is text
        self.query_one("#procs", ProcessTable).border_title = "Processes" + suffix
        self.query_one("#traffic", TrafficPanel).border_title = "Messages" + suffix

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.action_close_filter(keep=True)

    def action_close_filter(self, keep: bool = False) -> None:
        """Esc clears the filter; Enter keeps it; both return to the panel."""
        box = self.query_one("#filter", Input)
        if not keep:
            box.value = ""
        box.remove_class("-open")
        self._apply_panel()

    def _selected(self) -> dict[str, Any] | None:
        if isinstance(self.screen, Confirm):  # one question at a time
            return None
        if self.panel != "procs":  # the key acts on the table on screen, never on a hidden or unfocused one
            self.notify("select a process in the Processes panel first (Tab)", severity="warning", timeout=2)
            return None
        row = self.query_one(ProcessTable).selected()
        if row is None:
            self.notify("no process selected", severity="warning", timeout=2)
        return row

    def action_signal(self, sig: str) -> None:
        """Send a signal to the selected process (TERM and KILL ask first: both end it)."""
        row = self._selected()
        if row is None:
            return
        line = f"kill -{sig} {row['pid']}"
        if sig in ("TERM", "KILL"):
            question = f"Send {sig} to process {row['pid']} ({row.get('name', '?')})?"
            self.push_screen(Confirm(question), lambda yes: self._send_if(yes, line))
        else:
            self.send(line)

    def action_renice(self, step: int) -> None:
        """+ lowers the priority (nice + 1), - raises it (nice - 1)."""
        row = self._selected()
        if row is None:
            return
        nice = int(row.get("nice") or 0) + step
        self.send(f"renice {nice} {row['pid']}")

    def _send_if(self, yes: bool | None, line: str) -> None:
        """The answer of a confirmation: send `line` only on yes."""
        if yes:
            self.send(line)

    @work(group="actions")
    async def send(self, line: str) -> None:
        """Run one command line on the kernel and say how it went."""
        ok, message = await self.source.execute(line)
        self.sent.append((line, ok, message))
        if ok:
            self.notify(line, timeout=2)
        else:
            self.notify(f"{line}: {message}", severity="error", timeout=4)


def main(args: Any) -> int:
    """`llmsh top [--kernel FILE]`."""
    connection_file = getattr(args, "kernel", None)
    app = TopApp(KernelSource(connection_file), where=connection_file or "")
    app.run()
    return 0
