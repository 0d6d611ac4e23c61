"""Loading from folders and the hub cache, integrity checks, dtypes, tied heads, paging hooks: what a user sees on load."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmsh.cli import main as cli_main
from llmsh.runtime import LoadError, load
from llmsh.runtime.integrity import MANIFEST


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def sharded(make_tiny_model) -> Path:
    return make_tiny_model("llama", shards=True)


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and len(text) < 500
    return text


def test_sharded_load_matches_single_file(sharded, tiny_llama):
    assert len(list(sharded.glob("*.safetensors"))) > 2 and (sharded / "model.safetensors.index.json").exists()
    ids = [1, 5, 9, 30, 200]
    torch.testing.assert_close(load(sharded).forward(ids), load(tiny_llama).forward(ids), atol=0, rtol=0)


def test_weights_are_views_of_the_mapped_file(make_tiny_model):
    """GPT-2 (Conv1D, stored as our Linear wants) maps every tensor from the file but the tied embedding (transposed to
    be the head's (in, out) weight); Llama all but its projections (transposed; q|k|v and gate|up fused)."""
    for family in ("gpt2", "llama"):
        model = load(make_tiny_model(family))
        ranges = []
        for f in model.checkpoint.files.values():
            base = ctypes.addressof(ctypes.c_char.from_buffer(f._map))
            ranges.append((base, base + len(f._map)))
        for name, p in model.module.named_parameters():
            mapped = any(lo <= p.data_ptr() < hi for lo, hi in ranges)
            copied = model.checkpoint.transposed(name) or bool(model.checkpoint.parts(name))
            assert mapped != copied, name
            assert p.is_contiguous(), name


def test_checksum_manifest_then_corrupt_byte_fails_naming_the_file(sharded, tmp_path, capsys):
    folder = _copy(sharded, tmp_path / "m")
    assert cli_main(["checksum", str(folder)]) == 0
    assert "wrote" in capsys.readouterr().out and (folder / MANIFEST).exists()
    load(folder)                                                       # verifies fine
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0x01                                                   # one bit of one weight
    shard.write_bytes(bytes(data))
    with pytest.raises(LoadError) as err:
        load(folder)
    msg = _one_line(err)
    assert shard.name in msg and "corrupt" in msg and "llmsh checksum" in msg
    load(folder, verify=False)                                          # an explicit opt-out skips hashing


def test_truncated_shard_fails_naming_the_file(sharded, tmp_path):
    folder = _copy(sharded, tmp_path / "m")                             # no manifest: the structure check catches it
    shard = sorted(folder.glob("model-*.safetensors"))[2]
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(LoadError) as err:
        load(folder, verify=False)
    msg = _one_line(err)
    assert shard.name in msg and "truncated" in msg


@pytest.mark.parametrize("entry", [{"dtype": "F32", "shape": [2]}, {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "x"])
def test_header_that_parses_but_is_malformed_fails_naming_the_file(sharded, tmp_path, entry):
    """A flipped byte can leave the header valid JSON of the wrong shape: one line, not `KeyError: 'data_offsets'`."""
    folder = _copy(sharded, tmp_path / "m")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header[next(k for k in header if k != "__metadata__")] = entry
    new = json.dumps(header).encode()
    shard.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])
    with pytest.raises(LoadError) as err:
        load(folder, verify=False)
    msg = _one_line(err)
    assert shard.name in msg and "corrupt header" in msg


def test_missing_shard_fails_naming_the_file(sharded, tmp_path):
    folder = _copy(sharded, tmp_path / "m")
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(LoadError) as err:
        load(folder)
    msg = _one_line(err)
    assert shard.name in msg and "missing" in msg


def test_missing_file_listed_in_manifest(tiny_gpt2, tmp_path):
    folder = _copy(tiny_gpt2, tmp_path / "m")
    cli_main(["checksum", str(folder)])
    (folder / "generation_config.json").unlink()
    with pytest.raises(LoadError, match="generation_config.json is missing"):
        load(folder)


