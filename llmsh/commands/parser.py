"""The llmsh command language: a lexer and a recursive-descent parser producing an AST of pipelines.

Grammar (a small, POSIX-shaped subset):

    script    := statement ((';' | '&' | newline) statement)*       '&' runs the statement as a background job
    statement := pipeline (('&&' | '||') newline* pipeline)*
    pipeline  := command ('|' newline* command)*
    command   := (WORD | '>' WORD | '>>' WORD)+

Words are quoted like POSIX sh: the lexer only finds where a word ends (respecting quotes and backslashes) and hands
the word to `shlex.split` to remove the quoting, so quoting rules are exactly shlex's. The lexer is our own because
shlex cannot tell a quoted `"&&"` from the operator, and treats a newline as plain whitespace. `#` starts a comment
at the beginning of a word; backslash-newline joins lines. The parser is pure Python with no llmsh imports, so the
client can use it (for multi-line input) without loading anything heavy.
"""

from __future__ import annotations

import gc
import re
import shlex
import threading
from collections.abc import Callable

SEPARATORS = (";", "&", "\n")
OPERATORS = ("&&", "||", ">>", ";", "|", "&", ">", "<", "\n")  # longest first where they share a prefix
_OP_CHARS = set(";&|<>\n")
_TWO_CHAR_OPS = {o for o in OPERATORS if len(o) == 2}
_BLANK = " \t\r"
_END = "<end>"  # the operator slot past the last token (compared by identity)
# one token after optional blanks: an operator (longest first), a plain word (no quotes or backslashes, ending at a
# blank, an operator or the end), a comment (a '#' where a word would start), a backslash-newline; else, with no
# group matched, a word with quoting that `_Lexer._word` reads
_TOKEN = re.compile(r"""[ \t\r]*(?:
      (?P<op>&&|\|\||>>|[;|&<>\n])
    | (?P<word>[^ \t\r;&|<>\n\\'"\#][^ \t\r;&|<>\n\\'"]*+)(?![^ \t\r;&|<>\n])
    | (?P<comment>\#[^\n]*)
    | (?P<cont>\\\n)
    )?""", re.X)
_WORD_RUN = re.compile(r"[^ \t\r;&|<>\n\\'\"]+")  # plain characters of a word, taken in one step
# the inside of "…": anything but an unescaped quote, as runs between escapes (one alternation per character kept a
# backtracking mark per character: 3x slower per byte at 1 MB than at 100 KB)
_DOUBLE_BODY = re.compile(r'[^"\\]*+(?:\\.[^"\\]*+)*+', re.S)
_DOUBLE_ESCAPE = re.compile(r"\\(.)", re.S)


class ParseError(ValueError):
    """A syntax error with a one-line message; `incomplete` means more input could fix it (open quote, trailing `&&`)."""

    def __init__(self, message: str, *, incomplete: bool = False, pos: int = 0) -> None:
        super().__init__(message)
        self.incomplete = incomplete
        self.pos = pos


class _Node:
    """Plain slotted classes rather than dataclasses: the client imports this module on every `llmsh -c`, and
    `dataclasses` (with `inspect`) would be a tenth of its start-up time."""

    __slots__: tuple[str, ...] = ()

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and all(getattr(self, k) == getattr(other, k) for k in self.__slots__)


class Token(_Node):
    """A word (quoting removed in `value`) or an operator, with its source span."""

    __slots__ = ("kind", "value", "start", "end", "quoted")

    def __init__(self, kind: str, value: str, start: int, end: int, quoted: bool = False) -> None:
        self.kind = kind  # "word" | "op"
        self.value = value
        self.start = start
        self.end = end
        self.quoted = quoted


class Redirect(_Node):
    """`> path` (truncate) or `>> path` (append): the command's stdout goes to a file."""

    __slots__ = ("path", "append")

    def __init__(self, path: str, append: bool = False) -> None:
        self.path = path
        self.append = append


class SimpleCommand(_Node):
    """One command with its arguments, e.g. `echo hi > out.txt`."""

    __slots__ = ("argv", "redirect", "start", "end")

    def __init__(self, argv: list[str], redirect: Redirect | None = None, start: int = 0, end: int = 0) -> None:
        self.argv = argv
        self.redirect = redirect
        self.start = start
        self.end = end

    @property
    def name(self) -> str:
        return self.argv[0]


class Pipeline(_Node):
    """`a | b | c`: each stage's output streams into the next stage's stdin."""

    __slots__ = ("commands",)

    def __init__(self, commands: list[SimpleCommand]) -> None:
        self.commands = commands


class AndOr(_Node):
    """`p1 && p2 || p3`: run `first`, then each following pipeline depending on the previous exit code."""

    __slots__ = ("first", "rest")

    def __init__(self, first: Pipeline, rest: list[tuple[str, Pipeline]] | None = None) -> None:
        self.first = first
        self.rest = rest if rest is not None else []

    def pipelines(self) -> list[Pipeline]:
        return [self.first, *(p for _, p in self.rest)]


