"""Where llmsh keeps its files: platformdirs locations, which honour XDG_* on Linux.

Tests point XDG_RUNTIME_DIR / XDG_STATE_HOME / XDG_CONFIG_HOME at a temporary directory, so they never
touch a real user's kernel.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import platformdirs

APP = "llmsh"


def runtime_dir() -> Path:
    """Connection files of running kernels (created 0700).

    Without XDG_RUNTIME_DIR (a plain ssh or container session) platformdirs falls back to /tmp/runtime-$UID and
    warns on every call; the fallback is what we want, so the warning would only be noise in every command."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(platformdirs.user_runtime_dir(APP))
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def state_dir() -> Path:
    """Logs, shell history and the kernel journal."""
    path = Path(platformdirs.user_state_dir(APP))
    path.mkdir(parents=True, exist_ok=True)
    return path


def config_dir() -> Path:
    """`config.toml` lives here."""
    return Path(platformdirs.user_config_dir(APP))


def cache_dir() -> Path:
    """Rebuildable files: the CPU decode kernels compiled for this machine (llmsh/runtime/kernels)."""
    path = Path(platformdirs.user_cache_dir(APP))
    path.mkdir(parents=True, exist_ok=True)
    return path


def log_file(connection_file: Path | str) -> Path:
    """Where the kernel of this connection file logs (state dir); its engines log there too."""
    folder = state_dir() / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{Path(connection_file).stem}.log"
