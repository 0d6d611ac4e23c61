"""A small Hugging Face → GGUF converter for tests, written with the `gguf` package's `GGUFWriter`.

It follows llama.cpp's `convert_hf_to_gguf.py` in the facts that matter to a reader (tensor names, the q/k row
permutation of the `llama` architecture, GPT-2's Conv1D weights stored (out, in), llama3 RoPE scaling as a
`rope_freqs` tensor, metadata keys, a byte-level BPE vocabulary with merges and token types), so that llmsh's GGUF
loader is checked against files laid out as llama.cpp writes them, from checkpoints transformers wrote. llama.cpp's
converter itself cannot take our tiny models: it refuses tokenizers whose pre-tokenizer hash it does not know.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from safetensors.torch import load_file

LLAMA_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
GPT2_NAMES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
              "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's permutation of q/k rows from Hugging Face's rotate-half RoPE to ggml's adjacent pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope(cfg: dict) -> dict:
    """RoPE settings of a transformers v4 (`rope_scaling`, `rope_theta`) or v5 (`rope_parameters`) config."""
    return dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})


def llama3_rope_factors(cfg: dict) -> np.ndarray:
    """The `rope_freqs` tensor llama.cpp writes for llama3 RoPE scaling (ggml divides each frequency by it)."""
    rs = _rope(cfg)
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    base = rs.get("rope_theta") or cfg.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _tokenizer(w: gguf.GGUFWriter, folder: Path, cfg: dict) -> None:
    tj = json.loads((folder / "tokenizer.json").read_text())
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    special = set()
    for t in tj.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
        if t.get("special"):
            special.add(t["id"])
    n = max(cfg["vocab_size"], max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [gguf.TokenType.UNUSED] * n
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")                       # the fixtures' tokenizers split with GPT-2's regex
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if tc.get("bos_token"):
        w.add_bos_token_id(vocab[tc["bos_token"]])
    w.add_eos_token_id(vocab[tc["eos_token"]])
    post = tj.get("post_processor") or {}
    w.add_add_bos_token(post.get("type") == "TemplateProcessing")
    if tc.get("chat_template"):
        w.add_chat_template(tc["chat_template"])


def _quantize(name: str, data: np.ndarray, qtype: T) -> tuple[np.ndarray, T]:
    """Matrices in qtype (llama.cpp keeps 1-D tensors and token embeddings of odd widths in F32); the rest F32."""
    if data.ndim != 2 or qtype == T.F32 or data.shape[1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return data.astype(np.float32), T.F32
    if qtype not in (T.Q4_K, T.Q6_K):
        return gguf.quants.quantize(data.astype(np.float32), qtype), qtype
    from llmsh.runtime.quant import quantize  # Q4_K, Q6_K: the gguf package only decodes them
    return quantize(data.astype(np.float32), qtype), qtype


def convert(folder: Path, out: Path, qtype: T = T.F32, types: dict[str, T] | None = None,
            dequantized: bool = False) -> Path:
    """Write folder's model as one GGUF file at out; matrices in qtype, or per tensor name as `types` says.
    dequantized: write the float32 the quantized file decodes to (gguf's reference `dequantize`), not the blocks."""
    cfg = json.loads((folder / "config.json").read_text())
    sd = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}
    mt = cfg["model_type"]
    arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}[mt]
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(folder.name)
    tensors: dict[str, torch.Tensor] = {}
    if arch == "gpt2":
        w.add_context_length(cfg["n_positions"])
        w.add_embedding_length(cfg["n_embd"])
        w.add_feed_forward_length(cfg.get("n_inner") or 4 * cfg["n_embd"])
        w.add_block_count(cfg["n_layer"])
        w.add_head_count(cfg["n_head"])
        w.add_layer_norm_eps(cfg.get("layer_norm_epsilon", 1e-5))
        for k, v in sd.items():
            k = k.removeprefix("transformer.")
            if k in ("lm_head.weight",) or k.endswith(".attn.bias") or k.endswith(".masked_bias"):
                continue
            if k.startswith("h."):
                _, i, rest = k.split(".", 2)
                mod, kind = rest.rsplit(".", 1)
                if kind == "weight" and v.dim() == 2:
                    v = v.t()                                    # Conv1D (in, out) -> (out, in)
                tensors[f"blk.{i}.{GPT2_NAMES[mod]}.{kind}"] = v
            else:
                tensors[{"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
                         "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias"}[k]] = v
        tensors["output.weight"] = tensors["token_embd.weight"]  # llama.cpp's converter writes the tied head too
    else:
        nh, nkv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        w.add_context_length(cfg["max_position_embeddings"])
        w.add_embedding_length(cfg["hidden_size"])
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_block_count(cfg["num_hidden_layers"])
        w.add_head_count(nh)
        w.add_head_count_kv(nkv)
        w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
        w.add_rope_freq_base(_rope(cfg).get("rope_theta") or cfg.get("rope_theta", 10000.0))
        w.add_vocab_size(cfg["vocab_size"])
        if cfg.get("sliding_window") and mt == "mistral":
            w.add_sliding_window(cfg["sliding_window"])
        if _rope(cfg).get("rope_type") == "llama3":
            tensors["rope_freqs.weight"] = torch.from_numpy(llama3_rope_factors(cfg))
        for k, v in sd.items():
            if k == "lm_head.weight":
                if not cfg.get("tie_word_embeddings"):
                    tensors["output.weight"] = v
                continue
            if k.startswith("model.layers."):
                _, _, i, rest = k.split(".", 3)
                mod, kind = rest.rsplit(".", 1)
                if arch == "llama" and mod == "self_attn.q_proj":
                    v = permute(v, nh)
                elif arch == "llama" and mod == "self_attn.k_proj":
                    v = permute(v, nkv)
                tensors[f"blk.{i}.{LLAMA_NAMES[mod]}.{kind}"] = v
            else:
                names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
                tensors[names[k]] = v
    _tokenizer(w, folder, cfg)
    for name, v in tensors.items():
        data, t = _quantize(name, v.numpy(), (types or {}).get(name, qtype))
        if dequantized and t != T.F32:
            data, t = gguf.quants.dequantize(data, t).astype(np.float32), T.F32
        w.add_tensor(name, data, raw_dtype=t)        # the writer turns a quantized byte shape into the element shape
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
