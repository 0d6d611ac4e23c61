"""The tokenizer of a GGUF file, rebuilt from its metadata as a `tokenizers.Tokenizer` (what tokenizer.json runs on).

GGUF keeps a vocabulary (`tokenizer.ggml.tokens`, `token_type`, `scores`), the merges of byte-level BPE models, the
special token ids, whether to add BOS, a pre-tokenizer name (`tokenizer.ggml.pre`: which split regex llama.cpp uses)
and the chat template. Two models cover the families llmsh runs:
- `gpt2`: byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM): vocabulary + merges, the split regex of `pre`, byte-level
  decoding. This is what Hugging Face's tokenizer.json of those models holds, so ids match it.
- `llama`: SentencePiece BPE (Llama 2, Mistral, TinyLlama): pieces with scores; merges are recovered from the scores
  (a piece ranks by its own score, as SentencePiece's BPE merges), spaces become "▁", unknown bytes fall back to
  `<0xNN>` pieces; the same construction transformers uses to turn a SentencePiece model into a fast tokenizer.
Control tokens become special added tokens, so `<|im_start|>` in a prompt is one id, as with the HF tokenizer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from llmsh.runtime.errors import LoadError
from llmsh.runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the split regex (None: GPT-2's, inside ByteLevel) and whether digits split one by one first
PRE: dict[str, tuple[str | None, bool]] = {
    "default": (None, False), "gpt-2": (None, False), "gpt2": (None, False),
    "llama-bpe": (LLAMA3_SPLIT, False), "llama3": (LLAMA3_SPLIT, False), "smaug-bpe": (LLAMA3_SPLIT, False),
    "qwen2": (QWEN2_SPLIT, False), "smollm": (None, True), "starcoder": (None, True),
}
CONTROL, USER_DEFINED = 3, 4
SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
               "pad_token": "padding_token_id"}


def build(meta: Callable[[str, Any], Any], cached: str | None = None) -> tuple[Tokenizer | None, str | None]:
    """The Tokenizer of a GGUF file whose metadata `meta(key, default)` reads (None if it has no vocabulary), and
    the `tokenizers` JSON of it; `cached`: that JSON from an earlier build, which is then not rebuilt (fast: the
    vocabulary list is not read either, special tokens are named by the tokenizer itself)."""
    kind = meta("tokenizer.ggml.model", None)
    if kind is None:
        return None, None
    tok = _from_json(cached)
    tokens: list[str] | None = None
    if tok is None:
        tokens = meta("tokenizer.ggml.tokens", None)
        if not tokens:
            return None, None
        tok, cached = _build_tokenizers(meta, kind, tokens), None

    def named(i: Any) -> str | None:
        nonlocal tokens
        if not isinstance(i, int) or i < 0:
            return None
        if tokens is None and (text := tok.id_to_token(i)) is not None:
            return text
        if tokens is None:             # a string the vocabulary repeats names only its last id there: ask the list
            tokens = meta("tokenizer.ggml.tokens", None) or []
        return tokens[i] if i < len(tokens) else None

    bos = meta("tokenizer.ggml.bos_token_id", None)
    special = {attr: name for attr, key in SPECIAL_IDS.items()
               if (name := named(meta(f"tokenizer.ggml.{key}", None))) is not None}
    eos = {i for key in ("eos_token_id", "eot_token_id", "eom_token_id")
           if isinstance(i := meta(f"tokenizer.ggml.{key}", None), int)}
    return Tokenizer.from_parts(tok, special_tokens=special, chat_template=meta("tokenizer.chat_template", None),
                                eos_token_ids=eos, bos_token_id=bos), cached or tok.to_str()


def _from_json(cached: str | None) -> Any:
    """The tokenizer an earlier build saved, or None (none saved, or the saved file is damaged: rebuilt then)."""
    from tokenizers import Tokenizer as Tok

    if not cached:
        return None
    try:
        return Tok.from_str(cached)
    except Exception:  # tokenizers raises its own Exception subclass for a malformed file
        log.warning("the cached tokenizer of a GGUF file is damaged; rebuilding it from the file's metadata")
        return None


def _build_tokenizers(meta: Callable[[str, Any], Any], kind: str, tokens: list[str]) -> Any:
    """The `tokenizers.Tokenizer` the metadata describes (see the module docstring)."""
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as Tok

    types: list[int] = meta("tokenizer.ggml.token_type", None) or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in meta("tokenizer.ggml.merges", None) or []]
        pre = meta("tokenizer.ggml.pre", "default")
        if pre not in PRE:
            log.warning("GGUF pre-tokenizer %r is not known to llmsh: splitting words as GPT-2 does", pre)
        split, digits = PRE.get(pre, (None, False))
        tok = Tok(models.BPE(vocab=vocab, merges=merges, ignore_merges=split == LLAMA3_SPLIT))
        steps: list[Any] = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
        if split is None:
            steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
        else:
            from tokenizers import Regex

            steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        tok.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":
        scores: list[float] = meta("tokenizer.ggml.scores", None) or [0.0] * len(tokens)
        unk = meta("tokenizer.ggml.unknown_token_id", None)
        tok = Tok(models.BPE(vocab=vocab, merges=_spm_merges(tokens, scores, types), byte_fallback=True,
                             unk_token=tokens[unk] if unk is not None else None, fuse_unk=True))
        norm_steps: list[Any] = [normalizers.Replace(" ", "▁")]
        if meta("tokenizer.ggml.add_space_prefix", True):
            norm_steps.insert(0, normalizers.Prepend("▁"))
        tok.normalizer = normalizers.Sequence(norm_steps)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if meta("tokenizer.ggml.add_space_prefix", True)
                                           else []))
    else:
        raise LoadError(f"GGUF tokenizer model {kind!r} is not supported (supported: gpt2, llama); "
                        "use a Hugging Face folder of this model instead")
    added = [AddedToken(tokens[i], special=t == CONTROL, normalized=False) for i, t in enumerate(types)
             if t in (CONTROL, USER_DEFINED)]
    if added:
        tok.add_tokens(added)
    bos = meta("tokenizer.ggml.bos_token_id", None)
    add_bos = bool(meta("tokenizer.ggml.add_bos_token", kind == "llama")) and bos is not None
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A",
                                                           pair=f"{tokens[bos]} $A {tokens[bos]} $B",
                                                           special_tokens=[(tokens[bos], bos)])
    elif kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Merges of a SentencePiece BPE vocabulary: every split of a normal piece into two pieces, ranked by the
    merged piece's score (higher merges first), as transformers' SentencePieceExtractor does."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found: list[tuple[float, int, int, tuple[str, str]]] = []
    for piece, i in vocab.items():
        if types[i] != 1 or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in vocab and b in vocab:
                found.append((-scores[i], vocab[a], vocab[b], (a, b)))
    found.sort()
    return [m for *_, m in found]
