"""How the shell renders kernel messages: streams verbatim, results as text/plain, errors as one (red) line."""

from __future__ import annotations

from typing import Any

from llmsh.client.render import Printer, exit_code, reply_error


def msg(kind: str, content: dict[str, Any]) -> dict[str, Any]:
    return {"msg_type": kind, "content": content}


def test_streams_results_and_errors(capsys: Any) -> None:
    p = Printer(color=False)
    p.on_output(msg("stream", {"name": "stdout", "text": "tok"}))
    p.on_output(msg("stream", {"name": "stdout", "text": "ens\n"}))
    p.on_output(msg("stream", {"name": "stderr", "text": "warn\n"}))
    p.on_output(msg("execute_result", {"data": {"text/plain": "PID  NAME", "application/json": []}}))
    p.on_output(msg("error", {"ename": "X", "evalue": "llmsh: shown by the reply instead"}))
    p.error("llmsh: foo: command not found")
    out, err = capsys.readouterr()
    assert out == "tokens\nPID  NAME\n"
    assert err == "warn\nllmsh: foo: command not found\n"
    Printer(color=True).error("llmsh: bad")
    assert capsys.readouterr().err == "\x1b[31mllmsh: bad\x1b[0m\n"


def test_reply_error_and_exit_code() -> None:
    assert reply_error({"ename": "KeyboardInterrupt", "evalue": "interrupted"}) == "llmsh: interrupted"
    assert reply_error({"ename": "CommandNotFound", "evalue": "llmsh: x: command not found\nmore"}) == "llmsh: x: command not found"
    assert reply_error({"ename": "KernelError", "evalue": "something"}) == "llmsh: something"
    assert exit_code({"status": "error", "llmsh_exit_code": 127}) == 127
    assert exit_code({"status": "error"}) == 1 and exit_code({"status": "ok"}) == 0