class Statement(_Node):
    """One and-or list, run in the foreground or (`&`) as a background job."""

    __slots__ = ("body", "background", "text", "line")

    def __init__(self, body: AndOr, background: bool, text: str, line: int) -> None:
        self.body = body
        self.background = background
        self.text = text  # the source text, for `jobs` and error messages
        self.line = line  # 1-based line of the statement's first token


class Script(_Node):
    """What `parse` returns: the statements in order."""

    __slots__ = ("statements",)

    def __init__(self, statements: list[Statement]) -> None:
        self.statements = statements


class _Lexer:
    """Splits source text into tokens; `partial=True` (completion) closes an open quote instead of failing."""

    def __init__(self, code: str, partial: bool = False) -> None:
        self.code = code
        self.partial = partial
        self.dangling = False  # input ends in a backslash-newline: the line continues

    def tokens(self) -> list[Token]:
        """One regex match per token (blanks skipped inside it): the per-character Python loop took ~0.6 s for a
        1 MB line; words with quotes or backslashes go through `_word`."""
        code, n, i = self.code, len(self.code), 0
        out: list[Token] = []
        append, match = out.append, _TOKEN.match
        while i < n:
            m = match(code, i)
            if m is None:  # (never: every part of the pattern is optional)
                break
            kind = m.lastgroup  # (the pattern also matches blanks alone: then kind is None)
            if kind == "word":
                append(Token("word", m.group(kind), m.start(kind), m.end()))
                i = m.end()
            elif kind == "op":
                append(Token("op", m.group(kind), m.start(kind), m.end()))
                i = m.end()
            elif kind == "comment":
                i = m.end()
            elif kind == "cont":
                i = m.end()
                self.dangling = i >= n
            elif m.end() >= n:
                break
            else:
                tok, i = self._word(m.end())
                append(tok)
        return out

    def _word(self, i: int) -> tuple[Token, int]:
        """One word from `i`: its value with the quoting removed as POSIX `shlex.split` would, in one pass
        (shlex itself reads character by character in Python: a 1 MB quoted prompt took seconds)."""
        code, n, start = self.code, len(self.code), i
        run = _WORD_RUN.match(code, i)
        if run is not None and (run.end() >= n or code[run.end()] in _BLANK or code[run.end()] in _OP_CHARS):
            return Token("word", run.group(), start, run.end()), run.end()  # the common case: a plain word
        value: list[str] = []
        quoted = False
        while i < n:
            c = code[i]
            if c in _BLANK or c in _OP_CHARS:
                break
            if c == "\\":
                if i + 1 >= n:
                    if self.partial:
                        i += 1
                        break
                    raise ParseError("line ends with '\\'; continue it on the next line", incomplete=True, pos=i)
                if code[i + 1] == "\n":  # line continuation inside a word
                    i += 2
                    self.dangling = i >= n
                    continue
                value.append(code[i + 1])  # outside quotes a backslash keeps the next character as it is
                quoted = True
                i += 2
                continue
            if c in "'\"":
                j = self._closing_quote(i)
                quoted = True
                if j < 0:
                    if not self.partial:
                        raise ParseError(f"unclosed {c} quote", incomplete=True, pos=i)
                    j = n
                inner = code[i + 1 : j]
                value.append(inner if c == "'" else _unescape_double(inner))
                i = min(j + 1, n)
                continue
            run = _WORD_RUN.match(code, i)
            assert run is not None  # code[i] is none of the characters the pattern stops at
            value.append(run.group())
            i = run.end()
        return Token("word", "".join(value), start, i, quoted), i

    def _closing_quote(self, i: int) -> int:
        code, q = self.code, self.code[i]
        if q == "'":
            return code.find("'", i + 1)
        m = _DOUBLE_BODY.match(code, i + 1)
        assert m is not None  # the pattern also matches the empty string
        j = m.end()
        return j if j < len(code) and code[j] == '"' else -1


def _unescape_double(inner: str) -> str:
    """The text between double quotes with shlex's (POSIX) rules: backslash-newline is dropped, and a backslash
    escapes only `"` and `\\`; before any other character it stays."""
    if "\\" not in inner:
        return inner
    return _DOUBLE_ESCAPE.sub(lambda m: "" if m.group(1) == "\n" else m.group(1) if m.group(1) in '"\\' else m.group(0), inner)


def tokenize(code: str, *, partial: bool = False) -> list[Token]:
    """The tokens of `code`; raises ParseError for an unclosed quote unless `partial`."""
    return _Lexer(code, partial).tokens()


