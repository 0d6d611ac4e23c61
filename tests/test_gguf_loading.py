"""`load FILE.gguf`: tiny random HF checkpoints converted to GGUF (tests/gguf_convert.py), checked against transformers
(logits) and against the folder's own tokenizer (ids, chat template, special tokens)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

from llmsh.runtime import LoadError, load  # noqa: E402
from llmsh.runtime.tokenizer import Tokenizer  # noqa: E402
from tests.gguf_convert import convert  # noqa: E402
from tests.proc_maps import file_mappings  # noqa: E402

FAMILIES = ["gpt2", "llama", "llama3", "smollm", "mistral", "qwen2"]
TEXTS = ["Hello world, the quick brown fox 123 jumps", "<|im_start|>user\nCafé 🙂 naïve<|im_end|>",
         "  two  spaces\n\nx"]


@pytest.fixture(scope="module")
def make_gguf(make_tiny_model: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """make_gguf(family, qtype=F32) -> a .gguf converted from the session's tiny HF model of that family."""
    made: dict[tuple, Path] = {}

    def make(family: str, qtype: T = T.F32, **kw) -> Path:
        key = (family, qtype, tuple(sorted(kw.items())))
        if key not in made:
            out = tmp_path_factory.mktemp("gguf") / f"tiny-{family}-{qtype.name}.gguf"
            made[key] = convert(make_tiny_model(family), out, qtype, **kw)
        return made[key]

    return make


def hf_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    """transformers' logits in float64: a reference free of the float32 rounding of any one CPU's GEMM kernels."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def assert_logits_close(got: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> None:
    """assert_close in ref's dtype; a failure also prints each position's largest difference."""
    got = got.to(ref.dtype)
    per_position = (got - ref).abs().amax(1).tolist()
    torch.testing.assert_close(got, ref, atol=atol, rtol=rtol,
                               msg=lambda m: f"{m}\nlargest difference per position: {per_position}")


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_logits_match_transformers(family: str, make_tiny_model, make_gguf) -> None:
    """A float32 GGUF gives the logits of the folder it was converted from, loaded by us, and transformers'."""
    model = load(make_gguf(family))
    ids = list(range(3, 40))                               # longer than mistral's sliding window of 24
    got = model.forward(ids)
    assert model.dtype == torch.float32
    same_folder = load(make_tiny_model(family)).forward(ids)
    assert_logits_close(got, same_folder, atol=2e-5, rtol=1e-4)
    assert_logits_close(got, hf_logits(make_tiny_model(family), ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_tokenizer_matches_the_folder(family: str, make_tiny_model, make_gguf) -> None:
    folder = make_tiny_model(family)
    tok, ref = load(make_gguf(family)).tokenizer, Tokenizer(folder)
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text), text
        ids = ref.encode(text)
        assert tok.decode(ids) == ref.decode(ids)
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert tok.eos_token_ids == ref.eos_token_ids and tok.bos_token_id == ref.bos_token_id
    assert tok.special_tokens.get("eos_token") == ref.special_tokens["eos_token"]
    if ref.chat_template:
        msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "more"}]
        assert tok.apply_chat_template(msgs) == ref.apply_chat_template(msgs)
    if family != "qwen2":   # transformers' Qwen2Tokenizer re-splits digits its own way, not as tokenizer.json says
        import transformers

        hf = transformers.AutoTokenizer.from_pretrained(folder)
        assert all(tok.encode(t) == hf(t).input_ids for t in TEXTS)


def test_gguf_bf16_equals_the_folder_model_in_bf16(make_tiny_model, make_gguf) -> None:
    model = load(make_gguf("llama", T.BF16))
    assert model.dtype == torch.bfloat16                      # stays bfloat16: no conversion at load
    ref = load(make_tiny_model("llama"), dtype="bfloat16")    # the same rounding (nearest even) of the same weights
    ids = list(range(3, 30))
    torch.testing.assert_close(model.forward(ids), ref.forward(ids), atol=0, rtol=0)


def test_gguf_f16_loads_as_float32(make_tiny_model, make_gguf) -> None:
    model = load(make_gguf("llama", T.F16))
    assert model.dtype == torch.float32                       # CPU float16 matmuls are slow: widened once at load
    ids = list(range(3, 30))
    assert_logits_close(model.forward(ids), hf_logits(make_tiny_model("llama"), ids), atol=3e-2, rtol=1e-2)


