"""Tokenizer, chat template and streaming detokenizer against transformers on the same files."""

from __future__ import annotations

import pytest

from llmsh.runtime.tokenizer import Detokenizer, Tokenizer, compile_chat_template

TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and trailing  ",
    "Café, naïve — 日本語 🙂🚀 mixed",
    "<|endoftext|>special in the middle</s><s>",
    "",
    "line one\nline two\n\n\ttabbed",
]
CHATS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3? 🙂"}],
]


@pytest.fixture(scope="module", params=["gpt2", "llama", "qwen2"])
def toks(request, make_tiny_model):
    """(ours, transformers') tokenizers of one tiny folder (styles: gpt2, llama with BOS, chatml)."""
    from transformers import AutoTokenizer

    folder = make_tiny_model(request.param)
    return Tokenizer(folder), AutoTokenizer.from_pretrained(folder)


def test_encode_decode_match_transformers(toks):
    ours, ref = toks
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == ref.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text


def test_chat_template_matches_transformers(toks):
    ours, ref = toks
    if ref.chat_template is None:
        with pytest.raises(ValueError, match="no chat template"):
            ours.apply_chat_template(CHATS[0])
        return
    for chat in CHATS:
        for gen_prompt in (True, False):
            want = ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen_prompt)
            assert ours.apply_chat_template(chat, add_generation_prompt=gen_prompt) == want


def test_chat_template_raise_exception_is_one_line(make_tiny_model):
    ours = Tokenizer(make_tiny_model("llama"))
    with pytest.raises(ValueError, match="roles must alternate") as err:
        ours.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert "\n" not in str(err.value)


def test_template_environment_like_transformers():
    tpl = compile_chat_template(
        "{{ messages | tojson }}|{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}"
        "{% endfor %}|{{ '<b>' }}")
    assert tpl.render(messages=[{"role": "user", "content": "é<b>"}, {"role": "x"}]) == \
        '[{"role": "user", "content": "é<b>"}, {"role": "x"}]|user|<b>'
    with pytest.raises(Exception):  # the sandbox is immutable: templates cannot mutate caller data
        compile_chat_template("{{ messages.append(1) }}").render(messages=[])


def test_eos_and_special_tokens_from_configs(make_tiny_model):
    folder = make_tiny_model("qwen2")
    tok = Tokenizer(folder, {"eos_token_id": 0}, {"eos_token_id": [2, 0]})
    assert tok.eos_token_ids == {0, 2, tok.token_to_id("<|im_end|>")}
    assert tok.special_tokens["eos_token"] == "<|im_end|>"


def test_streaming_detokenizer_never_splits_a_character(make_tiny_model):
    tok = Tokenizer(make_tiny_model("gpt2"))
    text = "Café 🙂 日本語のテキスト 🚀🐍 naïve façade ❤️ end"
    ids = tok.encode(text)
    assert len(ids) > len(text.encode()) // 4   # byte-level: multi-byte characters span several tokens
    detok = Detokenizer(tok)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    # every character arrives whole: each piece is valid text on its own
    assert all(p.encode().decode() == p for p in pieces)


def test_streaming_matches_full_decode_on_random_tokens(make_tiny_model):
    import random

    tok = Tokenizer(make_tiny_model("llama"))
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(3, tok.vocab_size) for _ in range(30)]
        detok = Detokenizer(tok)
        streamed = "".join(detok.push(i) for i in ids) + detok.flush()
        assert streamed == tok.decode(ids, skip_special_tokens=True)
