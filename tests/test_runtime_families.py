"""The newer families beyond parity with transformers (test_runtime_parity.py): what a MoE decode step reads, how
configs llmsh cannot run are refused, and which decode path each family takes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llmsh.runtime import LoadError, load
from llmsh.runtime.gemma import GemmaConfig
from llmsh.runtime.llama import LlamaConfig


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_a_decode_step_runs_only_the_chosen_experts(family, make_tiny_model):
    """A batch-1 decode step pages in top_k experts per MoE layer; with every other expert released (meta tensors,
    which cannot be read) it gives the same logits as with all of them resident."""
    model = load(make_tiny_model(family))
    cfg, pages = model.config, model.pages()
    prompt = list(range(10, 30))
    cache = model.new_cache(1, 64)
    slot = cache.alloc()
    model.prefill(cache, [slot], [prompt])
    state = [t.clone() for t in cache.k + cache.v]
    expected = model.decode_step(cache, [slot], [5])

    seen: list[int] = []
    model.set_page_hook(seen.append)
    cache.lengths[slot] = len(prompt)
    assert torch.equal(model.decode_step(cache, [slot], [5]), expected)
    experts = [pages[i].name for i in seen if ".expert." in pages[i].name]
    n_moe = cfg.n_layer - len(cfg.dense_layers)
    assert len(experts) == len(set(experts)) == n_moe * cfg.top_k

    for i, page in enumerate(pages):
        if ".expert." in page.name and page.name not in experts:
            model.release_page(i)
    for t, saved in zip(cache.k + cache.v, state):
        t.copy_(saved)
    cache.lengths[slot] = len(prompt)
    assert torch.equal(model.decode_step(cache, [slot], [5]), expected)
    model.set_page_hook(None)


def test_bytes_read_per_token_counts_top_k_of_the_experts(make_tiny_model):
    model = load(make_tiny_model("mixtral"))
    cfg = model.config
    experts = sum(p.nbytes for p in model.pages() if ".expert." in p.name)
    embed = model.module.tok_embeddings.weight
    unread_embed = embed.nbytes - embed[0].nbytes                        # untied: only looked up
    unread_experts = experts - experts * cfg.top_k // cfg.n_experts
    assert model.bytes_read_per_token() == model.weight_bytes() - unread_embed - unread_experts


def _edited(folder, tmp_path, **changes):
    out = tmp_path / "m"
    shutil.copytree(folder, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(changes)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("family,changes,words", [
    ("gemma2", {"hidden_activation": "relu"}, "hidden_activation 'relu'"),
    ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma3", {"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}, "'yarn'"),
    ("mixtral", {"num_experts_per_tok": 9}, "num_experts_per_tok 9"),
    ("qwen3_moe", {"shared_expert_intermediate_size": 64}, "shared experts"),
    ("phi3", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_configs_llmsh_cannot_run_are_refused_in_one_line(family, changes, words, make_tiny_model, tmp_path):
    with pytest.raises(LoadError) as e:
        load(_edited(make_tiny_model(family), tmp_path, **changes))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_old_style_configs_read_the_same():
    """transformers v4 configs: Gemma 2 windows on even layers, Gemma 3 on five of six with rope_local_base_freq;
    Phi-3's 'su' rope and top-level original_max_position_embeddings."""
    g2 = GemmaConfig.from_hf(dict(model_type="gemma2", vocab_size=10, hidden_size=8, num_hidden_layers=4,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=4, intermediate_size=16,
                                  sliding_window=4096, query_pre_attn_scalar=144))
    assert g2.windows == [4096, None, 4096, None] and g2.query_pre_attn_scalar == 144
    g3 = GemmaConfig.from_hf(dict(model_type="gemma3_text", vocab_size=10, hidden_size=8, num_hidden_layers=7,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=4, intermediate_size=16,
                                  sliding_window=512, rope_theta=1e6, rope_local_base_freq=1e4,
                                  rope_scaling={"rope_type": "linear", "factor": 8.0}))
    assert g3.windows == [512] * 5 + [None, 512] and (g3.rope_theta, g3.rope_local_theta) == (1e6, 1e4)
    assert g3.rope_scaling == {"rope_type": "linear", "factor": 8.0} and g3.qk_norm and g3.attn_softcap is None
    phi = LlamaConfig.from_hf(dict(model_type="phi3", vocab_size=10, hidden_size=8, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=16, max_position_embeddings=131072,
                                   original_max_position_embeddings=4096,
                                   rope_scaling={"type": "su", "short_factor": [1.0, 1.0], "long_factor": [2.0, 3.0]}))
    assert phi.rope_scaling["rope_type"] == "longrope" and phi.rope_scaling["original_max_position_embeddings"] == 4096
    assert phi.fused_checkpoint and not phi.qk_norm
    # gemma-3-4b-it's config.json: the text_config names only what differs from Gemma3TextConfig's defaults
    mm = GemmaConfig.from_hf(dict(model_type="gemma3", text_config=dict(
        model_type="gemma3_text", hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, sliding_window=1024,
        rope_scaling={"factor": 8.0, "rope_type": "linear"})))
    assert (mm.dim, mm.n_layer, mm.n_head, mm.n_kv_head, mm.head_dim, mm.vocab_size) == (2560, 34, 8, 4, 256, 262208)
    assert mm.windows[:6] == [1024] * 5 + [None] and mm.rope_scaling["factor"] == 8.0 and mm.tie_embeddings
    assert (mm.rope_theta, mm.rope_local_theta, mm.query_pre_attn_scalar) == (1e6, 1e4, 256)


