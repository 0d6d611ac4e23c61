"""The HTTP API (issue 17) as its users see it: the real `openai` and `ollama` client packages against a real
kernel started with `--http`, with tiny models. Pure parsing and mapping get fast unit tests at the end."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from llmsh.http.config import HttpConfigError, parse_address, settings
from llmsh.http.gateway import ApiError
from llmsh.http.ollama_api import keep_alive_seconds, options
from llmsh.http.openai_api import _params
from tests.fixtures_kernel import KernelHandle, kernel_env

GREEDY = "--temperature 0 --ignore-eos"


# ---- a kernel with --http -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(make_kernel: Callable[..., KernelHandle], tiny_gpt2: Path, tiny_llama: Path,
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A kernel serving HTTP on a free loopback port, with `g` (gpt2) and `c` (llama, chat template) loaded and a
    models dir holding `tinychat` (a llama) for loading on demand."""
    models = tmp_path_factory.mktemp("http-models")
    (models / "tinychat").symlink_to(tiny_llama, target_is_directory=True)
    env = kernel_env()
    env["LLMSH_MODEL_PATH"] = str(models)
    k = make_kernel("--http", "127.0.0.1:0", env=env)
    _ok(k, f"load {tiny_gpt2} --name g")
    _ok(k, f"load {tiny_llama} --name c")
    url = "http://" + k.kernel_info()["http"]
    assert f"http      {url}" in k.llmsh("kernel", "status").stdout
    return {"k": k, "url": url, "oa": openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60),
            "ol": ollama.Client(host=url, timeout=60)}


def _ok(k: KernelHandle, code: str, timeout: float = 60) -> dict[str, Any]:
    out = k.execute(code, timeout=timeout)
    assert out["status"] == "ok", (code, out)
    return out


def _row(k: KernelHandle, name: str) -> dict[str, Any]:
    rows = {r["name"]: r for r in _ok(k, "ps --json")["data"]}
    assert name in rows, (name, sorted(rows))
    return rows[name]


