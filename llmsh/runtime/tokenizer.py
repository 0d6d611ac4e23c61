"""Tokenizer, chat template and streaming detokenizer, read from a Hugging Face folder without transformers.

`tokenizer.json` is run by the `tokenizers` library (the same Rust code transformers' fast tokenizers use);
`tokenizer_config.json` supplies the special tokens and the `chat_template` (or `chat_template.jinja`), which is
rendered exactly as transformers does: a sandboxed, immutable jinja2 environment with trim_blocks/lstrip_blocks,
`raise_exception`, a `tojson` that does not HTML-escape, `strftime_now`, and the special tokens as variables.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from llmsh.runtime.errors import LoadError

SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value: Any) -> str | None:
    """Special tokens are stored as a string or as an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> set[int]:
    if isinstance(value, int):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int)}
    return set()


@lru_cache(maxsize=16)
def compile_chat_template(source: str):
    """Compile a chat template the way transformers does (same environment, globals and filters)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}…{% endgeneration %}` marks assistant text for training masks; rendering ignores it."""

        tags = {"generation"}

        def parse(self, parser):  # type: ignore[no-untyped-def]
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):  # type: ignore[no-untyped-def]
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization_spaces: remove spaces before punctuation and English contractions."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class Tokenizer:
    """encode/decode, special tokens, EOS ids and chat template of one model folder."""

    def __init__(self, folder: Path, config: dict[str, Any] | None = None,
                 generation_config: dict[str, Any] | None = None) -> None:
        from tokenizers import Tokenizer as _Tok

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.exists():
            raise LoadError(f"no tokenizer.json in {folder}; llmsh needs a fast tokenizer (save one with "
                            "transformers' tokenizer.save_pretrained)")
        try:
            self._tok = _Tok.from_file(str(path))
        except Exception as e:  # the Rust error text is one line
            raise LoadError(f"tokenizer.json in {folder} cannot be read: {str(e).splitlines()[0]}") from None
        tc: dict[str, Any] = {}
        if (folder / "tokenizer_config.json").exists():
            try:
                tc = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
            except ValueError as e:
                raise LoadError(f"tokenizer_config.json in {folder} is not valid JSON ({e})") from None
        self.special_tokens: dict[str, str] = {}
        for attr in SPECIAL_ATTRS:
            text = _token_text(tc.get(attr))
            if text is not None:
                self.special_tokens[attr] = text
        self.chat_template: str | None = self._read_template(folder, tc)
        self.clean_up_spaces = bool(tc.get("clean_up_tokenization_spaces", False))
        self.model_max_length = tc.get("model_max_length")
        config, generation_config = config or {}, generation_config or {}
        eos = _ids(generation_config.get("eos_token_id")) or _ids(config.get("eos_token_id"))
        eos_id = self.token_to_id(self.special_tokens["eos_token"]) if "eos_token" in self.special_tokens else None
        if eos_id is not None:
            eos.add(eos_id)
        self.eos_token_ids: set[int] = eos
        bos = self.special_tokens.get("bos_token")
        self.bos_token_id: int | None = self.token_to_id(bos) if bos else next(iter(_ids(config.get("bos_token_id"))), None)

    @classmethod
    def from_parts(cls, tok: Any, *, special_tokens: dict[str, str], chat_template: str | None,
                   eos_token_ids: set[int], bos_token_id: int | None) -> Tokenizer:
        """A Tokenizer around a ready `tokenizers.Tokenizer` and the facts a folder's config files would give
        (a GGUF file's metadata, see gguf_tokenizer.py)."""
        self = cls.__new__(cls)
        self._tok, self.special_tokens, self.chat_template = tok, dict(special_tokens), chat_template
        self.clean_up_spaces, self.model_max_length = False, None
        self.eos_token_ids, self.bos_token_id = set(eos_token_ids), bos_token_id
        return self

    @staticmethod
    def _read_template(folder: Path, tc: dict[str, Any]) -> str | None:
        if (folder / "chat_template.jinja").exists():
            return (folder / "chat_template.jinja").read_text(encoding="utf-8")
        tpl = tc.get("chat_template")
        if isinstance(tpl, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            tpl = named.get("default") or next(iter(named.values()), None)
        if tpl is None and (folder / "chat_template.json").exists():
            tpl = json.loads((folder / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
        return tpl

    @property
    def vocab_size(self) -> int:
        """Number of tokens including added ones."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string, or None."""
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Token string of an id, or None."""
        return self._tok.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; special tokens (e.g. BOS) are added as the tokenizer's post-processor says."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of ids (transformers' decode semantics, including clean_up_tokenization_spaces)."""
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self.clean_up_spaces else text

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render messages with the model's chat template; ValueError (one line) if there is none or it refuses."""
        import jinja2

        if not self.chat_template:
            raise ValueError("this model has no chat template (tokenizer_config.json has no chat_template); "
                             "use 'run' with a plain prompt instead")
        template = compile_chat_template(self.chat_template)
        tools, documents = kwargs.pop("tools", None), kwargs.pop("documents", None)
        variables = {**self.special_tokens, **kwargs}  # like transformers, caller's kwargs win over special tokens
        try:
            return template.render(messages=messages, tools=tools, documents=documents,
                                   add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"chat template: {e}") from None


class Detokenizer:
    """Turns a growing list of token ids into text pieces, never splitting a multi-byte UTF-8 character.

    Decodes a short window of recent ids twice (with and without the new token) and emits the difference, waiting while
    the newest text ends in U+FFFD (an incomplete byte sequence). A few prompt ids seed the window so that tokenizers
    that drop a leading space at the start of a text (SentencePiece) still produce it mid-sentence.
    """

    def __init__(self, tokenizer: Tokenizer, context: list[int] | None = None, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids = list(context or [])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly '')."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""

    def flush(self) -> str:
        """Text still held back (an incomplete character at the very end decodes as U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):] if text.startswith(prefix) else ""
