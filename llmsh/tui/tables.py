"""The dashboard's tables: processes, message rates, the message log, nodes.

They share `FitTable`: columns are data (key, header, width, right-aligned) with a priority order, and only the
columns that fit the current width are shown, so an 80-column terminal gets the important ones without a
horizontal scrollbar. Rows are rebuilt from plain dicts at each telemetry tick.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.text import Text
from textual.binding import Binding
from textual.widgets import DataTable

from llmsh.fmt import PROC_COLUMNS, PROC_PRIORITY, clock, human_bytes, proc_cell, proc_sort_key, rate
from llmsh.tui.model import spark

Column = tuple[str, str, int, bool]  # key, header, width, right-aligned

STATE_STYLE = {"running": "bold green", "stopped": "bold yellow", "failed": "bold red", "paged-out": "blue",
               "loading": "cyan", "exiting": "magenta", "lost": "bold red"}


class FitTable(DataTable):
    """A DataTable whose columns are chosen by priority to fit its width."""

    COLUMNS: Sequence[Column] = ()
    PRIORITY: Sequence[str] = ()  # keys, most important first; default: display order

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.shown: list[Column] = []
        self.filter = ""

    def on_mount(self) -> None:
        self._set_columns()

    def on_resize(self, event: Any) -> None:
        if [c[0] for c in self.fit()] != [c[0] for c in self.shown]:
            self.rebuild()

    def header(self, col: Column) -> str:
        """Header text of a column (subclasses add sort marks)."""
        return col[1]

    def fit(self) -> list[Column]:
        """The columns that fit the current width, in display order."""
        room = (self.size.width or 78) - 2  # keep a cell for the vertical scrollbar's gutter
        by_key = {c[0]: c for c in self.COLUMNS}
        keep: set[str] = set()
        for key in self.PRIORITY or [c[0] for c in self.COLUMNS]:
            col = by_key[key]
            need = max(col[2], len(self.header(col))) + 2  # one cell of padding each side
            if need <= room:
                keep.add(key)
                room -= need
        return [c for c in self.COLUMNS if c[0] in keep]

    def _set_columns(self) -> None:
        self.shown = self.fit()
        for col in self.shown:
            self.add_column(self.header(col), key=col[0], width=max(col[2], len(self.header(col))))

    def cells(self, row: dict[str, Any]) -> list[Any]:
        """The shown cells of one row."""
        out = []
        for key, _h, _w, right in self.shown:
            out.append(self.cell(row, key, right))
        return out

    def cell(self, row: dict[str, Any], key: str, right: bool) -> Any:
        """One cell; subclasses format."""
        return Text(str(row.get(key, "")), justify="right" if right else "left")

    def visible_rows(self) -> list[dict[str, Any]]:
        """The rows to show now (after filtering and sorting)."""
        return []

    def row_key(self, row: dict[str, Any]) -> str | None:
        """A stable key for a row (None: rows are anonymous)."""
        return None

    def rebuild(self) -> None:
        """Redraw every row (and the columns, which may have changed with the width)."""
        keep = self.current_key()
        self.clear(columns=True)
        self._set_columns()
        for r in self.visible_rows():
            self.add_row(*self.cells(r), key=self.row_key(r))
        if keep is not None:
            try:
                self.move_cursor(row=self.get_row_index(keep), animate=False)
            except Exception:  # that row is gone
                pass

    def current_key(self) -> str | None:
        """Key of the row under the cursor."""
        if not self.row_count:
            return None
        try:
            return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        except Exception:  # cursor outside a just-shrunk table
            return None

    def set_filter(self, text: str) -> None:
        """Show only rows containing `text`."""
        self.filter = text.lower()
        self.rebuild()


class ProcessTable(FitTable):
    """The model processes: sortable columns (click a header, or `<` `>`; `I` inverts), one selected row."""

    COLUMNS = PROC_COLUMNS
    PRIORITY: Sequence[str] = PROC_PRIORITY
    BINDINGS = [
        Binding("less_than_sign", "sort_by(-1)", "Sort ←", show=False),
        Binding("greater_than_sign", "sort_by(1)", "Sort →", show=False),
        Binding("I", "invert", "Invert", show=False),
    ]

    def __init__(self, **kw: Any) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kw)
        self.sort_key = "pid"
        self.reverse = False
        self.items: list[dict[str, Any]] = []
        self.multinode = False

    def set_multinode(self, multi: bool) -> None:
        """Several nodes: the NODE column comes right after STATE in priority (one node: it is left out)."""
        if multi == self.multinode:
            return
        self.multinode = multi
        keys = list(PROC_PRIORITY)
        self.PRIORITY = (*keys[:3], "node", *keys[3:]) if multi else PROC_PRIORITY
        self.rebuild()

    def header(self, col: Column) -> str:
        return col[1] + (("▼" if self.reverse else "▲") if col[0] == self.sort_key else "")

    def visible_rows(self) -> list[dict[str, Any]]:
        rows = [r for r in self.items if not self.filter or self.filter in _proc_text(r)]
        rows.sort(key=lambda r: proc_sort_key(r, self.sort_key), reverse=self.reverse)
        return rows

    def row_key(self, row: dict[str, Any]) -> str:
        return str(row.get("pid"))

    def cell(self, row: dict[str, Any], key: str, right: bool) -> Any:
        style = STATE_STYLE.get(str(row.get("state")), "") if key == "state" else ""
        return Text(proc_cell(row, key), style=style, justify="right" if right else "left")

    def show(self, rows: list[dict[str, Any]]) -> None:
        """Replace the rows, keeping the sort order, the filter and the selected pid."""
        if list(rows) == self.items and self.columns:  # unchanged: skip the redraw (idle kernels change nothing)
            return
        self.items = list(rows)
        self.rebuild()

    def selected(self) -> dict[str, Any] | None:
        """The process row under the cursor, or None when the table is empty."""
        key = self.current_key()
        return next((r for r in self.items if str(r.get("pid")) == key), None) if key is not None else None

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        """Click a header: sort by it; click again: reverse."""
        key = str(event.column_key.value)
        if key == self.sort_key:
            self.reverse = not self.reverse
        else:
            self.sort_key, self.reverse = key, False
        self.rebuild()

    def action_sort_by(self, step: int) -> None:
        """Move the sort column left or right."""
        keys = [c[0] for c in self.shown] or [c[0] for c in PROC_COLUMNS]
        i = keys.index(self.sort_key) if self.sort_key in keys else 0
        self.sort_key = keys[(i + step) % len(keys)]
        self.rebuild()

    def action_invert(self) -> None:
        """Reverse the sort order."""
        self.reverse = not self.reverse
        self.rebuild()


def _proc_text(r: dict[str, Any]) -> str:
    return " ".join(str(r.get(k, "")) for k in ("pid", "name", "state", "device", "node")).lower()


class RatesTable(FitTable):
    """Message rates per direction and type since the previous telemetry tick (busiest first)."""

    COLUMNS = (("dir", "DIR", 3, False), ("type", "TYPE", 19, False), ("msgs_s", "MSG/S", 5, True),
               ("trend", "TREND", 10, False), ("bytes_s", "B/S", 6, True), ("count", "TOTAL", 6, True))
    PRIORITY = ("type", "msgs_s", "dir", "trend", "bytes_s", "count")

    def __init__(self, **kw: Any) -> None:
        super().__init__(cursor_type="none", show_cursor=False, **kw)
        self.items: list[dict[str, Any]] = []
        self.history: dict[tuple[str, str], Any] = {}

    def visible_rows(self) -> list[dict[str, Any]]:
        return sorted(self.items, key=lambda r: (-float(r.get("msgs_s") or 0), -int(r.get("count") or 0)))

    def cell(self, row: dict[str, Any], key: str, right: bool) -> Any:
        if key == "dir":
            return Text(str(row.get("dir")), style="green" if row.get("dir") == "in" else "cyan")
        if key == "trend":
            hist = self.history.get((str(row.get("dir")), str(row.get("type"))), [])
            return Text(spark(hist, 10), style="green" if row.get("dir") == "in" else "cyan")
        text = {"msgs_s": rate(row.get("msgs_s")), "bytes_s": human_bytes(row.get("bytes_s"))}.get(key)
        return Text(text if text is not None else str(row.get(key, "")), justify="right" if right else "left")

    def show(self, rates: list[dict[str, Any]], history: dict[tuple[str, str], Any] | None = None) -> None:
        """New rates, with each type's msgs/s history for the trend column."""
        self.history = history or {}
        if list(rates) == self.items and self.columns:  # unchanged: skip the redraw (idle kernels change nothing)
            return
        self.items = list(rates)
        self.rebuild()