def test_gguf_greedy_text_equals_the_folder_model(make_tiny_model, make_gguf) -> None:
    folder_model, gguf_model = load(make_tiny_model("llama3")), load(make_gguf("llama3"))
    kw = dict(max_tokens=16, temperature=0)
    assert gguf_model.generate(["Once upon a time", "def hello"], **kw) == \
        folder_model.generate(["Once upon a time", "def hello"], **kw)


def test_unsupported_type_is_one_line_naming_it(make_gguf) -> None:
    with pytest.raises(LoadError) as err:
        load(make_gguf("llama", T.Q5_1))          # a type gguf can write and llmsh does not run
    msg = str(err.value)
    assert "Q5_1" in msg and "\n" not in msg and "supported" in msg


def test_bad_files_fail_with_one_line(tmp_path: Path, make_gguf) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(LoadError, match="not a readable GGUF"):
        load(str(junk))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(make_gguf("gpt2").read_bytes()[:5000])
    with pytest.raises(LoadError):
        load(str(cut))
    with pytest.raises(LoadError, match="no GGUF file"):
        load(str(tmp_path / "absent.gguf"))


def test_second_open_uses_the_index_not_the_parser(make_gguf, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmsh.runtime import gguf_file

    path = make_gguf("smollm")
    first = load(str(path))                                   # (earlier tests may have indexed it already)
    assert gguf_file.GGUFFile(path).cached_tokenizer is not None

    def no_parsing():
        raise AssertionError("parsed the unchanged file again")

    monkeypatch.setattr(gguf_file, "_plain_reader", no_parsing)
    again = load(str(path))
    ids = list(range(3, 30))
    torch.testing.assert_close(again.forward(ids), first.forward(ids), atol=0, rtol=0)
    assert again.tokenizer.encode(TEXTS[1]) == first.tokenizer.encode(TEXTS[1])


def beside(path: Path, name: str) -> Path:
    """The file `name` (gguf_file.LISTS, TOKENIZER) beside the index of the GGUF file at `path`."""
    from llmsh.runtime import gguf_file

    return next(p for p in gguf_file.index_files(path) if p.name.endswith("." + name))


def test_an_indexed_load_reads_neither_the_vocabulary_nor_the_parser(make_gguf, monkeypatch) -> None:
    """The long lists (vocabulary, scores, merges) wait beside the index: a load with a cached tokenizer needs none
    of them, and the vocabulary size comes from the index."""
    from llmsh.runtime import gguf_file

    path = make_gguf("smollm")
    first = load(str(path))
    g = gguf_file.GGUFFile(path)
    assert g.indexed and g.length("tokenizer.ggml.tokens") == first.hf_config["vocab_size"]
    assert "tokenizer.ggml.tokens" not in g.fields                     # not read yet
    beside(path, gguf_file.LISTS).unlink()

    def no_parsing():
        raise AssertionError("parsed the unchanged file again")

    monkeypatch.setattr(gguf_file, "_plain_reader", no_parsing)
    again = load(str(path))
    assert again.tokenizer.encode(TEXTS[1]) == first.tokenizer.encode(TEXTS[1])
    assert again.tokenizer.special_tokens == first.tokenizer.special_tokens
    assert again.hf_config == first.hf_config


@pytest.mark.parametrize("damaged", ["tokenizer", "lists", "both"])
def test_damaged_files_beside_the_index_are_rebuilt(damaged: str, make_gguf) -> None:
    """A cached tokenizer or list file that is cut or garbled costs a rebuild from the GGUF file, never a failed
    load or different ids; the rebuilt files are written back."""
    from llmsh.runtime import gguf_file

    path = make_gguf("llama")
    first = load(str(path))
    saved = gguf_file.GGUFFile(path).cached_tokenizer
    assert saved
    if damaged in ("tokenizer", "both"):
        beside(path, gguf_file.TOKENIZER).write_text(saved[: len(saved) // 2])
    if damaged in ("lists", "both"):
        beside(path, gguf_file.LISTS).write_text("[1, 2")
    again = load(str(path))
    for text in TEXTS:
        assert again.tokenizer.encode(text) == first.tokenizer.encode(text)
    assert again.tokenizer.special_tokens == first.tokenizer.special_tokens
    assert again.tokenizer.eos_token_ids == first.tokenizer.eos_token_ids
    g = gguf_file.GGUFFile(path)
    assert g.cached_tokenizer == saved
    assert g.meta("tokenizer.ggml.tokens")[:3] == ["<unk>", "<s>", "</s>"]    # (damaged lists: from the file again)
    assert len(g.meta("tokenizer.ggml.tokens")) == g.length("tokenizer.ggml.tokens")


def test_a_cached_tokenizer_names_special_tokens_the_vocabulary_repeats() -> None:
    """A string the vocabulary holds twice keeps only its last id in the tokenizer's own table: special tokens
    with the other id are named from the vocabulary list, as on the first build."""
    from llmsh.runtime import gguf_tokenizer

    tokens = ["<unk>", "<s>", "</s>", "\u2581a", "b", "<s>"] + [f"<0x{i:02X}>" for i in range(256)]
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [0.0] * len(tokens), "tokenizer.ggml.token_type": [3, 3, 3, 1, 1, 3] + [6] * 256,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}
    fresh, saved = gguf_tokenizer.build(lambda k, d=None: meta.get(k, d))
    cached, again = gguf_tokenizer.build(lambda k, d=None: meta.get(k, d), saved)
    assert fresh is not None and cached is not None and again == saved
    assert cached.special_tokens == fresh.special_tokens == {"bos_token": "<s>", "eos_token": "</s>",
                                                             "unk_token": "<unk>"}
    assert cached.encode("a b") == fresh.encode("a b")


def test_an_index_is_not_saved_for_a_file_changed_while_it_was_read(make_gguf, tmp_path: Path) -> None:
    """What was read of a file changed meanwhile may be of either version: none of it goes into an index."""
    import os
    import shutil

    from llmsh.runtime import gguf_file

    path = tmp_path / "moving.gguf"
    shutil.copy(make_gguf("gpt2"), path)
    g = gguf_file.GGUFFile(path)
    assert not g.indexed
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    g.save_index(None)
    assert not gguf_file.index_files(path)
    assert not gguf_file.GGUFFile(path).indexed


def test_a_changed_file_replaces_its_index(make_gguf, tmp_path: Path) -> None:
    """The index of a file's earlier version (and the files beside it) go when the changed file is indexed."""
    import os
    import shutil

    from llmsh.runtime import gguf_file

    path = tmp_path / "changing.gguf"
    shutil.copy(make_gguf("gpt2"), path)
    load(str(path))
    before = [p.name for p in gguf_file.index_files(path)]
    assert len(before) == 3                                  # the index, its lists and its tokenizer
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    load(str(path))
    after = [p.name for p in gguf_file.index_files(path)]
    assert len(after) == 3 and not set(after) & set(before)
    from llmsh import paths

    hash_named = [paths.cache_dir() / "gguf" / f"{'ab' * 16}{end}.json" for end in ("", ".lists", ".tokenizer")]
    for old in hash_named:                                   # what llmsh versions before path prefixes left
        old.write_text("{}")
    gguf_file.forget(path)
    assert not gguf_file.index_files(path)
    assert not [old for old in hash_named if old.exists()]


@pytest.mark.parametrize("qtype", [T.F32, T.BF16])
def test_float_matrices_are_reshaped_once_then_mapped(qtype: T, make_tiny_model, tmp_path: Path, monkeypatch) -> None:
    """A float GGUF file's transposed and fused matrices are cached on the first load; the next load maps them (no
    rebuild, the same logits), and a changed file is rebuilt."""
    import os

    from llmsh.runtime import gguf_loader

    path = convert(make_tiny_model("llama"), tmp_path / "m.gguf", qtype)
    ids = list(range(3, 30))
    first = load(str(path))
    want = first.forward(ids)
    assert first.checkpoint.layout is not None and first.checkpoint.layout.entries     # written by the first load

    real_rows = gguf_loader.GGUFCheckpoint.rows

    def no_rebuild(self, name):                      # tensors used as stored (norms, the embedding) still read here
        if self.layout_name(name) is not None:
            raise AssertionError(f"rebuilt {name} instead of mapping the cached layout")
        return real_rows(self, name)

    with monkeypatch.context() as m:
        m.setattr(gguf_loader.GGUFCheckpoint, "rows", no_rebuild)
        again = load(str(path))
        torch.testing.assert_close(again.forward(ids), want, atol=0, rtol=0)
        wqkv = again.module.layers[0].attention.wqkv.weight
        cached = again.checkpoint.layout.tensor(again.checkpoint.layout_name("layers.0.attention.wqkv.weight"))
        assert wqkv.data_ptr() == cached.data_ptr()                                 # a view of the mapped file
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))                  # the file "changed"
    rebuilt = []
    monkeypatch.setattr(gguf_loader.GGUFCheckpoint, "rows", lambda self, n: rebuilt.append(n) or real_rows(self, n))
    torch.testing.assert_close(load(str(path)).forward(ids), want, atol=0, rtol=0)
    assert "layers.0.attention.wqkv.weight" in rebuilt                             # not the stale entry
    from llmsh.runtime import layout_cache

    wrong = {key: torch.zeros(3, 5) for key in again.checkpoint.layout.entries}     # parses, wrong shapes
    layout_cache.forget(path)
    layout_cache.write(path, first.dtype, wrong)
    torch.testing.assert_close(load(str(path)).forward(ids), want, atol=0, rtol=0)  # built again, not used
    layout_cache.forget(path)
    assert layout_cache.open_cached(path, first.dtype) is None


