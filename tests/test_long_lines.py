"""Long command lines (issue 14): the parser is linear and matches shlex's quoting; the kernel refuses a request over
`--max-message` with one line naming the limit, and keeps serving other clients."""

from __future__ import annotations

import shlex
from typing import Any

import pytest

from llmsh.commands import parser
from llmsh.commands.parser import parse, tokenize

QUOTING = [
    'a"b c"d', "'it''s'", r'"a\"b"', r'"a\\b"', r'"a\nb"', r"a\ b", r"\$x", "''", '""', r'"x\'y"', "'a\\b'",
    'pre"mid"\'post\'', r'"\\"', r'a\\', "\"multi\nline\"", 'x"y\\\nz"',
]


@pytest.mark.parametrize("word", QUOTING)
def test_unquoting_matches_shlex(word: str) -> None:
    (tok,) = [t for t in tokenize(word) if t.kind == "word"]
    expected = shlex.split(word.replace("\\\n", ""), posix=True)
    assert [tok.value] == expected


def test_a_megabyte_prompt_is_one_word_without_shlex(monkeypatch: Any) -> None:
    def slow(*a: Any, **k: Any) -> None:
        raise AssertionError("shlex.split reads character by character in Python: quadratic-ish on long words")

    monkeypatch.setattr(shlex, "split", slow)
    prompt = "word " * 200_000
    script = parse(f'run g "{prompt}" --max-tokens 1')
    assert script.statements[0].body.first.commands[0].argv == ["run", "g", prompt, "--max-tokens", "1"]


class _CountingStr(str):
    """A str that adds up how many characters `count` scans: the parser must scan each at most once."""

    scanned = 0

    def count(self, sub: str, start: Any = None, end: Any = None) -> int:  # type: ignore[override]
        s, e, _ = slice(start, end).indices(len(self))
        _CountingStr.scanned += max(0, e - s)
        return str.count(self, sub, start, end)


def test_line_numbers_of_many_statements_cost_one_scan() -> None:
    code = _CountingStr("echo a\n" * 5_000)
    statements = parser._Parser(code, tokenize(code)).script().statements
    assert [s.line for s in statements[:3]] == [1, 2, 3] and statements[-1].line == 5_000
    assert _CountingStr.scanned <= len(code)


def test_max_message_is_refused_with_one_line(make_kernel: Any) -> None:
    k = make_kernel("--max-message", "64KiB")
    res = k.execute("echo " + "x" * 100_000)
    assert res["status"] == "error" and res["stdout"] == ""
    line = res["reply"]["evalue"]  # the size counts the whole signed message, not only the code
    assert line.startswith("llmsh: message of 98") and line.endswith(
        "KiB is over the kernel's limit of 64KiB; send less, or start the kernel with a larger --max-message"
    )
    res = k.execute("echo " + "y" * 60_000)  # under the limit: runs
    assert res["status"] == "ok" and res["stdout"] == "y" * 60_000 + "\n"
    r = k.llmsh("-c", "echo " + "z" * 100_000)
    assert r.returncode == 1 and r.stderr.startswith("llmsh: message of") and r.stderr.count("\n") == 1


def test_bad_max_message_is_a_usage_line(capsys: Any) -> None:
    from llmsh.cli import main

    with pytest.raises(SystemExit) as e:
        main(["kernel", "start", "--max-message", "lots"])
    assert e.value.code == 2
    assert "argument --max-message: bad size 'lots': expected a number of bytes or a size like 4MiB" in capsys.readouterr().err


def test_a_megabyte_line_of_many_statements_parses_whole_with_no_gc_pass() -> None:
    """A 1 MB line of ~150k statements parses to every statement; its ~600k small objects (none in a cycle) start no
    garbage collection on the way, which used to be half of its parse (timings: scripts/bench/parse.py)."""
    import gc

    code = "echo a;" * 150_000
    passes: list[dict[str, Any]] = []

    def count(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            passes.append(info)

    gc.callbacks.append(count)
    try:
        statements = parse(code).statements
    finally:
        gc.callbacks.remove(count)
    assert len(code) > 1_000_000 and len(statements) == 150_000
    assert statements[-1].body.first.commands[0].argv == ["echo", "a"] and statements[-1].text == "echo a"
    assert passes == [] and gc.isenabled()


def test_quoted_megabyte_prompt_keeps_its_escapes() -> None:
    body = 'say \\"hi\\" ' * 100_000
    (tok,) = [t for t in tokenize(f'"{body}"')]
    assert tok.value == 'say "hi" ' * 100_000


def test_a_parse_ending_in_one_thread_leaves_the_collector_paused_for_another() -> None:
    """The collector's switch is process-wide: B's parse, begun first, ending while A's runs must not switch it back
    on under A."""
    import gc
    import threading

    from llmsh.commands.parser import GcPause

    pause = GcPause()
    b_in, a_in, b_done = threading.Event(), threading.Event(), threading.Event()
    seen: list[bool] = []

    def b() -> None:
        with pause:
            b_in.set()
            a_in.wait(5)
        b_done.set()

    def a() -> None:
        b_in.wait(5)
        with pause:
            a_in.set()
            b_done.wait(5)
            seen.append(gc.isenabled())          # B has ended; A still parses

    assert gc.isenabled()
    threads = [threading.Thread(target=b), threading.Thread(target=a)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert b_done.is_set() and seen == [False]
    assert gc.isenabled()                         # on again once neither parses