class MessageLog(FitTable):
    """The scrolling log of recent messages: time, direction, type, size, client; follows the tail."""

    COLUMNS = (("t", "TIME", 12, False), ("dir", "DIR", 3, False), ("type", "TYPE", 19, False),
               ("bytes", "SIZE", 5, True), ("client", "CLIENT", 8, False))
    PRIORITY = ("type", "dir", "t", "bytes", "client")

    def __init__(self, utc: bool = False, max_rows: int = 300, **kw: Any) -> None:
        super().__init__(cursor_type="row", **kw)
        self.utc = utc
        self.max_rows = max_rows
        self.entries: list[dict[str, Any]] = []

    def _match(self, m: dict[str, Any]) -> bool:
        return not self.filter or self.filter in f"{m.get('type')} {m.get('client')} {m.get('socket')}".lower()

    def visible_rows(self) -> list[dict[str, Any]]:
        return [m for m in self.entries if self._match(m)]

    def cell(self, row: dict[str, Any], key: str, right: bool) -> Any:
        if key == "t":
            return clock(float(row.get("t") or 0), self.utc)
        if key == "dir":
            return Text(str(row.get("dir")), style="green" if row.get("dir") == "in" else "cyan")
        if key == "bytes":
            return Text(human_bytes(row.get("bytes")), justify="right")
        if key == "client":
            return str(row.get("client") or "")[:8]
        return str(row.get(key, ""))

    def append(self, msgs: list[dict[str, Any]]) -> None:
        """Add new messages at the bottom, following the tail unless the user moved up."""
        follow = self.cursor_row >= self.row_count - 1
        self.entries.extend(msgs)
        overflow = len(self.entries) > self.max_rows
        del self.entries[: -self.max_rows]
        if overflow:
            self.rebuild()
        else:
            for m in msgs:
                if self._match(m):
                    self.add_row(*self.cells(m))
        if follow:
            self.follow_tail()

    def on_resize(self, event: Any) -> None:
        follow = self.cursor_row >= self.row_count - 1
        super().on_resize(event)  # may rebuild, which resets the cursor
        if follow:  # just shown (hidden panels have no size): catch up with the tail
            self.call_after_refresh(self.follow_tail)

    def follow_tail(self) -> None:
        """Select and show the newest message."""
        if self.row_count:
            self.move_cursor(row=self.row_count - 1, animate=False)
            self.scroll_end(animate=False, immediate=True)

    def set_filter(self, text: str) -> None:
        super().set_filter(text)
        self.follow_tail()