def test_longrope_switches_to_its_long_factors_past_the_original_length():
    from llmsh.runtime.llama import model_rope_tables

    cfg = LlamaConfig(dim=8, n_layer=1, n_head=2, intermediate_size=16, max_seq_len=32, rope_scaling={
        "rope_type": "longrope", "short_factor": [1.0, 1.0], "long_factor": [4.0, 4.0],
        "original_max_position_embeddings": 8, "max_position_embeddings": 32})
    cos, _ = model_rope_tables(cfg)
    plain, _ = model_rope_tables(LlamaConfig(dim=8, n_layer=1, n_head=2, intermediate_size=16, max_seq_len=32))
    scale = (1 + torch.log(torch.tensor(4.0)) / torch.log(torch.tensor(8.0))).sqrt()
    torch.testing.assert_close(cos[:8], plain[:8] * scale)                 # short factors 1: plain RoPE, scaled
    assert not torch.allclose(cos[8:], plain[8:] * scale)


@pytest.mark.parametrize("family,fast", [("qwen3", True), ("phi4", True), ("gemma2", True), ("gemma3", True),
                                         ("mixtral", True), ("qwen3_moe", True)])
def test_which_families_decode_through_the_c_kernels(family, fast, make_tiny_model):
    """Every new family takes the C path where a compiler exists (the MoE ones per layer half and per expert)."""
    from llmsh.runtime.kernels import library

    model = load(make_tiny_model(family))
    assert (model.fast_decode is not None) == (fast and library() is not None)


CHATS = [
    [{"role": "user", "content": "  hi  "}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"}, {"role": "user", "content": "And 3+3? 🙂"}],
    [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "<think>\nuse the tool\n</think>\n\nok"}],
]
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}]


def _with_template(folder, tmp_path, template):
    out = tmp_path / "chat"
    shutil.copytree(folder, out)
    tc = json.loads((out / "tokenizer_config.json").read_text())
    tc["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(tc))
    return out


@pytest.mark.parametrize("family,template", [("qwen3", "QWEN3"), ("gemma2", "GEMMA2"), ("gemma3", "GEMMA3")])
def test_chat_templates_render_as_transformers_renders_them(family, template, make_tiny_model, tmp_path):
    """Qwen3: thinking tags (on, off, earlier turns' reasoning dropped), tools; Gemma 2: a system message is refused
    with the template's own one-line reason; Gemma 3: it joins the first user turn."""
    from transformers import AutoTokenizer

    from llmsh.runtime.tokenizer import Tokenizer
    from tests import chat_templates

    folder = _with_template(make_tiny_model(family), tmp_path, getattr(chat_templates, template))
    ours, ref = Tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    options = [{}, {"enable_thinking": False}, {"enable_thinking": True}, {"tools": TOOLS}] if family == "qwen3" else [{}]
    rendered = 0
    for chat in CHATS:
        for gen in (True, False):
            for extra in options:
                try:
                    want = ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen, **extra)
                except Exception as e:                                   # noqa: BLE001 (jinja's TemplateError)
                    with pytest.raises(ValueError) as err:
                        ours.apply_chat_template(chat, add_generation_prompt=gen, **extra)
                    assert str(e) in str(err.value) and "\n" not in str(err.value)
                    continue
                assert ours.apply_chat_template(chat, add_generation_prompt=gen, **extra) == want
                rendered += 1
    assert rendered >= (len(CHATS) - 1) * 2
    if family == "gemma2":
        with pytest.raises(ValueError, match="System role not supported"):
            ours.apply_chat_template(CHATS[1])
    if family == "qwen3":
        off = ours.apply_chat_template(CHATS[0], enable_thinking=False)
        assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert "add them" not in ours.apply_chat_template(CHATS[1])           # earlier reasoning is dropped