def test_checksum_cli_rejects_non_folder(tmp_path, capsys):
    assert cli_main(["checksum", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "is not a folder" in err and err.count("\n") == 1
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model")
    assert cli_main(["checksum", str(tmp_path / "notes")]) == 2
    err = capsys.readouterr().err
    assert "not a model folder" in err and err.count("\n") == 1
    assert not list((tmp_path / "notes").glob("llmsh-checksums*"))  # nothing written


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _into_hub_cache(src: Path, name: str, rev: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Lay src out as huggingface_hub does: blobs named by hash, snapshot symlinks, refs/main."""
    repo = Path(os.environ["HF_HOME"]) / "hub" / ("models--" + name.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest() if f.suffix == ".safetensors" else _git_sha1(data)
        (repo / "blobs" / blob).write_bytes(data)
        (snap / f.name).symlink_to(Path("../../blobs") / blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    return repo


def test_hub_cache_name_resolution_and_blob_verification(sharded):
    repo = _into_hub_cache(sharded, "tiny-org/tiny-llama")
    model = load("tiny-org/tiny-llama")
    assert model.name == "tiny-org/tiny-llama" and model.path.parent.name == "snapshots"
    assert load("tiny-org/tiny-llama@0123456789abcdef0123456789abcdef01234567").path == model.path
    from llmsh.runtime.hub import list_cached_models
    assert "tiny-org/tiny-llama" in list_cached_models()
    blob = next(p for p in (repo / "snapshots").rglob("model-00002*.safetensors")).resolve()
    data = bytearray(blob.read_bytes())
    data[-50] ^= 0xFF                                                   # in the weights, past the header
    blob.write_bytes(bytes(data))
    with pytest.raises(LoadError) as err:
        load("tiny-org/tiny-llama")
    assert "model-00002" in _one_line(err) and "Hugging Face cache" in str(err.value)
    with pytest.raises(LoadError, match="not in the Hugging Face cache") as err:
        load("tiny-org/never-downloaded")
    _one_line(err)
    with pytest.raises(LoadError, match="no model at ./nowhere"):
        load("./nowhere")


def test_unsupported_model_type_lists_supported(tiny_gpt2, tmp_path):
    folder = _copy(tiny_gpt2, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "bert"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError) as err:
        load(folder)
    msg = _one_line(err)
    assert "'bert'" in msg and all(t in msg for t in ("gpt2", "llama", "mistral", "qwen2"))


def test_config_and_weights_disagree(tiny_llama, tmp_path):
    folder = _copy(tiny_llama, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="do not match"):
        load(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(LoadError, match="not valid JSON"):
        load(folder)


def test_tied_and_untied_heads(make_tiny_model):
    untied, tied = load(make_tiny_model("llama")), load(make_tiny_model("smollm"))
    assert untied.module.output.weight is not untied.module.tok_embeddings.weight
    assert not torch.equal(untied.module.output.weight, untied.module.tok_embeddings.weight)
    assert tied.module.output.weight is tied.module.tok_embeddings.weight
    assert [p.name for p in tied.pages()] == ["embed", "block.0", "block.1", "head"]
    assert sum(p.nbytes for p in tied.pages()) == sum(p.nbytes for p in tied.module.parameters())


def test_llama3_rope_scaling_changes_low_frequencies(make_tiny_model):
    from llmsh.runtime.llama import LlamaConfig, rope_inv_freq

    cfg = load(make_tiny_model("llama3")).config
    plain = rope_inv_freq(LlamaConfig(**{**cfg.__dict__, "rope_scaling": None}))
    scaled = rope_inv_freq(cfg)
    assert scaled[0] == plain[0] and scaled[-1] < plain[-1] / 4      # high freqs kept, low freqs slowed by ~factor
    with pytest.raises(LoadError, match="supported: default, linear, llama3"):
        rope_inv_freq(LlamaConfig(**{**cfg.__dict__, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}))


def test_dtypes_and_devices(tiny_llama):
    ids = [1, 20, 30, 40]
    ref = load(tiny_llama).forward(ids)
    bf = load(tiny_llama, dtype="bfloat16")
    assert bf.dtype == torch.bfloat16 and bf.weight_bytes() * 2 == load(tiny_llama).weight_bytes()
    assert (bf.forward(ids) - ref).abs().max() < 0.5
    with pytest.raises(LoadError, match="float16 needs a CUDA device"):
        load(tiny_llama, dtype="float16")
    with pytest.raises(LoadError, match="unknown dtype"):
        load(tiny_llama, dtype="int3")
    if not torch.cuda.is_available():
        with pytest.raises(LoadError, match="CUDA is not available"):
            load(tiny_llama, device="cuda")


def test_progress_callback(tiny_gpt2):
    seen = []
    load(tiny_gpt2, progress=lambda f, msg: seen.append(f))
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)


def test_paging_hooks(make_tiny_model):
    model = load(make_tiny_model("gpt2"))
    ids = [3, 4, 5, 6]
    want = model.forward(ids)
    calls: list[int] = []
    model.set_page_hook(calls.append)
    model.forward(ids)
    assert calls == [0, 1, 2, 0, 3]                                     # tied head: embed's page again before head
    model.set_page_hook(None)
    page = model.pages()[1]
    assert page.name == "block.0" and page.nbytes == sum(model.page_tensors(1)[p].nbytes for p in page.param_names)
    host = {k: v.clone() for k, v in model.page_tensors(1).items()}
    model.release_page(1)
    assert not model.page_resident(1)
    with pytest.raises(Exception):
        model.forward(ids)
    model.materialize_page(1)                                           # re-read from the checkpoint
    torch.testing.assert_close(model.forward(ids), want, atol=0, rtol=0)
    model.release_page(0)                                               # tied: the head's matrix goes too
    assert model.module.lm_head.weight.is_meta
    model.materialize_page(0, "cpu", host=None)
    assert model.module.lm_head.weight is model.module.wte.weight
    model.release_page(1)
    model.materialize_page(1, "cpu", host=host)                         # from a host copy
    torch.testing.assert_close(model.forward(ids), want, atol=0, rtol=0)
    assert torch.equal(model.checkpoint.load_tensor("h.0.attn.c_attn.weight", "cpu", torch.float32),
                       host["h.0.attn.c_attn.weight"])


def test_bytes_read_per_token_skips_only_lookup_tables(make_tiny_model):
    """What the bandwidth limit divides by: untied embedding tables cost one row per token, a tied one is the head."""
    for family, skipped in (("llama", ["tok_embeddings"]), ("llama3", []), ("gpt2", ["wpe"])):
        model = load(make_tiny_model(family))
        tables = [model.module.get_submodule(n).weight for n in skipped]
        expected = model.weight_bytes() - sum(t.nbytes - t[0].nbytes for t in tables)
        assert model.bytes_read_per_token() == expected, family
        assert family != "llama3" or model.bytes_read_per_token() == model.weight_bytes()


def test_a_missing_or_misshapen_part_of_a_fused_matrix_fails_naming_it(tiny_llama, tmp_path):
    """q|k|v are loaded as one matrix: a checkpoint lacking k_proj, or with a k_proj of the wrong width, fails clearly."""
    from safetensors.torch import load_file, save_file

    key = "model.layers.0.self_attn.k_proj.weight"
    tensors = load_file(tiny_llama / "model.safetensors")
    for name, change in (("lacks", lambda t: t.pop(key)), ("misshapen", lambda t: t.update({key: t[key][:, :-1].contiguous()}))):
        folder = _copy(tiny_llama, tmp_path / name)
        broken = dict(tensors)
        change(broken)
        save_file(broken, folder / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(LoadError) as err:
            load(folder)
        line = str(err.value)
        assert "\n" not in line and ("k_proj" in line if name == "lacks" else "wqkv" in line or "shape" in line), line


def test_a_load_does_not_import_torch_dynamo(tiny_llama, tiny_gpt2):
    """Models are built on the meta device with no random init: torch's Python reference of `normal_` on meta
    tensors imports torch._dynamo on its first call, ~0.7 s of a process's first load."""
    code = ("import sys; from llmsh.runtime import load; [load(p) for p in sys.argv[1:]]; "
            "print('torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(tiny_llama), str(tiny_gpt2)], capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() == "False"


def test_transposed_matrices_are_built_once_then_mapped(make_tiny_model, tmp_path, monkeypatch):
    """A Llama checkpoint's projections are stored (out, in) and fused from parts: the first load builds ours and
    writes them to the layout cache, later loads map that file (no transpose); a changed shard gets a new entry, and
    a page-in after the shard changed fails as for any view of it. A disk without room for the copy is left alone."""
    from llmsh.runtime import checkpoint as checkpoint_mod
    from llmsh.runtime import layout_cache
    from llmsh.runtime.errors import CheckpointChanged

    folder = _copy(make_tiny_model("llama", shards=True), tmp_path / "m")      # its own path: its own entries
    ids = [1, 5, 9, 30, 200]
    first = load(folder)
    want = first.forward(ids)
    assert first.checkpoint.layout is not None and first.checkpoint.layout.entries

    real_transpose = checkpoint_mod._c_transpose
    with monkeypatch.context() as m:
        m.setattr(checkpoint_mod, "_c_transpose", lambda *a: pytest.fail("transposed again instead of mapping"))
        again = load(folder)
        torch.testing.assert_close(again.forward(ids), want, atol=0, rtol=0)
    name = "layers.0.attention.wqkv.weight"
    wqkv = again.module.get_parameter(name)
    assert wqkv.data_ptr() == again.checkpoint.layout.tensor(again.checkpoint.layout_name(name)).data_ptr()

    ckpt = again.checkpoint
    shard = folder / ckpt.where[ckpt.hf_key(ckpt.parts(name)[-1])]                # the one holding wv
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))                  # the shard "changed"
    with pytest.raises(CheckpointChanged):
        again.checkpoint.populate(name)                                           # the cached copy is of the old one
    calls = []
    monkeypatch.setattr(checkpoint_mod, "_c_transpose", lambda *a: calls.append(1) or real_transpose(*a))
    torch.testing.assert_close(load(folder).forward(ids), want, atol=0, rtol=0)
    assert calls                                                                   # rebuilt, not the stale entry
    entries = list(layout_cache.paths.cache_dir().joinpath("layout").glob(
        f"{layout_cache.hash_cache.path_prefix(folder)}-*"))
    assert len(entries) == 1                                                       # the stale one removed

    wrong = {lname: torch.zeros(3, 5) for lname in again.checkpoint.layout.entries}   # parses, wrong shapes
    layout_cache.forget(folder)
    layout_cache.write(folder, again.dtype, wrong, files=again.checkpoint.paths())
    torch.testing.assert_close(load(folder).forward(ids), want, atol=0, rtol=0)    # built again, not used

    layout_cache.forget(folder)
    monkeypatch.setattr(layout_cache.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 40, 1 << 40, 0))
    full = load(folder)
    assert full.checkpoint.layout is None                                          # nothing written
    torch.testing.assert_close(full.forward(ids), want, atol=0, rtol=0)
