"""Fast unit tests of the kernel's pure parts: counters, the message verifier, connection files, the kernelspec."""

from __future__ import annotations

import json
import sys

import pytest
from jupyter_client.session import DELIM

from llmsh.kernel.counters import Counters
from llmsh.kernel.engines import MALLOC_TUNABLES, glibc_tunables
from llmsh.kernel.lifecycle import kernelspec
from llmsh.protocol.connection import (
    ConnectionFileError,
    is_loopback,
    new_key,
    read_connection_file,
    write_connection_file,
)
from llmsh.protocol.session import BAD_SIGNATURE, MALFORMED, REPLAY, UNSIGNED, Rejected, Verifier, make_session


def test_counters_snapshot_shape():
    clients = {"s1": 1.0}
    c = Counters(clients)
    c.record("in", "shell", "execute_request", 100, "s1")
    c.record("in", "shell", "execute_request", 50, "s1")
    c.record("out", "iopub", "stream", 10, "s1")
    c.reject("bad_signature", "shell", 7)
    c.cancel("disconnect")
    snap = c.snapshot()
    assert snap["in"] == {"shell": {"execute_request": {"count": 2, "bytes": 150}}}
    assert snap["out"] == {"iopub": {"stream": {"count": 1, "bytes": 10}}}
    assert snap["rejected"] == {"bad_signature": 1} and snap["clients"] == 1 and snap["cancelled"] == {"disconnect": 1}
    assert c.totals("in") == (2, 150)
    assert [r["type"] for r in c.recent] == ["execute_request", "execute_request", "stream", "rejected:bad_signature"]
    assert set(c.recent[0]) == {"t", "dir", "socket", "type", "bytes", "client"}
    json.dumps(snap)


def test_verifier_reasons():
    key = new_key()
    sender, verifier = make_session(key), Verifier(make_session(key))
    msg = sender.msg("kernel_info_request", {})
    good = [b"ident", *sender.serialize(msg)]
    idents, got = verifier.verify(good)
    assert idents == [b"ident"] and got["header"]["msg_id"] == msg["header"]["msg_id"]
    cases = {
        REPLAY: good,
        BAD_SIGNATURE: make_session(new_key()).serialize(sender.msg("kernel_info_request", {})),
        MALFORMED: [b"no delimiter"],
    }
    unsigned = sender.serialize(sender.msg("kernel_info_request", {}))
    unsigned[unsigned.index(DELIM) + 1] = b""
    cases[UNSIGNED] = unsigned
    for reason, frames in cases.items():
        with pytest.raises(Rejected) as err:
            verifier.verify(frames)
        assert err.value.reason == reason


def test_connection_file_written_private_and_checked(tmp_path):
    path = write_connection_file(tmp_path / "k.json", {"ip": "127.0.0.1", "key": "ab", "shell_port": 5})
    assert path.stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob(".*tmp"))
    info = read_connection_file(path)
    assert info["transport"] == "tcp" and info["hb_port"] == 0
    path.write_text(json.dumps({"shell_port": "x"}))
    with pytest.raises(ConnectionFileError, match="shell_port must be a port number"):
        read_connection_file(path)
    with pytest.raises(ConnectionFileError, match="no connection file"):
        read_connection_file(tmp_path / "missing.json")


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.1.2.3")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("example.org")


def test_kernelspec_argv():
    spec = kernelspec()
    assert spec["argv"][:3] == [sys.executable, "-m", "llmsh"] and spec["argv"][-1] == "{connection_file}"


def test_engine_malloc_tunables_keep_the_users_own():
    assert glibc_tunables("") == ":".join(f"{k}={v}" for k, v in MALLOC_TUNABLES.items())
    merged = glibc_tunables("glibc.malloc.arena_max=4:glibc.cpu.hwcaps=-AVX2")
    assert merged.split(":")[:2] == ["glibc.malloc.arena_max=4", "glibc.cpu.hwcaps=-AVX2"]
    assert merged.count("arena_max") == 1 and "glibc.malloc.mmap_threshold=" in merged
