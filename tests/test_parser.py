"""Unit tests of the command language: tokens, quoting, the AST, syntax errors and is_complete."""

from __future__ import annotations

import pytest

from llmsh.commands.parser import ParseError, is_complete, parse, tokenize


def argvs(code: str) -> list[list[list[str]]]:
    """Each statement as its pipelines' argv lists (and-or structure flattened)."""
    return [[c.argv for p in s.body.pipelines() for c in p.commands] for s in parse(code).statements]


def test_words_and_quoting_follow_shlex() -> None:
    (stmt,) = parse("""echo 'a b' "c \\"d\\"" e\\ f g"h"i ''""").statements
    assert stmt.body.first.commands[0].argv == ["echo", "a b", 'c "d"', "e f", "ghi", ""]


def test_quoted_operators_are_words() -> None:
    assert argvs("echo '&&' \"|\" \\; '#x'") == [[["echo", "&&", "|", ";", "#x"]]]


def test_sequence_and_or_and_background() -> None:
    script = parse("a 1; b && c || d & e\nf")
    assert [s.text for s in script.statements] == ["a 1", "b && c || d", "e", "f"]
    assert [s.background for s in script.statements] == [False, True, False, False]
    ops = [op for op, _ in script.statements[1].body.rest]
    assert ops == ["&&", "||"]
    assert [s.line for s in script.statements] == [1, 1, 1, 2]


def test_pipeline_and_redirects() -> None:
    (stmt,) = parse("run a 'q' | run b > out.txt").statements
    left, right = stmt.body.first.commands
    assert left.argv == ["run", "a", "q"] and left.redirect is None
    assert right.argv == ["run", "b"] and right.redirect.path == "out.txt" and not right.redirect.append
    (stmt,) = parse("echo x >> log").statements
    assert stmt.body.first.commands[0].redirect.append


def test_comments_and_continuation() -> None:
    assert argvs("echo a # not this ; echo b\n# whole line\necho c") == [[["echo", "a"]], [["echo", "c"]]]
    assert argvs("echo a#b") == [[["echo", "a#b"]]]
    assert argvs("echo one \\\n  two") == [[["echo", "one", "two"]]]
    assert argvs("echo a &&\n  echo b") == [[["echo", "a"], ["echo", "b"]]]
    assert argvs("echo a |\n echo b") == [[["echo", "a"], ["echo", "b"]]]


def test_blank_input_is_an_empty_script() -> None:
    assert parse("").statements == [] and parse("  \n # only a comment\n").statements == []


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("; echo", "syntax error near ';'"),
        ("echo a ;; echo b", "syntax error near ';'"),
        ("&& echo", "syntax error near '&&'"),
        ("echo a | | b", "syntax error near '|'"),
        ("echo >", "'>' needs a file name"),
        ("echo > a > b", "only one output redirection"),
        ("cat < f", "input redirection '<' is not supported"),
    ],
)
def test_syntax_errors_are_one_line(code: str, message: str) -> None:
    with pytest.raises(ParseError) as e:
        parse(code)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not e.value.incomplete


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("echo hi", "complete"),
        ("", "complete"),
        ("echo a;", "complete"),
        ("sleep 5 &", "complete"),
        ("echo 'open", "incomplete"),
        ('echo "open', "incomplete"),
        ("echo a \\", "incomplete"),
        ("echo a \\\n", "incomplete"),
        ("echo a &&", "incomplete"),
        ("echo a ||  ", "incomplete"),
        ("echo a |", "incomplete"),
        ("echo a &&\n", "incomplete"),
        ("echo 'multi\nline'", "complete"),
        ("; x", "invalid"),
        ("echo >", "invalid"),
    ],
)
def test_is_complete(code: str, status: str) -> None:
    assert is_complete(code) == (status, "")


def test_partial_tokenize_closes_open_quote_for_completion() -> None:
    toks = tokenize("load 'my mod", partial=True)
    assert [t.value for t in toks] == ["load", "my mod"] and toks[-1].quoted
    with pytest.raises(ParseError):
        tokenize("load 'my mod")