class _Parser:
    """Recursive descent over the tokens. `ops[i]` is token i's operator, or '' for a word, so each step is a list
    lookup rather than a method call (a 1 MB line of 150k statements is ~600k tokens)."""

    def __init__(self, code: str, tokens: list[Token]) -> None:
        self.code = code
        self.toks = tokens
        self.ops = [t.value if t.kind == "op" else "" for t in tokens] + [_END]
        self.i = 0
        self.lines = 0  # newlines before `counted`
        self.counted = 0

    def peek(self) -> Token | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def skip_newlines(self) -> None:
        ops, i = self.ops, self.i
        while ops[i] == "\n":
            i += 1
        self.i = i

    def script(self) -> Script:
        stmts: list[Statement] = []
        toks, ops, code = self.toks, self.ops, self.code
        while True:
            self.skip_newlines()
            if self.i >= len(toks):
                return Script(stmts)
            first = toks[self.i]
            body = self.and_or()
            last = toks[self.i - 1]
            op = ops[self.i]
            background = op == "&"
            if op is not _END:
                if op not in SEPARATORS:
                    raise self.unexpected(self.peek())
                self.i += 1
            text = code[first.start : last.end]
            self.lines += code.count("\n", self.counted, first.start)  # counted once overall: linear in the input
            self.counted = first.start
            stmts.append(Statement(body, background, text, self.lines + 1))

    def and_or(self) -> AndOr:
        node = AndOr(self.pipeline())
        ops = self.ops
        while (op := ops[self.i]) == "&&" or op == "||":
            self.i += 1
            self.skip_newlines()
            if ops[self.i] is _END:
                raise ParseError(f"'{op}' needs a command after it", incomplete=True, pos=len(self.code))
            node.rest.append((op, self.pipeline()))
        return node

    def pipeline(self) -> Pipeline:
        cmds = [self.command()]
        ops = self.ops
        while ops[self.i] == "|":
            self.i += 1
            self.skip_newlines()
            if ops[self.i] is _END:
                raise ParseError("'|' needs a command after it", incomplete=True, pos=len(self.code))
            cmds.append(self.command())
        return Pipeline(cmds)

    def command(self) -> SimpleCommand:
        toks, ops, i = self.toks, self.ops, self.i
        argv: list[str] = []
        redirect: Redirect | None = None
        start = toks[i].start if i < len(toks) else len(self.code)
        end = start
        while True:
            op = ops[i]
            if op == "":
                t = toks[i]
                argv.append(t.value)
            elif op == ">" or op == ">>":
                t = toks[i]
                if ops[i + 1] != "":
                    raise ParseError(f"'{op}' needs a file name after it", pos=t.start)
                if redirect is not None:
                    raise ParseError("only one output redirection per command", pos=t.start)
                i += 1
                t = toks[i]
                redirect = Redirect(t.value, append=op == ">>")
            elif op == "<":
                raise ParseError("input redirection '<' is not supported; quote the '<' or use a pipe", pos=toks[i].start)
            else:
                break
            end = t.end
            i += 1
        self.i = i
        if not argv:
            nxt = self.peek()
            if nxt is None:
                raise ParseError("missing command", pos=len(self.code))
            raise self.unexpected(nxt)
        return SimpleCommand(argv, redirect, start, end)

    def unexpected(self, t: Token | None) -> ParseError:
        shown = "newline" if t is not None and t.value == "\n" else (t.value if t else "end of input")
        return ParseError(f"syntax error near '{shown}'", pos=t.start if t else len(self.code))


def parse(code: str) -> Script:
    """Parse source text into a Script; raises ParseError (one-line message) on bad or unfinished input."""
    return _without_gc(lambda: _Parser(code, tokenize(code)).script())


class GcPause:
    """Pauses the cyclic garbage collector while any thread parses. The collector's switch is one per process: a
    parse that saved and restored it alone would switch it back on under a parse still running in another thread
    (the kernel parses each client's lines on its own thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parsing = 0                 # parses running now, in all threads
        self._restore = False             # whether the collector was on when the first of them began

    def __enter__(self) -> None:
        with self._lock:
            if self._parsing == 0:
                self._restore = gc.isenabled()
                gc.disable()
            self._parsing += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._parsing -= 1
            if self._parsing == 0 and self._restore:
                gc.enable()


_gc_pause = GcPause()


def _without_gc(fn: Callable[[], Script]) -> Script:
    """fn() with the cyclic garbage collector paused. A long line makes ~4 objects per token, none in a cycle, and
    each 700 allocations started a collection that re-traversed the younger ones: half of a 1 MB line's parse."""
    with _gc_pause:
        return fn()


def simple_argv(code: str) -> list[str] | None:
    """The words of `code` when it is exactly one simple command (no list, pipe, `&` or redirect), else None.

    The shell uses it to spot lines it handles itself (`exit N`, `chat NAME`)."""
    try:
        stmts = parse(code).statements
    except ParseError:
        return None
    if len(stmts) != 1 or stmts[0].background or stmts[0].body.rest:
        return None
    cmds = stmts[0].body.first.commands
    if len(cmds) != 1 or cmds[0].redirect is not None:
        return None
    return list(cmds[0].argv)


def is_complete(code: str) -> tuple[str, str]:
    """Jupyter's is_complete: ("complete"|"incomplete"|"invalid", indent) — unclosed quote, trailing `\\`, `&&`, `||`, `|` are incomplete."""
    lexer = _Lexer(code)
    try:
        _without_gc(lambda: _Parser(code, lexer.tokens()).script())
    except ParseError as e:
        return ("incomplete", "") if e.incomplete else ("invalid", "")
    if lexer.dangling:
        return "incomplete", ""
    return "complete", ""


def join(argv: list[str]) -> str:
    """Quote argv back into one command line (for display)."""
    return shlex.join(argv)
