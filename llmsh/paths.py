"""Where llmsh keeps its files: platformdirs locations, which honour XDG_* on Linux, kept private to the user.

The runtime dir holds connection files (with the signing key) and, by default on POSIX, the kernel's ipc sockets:
it must be the user's own and mode 0700. An unsafe `XDG_RUNTIME_DIR` is an error (UnsafeDirError), never a silent
fallback elsewhere. The state dir (journal, logs, shell history) is 0700 and its files 0600.

Tests point XDG_RUNTIME_DIR / XDG_STATE_HOME / XDG_CONFIG_HOME at a temporary directory, so they never
touch a real user's kernel.
"""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import platformdirs

APP = "llmsh"
LOGS_KEPT = 5  # kernel logs kept in state_dir/logs (the newest ones); older ones are removed at kernel start


class UnsafeDirError(OSError):
    """A directory llmsh would keep secrets in is not private to this user; the message is one line saying what to do."""


def _check_base(var: str) -> None:
    """`var` (XDG_RUNTIME_DIR) when set must exist, be ours and be mode 0700, as the XDG spec requires."""
    value = os.environ.get(var)
    if not value or os.name != "posix":
        return
    try:
        st = os.stat(value)
    except OSError as e:
        raise UnsafeDirError(f"{var}={value} cannot be used ({e.strerror}); create it with mode 0700 or unset {var}") from None
    if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise UnsafeDirError(
            f"{var}={value} is not private (owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}); "
            f"it must be yours with mode 700: 'chmod 700 {value}', or unset {var}"
        )


def private_dir(path: Path) -> Path:
    """Create `path` mode 0700; an existing one must be ours, and loses group/other access (it is llmsh's own folder)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if os.name == "posix":
        st = path.stat()
        if st.st_uid != os.getuid():
            raise UnsafeDirError(f"{path} belongs to uid {st.st_uid}, not to you; remove it or point XDG_* elsewhere")
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.chmod(path, 0o700)
    return path


def private_file(path: Path) -> Path:
    """Make sure `path` exists and is mode 0600 (created so, never readable by others in between)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    if os.name == "posix" and stat.S_IMODE(path.stat().st_mode) & 0o077:
        os.chmod(path, 0o600)
    return path


def runtime_dir() -> Path:
    """Connection files and ipc sockets of running kernels (0700; raises UnsafeDirError).

    Without XDG_RUNTIME_DIR (a plain ssh or container session) platformdirs falls back to /tmp/runtime-$UID and
    warns on every call; the fallback is what we want (it is checked like any other), so the warning would only
    be noise in every command (platformdirs checks that fallback's owner and mode itself)."""
    _check_base("XDG_RUNTIME_DIR")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            path = Path(platformdirs.user_runtime_dir(APP))
        except PermissionError as e:  # its /tmp/runtime-$UID fallback is not ours (another account made it first)
            raise UnsafeDirError(str(e)) from None
    return private_dir(path)


def state_dir() -> Path:
    """Logs, shell history and the kernel journal (0700)."""
    return private_dir(Path(platformdirs.user_state_dir(APP)))


def logs_dir() -> Path:
    """The kernels' log files (0700)."""
    return private_dir(state_dir() / "logs")


def prune_logs(keep: int = LOGS_KEPT) -> list[Path]:
    """Remove all but the newest `keep` kernel logs; returns what was removed."""
    logs = sorted(logs_dir().glob("*.log*"), key=lambda p: p.stat().st_mtime, reverse=True)
    removed = logs[keep:]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


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
    return logs_dir() / f"{Path(connection_file).stem}.log"
