"""Sampling and the request lifecycle: seeds, filters vs transformers, stop strings, EOS, limits, streaming."""

from __future__ import annotations

import pytest
import torch

from llmsh.runtime import SamplingParams, load
from llmsh.runtime.generation import BatchGenerator, Sequence
from llmsh.runtime.sampling import apply_repetition_penalty, logits_to_probs


@pytest.fixture(scope="module")
def gpt2(make_tiny_model):
    return load(make_tiny_model("gpt2"))


def test_filters_match_transformers_processors():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 300, generator=g) * 3
    seen = torch.tensor([[5, 17, 17, 250]])
    torch.testing.assert_close(apply_repetition_penalty(logits[0], seen[0], 1.3),
                               RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone())[0])
    for temp, k, p in [(0.7, 0, 1.0), (1.0, 20, 1.0), (1.3, 0, 0.9), (0.5, 40, 0.8)]:
        ref = TemperatureLogitsWarper(temp)(seen, logits.clone())
        if k:
            ref = TopKLogitsWarper(k)(seen, ref)
        if p < 1:
            ref = TopPLogitsWarper(p)(seen, ref)
        torch.testing.assert_close(logits_to_probs(logits[0], temp, k, p), ref.softmax(-1)[0])


def test_seeded_sampling_is_reproducible_per_request(gpt2):
    a = gpt2.generate(["hello", "the fox"], max_tokens=12, temperature=0.9, top_k=50, seed=7)
    b = gpt2.generate(["hello", "the fox"], max_tokens=12, temperature=0.9, top_k=50, seed=7)
    c = gpt2.generate(["hello", "the fox"], max_tokens=12, temperature=0.9, top_k=50, seed=8)
    assert a == b and a != c
    # a request's output does not depend on who else is in the batch
    assert gpt2.generate(["the fox"], max_tokens=12, temperature=0.9, top_k=50, seed=7) == [a[1]]


def test_stop_strings_cut_the_text(gpt2):
    full = gpt2.generate(["The quick"], max_tokens=24)[0]
    stop = full[10:13]
    assert len(stop) == 3
    cut = gpt2.generate(["The quick"], max_tokens=24, stop=[stop, "\x00never"])[0]
    assert cut == full[:full.index(stop)]
    pieces = list(gpt2.stream("The quick", max_tokens=24, stop=[stop]))
    assert "".join(pieces) == cut


def test_eos_and_length_and_context_full(gpt2):
    ids = gpt2.tokenizer.encode("hello")
    seq = Sequence(gpt2, ids, SamplingParams(max_tokens=5))
    eos = next(iter(gpt2.tokenizer.eos_token_ids))
    assert seq.push(10) is not None and seq.finished is None
    seq.push(eos)
    assert seq.finished == "eos"
    seq = Sequence(gpt2, ids, SamplingParams(max_tokens=3, ignore_eos=True))
    for t in (10, 11, 12):
        seq.push(t)
    assert seq.finished == "length" and len(seq.token_ids) == 3
    gen = BatchGenerator(gpt2, max_batch=1, max_seq_len=len(ids) + 4)   # context smaller than max_tokens
    seq = Sequence(gpt2, ids, SamplingParams(max_tokens=100, ignore_eos=True))
    gen.add(seq)
    while gen.has_work:
        gen.step()
    assert seq.finished == "length" and len(ids) + len(seq.token_ids) == gen.max_seq_len + 1
    with pytest.raises(ValueError, match="does not fit"):
        gen.add(Sequence(gpt2, list(range(50)), SamplingParams()))


