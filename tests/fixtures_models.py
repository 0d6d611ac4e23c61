"""Tiny random Hugging Face-format checkpoints, made on the fly, for every test that needs a real model.

Each folder is what a user would download: `config.json`, `model.safetensors` (or shards + index), `generation_config.json`,
a real `tokenizer.json` trained here with the `tokenizers` library, and `tokenizer_config.json` with special tokens and a
chat template. Weights come from transformers' own `save_pretrained`, so the runtime is tested against the reference
implementation's files rather than files it wrote itself. Folders are cached per session: building one costs well under a second.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

VOCAB = 384  # small enough to be fast, big enough that BPE learns real merges from the corpus below

# Text the tokenizers are trained on: English, code-ish text and multi-byte UTF-8 (accents, CJK, emoji) so that
# byte-level tokens split characters and the streaming detokenizer has something to get wrong.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Once upon a time there was a little model that could generate text, token by token.",
    "def hello(name):\n    return f'hello {name}'\n",
    "Café, naïve, façade, résumé, jalapeño, Straße, smörgåsbord.",
    "日本語のテキストと中文文本，还有한국어 텍스트.",
    "Emoji: 🙂 🚀 🐍 🎉 ❤️ — and dashes – too.",
    "llmsh is an operating-system shell for language models; the kernel runs models as processes.",
    "User: what is the capital of France? Assistant: Paris is the capital of France.",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
] * 20

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set messages = messages[1:] %}"
    "{% else %}{% set system = false %}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system %}{% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

# family -> (transformers config class name, config kwargs, tokenizer style)
FAMILIES: dict[str, tuple[str, dict[str, Any], str]] = {
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, initializer_range=0.2), "gpt2"),
    "llama": (
        "LlamaConfig",
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False),
        "llama",
    ),
    "llama3": (  # Llama 3.x: llama3 rope scaling, GQA, tied embeddings like Llama 3.2 1B
        "LlamaConfig",
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
             max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=True, rope_theta=500000.0,
             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 32}),
        "chatml",
    ),
    "smollm": (  # SmolLM/TinyLlama-shaped: plain Llama, tied embeddings, one KV head
        "LlamaConfig",
        dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
             max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=True),
        "chatml",
    ),
    "mistral": (  # sliding window shorter than the test sequences so the window is really exercised
        "MistralConfig",
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, initializer_range=0.2, sliding_window=24, tie_word_embeddings=False),
        "llama",
    ),
    "qwen2": (
        "Qwen2Config",
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=True),
        "chatml",
    ),
    "qwen3": (  # head_dim set apart from hidden/heads, as Qwen3's are; q/k norms; tied like Qwen3-0.6B
        "Qwen3Config",
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=32, max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=True),
        "chatml",
    ),
    "phi3": (  # longrope (short factors within the original 64 positions; attention factor from 256/64), window 24
        "Phi3Config",
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, original_max_position_embeddings=64, initializer_range=0.2,
             sliding_window=24, tie_word_embeddings=False, pad_token_id=0,
             rope_scaling={"rope_type": "longrope", "short_factor": [1.0 + i / 8 for i in range(8)],
                           "long_factor": [2.0 + i for i in range(8)]}),
        "chatml",
    ),
    "phi4": (  # Phi-4-mini-shaped: partial rotary (3/4 of each head), tied embeddings, GQA
        "Phi3Config",
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
             max_position_embeddings=256, initializer_range=0.2, partial_rotary_factor=0.75, tie_word_embeddings=True,
             pad_token_id=0),
        "chatml",
    ),
    "gemma2": (  # soft-caps, (1 + w) norms, pre/post norms, sliding window 12 on even layers (crossed by the tests)
        "Gemma2Config",
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, max_position_embeddings=256, initializer_range=0.2, sliding_window=12,
             query_pre_attn_scalar=24, attn_logit_softcapping=5.0, final_logit_softcapping=3.0, pad_token_id=0),
        "gemma",
    ),
    "gemma3": (  # text-only Gemma 3: q/k norms, local base 10k and global 1M with linear scaling, window 12
        "Gemma3TextConfig",
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
             head_dim=32, max_position_embeddings=256, initializer_range=0.2, sliding_window=12,
             query_pre_attn_scalar=24, pad_token_id=0,
             layer_types=["sliding_attention", "sliding_attention", "full_attention"],
             rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
        "gemma",
    ),
    "mixtral": (  # 4 experts, top-2 (weights renormalised), untied
        "MixtralConfig",
        dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, initializer_range=0.2, num_local_experts=4, num_experts_per_tok=2,
             tie_word_embeddings=False),
        "llama",
    ),
    "qwen3_moe": (  # 6 experts, top-2 without renormalising (norm_topk_prob false); layer 1 a dense MLP
        "Qwen3MoeConfig",
        dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
             initializer_range=0.2, num_experts=6, num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1],
             tie_word_embeddings=False),
        "chatml",
    ),
    "gemma3_mm": (  # a multimodal Gemma 3 (Gemma3ForConditionalGeneration, like the 4B+ ones): its text model only
        "Gemma3Config",
        dict(text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=1, head_dim=32, vocab_size=VOCAB, sliding_window=12,
                              query_pre_attn_scalar=24, max_position_embeddings=256, initializer_range=0.2),
             vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14),
             mm_tokens_per_image=4, initializer_range=0.2, pad_token_id=0),
        "gemma",
    ),
}

# families whose norm weights are randomised before saving: transformers initialises them to 1 (or Gemma's 0 offset),
# which would let a wrong gain formula or a norm left out (q/k norms) pass the comparisons
RANDOM_NORMS = {"qwen3", "phi3", "phi4", "gemma2", "gemma3", "gemma3_mm", "mixtral", "qwen3_moe"}

# tokenizer style -> (special tokens, bos, eos, chat template or None, add bos on encode)
TOKENIZER_STYLES: dict[str, tuple[list[str], str | None, str, str | None, bool]] = {
    "gpt2": (["<|endoftext|>"], "<|endoftext|>", "<|endoftext|>", None, False),
    "llama": (["<unk>", "<s>", "</s>"], "<s>", "</s>", LLAMA2_TEMPLATE, True),
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", CHATML_TEMPLATE, False),
    "gemma": (["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", None, True),
}


def train_tokenizer(style: str, vocab_size: int = VOCAB):
    """A real byte-level BPE `tokenizers.Tokenizer` trained on CORPUS, with the special tokens of `style`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials, bos, _eos, _tpl, add_bos = TOKENIZER_STYLES[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def write_tokenizer(folder: Path, style: str, vocab_size: int = VOCAB) -> dict[str, int]:
    """Write tokenizer.json + tokenizer_config.json for `style` into folder; returns {'bos': id|None, 'eos': id}."""
    tok = train_tokenizer(style, vocab_size)
    specials, bos, eos, template, _add_bos = TOKENIZER_STYLES[style]
    tok.save(str(folder / "tokenizer.json"))
    added = {
        str(tok.token_to_id(s)): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": True}
        for s in specials
    }
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": "<unk>" if "<unk>" in specials else None,
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 256,
    }
    if template is not None:
        cfg["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    return {"bos": tok.token_to_id(bos) if bos else None, "eos": tok.token_to_id(eos)}


def build_tiny_model(folder: Path, family: str = "gpt2", *, shards: bool = False, dtype: str = "float32",
                     seed: int = 0, **overrides: Any) -> Path:
    """Save a tiny random `family` model with transformers' save_pretrained + a trained tokenizer into folder."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    cls_name, kwargs, style = FAMILIES[family]
    folder.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(folder, style)
    kwargs = {**kwargs, "vocab_size": VOCAB, "bos_token_id": ids["bos"] if ids["bos"] is not None else ids["eos"],
              "eos_token_id": ids["eos"], **overrides}
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    if family in RANDOM_NORMS:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(torch.randn_like(p) * 0.3)
    model = model.to(getattr(torch, dtype))
    model.generation_config.do_sample = False
    model.save_pretrained(folder, max_shard_size="100KB" if shards else "5GB")
    return folder


@pytest.fixture(scope="session")
def make_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: make_tiny_model(family="gpt2"|"llama"|"llama3"|"smollm"|"mistral"|"qwen2", shards=False, **config) -> folder.

    Folders are cached for the session by their arguments: do not modify a returned folder in place — copy it first
    (`shutil.copytree`) when a test corrupts files.
    """
    made: dict[str, Path] = {}

    def make(family: str = "gpt2", **overrides: Any) -> Path:
        key = json.dumps([family, overrides], sort_keys=True, default=str)
        if key not in made:
            if family not in FAMILIES:
                raise ValueError(f"unknown tiny model family {family!r}; known: {', '.join(FAMILIES)}")
            folder = tmp_path_factory.mktemp(f"tiny-{family}")
            made[key] = build_tiny_model(folder, family, **overrides)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_gpt2(make_tiny_model: Callable[..., Path]) -> Path:
    """A ready tiny GPT-2 folder (2 layers, hidden 64, vocab 384)."""
    return make_tiny_model("gpt2")


@pytest.fixture(scope="session")
def tiny_llama(make_tiny_model: Callable[..., Path]) -> Path:
    """A ready tiny Llama folder (2 layers, hidden 64, GQA 4/2, untied, Llama-2 chat template)."""
    return make_tiny_model("llama")
