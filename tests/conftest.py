"""Test set-up shared by every test module.

Each part of llmsh keeps its fixtures in its own `tests/fixtures_*.py` module, listed in `pytest_plugins`,
so that parallel work on different parts never edits the same file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

pytest_plugins: list[str] = [
    "tests.fixtures_kernel",   # real kernel process + clients (foundation)
    "tests.fixtures_models",   # tiny random HF-format checkpoints (runtime)
]

# Isolate every llmsh file location before anything imports platformdirs: tests must never touch a real user's
# kernel, history or Hugging Face cache. Subprocesses (kernels, `llmsh -c`) inherit these variables.
_ISOLATED = Path(tempfile.mkdtemp(prefix="llmsh-tests-"))
for _var, _sub in (
    ("XDG_RUNTIME_DIR", "run"),
    ("XDG_STATE_HOME", "state"),
    ("XDG_CONFIG_HOME", "config"),
    ("XDG_DATA_HOME", "data"),
    ("XDG_CACHE_HOME", "cache"),
    ("HF_HOME", "hf"),
    ("JUPYTER_DATA_DIR", "jupyter-data"),
    ("JUPYTER_RUNTIME_DIR", "jupyter-run"),
):
    (_ISOLATED / _sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    os.environ[_var] = str(_ISOLATED / _sub)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def isolated_home() -> Path:
    """The temporary root that all XDG_* / HF_HOME variables point into for this test run."""
    return _ISOLATED
