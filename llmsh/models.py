"""Where models are: the configured model dirs and the local Hugging Face hub cache (`models`, `load NAME`).

Torch-free and used by both sides: the front lists and resolves names for `models` and Tab completion (on a worker
thread, never on its event loop), the engine resolves what it loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmsh.config import ConfigError, read_config
from llmsh.runtime.hub import hub_cache_dir


def default_name(path: str) -> str:
    if path.startswith("ollama:"):  # ollama:me/llama3.2:1b -> llama3.2
        return path.split("/")[-1].removeprefix("ollama:").split(":")[0]
    p = Path(path)
    if p.suffix.lower() == ".gguf":
        return p.stem
    if "snapshots" in p.parts:  # HF cache: models--org--name/snapshots/<rev>
        for part in p.parts:
            if part.startswith("models--"):
                return part.split("--")[-1]
    return p.name or str(path)


def model_dirs() -> list[Path]:
    """Configured model folders: `LLMSH_MODEL_PATH` (os.pathsep-separated) first, then config.toml `model_dirs`."""
    dirs: list[Path] = []
    env = os.environ.get("LLMSH_MODEL_PATH", "")
    dirs += [Path(d).expanduser() for d in env.split(os.pathsep) if d]
    try:
        data = read_config()
    except ConfigError:
        data = {}  # `load` says nothing of it; the kernel's start already reported the file
    dirs += [Path(str(d)).expanduser() for d in data.get("model_dirs", []) or []]
    return dirs


def hf_cache_dir() -> Path:
    """The hub cache (one resolver for the whole project: `llmsh.runtime.hub`, torch-free)."""
    return hub_cache_dir()


def _describe(path: Path, name: str, source: str) -> dict[str, Any]:
    size = sum(f.stat().st_size for f in path.glob("*.safetensors") if f.exists())
    arch = ""
    try:
        cfg = json.loads((path / "config.json").read_text())
        arch = cfg.get("model_type") or ",".join(cfg.get("architectures") or [])
    except (OSError, ValueError):
        pass
    return {"name": name, "path": str(path), "source": source, "arch": arch, "bytes": size}


def find_models() -> list[dict[str, Any]]:
    """Everything `load` can find by name: model dirs (folders with a config.json) and the HF hub cache."""
    out: list[dict[str, Any]] = []
    for d in model_dirs():
        if not d.is_dir():
            continue
        if (d / "config.json").is_file():
            out.append(_describe(d, d.name, str(d.parent)))
        for sub in sorted(d.iterdir()):
            if sub.is_dir() and (sub / "config.json").is_file():
                out.append(_describe(sub, sub.name, str(d)))
            elif sub.suffix.lower() == ".gguf" and sub.is_file():  # GGUF files (llama.cpp's format)
                out.append({"name": sub.name, "path": str(sub), "source": str(d), "arch": "gguf",
                            "bytes": sub.stat().st_size})
    from llmsh.runtime import ollama  # torch-free

    out += ollama.list_models()
    cache = hf_cache_dir()
    if cache.is_dir():
        for repo in sorted(cache.glob("models--*")):
            snaps = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime, reverse=True)
            for snap in snaps:
                if (snap / "config.json").exists():
                    name = repo.name[len("models--"):].replace("--", "/")
                    out.append(_describe(snap, name, "hf-cache"))
                    break
    return out


def resolve_model(source: str) -> str:
    """A path as given (absolute), or the folder of a model named in `models`; else `source` unchanged for the runtime."""
    p = Path(source).expanduser()
    if p.exists():
        return str(p.resolve())
    if source.startswith("ollama:"):  # the runtime resolves it in Ollama's store (and names it in errors)
        return source
    for m in find_models():
        if m["name"] == source or m["name"].split("/")[-1] == source:
            return m["path"]
    return source
