"""`load ollama:NAME[:TAG]` and `models` over a fake Ollama store built in tmp (manifests + sha256-named blobs), the
layout Ollama itself writes; the store is made read-only, as llmsh must never write there."""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("gguf")

from llmsh.runtime import LoadError, hash_cache, load, ollama  # noqa: E402
from tests.gguf_convert import convert  # noqa: E402


def add_blob(store: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (store / "blobs").mkdir(parents=True, exist_ok=True)
    (store / "blobs" / f"sha256-{digest}").write_bytes(data)
    return digest


def add_model(store: Path, gguf_file: Path, name: str, tag: str = "latest", namespace: str = "library") -> Path:
    """What `ollama pull` leaves: the GGUF and a config as blobs, a manifest naming them by digest."""
    model = gguf_file.read_bytes()
    cfg = json.dumps({"model_format": "gguf", "model_family": "llama", "file_type": "F32"}).encode()
    layers = [{"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{add_blob(store, model)}",
               "size": len(model)},
              {"mediaType": "application/vnd.ollama.image.template",
               "digest": f"sha256:{add_blob(store, b'{{ .Prompt }}')}", "size": 14}]
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                           "digest": f"sha256:{add_blob(store, cfg)}", "size": len(cfg)},
                "layers": layers}
    path = store / "manifests" / "registry.ollama.ai" / namespace / name / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return path


def read_only(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


@pytest.fixture(scope="module")
def tiny_gguf(make_tiny_model: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(make_tiny_model("llama3"), tmp_path_factory.mktemp("gguf") / "tiny-llama3.gguf")


@pytest.fixture
def store(tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = tmp_path / "ollama-models"
    add_model(root, tiny_gguf, "tiny")
    add_model(root, tiny_gguf, "tiny", tag="q", namespace="me")
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    read_only(root)
    yield root
    for p in [root, *root.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_names_resolve_as_ollama_does() -> None:
    assert ollama.parse_name("llama3") == ("registry.ollama.ai", "library", "llama3", "latest")
    assert ollama.parse_name("llama3.2:1b") == ("registry.ollama.ai", "library", "llama3.2", "1b")
    assert ollama.parse_name("me/model:q4") == ("registry.ollama.ai", "me", "model", "q4")
    assert ollama.parse_name("host.io/ns/m") == ("host.io", "ns", "m", "latest")
    for bad in ("", "a/b/c/d", "../x"):
        with pytest.raises(LoadError):
            ollama.parse_name(bad)


def test_load_from_the_store_equals_the_file(store: Path, tiny_gguf: Path) -> None:
    m = load("ollama:tiny")
    assert m.name == "tiny" and m.path.parent == store / "blobs"
    ref = load(str(tiny_gguf))
    ids = list(range(3, 30))
    torch.testing.assert_close(m.forward(ids), ref.forward(ids), atol=0, rtol=0)
    assert load("ollama:me/tiny:q").generate("Once", max_tokens=6, temperature=0) == \
        ref.generate("Once", max_tokens=6, temperature=0)


def test_missing_and_corrupt_models_fail_in_one_line(store: Path, tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(LoadError, match=r"no Ollama model nope:latest .*ollama pull nope:latest"):
        load("ollama:nope")
    bad = tmp_path / "bad"
    shutil.copytree(store, bad)
    for p in [bad, *bad.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)
    monkeypatch.setenv("OLLAMA_MODELS", str(bad))
    blob = ollama.resolve("tiny").model_path.name
    data = bytearray((bad / "blobs" / blob).read_bytes())
    data[-10] ^= 0xFF                                           # same size, one flipped byte
    (bad / "blobs" / blob).write_bytes(bytes(data))
    with pytest.raises(LoadError, match="corrupt: its sha256 does not match"):
        load("ollama:tiny")
    (bad / "blobs" / blob).write_bytes(bytes(data[:1000]))
    with pytest.raises(LoadError, match="truncated"):
        load("ollama:tiny")
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "none"))
    with pytest.raises(LoadError, match="no Ollama store"):
        load("ollama:tiny")


def test_second_load_does_not_rehash(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    found = ollama.resolve("tiny")
    ollama.verify(found)
    assert hash_cache.lookup(found.model_path) == found.digest

    def no_hashing(*a: Any) -> Any:
        raise AssertionError("rehashed an unchanged file")

    monkeypatch.setattr(hash_cache, "open", no_hashing, raising=False)   # hash_cache reading the file at all
    load("ollama:tiny")                                      # verified from the cache by (path, size, mtime, inode)


def test_models_lists_gguf_files_and_ollama_models(store: Path, tiny_gguf: Path, monkeypatch) -> None:
    from llmsh.models import find_models, resolve_model

    monkeypatch.setenv("LLMSH_MODEL_PATH", str(tiny_gguf.parent))
    found = {m["name"]: m for m in find_models()}
    assert found["ollama:tiny:latest"]["arch"] == "llama F32" and found["ollama:me/tiny:q"]["source"] == "ollama"
    assert found[tiny_gguf.name]["path"] == str(tiny_gguf) and found[tiny_gguf.name]["arch"] == "gguf"
    assert resolve_model(tiny_gguf.name) == str(tiny_gguf)
    assert resolve_model("ollama:tiny") == "ollama:tiny"


def test_kernel_loads_and_runs_an_ollama_model(make_kernel: Any, tiny_gguf: Path, tmp_path: Path,
                                              make_tiny_model: Callable[..., Path]) -> None:
    from tests.fixtures_kernel import kernel_env

    root = tmp_path / "store"
    add_model(root, tiny_gguf, "tiny")
    read_only(root)
    env = {**kernel_env(), "OLLAMA_MODELS": str(root)}
    k = make_kernel(env=env)
    r = k.execute("load ollama:tiny")
    assert r["status"] == "ok", r["reply"].get("evalue")
    rows = k.execute("ps --json")
    assert r["status"] == "ok" and "tiny" in json.dumps(rows["data"])
    out = k.execute("run tiny --max-tokens 4 --temperature 0 Once")
    assert out["status"] == "ok", out["reply"].get("evalue")
    (expect,) = load(str(tiny_gguf)).generate("Once", max_tokens=4, temperature=0)
    assert expect in out["stdout"]
    assert "ollama:tiny:latest" in k.execute("models")["stdout"] + json.dumps(k.execute("models --json")["data"])
    err = k.execute("load ollama:absent")
    assert err["status"] == "error" and "ollama pull absent:latest" in err["reply"]["evalue"]
    # load PATH --quant: a Hugging Face checkpoint with its matrices quantized at load
    q = k.execute(f"load {make_tiny_model('llama3')} --quant q8_0 --name qq")
    assert q["status"] == "ok", q["reply"].get("evalue")
    out = k.execute("run qq --max-tokens 4 --temperature 0 Once")
    assert out["status"] == "ok" and out["stdout"].strip(), out["reply"].get("evalue")

