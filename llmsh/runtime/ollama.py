"""Models in Ollama's store, found through its manifests and read in place (llmsh never writes there).

The store (`$OLLAMA_MODELS`, else `~/.ollama/models`) holds `manifests/<host>/<namespace>/<model>/<tag>` (JSON in the
OCI image-manifest shape: `layers` with a `mediaType`, a `digest` "sha256:<hex>" and a `size`) and
`blobs/sha256-<hex>`, every blob named by its own hash. The layer of media type `application/vnd.ollama.image.model`
is the GGUF file. Names resolve as Ollama resolves them: `llama3` is `registry.ollama.ai/library/llama3:latest`,
`me/model:tag` is `registry.ollama.ai/me/model:tag`. Integrity: a blob must hash to its name (cached per file
identity, see hash_cache.py, so a second load does not rehash).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmsh.runtime import hash_cache
from llmsh.runtime.errors import LoadError

MODEL_MEDIA = "application/vnd.ollama.image.model"
DEFAULT_HOST, DEFAULT_NAMESPACE, DEFAULT_TAG = "registry.ollama.ai", "library", "latest"


def store_dir() -> Path:
    """Ollama's model store: OLLAMA_MODELS, else ~/.ollama/models."""
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


@dataclass
class OllamaModel:
    """One resolved Ollama model: its manifest and the GGUF blob it names."""

    name: str                 # as Ollama shows it: llama3:latest, me/model:tag, host/ns/model:tag
    manifest: Path
    model_path: Path          # blobs/sha256-<hex>
    digest: str               # <hex>
    size: int
    kind: str = ""            # family and file type from the config blob, e.g. "llama Q4_K_M"

    @property
    def display_name(self) -> str:
        return self.name.split("/")[-1].split(":")[0]


def parse_name(text: str) -> tuple[str, str, str, str]:
    """(host, namespace, model, tag) of an Ollama name, with Ollama's defaults filled in."""
    text = text.strip()
    base, _, tag = text.rpartition(":") if ":" in text.split("/")[-1] else (text, "", "")
    parts = [p for p in base.split("/") if p]
    if not parts or len(parts) > 3 or any(p in (".", "..") for p in parts) or (tag and "/" in tag):
        raise LoadError(f"{text!r} is not an Ollama model name; use NAME[:TAG], e.g. ollama:llama3.2:1b")
    host = parts[-3] if len(parts) == 3 else DEFAULT_HOST
    namespace = parts[-2] if len(parts) >= 2 else DEFAULT_NAMESPACE
    return host, namespace, parts[-1], tag or DEFAULT_TAG


def _short_name(host: str, namespace: str, model: str, tag: str) -> str:
    prefix = "" if host == DEFAULT_HOST and namespace == DEFAULT_NAMESPACE else \
        f"{namespace}/" if host == DEFAULT_HOST else f"{host}/{namespace}/"
    return f"{prefix}{model}:{tag}"


def _read_manifest(path: Path, name: str) -> OllamaModel:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        layers = data["layers"]
    except (OSError, ValueError, KeyError, TypeError):
        raise LoadError(f"the Ollama manifest of {name} ({path}) is not valid JSON with layers; "
                        f"re-pull it (ollama pull {name})") from None
    model = next((layer for layer in layers if isinstance(layer, dict) and layer.get("mediaType") == MODEL_MEDIA), None)
    digest = str((model or {}).get("digest", ""))
    if not digest.startswith("sha256:") or len(digest) != 71:
        raise LoadError(f"the Ollama manifest of {name} names no model layer (mediaType {MODEL_MEDIA}); "
                        f"re-pull it (ollama pull {name})")
    hexdigest = digest.removeprefix("sha256:")
    blob = store_dir() / "blobs" / f"sha256-{hexdigest}"
    return OllamaModel(name, path, blob, hexdigest, int((model or {}).get("size") or 0), _describe(data))


def _describe(manifest: dict[str, Any]) -> str:
    """'llama Q4_K_M' from the manifest's config blob (model_family, file_type); '' if it says nothing."""
    digest = str((manifest.get("config") or {}).get("digest", "")).removeprefix("sha256:")
    try:
        cfg = json.loads((store_dir() / "blobs" / f"sha256-{digest}").read_text(encoding="utf-8")) if digest else {}
    except (OSError, ValueError):
        return ""
    return " ".join(str(cfg[k]) for k in ("model_family", "file_type") if isinstance(cfg, dict) and cfg.get(k))


def resolve(text: str) -> OllamaModel:
    """The Ollama model named text (NAME[:TAG]); LoadError (one line) if the store or the model is not there."""
    store = store_dir()
    host, namespace, model, tag = parse_name(text)
    name = _short_name(host, namespace, model, tag)
    manifest = store / "manifests" / host / namespace / model / tag
    if not (store / "manifests").is_dir():
        raise LoadError(f"no Ollama store at {store} (set OLLAMA_MODELS to where Ollama keeps its models)")
    if not manifest.is_file():
        known = ", ".join(m["name"] for m in list_models()[:8]) or "none"
        raise LoadError(f"no Ollama model {name} in {store} (models there: {known}); pull it with 'ollama pull {name}'")
    found = _read_manifest(manifest, name)
    if not found.model_path.is_file():
        raise LoadError(f"the model blob of {name} is missing from {store / 'blobs'}; re-pull it (ollama pull {name})")
    size = found.model_path.stat().st_size
    if found.size and size != found.size:
        raise LoadError(f"the model blob of {name} has {size} bytes, its manifest says {found.size}: truncated or "
                        f"corrupt; re-pull it (ollama pull {name})")
    return found


def verify(found: OllamaModel, progress: Callable[[float, str], None] | None = None) -> None:
    """Check that the blob hashes to its name (remembered per file identity: a second load does not rehash)."""
    report = progress or (lambda frac, msg: None)
    digest = hash_cache.sha256(found.model_path, lambda done, total: report(done / max(total, 1), "verifying"))
    if digest != found.digest:
        raise LoadError(f"the model blob of {found.name} ({found.model_path.name}) is corrupt: its sha256 does not "
                        f"match its name; re-pull it (ollama pull {found.name})")


def list_models() -> list[dict[str, Any]]:
    """Every model in Ollama's store, for `models`: name, path of the GGUF blob, bytes."""
    root = store_dir() / "manifests"
    out: list[dict[str, Any]] = []
    if not root.is_dir():
        return out
    for manifest in sorted(p for p in root.glob("*/*/*/*") if p.is_file()):
        host, namespace, model, tag = manifest.relative_to(root).parts
        name = _short_name(host, namespace, model, tag)
        try:
            found = _read_manifest(manifest, name)
        except LoadError:
            continue
        out.append({"name": f"ollama:{name}", "path": str(found.model_path), "source": "ollama",
                    "arch": found.kind or "gguf",
                    "bytes": found.size})
    return out
