"""`config.toml` (platformdirs' user_config_dir): the one reader of the user's settings file.

Keys in use: `model_dirs` (llmsh/models.py), `max_procs` (the process table's limit), `http`/`serve_http`/`http_key`/
`http_min_nice` (llmsh/http/config.py), `ray` (the Ray cluster a kernel joins, as `--ray`). A missing or unreadable file is an empty config; a file that is not valid TOML
is reported once by whoever asks (`ConfigError`), never silently half-read.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from llmsh.paths import config_dir


class ConfigError(ValueError):
    """config.toml is not valid TOML (one line naming the file and the problem)."""


def config_path() -> Path:
    return config_dir() / "config.toml"


def read_config(path: Path | None = None) -> dict[str, Any]:
    """The settings (empty when there is no file); ConfigError for a file that is not TOML."""
    path = path or config_path()
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        return {}
    except OSError:
        return {}
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e}); fix or remove it") from None


def max_procs(default: int) -> int:
    """`max_procs` from config.toml (processes in the table at once), else `default`; ConfigError if not ≥ 1."""
    value = read_config().get("max_procs", default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{config_path()}: max_procs = {value!r}; give a whole number ≥ 1")
    return value


def ray_address(given: str | None) -> str | None:
    """`--ray` if given, else `ray` from config.toml ("auto" or an address), else None (one machine, no Ray)."""
    if given:
        return given
    value = read_config().get("ray")
    if value is None or value is False or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{config_path()}: ray = {value!r}; give \"auto\" or a Ray address like \"10.0.0.5:6379\"")
    return value