def test_generation_config_defaults_and_validation():
    p = SamplingParams.from_config({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_new_tokens": 40},
                                   top_k=None, seed=3)
    assert (p.temperature, p.top_p, p.max_tokens, p.seed, p.top_k) == (0.6, 0.9, 40, 3, 0)
    assert SamplingParams.from_config({"do_sample": False, "temperature": 0.6}).greedy
    for bad in (dict(temperature=-1), dict(top_p=0), dict(max_tokens=0), dict(top_k=-2), dict(seed=-1),
                dict(stop=[""]), dict(repetition_penalty=0)):
        with pytest.raises(ValueError) as err:
            SamplingParams(**bad).validate()
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown sampling option 'temp'"):
        SamplingParams.from_config({}, temp=1)


def test_remove_cancels_and_frees_the_slot(gpt2):
    gen = BatchGenerator(gpt2, max_batch=2, max_seq_len=64)
    a, b, c = (Sequence(gpt2, gpt2.tokenizer.encode(t), SamplingParams(max_tokens=30, ignore_eos=True))
               for t in ("one", "two", "three"))
    for s in (a, b, c):
        gen.add(s)
    gen.step()
    assert gen.last_batch_size == 2 and c in gen.waiting
    gen.remove(a)
    assert a.finished == "cancelled" and gen.cache.free_slots == 1
    gen.step()                                                          # c takes a's slot, b keeps decoding
    assert gen.last_batch_size == 2 and c.slot is not None


def test_stream_yields_multibyte_text_whole(gpt2):
    """Random weights emit arbitrary byte tokens; every streamed piece must still be whole characters."""
    pieces = list(gpt2.stream("Café 🙂", max_tokens=40, temperature=1.0, seed=0, ignore_eos=True))
    text = "".join(pieces)
    seq_text = gpt2.generate(["Café 🙂"], max_tokens=40, temperature=1.0, seed=0, ignore_eos=True)[0]
    assert text == seq_text
    assert all(p.encode("utf-8").decode("utf-8") == p for p in pieces)


def test_prefill_rejects_bad_input(gpt2):
    cache = gpt2.new_cache(2, 16)
    slot = cache.alloc()
    with pytest.raises(ValueError, match="token ids must be in"):
        gpt2.prefill(cache, [slot], [[1, gpt2.config.vocab_size]])
    with pytest.raises(ValueError, match="do not fit"):
        gpt2.prefill(cache, [slot], [list(range(17))])
    assert cache.length(slot) == 0
    with pytest.raises(RuntimeError, match="KV cache full"):
        cache.alloc(), cache.alloc()


def test_packs_keep_the_order_and_bound_the_tokens():
    from llmsh.runtime.model import packs

    lengths = [16, 256, 250, 20, 18, 100, 17]
    assert packs(lengths) == [list(range(len(lengths)))]            # one prefill for all of them
    got = packs(lengths, max_tokens=300)
    assert [i for p in got for i in p] == list(range(len(lengths)))  # each prompt once, in order
    assert all(sum(lengths[i] for i in p) <= 300 for p in got) and got[0] == [0, 1]
    assert packs([500, 10], max_tokens=300) == [[0], [1]]            # a longer prompt goes alone

def test_prefill_of_mixed_lengths_equals_one_prompt_at_a_time(gpt2):
    prompts = [list(range(1, 1 + n)) for n in (3, 40, 5, 38, 4)]
    together, alone = gpt2.new_cache(5, 64), gpt2.new_cache(5, 64)
    slots = [together.alloc() for _ in prompts]
    got = gpt2.prefill(together, slots, prompts)
    want = torch.cat([gpt2.prefill(alone, [alone.alloc()], [p]) for p in prompts])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert [together.length(s) for s in slots] == [len(p) for p in prompts]
    steps = [gpt2.decode_step(c, list(range(5)), [7] * 5) for c in (together, alone)]
    torch.testing.assert_close(steps[0], steps[1], atol=1e-4, rtol=1e-4)


def test_a_request_waits_while_the_batch_is_full(gpt2):
    """More requests than slots: the extra one waits (no error) and starts when a slot frees, with the same tokens
    as alone."""
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    alone = Sequence(gpt2, gpt2.tokenizer.encode("two"), params)
    solo = BatchGenerator(gpt2, max_batch=1, max_seq_len=32)
    solo.add(alone)
    while solo.has_work:
        solo.step()
    gen = BatchGenerator(gpt2, max_batch=1, max_seq_len=32)
    first, second = (Sequence(gpt2, gpt2.tokenizer.encode(t), params) for t in ("one", "two"))
    gen.add(first)
    gen.step()
    gen.add(second)                                       # the only slot is taken
    while gen.has_work:
        gen.step()
    assert first.finished == second.finished == "length"
    assert second.token_ids == alone.token_ids


@pytest.mark.parametrize("family", ["llama3", "mistral", "gemma2", "gemma3", "mixtral", "phi3"])
def test_packed_prompts_prefill_as_each_alone(make_tiny_model, family):
    """Fresh prompts of different lengths prefilled in one packed row: GQA, sliding windows shorter than a prompt,
    Gemma's soft caps and a mixture of experts give each prompt's logits and cache as when it runs alone."""
    from llmsh.runtime import load

    model = load(make_tiny_model(family))
    prompts = [list(range(3, 3 + n)) for n in (30, 5, 17, 2)]
    together, alone = model.new_cache(4, 64), model.new_cache(4, 64)
    slots = [together.alloc() for _ in prompts]
    got = model.prefill(together, slots, prompts)
    want = torch.cat([model.prefill(alone, [alone.alloc()], [p]) for p in prompts])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    steps = [model.decode_step(c, list(range(4)), [7] * 4) for c in (together, alone)]
    torch.testing.assert_close(steps[0], steps[1], atol=1e-4, rtol=1e-4)