class NodesTable(FitTable):
    """All nodes with a summary of their load (the panel exists when there are several)."""

    COLUMNS = (("name", "NODE", 16, False), ("state", "STATE", 5, False), ("cpu", "CPU%", 4, True),
               ("cores", "CORES", 5, True), ("load", "LOAD", 14, False), ("mem", "MEM", 12, True),
               ("procs", "PROCS", 5, True), ("tok_s", "TOK/S", 5, True), ("budget", "BUDGET", 11, True),
               ("beat", "BEAT", 5, True), ("gpus", "GPUS", 4, True), ("gutil", "GPU%", 4, True))
    PRIORITY = ("name", "state", "cpu", "mem", "procs", "tok_s", "budget", "beat", "gpus", "gutil", "load", "cores")

    def __init__(self, **kw: Any) -> None:
        super().__init__(cursor_type="row", **kw)
        self.items: list[dict[str, Any]] = []

    def visible_rows(self) -> list[dict[str, Any]]:
        out = []
        for n in self.items:
            cpu = n.get("cpu") or {}
            mem = cpu.get("mem") or {}
            gpus = n.get("gpus") or []
            gutil = sum(float(g.get("util") or 0) for g in gpus) / len(gpus) if gpus else None
            out.append({
                "name": str(n.get("name")) + ("*" if n.get("local") else ""),
                "cpu": f"{float(cpu.get('percent') or 0):.0f}",
                "cores": str(cpu.get("count", "-")),
                "load": " ".join(f"{x:.2f}" for x in cpu.get("load", [])),
                "mem": f"{human_bytes(mem.get('used'))}/{human_bytes(mem.get('total'))}",
                "gpus": str(len(gpus)),
                "gutil": "-" if gutil is None else f"{gutil:.0f}",
                "state": str(n.get("state") or ("front" if n.get("local") else "-")),
                "procs": str(n.get("procs", "-")),
                "tok_s": rate(n.get("tok_s")) if n.get("tok_s") is not None else "-",
                "budget": f"{human_bytes(n.get('budget_used'))}/{human_bytes(n.get('budget_total'))}"
                if n.get("budget_total") else "-",
                "beat": "-" if n.get("heartbeat_age_s") is None else f"{float(n['heartbeat_age_s']):.0f}s",
            })
        return out

    def row_key(self, row: dict[str, Any]) -> str:
        return row["name"]

    def cell(self, row: dict[str, Any], key: str, right: bool) -> Any:
        style = "bold red" if key == "state" and row.get("state") == "lost" else ""
        return Text(str(row.get(key, "")), style=style, justify="right" if right else "left")

    def show(self, nodes: list[dict[str, Any]]) -> None:
        """New node rows."""
        if list(nodes) == self.items and self.columns:  # unchanged: skip the redraw (idle kernels change nothing)
            return
        self.items = list(nodes)
        self.rebuild()