def test_fused_quantized_blocks_are_built_once_then_mapped(make_tiny_model, tmp_path: Path) -> None:
    """A quantized file's fused q|k|v (and row-permuted) blocks are a copy: cached on the first load, mapped after."""
    path = convert(make_tiny_model("llama"), tmp_path / "q.gguf", T.Q8_0)
    ids = list(range(3, 30))
    first = load(str(path))
    want = first.forward(ids)
    name = "layers.0.attention.wqkv.weight"
    key = first.checkpoint.layout_name(name)
    assert key is not None and key.startswith("q:")
    again = load(str(path))
    assert key in again.checkpoint.layout.entries
    torch.testing.assert_close(again.forward(ids), want, atol=0, rtol=0)
    mapped = again.checkpoint.layout.tensor(key)
    assert again.module.layers[0].attention.wqkv.weight.data_ptr() == mapped.data_ptr()   # not rebuilt


def test_layout_entries_of_deleted_files_are_removed(make_tiny_model, tmp_path: Path) -> None:
    from llmsh import paths

    def entries() -> set[Path]:
        return set((paths.cache_dir() / "layout").glob("*.safetensors"))

    a = convert(make_tiny_model("llama"), tmp_path / "a.gguf", T.F32)
    b = convert(make_tiny_model("qwen2"), tmp_path / "b.gguf", T.F32)
    before = entries()
    load(str(a))
    a_entry = entries() - before
    assert len(a_entry) == 1
    a.unlink()
    load(str(b))                                          # writing b's entry drops a's, whose file is gone
    assert not a_entry & entries() and len(entries() - before) == 1


