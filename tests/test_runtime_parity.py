"""Our plain-PyTorch models against transformers on the same files: logits, decode steps, greedy continuous batching."""

from __future__ import annotations

import pytest
import torch

from llmsh.runtime import fast_decode, load
from llmsh.runtime.generation import BatchGenerator, Sequence
from llmsh.runtime.sampling import SamplingParams

FAMILIES = ["gpt2", "llama", "llama3", "smollm", "mistral", "qwen2", "qwen3", "phi3", "phi4", "gemma2", "gemma3",
            "gemma3_mm", "mixtral", "qwen3_moe"]


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, make_tiny_model):
    """(family, our Model, transformers model) loaded from one tiny folder."""
    from transformers import AutoModelForCausalLM

    folder = make_tiny_model(request.param)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return request.param, load(folder), ref


def test_prefill_and_32_decode_steps_match_transformers(pair):
    family, model, ref = pair
    ids = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]                 # (40, vocab)
    torch.testing.assert_close(model.forward(ids), expected, atol=1e-4, rtol=0)
    cache = model.new_cache(max_batch=3, max_seq_len=64)
    cache.alloc()                                                     # slot 0 busy: ours runs in slot 1
    slot = cache.alloc()
    logits = model.prefill(cache, [slot], [ids[:8]])
    torch.testing.assert_close(logits[0], expected[7], atol=1e-4, rtol=0)
    for t in range(8, 40):                                            # 32 decode steps (mistral: past its window of 24)
        logits = model.decode_step(cache, [slot], [ids[t]])
        torch.testing.assert_close(logits[0], expected[t], atol=1e-4, rtol=0, msg=f"{family} step {t}")
    assert cache.length(slot) == 40


def _hf_greedy(ref, prompt: list[int], n: int) -> list[int]:
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_continuous_batch_matches_transformers(pair):
    family, model, ref = pair
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in (3, 7, 12, 5)]
    n_new = 16
    expected = [_hf_greedy(ref, p, n_new) for p in prompts]
    params = SamplingParams(max_tokens=n_new, ignore_eos=True)
    seqs = [Sequence(model, p, params) for p in prompts]
    gen = BatchGenerator(model, max_batch=4, max_seq_len=64)
    for s in seqs[:3]:
        gen.add(s)
    sizes = []
    while gen.has_work:
        if gen.steps == 5:
            gen.add(seqs[3])                                          # joins a running batch midway
        gen.step()
        sizes.append(gen.last_batch_size)
    assert max(sizes) == 4 and sizes[0] == 3
    for s, want in zip(seqs, expected):
        assert s.finished == "length"
        assert s.token_ids == want, family


@pytest.mark.parametrize("rows", [3, fast_decode.MAX_ROWS + 4])
def test_different_positions_share_one_decode_step(pair, rows):
    """Slots at different positions, unordered and non-contiguous, in one decode step give each slot its own single-
    sequence logits: through the C kernels (few rows) and through the torch path (more rows than they take), which
    reorders the rows by slot so the attention reads runs of the cache in place."""
    _, model, _ = pair
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, model.config.vocab_size, (2 + (7 * i) % 11,), generator=g).tolist() for i in range(rows)]
    nxt = [5 + i for i in range(rows)]
    batch_cache = model.new_cache(rows + 1, 32)
    taken = [batch_cache.alloc() for _ in range(rows + 1)]
    slots = taken[::-1][:rows]                                        # unordered, slot 0 left out: gathered rows
    slots[0], slots[-1] = slots[-1], slots[0]
    model.prefill(batch_cache, slots, prompts)
    batched = model.decode_step(batch_cache, slots, nxt)
    for i, p in enumerate(prompts):
        alone = model.forward(p + [nxt[i]])[-1]
        torch.testing.assert_close(batched[i], alone, atol=1e-4, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(make_tiny_model):
    folder = make_tiny_model("llama")
    cpu, gpu = load(folder), load(folder, device="cuda", dtype="float32")
    ids = list(range(1, 30))
    torch.testing.assert_close(gpu.forward(ids).cpu(), cpu.forward(ids), atol=1e-3, rtol=0)
    assert gpu.generate(["hello"], max_tokens=8) == cpu.generate(["hello"], max_tokens=8)
