"""Find a model folder from what the user typed: a path, or a name in the local Hugging Face hub cache.

The cache layout is `$HF_HUB_CACHE` (default `$HF_HOME/hub`, default `~/.cache/huggingface/hub`) /
`models--org--name/{refs/main, snapshots/<commit>/..., blobs/<sha>}`. Nothing here touches the network: a model that is
not on disk is an error that says where we looked.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from llmsh.runtime.errors import LoadError

_HEX_REV = re.compile(r"^[0-9a-f]{40}$")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache directory, honouring HF_HUB_CACHE and HF_HOME like huggingface_hub does."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def repo_dir(name: str) -> Path:
    """The cache folder of repo `org/name` (it may not exist)."""
    return hub_cache_dir() / ("models--" + name.replace("/", "--"))


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.count("/") > 1 or text.endswith("/")


def resolve(path_or_name: str) -> Path:
    """Return the model folder for a path or an `org/name[@revision]` in the hub cache; LoadError if there is none."""
    text = path_or_name.strip()
    if not text:
        raise LoadError("no model given; pass a folder path or a name like org/model from the Hugging Face cache")
    path = Path(text).expanduser()
    if path.is_dir():
        return _check_folder(path.resolve(), text)
    if _looks_like_path(text) or path.exists():
        raise LoadError(f"no model at {text} (expected a folder with config.json and *.safetensors); see 'help load'")
    name, _, rev = text.partition("@")
    repo = repo_dir(name)
    if not repo.is_dir():
        raise LoadError(f"no model at {text}: not a folder, and {repo.name} is not in the Hugging Face cache "
                        f"{hub_cache_dir()} (llmsh never downloads; fetch it first with huggingface-cli download {name})")
    return _check_folder(_snapshot(repo, rev or "main", text), text)


def _snapshot(repo: Path, rev: str, text: str) -> Path:
    snapshots = repo / "snapshots"
    ref = repo / "refs" / rev
    if ref.is_file():
        commit = ref.read_text().strip()
    elif _HEX_REV.match(rev):
        commit = rev
    else:
        found = sorted(p.name for p in snapshots.iterdir()) if snapshots.is_dir() else []
        if rev == "main" and len(found) == 1:
            commit = found[0]
        else:
            raise LoadError(f"{text}: no revision {rev!r} in {repo} (snapshots: {', '.join(found) or 'none'})")
    folder = snapshots / commit
    if not folder.is_dir():
        raise LoadError(f"{text}: revision {rev} points to snapshot {commit[:12]} which is missing from {snapshots}; "
                        "re-download the model")
    return folder


def _check_folder(folder: Path, text: str) -> Path:
    if not (folder / "config.json").exists():
        raise LoadError(f"no model at {text} (expected config.json and *.safetensors in {folder}); see 'help load'")
    return folder


def list_cached_models() -> list[str]:
    """Names (`org/model`) of every model repo in the local hub cache that has a snapshot."""
    root = hub_cache_dir()
    if not root.is_dir():
        return []
    names = []
    for repo in sorted(root.glob("models--*")):
        if (repo / "snapshots").is_dir() and any((repo / "snapshots").iterdir()):
            names.append(repo.name[len("models--"):].replace("--", "/"))
    return names


def in_hub_cache(folder: Path) -> Path | None:
    """If folder is a snapshot in a hub cache repo (`.../models--x--y/snapshots/<rev>`), return the repo folder."""
    folder = Path(folder)
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent
    return None
