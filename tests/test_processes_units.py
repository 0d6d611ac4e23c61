"""In-process pieces of the process commands: chat prompts match transformers', argument mixing, model discovery,
the `ps` table, and the real runtime adapter under the scheduler (stepped by hand, no kernel)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from llmsh.commands import generation, processes
from llmsh.commands.registry import REGISTRY, UsageError


def test_chat_prompt_matches_transformers(tiny_llama: Path) -> None:
    import transformers

    from llmsh.engine.service import chat_prompt_ids
    from llmsh.runtime.sampling import SamplingParams
    from llmsh.runtime.tokenizer import Tokenizer

    tok = Tokenizer(tiny_llama)
    proc = SimpleNamespace(name="t", runtime=SimpleNamespace(model=SimpleNamespace(tokenizer=tok), max_seq_len=256))
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]
    ids = chat_prompt_ids(proc, [*history, {"role": "user", "content": "how are you?"}], SamplingParams(max_tokens=8))
    ref = transformers.AutoTokenizer.from_pretrained(tiny_llama)
    want = ref.apply_chat_template([*history, {"role": "user", "content": "how are you?"}], add_generation_prompt=True,
                                   tokenize=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert ids == list(want)
    # too long for the context: the oldest exchange is dropped, the new message kept
    proc.runtime.max_seq_len = len(ids) + 8 - 1
    shorter = chat_prompt_ids(proc, [*history, {"role": "user", "content": "how are you?"}], SamplingParams(max_tokens=8))
    assert len(shorter) < len(ids)


def test_options_may_follow_the_prompt() -> None:
    cmd = REGISTRY.get("run")
    args = cmd.parse(["3", "tell", "me", "--max-tokens", "5", "--stop", "x"])
    assert generation.intermixed("run", args) == ("3", "tell me")
    assert args.max_tokens == 5 and args.stop == ["x"]
    args = cmd.parse(["3", "--", "-x", "y"])
    assert generation.intermixed("run", args) == ("3", "-x y")
    with pytest.raises(UsageError, match="which process"):
        generation.intermixed("run", cmd.parse([]))
    with pytest.raises(UsageError) as err:  # a bad option after the prompt: the usage names what run takes
        generation.intermixed("run", cmd.parse(["3", "hi", "--seed", "x"]))
    assert "PID|NAME PROMPT" in str(err.value) and "words" not in str(err.value)


def test_find_and_resolve_models(tiny_gpt2: Path, isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmsh import models as loader

    monkeypatch.setenv("LLMSH_MODEL_PATH", str(tiny_gpt2.parent))
    snap = isolated_home / "hf" / "hub" / "models--org--unit" / "snapshots" / "r1"
    snap.mkdir(parents=True, exist_ok=True)
    (snap / "config.json").write_text(json.dumps({"model_type": "llama"}))
    found = {m["name"]: m for m in loader.find_models()}
    assert found[tiny_gpt2.name]["arch"] == "gpt2" and found[tiny_gpt2.name]["bytes"] > 0
    assert found["org/unit"]["source"] == "hf-cache"
    assert loader.resolve_model(tiny_gpt2.name) == str(tiny_gpt2)
    assert loader.resolve_model("org/unit") == str(snap)
    assert loader.resolve_model("nowhere/nothing") == "nowhere/nothing"  # left for the runtime to explain
    assert loader.default_name(str(snap)) == "unit"


def test_ps_table_and_notes() -> None:
    rows = [
        {"pid": 1, "name": "a", "state": "running", "nice": 0, "device": "cpu", "res_bytes": 3 << 20, "reqs_active": 2,
         "reqs_queued": 1, "tok_s": 12.5, "tokens": 40, "time_s": 1.234, "node": "n", "reason": ""},
        {"pid": 2, "name": "b", "state": "failed", "nice": 5, "device": "cpu", "res_bytes": 0, "reqs_active": 0,
         "reqs_queued": 0, "tok_s": 0.0, "tokens": 0, "time_s": 0.0, "node": "n", "reason": "bad weights"},
    ]
    lines = processes.format_ps(rows).splitlines()
    assert lines[0].split() == "PID NAME STATE NI DEVICE RES REQS TOK/S TOKENS TIME NODE".split()
    assert lines[1].split() == ["1", "a", "running", "0", "cpu", "3.0M", "2+1", "12.5", "40", "1.23s", "n"]
    assert lines[-1] == "2: failed: bad weights"


def test_real_runtime_under_the_scheduler(make_tiny_model: Callable[..., Path]) -> None:
    """The runtime's BatchGenerator behind `ModelRuntime`, stepped by hand: batching and STOP/CONT are exact."""
    from llmsh.engine.loader import ModelRuntime
    from llmsh.engine.process import ProcessTable
    from llmsh.engine.scheduler import Scheduler
    from llmsh.runtime import load
    from llmsh.runtime.sampling import SamplingParams

    model = load(str(make_tiny_model("llama")))
    table = ProcessTable()
    sched = Scheduler(table, threaded=False)
    proc = table.add("m", "/x")
    proc.runtime = ModelRuntime(model, max_batch=4, max_seq_len=128)
    sched.attach(proc)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    ids = model.tokenizer.encode("once upon a time")
    events: list[list[Any]] = [[], []]
    for ev in events:
        sched.submit(proc, ids, params, lambda kind, value, ev=ev: ev.append((kind, value)))
    eng = sched.engine("cpu")
    for _ in range(5):
        eng.tick()
    sched.stop(proc)
    assert not eng.tick()
    assert proc.runtime.resident_bytes() > model.weight_bytes()  # weights + the KV cache its two requests hold
    sched.cont(proc)
    while eng.tick():
        pass
    ref = model.generate(["once upon a time"], max_tokens=20, temperature=0, ignore_eos=True)[0]
    for ev in events:
        assert ev[-1] == ("done", "length")
        assert "".join(v for k, v in ev if k == "token") == ref
    assert proc.max_batch_seen == 2 and proc.tokens == 40
    assert proc.runtime.resident_bytes() == model.weight_bytes()  # the finished requests' KV cache is given back
    sched.kill(proc)
    assert proc.runtime is None


def test_kill_while_loading_never_attaches(tiny_gpt2: Path) -> None:
    import threading

    from llmsh.engine.loader import Loader
    from llmsh.engine.process import ExitHow, ProcessTable, ProcState
    from llmsh.engine.scheduler import Scheduler

    table = ProcessTable()
    sched = Scheduler(table, threaded=False)
    loader = Loader(table, sched)
    gate = threading.Event()
    blockers = [loader.pool.submit(gate.wait) for _ in range(2)]  # both loader workers busy: the load stays queued
    proc, fut = loader.start(str(tiny_gpt2), name="doomed")
    assert proc.state is ProcState.LOADING and table.snapshot()[0]["state"] == "loading"
    sched.kill(proc)
    assert table.get(proc.pid) is None and table.exited[-1]["exit"] == ExitHow.KILL.value
    gate.set()
    fut.result(timeout=60)
    assert proc.runtime is None and proc not in sched.engine("cpu").procs
    # a load that completes just after the kill is refused at attach (the loader then drops the model)
    late = table.add("late", "/x")
    sched.kill(late)
    late.runtime = SimpleNamespace(new_batch=lambda: None)
    assert sched.attach(late) is False and late not in sched.engine("cpu").procs
    for b in blockers:
        b.result()
    loader.close()