def _wait(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _run(k: KernelHandle, proc: str, prompt: str, n: int) -> dict[str, Any]:
    return _ok(k, f"run {proc} {GREEDY} --max-tokens {n} --json -- {json.dumps(prompt)}")["data"]


# ---- OpenAI ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_openai_completion_is_runs_greedy_output_with_usage(served: dict[str, Any]) -> None:
    ran = _run(served["k"], "g", "hello world", 12)
    got = served["oa"].completions.create(model="g", prompt="hello world", max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert got.choices[0].text == ran["text"]
    assert got.choices[0].finish_reason == "length"
    assert got.usage.completion_tokens == 12 and got.usage.prompt_tokens == ran["prompt_tokens"]
    assert got.usage.total_tokens == 12 + ran["prompt_tokens"]


@pytest.mark.slow
def test_openai_stream_has_the_same_text_then_usage_and_done(served: dict[str, Any]) -> None:
    ran = _run(served["k"], "g", "hello world", 12)
    chunks = list(served["oa"].completions.create(model="g", prompt="hello world", max_tokens=12, temperature=0,
                                                  stream=True, stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ran["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    raw = httpx.post(served["url"] + "/v1/completions", json={"model": "g", "prompt": "hi", "max_tokens": 3, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


@pytest.mark.slow
def test_openai_chat_uses_the_template_like_the_shell(served: dict[str, Any]) -> None:
    shell = _ok(served["k"], "chat c --temperature 0 --max-tokens 10 --json hi there")["data"]["reply"]
    msgs = [{"role": "user", "content": "hi there"}]
    got = served["oa"].chat.completions.create(model="c", messages=msgs, max_completion_tokens=10, temperature=0)
    assert got.choices[0].message.content == shell and got.choices[0].message.role == "assistant"
    stream = served["oa"].chat.completions.create(model="c", messages=msgs, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == shell


@pytest.mark.slow
def test_stop_string_ends_the_text_before_it(served: dict[str, Any]) -> None:
    full = _run(served["k"], "g", "once upon", 20)["text"]
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), full
    got = served["oa"].completions.create(model="g", prompt="once upon", max_tokens=20, temperature=0, stop=[stop],
                                          extra_body={"ignore_eos": True})
    assert got.choices[0].finish_reason == "stop"
    assert got.choices[0].text == full[:full.index(stop)]


@pytest.mark.slow
def test_errors_have_openais_shape_and_status(served: dict[str, Any]) -> None:
    oa, url = served["oa"], served["url"]
    with pytest.raises(openai.NotFoundError, match="not loaded and not found"):
        oa.completions.create(model="nonesuch", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature must be >= 0"):
        oa.completions.create(model="g", prompt="x", max_tokens=2, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="one choice per request"):
        oa.completions.create(model="g", prompt="x", max_tokens=2, n=2)
    with pytest.raises(openai.BadRequestError, match="exceeds the context"):
        oa.completions.create(model="g", prompt="x", max_tokens=100000)
    r = httpx.post(url + "/v1/completions", content=b'{"prompt": "' + b"a" * (5 << 20) + b'"}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over the limit" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert [m.id for m in oa.models.list()][:2] == ["g", "c"]


@pytest.mark.slow
def test_disconnect_mid_stream_cancels_at_the_next_step(served: dict[str, Any]) -> None:
    """STOP holds the process still while the client goes away; after CONT the request is dropped at once."""
    k = served["k"]
    before = _row(k, "g")["tokens"]
    with httpx.stream("POST", served["url"] + "/v1/completions", timeout=60,
                      json={"model": "g", "prompt": "a long story", "max_tokens": 100, "temperature": 0,
                            "ignore_eos": True, "stream": True}) as r:
        lines = r.iter_lines()
        while next(lines).startswith("data:") is False:
            pass
        _ok(k, "kill -STOP g")
        seen = _row(k, "g")["tokens"] - before
    _wait(lambda: _cancelled(k) == 1, "the stream to be cancelled")
    _ok(k, "kill -CONT g")  # the client has gone: the engine drops the request at the next step
    _wait(lambda: _row(k, "g")["reqs_active"] + _row(k, "g")["reqs_queued"] == 0, "the request to be dropped")
    used = _row(k, "g")["tokens"] - before
    assert used <= seen + 2 < 100, (seen, used)


@pytest.mark.slow
def test_disconnect_while_waiting_for_a_whole_completion_cancels_it(served: dict[str, Any]) -> None:
    k = served["k"]
    before, cancelled = _row(k, "g")["tokens"], _cancelled(k)
    _ok(k, "kill -STOP g")
    try:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            httpx.post(served["url"] + "/api/generate", timeout=httpx.Timeout(60, read=1.0),
                       json={"model": "g", "prompt": "waiting", "stream": False, "options": {"num_predict": 100}})
        _wait(lambda: _cancelled(k) == cancelled + 1, "the request to be cancelled")
    finally:
        _ok(k, "kill -CONT g")
    _wait(lambda: _row(k, "g")["reqs_active"] + _row(k, "g")["reqs_queued"] == 0, "the request to be dropped")
    assert _row(k, "g")["tokens"] - before <= 2


def _cancelled(k: KernelHandle) -> int:
    return int(k.kernel_info()["counters"]["cancelled"].get("http-disconnect", 0))


@pytest.mark.slow
def test_concurrent_streams_are_batched_together(served: dict[str, Any]) -> None:
    k, url, n = served["k"], served["url"], 16
    _ok(k, "kill -STOP g")  # all sixteen queue, then join one batch at CONT (16 = the default --max-batch)
    start = _row(k, "g")
    texts: list[str] = ["" for _ in range(n)]

    def client(i: int) -> None:
        oa = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        for c in oa.completions.create(model="g", prompt=f"story {i}", max_tokens=8, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True}):
            texts[i] += c.choices[0].text if c.choices else ""

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    try:
        _wait(lambda: _row(k, "g")["reqs_queued"] + _row(k, "g")["reqs_active"] == n, f"{n} queued requests")
    finally:
        _ok(k, "kill -CONT g")
    for t in threads:
        t.join(60)
    end = _row(k, "g")
    tokens, steps = end["tokens"] - start["tokens"], end["steps"] - start["steps"]
    assert tokens == 8 * n and steps <= 8 + 2, (tokens, steps)
    assert end["last_batch"] == n, end  # the last step ran all sixteen together
    assert all(texts)
    counters = k.kernel_info()["counters"]
    assert counters["in"]["http"]["POST /v1/completions"]["count"] >= n


@pytest.mark.slow
def test_nice_header_runs_the_request_on_a_process_at_that_nice(served: dict[str, Any]) -> None:
    oa = served["oa"]
    got = oa.completions.create(model="g", prompt="batch job", max_tokens=4, temperature=0,
                                extra_headers={"X-Llmsh-Nice": "7"})
    assert got.usage.completion_tokens >= 1
    row = _row(served["k"], "g-nice7")
    assert row["nice"] == 7 and row["tokens"] >= 1
    with pytest.raises(openai.BadRequestError, match="out of range"):
        oa.completions.create(model="g", prompt="x", max_tokens=2, extra_headers={"X-Llmsh-Nice": "-5"})


# ---- Ollama ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ollama_generate_and_chat(served: dict[str, Any]) -> None:
    ol, k = served["ol"], served["k"]
    ran = _run(k, "g", "hello world", 8)
    opts = {"num_predict": 8, "temperature": 0}
    got = ol.generate(model="g", prompt="hello world", options=opts, keep_alive="10m")
    assert got.response and ran["text"].startswith(got.response)  # the same greedy text (Ollama's stops at EOS)
    assert got.done and 1 <= got.eval_count <= 8 and got.prompt_eval_count == ran["prompt_tokens"]
    streamed = "".join(p.response for p in ol.generate(model="g", prompt="hello world", options=opts, stream=True))
    assert streamed == got.response
    chatted = _ok(k, "chat c --reset --temperature 0 --max-tokens 6 --json why")["data"]["reply"]
    templated = ol.generate(model="c", prompt="why", options={"num_predict": 6, "temperature": 0})
    assert templated.response == chatted  # a model with a chat template: the prompt is one user turn, as in Ollama
    raw = ol.generate(model="c", prompt="why", raw=True, options={"num_predict": 6, "temperature": 0})
    assert raw.response == _ok(k, "run c --temperature 0 --max-tokens 6 --json why")["data"]["text"]
    shell = _ok(k, "chat c --reset --temperature 0 --max-tokens 6 --json hello")["data"]["reply"]
    msgs = [{"role": "user", "content": "hello"}]
    reply = ol.chat(model="c", messages=msgs, options={"num_predict": 6, "temperature": 0})
    assert reply.message.content == shell and reply.message.role == "assistant"
    parts = list(ol.chat(model="c", messages=msgs, options={"num_predict": 6, "temperature": 0}, stream=True))
    assert "".join(p.message.content for p in parts) == shell and parts[-1].done


@pytest.mark.slow
def test_ollama_loads_a_named_model_on_demand_and_lists_it(served: dict[str, Any]) -> None:
    ol, k = served["ol"], served["k"]
    assert "tinychat" in [m.model for m in ol.list().models]
    reply = ol.chat(model="tinychat", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 3})
    assert reply.done
    assert _row(k, "tinychat")["state"] in ("ready", "running")
    assert "tinychat" in [m.model for m in ol.ps().models]
    unloaded = ol.generate(model="tinychat", prompt="", keep_alive=0)  # Ollama's "unload": pages released when idle
    assert unloaded.done and unloaded.done_reason == "unload"
    _wait(lambda: _row(k, "tinychat")["state"] == "paged-out", "tinychat's pages to be released")
    with pytest.raises(ollama.ResponseError) as e:
        ol.generate(model="nonesuch", prompt="x")
    assert e.value.status_code == 404
    assert httpx.get(served["url"] + "/api/version").json()["version"]


@pytest.mark.slow
def test_engine_death_is_a_503_then_the_model_comes_back(served: dict[str, Any]) -> None:
    import os
    import signal

    k, oa = served["k"], served["oa"]
    _ok(k, "kill -STOP g")
    box: dict[str, Any] = {}

    def ask() -> None:
        try:
            oa.completions.create(model="g", prompt="doomed", max_tokens=5)
        except openai.APIStatusError as e:
            box["error"] = e

    t = threading.Thread(target=ask)
    t.start()
    _wait(lambda: _row(k, "g")["reqs_queued"] + _row(k, "g")["reqs_active"] == 1, "the queued request")
    os.kill(int(k.kernel_info()["engine_pid"]), signal.SIGKILL)
    t.join(60)
    assert box["error"].status_code == 503 and "engine exited" in str(box["error"])
    again = oa.completions.create(model="g", prompt="back", max_tokens=3, temperature=0)
    assert again.usage.completion_tokens >= 1  # restored on its first use, same name


# ---- off loopback ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_off_loopback_needs_a_key() -> None:
    """Through the real CLI: refused without a key; daemonised with one, which stays off its command line."""
    from llmsh import paths

    env = kernel_env()

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "llmsh", *args], check=False, capture_output=True, text=True,
                              env=env, timeout=120)

    refused = cli("kernel", "start", "--foreground", "--telemetry-hz", "0", "--http", "0.0.0.0:0")
    assert refused.returncode == 1 and "not a loopback address" in refused.stderr and "--http-key" in refused.stderr
    cf = paths.runtime_dir() / "kernel-http-daemon.json"
    started = cli("kernel", "start", "--connection-file", str(cf), "--telemetry-hz", "0", "--http", "0.0.0.0:0",
                  "--http-key", "s3cret")
    assert started.returncode == 0, started.stderr
    try:
        status = json.loads(cli("kernel", "status", "--json", "--kernel", str(cf)).stdout)
        assert b"s3cret" not in Path(f"/proc/{status['pid']}/cmdline").read_bytes()
        url = f"http://127.0.0.1:{status['http'].rsplit(':', 1)[1]}/v1"
        with pytest.raises(openai.AuthenticationError, match="Bearer"):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        assert openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0).models.list().data == []
        assert httpx.get(url.replace("/v1", "/api/tags")).status_code == 401
    finally:
        assert cli("kernel", "stop", "--kernel", str(cf)).returncode == 0


# ---- unit: parsing and mapping ------------------------------------------------------------------------------------


def test_addresses_and_settings(tmp_path: Path) -> None:
    assert parse_address("8080") == ("127.0.0.1", 8080)
    assert parse_address("0.0.0.0:1") == ("0.0.0.0", 1)
    assert parse_address("[::1]:9") == ("::1", 9)
    with pytest.raises(HttpConfigError, match=r"\[ADDR:\]PORT"):
        parse_address("localhost:http")
    ns = type("A", (), {})()
    assert settings(ns) is None
    cfg = tmp_path / "config.toml"
    cfg.write_text('serve_http = true\n')
    assert settings(ns, cfg).port == 11435
    cfg.write_text('http = "0.0.0.0:9000"\n')
    with pytest.raises(HttpConfigError, match="--http-key"):
        settings(ns, cfg)
    cfg.write_text('http = "0.0.0.0:9000"\nhttp_key = "k"\n')
    assert settings(ns, cfg).key == "k"


def test_parameter_mapping() -> None:
    assert _params({"max_completion_tokens": 5, "stop": "x", "seed": 3}) == {"max_tokens": 5, "stop": ["x"], "seed": 3}
    for body, param in (({"n": 3}, "n"), ({"max_tokens": 0}, "max_tokens"), ({"temperature": "hot"}, "temperature"),
                        ({"logprobs": True}, "logprobs"), ({"frequency_penalty": 1}, "frequency_penalty")):
        with pytest.raises(ApiError) as e:
            _params(body)
        assert e.value.status == 400 and e.value.param == param
    params, ctx = options({"options": {"num_predict": -1, "temperature": 0, "repeat_penalty": 1.1, "num_ctx": 64}})
    assert params == {"temperature": 0, "repetition_penalty": 1.1} and ctx == 64
    assert keep_alive_seconds("5m") == 300 and keep_alive_seconds(-1) is None and keep_alive_seconds(None) == "unset"
    assert keep_alive_seconds("0") == 0
    with pytest.raises(ApiError):
        keep_alive_seconds("soon")


def test_the_http_layer_never_imports_torch() -> None:
    """It runs in the front, which must survive anything a model does."""
    code = "import sys, llmsh.http.server, llmsh.http.app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=kernel_env())
    assert out.stdout.strip() == "False"


def test_llmsh_errors_map_to_http_statuses() -> None:
    from llmsh.kernel.engines import EngineDied
    from llmsh.kernel.errors import KernelError

    cases = [(KernelError("busy: process 1 (g) already has 64 queued requests", ename="Busy"), 429, "busy"),
             (EngineDied("engine exited: SIGKILL"), 503, "unavailable"),
             (KernelError("prompt of 9 tokens + --max-tokens 9999 exceeds the context of 128 tokens",
                          ename="RequestFailed"), 400, None),
             (KernelError("temperature must be >= 0", ename="UsageError"), 400, None),
             (KernelError("no process named 'x'", ename="NoSuchProcess"), 404, "model_not_found")]
    for err, status, code in cases:
        api = ApiError.from_kernel(err)
        assert (api.status, api.code) == (status, code) and api.message == str(err)
