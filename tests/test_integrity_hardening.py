"""Integrity that cannot be sidestepped (issue 14): the manifest covers every weight file and stays inside the folder,
an interrupted verification stops hashing, and a weight file changed on disk after load fails its process."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llmsh.cli import main as cli_main
from llmsh.runtime import LoadError, integrity, load
from llmsh.runtime.errors import CheckpointChanged
from llmsh.runtime.integrity import MANIFEST


def _checksummed(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    assert cli_main(["checksum", str(dst)]) == 0
    return dst


def test_a_weight_file_added_after_checksum_fails_the_load(tiny_gpt2: Path, tmp_path: Path) -> None:
    folder = _checksummed(tiny_gpt2, tmp_path / "m")
    shutil.copy(folder / "model.safetensors", folder / "model-override.safetensors")
    with pytest.raises(LoadError) as err:
        load(folder)
    assert str(err.value) == (
        f"model-override.safetensors in {folder} is not in {MANIFEST} (added after 'llmsh checksum'?); "
        f"remove it, or if you trust it run 'llmsh checksum {folder}'"
    )


def test_manifest_paths_stay_inside_the_folder(tiny_gpt2: Path, tmp_path: Path, monkeypatch: Any) -> None:
    folder = _checksummed(tiny_gpt2, tmp_path / "m")
    outside = tmp_path / "secret.txt"
    outside.write_text("not a model file")
    digest = integrity.sha256_file(outside)
    with open(folder / MANIFEST, "a") as f:
        f.write(f"{digest}  ../secret.txt\n")
    hashed: list[str] = []
    real = integrity._digest
    monkeypatch.setattr(integrity, "_digest", lambda p, *a, **k: hashed.append(str(p)) or real(p, *a, **k))
    with pytest.raises(LoadError) as err:
        load(folder)
    assert "lists '../secret.txt', which is outside the model folder" in str(err.value)
    assert hashed == []  # refused before reading anything


class Stop(Exception):
    pass


def test_interrupting_verification_stops_hashing_inside_a_file(tmp_path: Path) -> None:
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with open(folder / "weights.bin", "wb") as f:
        f.write(os.urandom(8 * integrity.CHUNK))
    integrity.write_manifest(folder)
    integrity._verified.clear()  # write_manifest remembered the digests
    st = (folder / "weights.bin").stat()  # and the hash cache knows the file by (path, size, mtime, inode): touch it
    os.utime(folder / "weights.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    calls: list[float] = []

    def progress(frac: float, text: str) -> None:  # the loader's callback raises like this when the load is killed
        calls.append(frac)
        if frac > 0.1:
            raise Stop()

    with pytest.raises(Stop):
        integrity.verify_folder(folder, progress)
    assert 0.1 < calls[-1] < 0.5  # stopped a few chunks into the big file, not after hashing all of it
    assert not any(k[0].endswith("weights.bin") for k in integrity._verified)


def test_a_changed_file_is_refused_at_page_in(tiny_gpt2: Path, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_gpt2, folder)
    model = load(folder)
    name = next(iter(model.module.state_dict()))
    out = model.checkpoint.read_into(name, model.module.state_dict()[name].clone())  # fine while unchanged
    st = (folder / "model.safetensors").stat()
    os.utime(folder / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(CheckpointChanged) as err:
        model.checkpoint.read_into(name, out)
    assert str(err.value) == (
        f"model.safetensors in {folder} changed on disk since it was loaded (modification time differs); "
        "kill the process and load the model again"
    )


@pytest.mark.slow
def test_the_kernel_fails_the_process_whose_file_changed(
    make_kernel: Callable[..., Any], tiny_gpt2: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_gpt2, folder)
    size = (folder / "model.safetensors").stat().st_size
    k = make_kernel("--mem-budget", f"cpu={size // 2}B,kv=80KiB")  # pages come in at every step
    r = k.execute(f"load {folder} --name g")
    assert r["status"] == "ok", r
    pid = r["data"]["pid"]
    assert k.execute("run g --max-tokens 2 hi")["status"] == "ok"
    st = (folder / "model.safetensors").stat()
    os.utime(folder / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    r = k.execute("run g --max-tokens 4 hello")
    assert r["status"] == "error" and "changed on disk since it was loaded" in r["reply"]["evalue"]
    row = next(p for p in k.execute("ps -a --json")["data"] if p["pid"] == pid)
    assert row["state"] in ("failed", "exited")  # failed, or already reaped after showing its reason
    assert row["reason"].startswith("model.safetensors in") and "changed on disk since it was loaded" in row["reason"]