def test_a_quantized_embedding_stays_quantized(make_tiny_model, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """An untied embedding the file stores quantized (a Q8_0 file's token_embd) stays in its blocks as a view of the
    mapped file: nothing is decoded at load, and a step decodes the rows it looks up (a float32 copy of a 128k-token,
    4096-wide table was 2.1 GB, in memory and in the layout cache)."""
    from gguf import GGMLQuantizationType, quants

    from llmsh.runtime import quant

    path = convert(make_tiny_model("llama"), tmp_path / "q.gguf", T.Q8_0)
    first = load(str(path))
    assert first.checkpoint.stored_type("tok_embeddings.weight") == "Q8_0"

    def no_decoding(*a, **k):
        raise AssertionError("decoded the embedding table at load")

    monkeypatch.setattr(quant, "dequantize", no_decoding)
    model = load(str(path))
    monkeypatch.undo()
    emb = model.module.tok_embeddings
    assert isinstance(emb, quant.QEmbedding) and emb.weight.dtype == torch.uint8
    assert model.checkpoint.layout_name("tok_embeddings.weight") is None              # used as the file stores it
    stored = model.checkpoint.g.array("token_embd.weight")
    assert emb.weight.data_ptr() == stored.ctypes.data
    ids = torch.tensor([[3, 7, 3], [0, 11, 5]])
    ref = quants.dequantize(stored[ids.reshape(-1).numpy()], GGMLQuantizationType.Q8_0)
    torch.testing.assert_close(emb(ids), torch.from_numpy(ref).float().view(2, 3, -1), atol=1e-6, rtol=0)
    torch.testing.assert_close(model.forward(list(range(3, 30))), first.forward(list(range(3, 30))), atol=0, rtol=0)
    assert model.bytes_read_per_token() == model.weight_bytes() - emb.weight.nbytes + emb.row_bytes


def test_a_tied_quantized_embedding_is_also_the_heads_blocks(make_tiny_model, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A tied table the file stores quantized (Llama 3.2, Qwen2.5, SmolLM GGUFs) stays in its blocks: looked up by
    row as a QEmbedding and multiplied as the head's QLinear, one Parameter viewing the mapped file. Decoded, it was a
    float32 head of 1.05 GB per token for a 128k x 2048 Q4_0 table of 148 MB, written to the layout cache too."""
    from llmsh.runtime import quant

    folder = make_tiny_model("llama3")
    path = convert(folder, tmp_path / "q.gguf", T.Q4_0)
    monkeypatch.setattr(quant, "dequantize", lambda *a, **k: pytest.fail("decoded the embedding table at load"))
    model = load(str(path))
    monkeypatch.undo()
    net = model.module
    assert model.config.tie_embeddings and isinstance(net.tok_embeddings, quant.QEmbedding)
    assert isinstance(net.output, quant.QLinear) and net.output.weight is net.tok_embeddings.weight
    assert net.output.weight.data_ptr() == model.checkpoint.g.array("token_embd.weight").ctypes.data
    assert model.bytes_read_per_token() > model.weight_bytes() - net.output.weight.nbytes // 2   # the head reads it
    reference = load(str(convert(folder, tmp_path / "f.gguf", T.Q4_0, dequantized=True)))
    ids = list(range(3, 30))
    torch.testing.assert_close(model.forward(ids), reference.forward(ids), atol=2e-4, rtol=1e-4)
    cache, ref_cache = model.new_cache(1, 64), reference.new_cache(1, 64)
    model.prefill(cache, [0], [[5, 9]]), reference.prefill(ref_cache, [0], [[5, 9]])
    torch.testing.assert_close(model.decode_step(cache, [0], [7]), reference.decode_step(ref_cache, [0], [7]),
                               atol=1e-2, rtol=5e-3)                      # the C kernels' step (see test_gguf_quant)


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage").exists(), reason="needs Linux's huge pages")
def test_weights_are_mapped_asking_for_huge_pages(make_gguf, make_tiny_model) -> None:
    """A page-cache miss through the mapping then reads a 2 MiB folio (checkpoint.map_weights): later loads map it
    with one entry instead of one per 4 KiB."""
    gguf_path, folder = make_gguf("llama", T.Q8_0), make_tiny_model("llama")
    first, second = load(str(gguf_path)), load(str(folder))     # (alive: their mappings are read below)
    for path in (gguf_path.resolve(), (folder / "model.safetensors").resolve()):
        flags = [set(m["VmFlags"].split()) for m in file_mappings({str(path)})]
        assert flags and all("hg" in f for f in flags), (path, flags)
    assert first.tokenizer is not None and second.tokenizer is not None


def test_a_file_that_cannot_be_mapped_fails_in_one_line(make_gguf, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from llmsh.runtime import gguf_file

    copy = tmp_path / "copy.gguf"                   # not indexed yet: the parsed open maps it after the parse
    copy.write_bytes(make_gguf("gpt2").read_bytes())

    def no_memory(path: Path) -> None:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(gguf_file, "_map", no_memory)
    with pytest.raises(LoadError) as err:
        load(str(copy))
    assert "cannot map the tensors" in str(err.value) and "\n" not in str(err.value)
