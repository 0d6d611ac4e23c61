"""`llmsh top` hardened (issue 14), driven with `run_test()`: K asks like k, keys act only on the process table
when it is the panel on screen, an active filter is shown, the traffic sparkline never wraps."""

from __future__ import annotations

import pytest

from llmsh.tui.app import TopApp
from llmsh.tui.tables import MessageLog, ProcessTable
from llmsh.tui.widgets import Confirm, TrafficPanel, TrafficSpark
from tests.test_tui_snapshots import ScriptedSource, live_events, settle

pytestmark = pytest.mark.slow
SPARK_GLYPHS = "▁▂▃▄▅▆▇█"


async def test_kill_asks_first_like_term() -> None:
    source = ScriptedSource(live_events())
    app = TopApp(source, utc=True)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("K")
        await pilot.pause()
        assert isinstance(app.screen, Confirm) and source.sent == []
        await pilot.press("n")
        await pilot.pause()
        assert source.sent == []
        await pilot.press("K", "y")
        await pilot.pause()
        assert source.sent == ["kill -KILL 1"]


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
async def test_keys_act_only_on_the_process_table_on_screen(size: tuple[int, int]) -> None:
    source = ScriptedSource(live_events())
    app = TopApp(source, utc=True)
    async with app.run_test(size=size) as pilot:
        await settle(pilot)
        await pilot.press("tab")  # to the messages
        assert app.panel == "traffic"
        await pilot.press("s", "c", "plus", "minus", "k", "K")
        await pilot.pause()
        assert source.sent == [] and not isinstance(app.screen, Confirm)
        await pilot.press("tab", "s")  # back on the processes: s acts again
        await pilot.pause()
        assert source.sent == ["kill -STOP 1"]


async def test_an_active_filter_is_shown() -> None:
    app = TopApp(ScriptedSource(live_events()), utc=True)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("slash", "g", "p", "enter")
        await pilot.pause()
        table = app.query_one(ProcessTable)
        assert table.row_count == 1 and table.border_title == "Processes (filter: gp)"
        assert app.query_one(TrafficPanel).border_title == "Messages (filter: gp)"
        await pilot.press("slash", "escape")
        await pilot.pause()
        assert table.row_count == 3 and table.border_title == "Processes"


@pytest.mark.parametrize("size", [(80, 24), (100, 30), (160, 50)])
async def test_the_traffic_sparkline_never_wraps(size: tuple[int, int]) -> None:
    app = TopApp(ScriptedSource(live_events(n=30)), utc=True)
    async with app.run_test(size=size) as pilot:
        await settle(pilot)
        await pilot.press("tab")
        await pilot.pause()
        spark = app.query_one(TrafficSpark)
        width = spark.content_size.width
        lines = spark.render().wrap(app.console, width)
        assert len(lines) == 2 and all(line.cell_len <= width for line in lines)
        assert all(any(c in line.plain for c in SPARK_GLYPHS) for line in lines)


@pytest.mark.parametrize("size", [(80, 24), (100, 30)])
async def test_no_sparkline_glyphs_in_the_scrollbars(size: tuple[int, int]) -> None:
    app = TopApp(ScriptedSource(live_events(n=30)), utc=True)
    async with app.run_test(size=size) as pilot:
        await settle(pilot)
        await pilot.press("tab")  # the message log follows its tail: a short thumb at the bottom of the panel
        await pilot.pause(0.3)
        log = app.query_one(MessageLog)
        assert log.max_scroll_y > 0 and log.show_vertical_scrollbar
        bar = log.vertical_scrollbar
        options = app.console.options.update_dimensions(bar.size.width, bar.size.height)
        drawn = "".join(seg.text for seg in app.console.render(bar.render(), options))
        assert drawn.strip() == "" and not set(drawn) & set(SPARK_GLYPHS)  # whole cells, no ▁▂▃ at the edge
