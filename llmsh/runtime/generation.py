"""Requests and the continuous batch that runs them: what the scheduler drives, one step at a time.

A `Sequence` is one request's state: prompt ids, its own seeded sampler, the ids and text generated so far, a streaming
detokenizer, and the finish rules (EOS from the configs, stop strings, max tokens, context full).
`BatchGenerator.step()` runs one prefill for the sequences that joined since the last step, then one decode step for
everything already running - sequences at different positions share that decode step through the slotted KV cache -
and returns the text pieces produced. Finished sequences leave and free their slot at once. Not thread-safe: one
thread (the scheduler's) owns a BatchGenerator.
"""

from __future__ import annotations

import random
from collections import deque
from typing import TYPE_CHECKING

import torch

from llmsh.runtime.sampling import SamplingParams, sample
from llmsh.runtime.tokenizer import Detokenizer

if TYPE_CHECKING:
    from llmsh.runtime.model import Model


class Sequence:
    """One generation request: prompt, sampling state, generated ids/text and `.finished` ("stop"|"length"|"eos")."""

    def __init__(self, model: Model, prompt_ids: list[int], params: SamplingParams | None = None) -> None:
        self.params = params or SamplingParams()
        self.params.validate()
        if not prompt_ids:
            if model.tokenizer is None or model.tokenizer.bos_token_id is None:
                raise ValueError("empty prompt: give at least one token")
            prompt_ids = [model.tokenizer.bos_token_id]  # like transformers: start from BOS
        self.prompt_ids = list(prompt_ids)
        self.token_ids: list[int] = []
        self.text = ""
        self.finished: str | None = None
        self.slot: int | None = None
        seed = self.params.seed if self.params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed)
        tok = model.tokenizer
        self.eos_ids: set[int] = set() if self.params.ignore_eos or tok is None else set(tok.eos_token_ids)
        self._detok = Detokenizer(tok, context=self.prompt_ids[-6:]) if tok is not None else None
        self._held = ""  # text withheld because it may be the start of a stop string
        self._seen: torch.Tensor | None = None

    def sample(self, logits: torch.Tensor) -> int:
        """Choose the next token from this sequence's row of logits (vocab,)."""
        seen = None
        if self.params.repetition_penalty != 1.0:
            seen = torch.tensor(self.prompt_ids + self.token_ids, dtype=torch.long)
        return sample(logits, self.params, self.generator, seen)

    def push(self, token_id: int) -> str:
        """Record a sampled token; return the text to stream (may be ''); sets `.finished` when a rule fires."""
        if self.finished:
            raise RuntimeError(f"sequence already finished ({self.finished})")
        self.token_ids.append(token_id)
        if token_id in self.eos_ids:
            return self.finish("eos")
        piece = self._detok.push(token_id) if self._detok else ""
        out = self._emit(piece)
        if not self.finished and len(self.token_ids) >= self.params.max_tokens:
            out += self.finish("length")
        return out

    def finish(self, reason: str) -> str:
        """End the sequence for `reason`; return any text still held back."""
        if self.finished:
            return ""
        tail = self._detok.flush() if self._detok else ""
        out = self._emit(tail, final=True)
        self.finished = self.finished or reason
        return out

    def _emit(self, piece: str, final: bool = False) -> str:
        text = self._held + piece
        self._held = ""
        stops = self.params.stop
        if stops:
            hits = [i for i in (text.find(s) for s in stops) if i >= 0]
            if hits:
                text = text[:min(hits)]
                self.finished = "stop"
                self.text += text
                return text
            if not final:  # hold back the longest tail that could still grow into a stop string
                keep = max((k for s in stops for k in range(1, min(len(s), len(text) + 1))
                            if text.endswith(s[:k])), default=0)
                if keep:
                    text, self._held = text[:-keep], text[-keep:]
        self.text += text
        return text

    @property
    def last_token(self) -> int:
        """The id to feed to the next decode step."""
        return self.token_ids[-1]

    def __repr__(self) -> str:
        return f"Sequence(prompt={len(self.prompt_ids)} tokens, generated={len(self.token_ids)}, finished={self.finished})"


class BatchGenerator:
    """Continuous batching over one model: sequences `add()`-ed join at the next `step()`, finished ones leave."""

    def __init__(self, model: Model, max_batch: int, max_seq_len: int) -> None:
        self.model = model
        self.max_seq_len = min(max_seq_len, model.max_seq_len)
        self.cache = model.new_cache(max_batch, self.max_seq_len)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.last_batch_size = 0
        self.steps = 0

    def add(self, seq: Sequence) -> None:
        """Queue a sequence; it is prefilled at the next step that has a free slot. ValueError if it cannot fit."""
        if len(seq.prompt_ids) >= self.max_seq_len:
            raise ValueError(f"prompt of {len(seq.prompt_ids)} tokens does not fit the context of {self.max_seq_len} tokens")
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence (cancelled request) from the queue or the running batch, freeing its slot."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
            self.cache.free(_slot(seq))
            seq.slot = None
            self.compact()
        if not seq.finished:
            seq.finished = "cancelled"

    def compact(self) -> None:
        """After sequences left: move the highest slots' sequences down into free ones, then let the cache give back
        what it no longer needs (a growing cache's rows reach up to the highest slot taken)."""
        cache = self.cache
        if not cache.growable:
            return
        for seq in sorted(self.running, key=_slot, reverse=True):
            free = min(set(range(cache.n_slots)) - set(cache.used_slots()), default=None)
            if free is None or free > _slot(seq):
                break
            cache.move(_slot(seq), free)
            seq.slot = free
        cache.fit()

    @property
    def has_work(self) -> bool:
        """True while any sequence is waiting or running."""
        return bool(self.waiting or self.running)

    def step(self) -> list[tuple[Sequence, str]]:
        """Prefill newcomers, decode one token for the running ones; returns (sequence, text piece) for each."""
        out: list[tuple[Sequence, str]] = []
        decoding = list(self.running)
        joining = []
        if self.waiting:  # the rows of every joiner at once: one resize of a growing cache, not one per join
            self.cache.reserve(self.cache.rows_with(len(self.waiting)), 0)
        while self.waiting and self.cache.free_slots:
            seq = self.waiting.popleft()
            seq.slot = self.cache.alloc()
            joining.append(seq)
        if joining:
            logits = self.model.prefill(self.cache, [_slot(s) for s in joining], [s.prompt_ids for s in joining])
            out += self._advance(joining, logits)
            self.running += joining
        if decoding:
            logits = self.model.decode_step(self.cache, [_slot(s) for s in decoding], [s.last_token for s in decoding])
            out += self._advance(decoding, logits)
        self.last_batch_size = len(joining) + len(decoding)
        self.steps += 1
        finished = [s for s in self.running if s.finished]
        for seq in finished:
            self.running.remove(seq)
            self.cache.free(_slot(seq))
        if finished:
            self.compact()
        return out

    def _advance(self, seqs: list[Sequence], logits: torch.Tensor) -> list[tuple[Sequence, str]]:
        """Sample one token per sequence (greedy rows with one batched argmax) and push it."""
        greedy = [i for i, s in enumerate(seqs) if s.params.greedy and s.params.repetition_penalty == 1.0]
        choice = dict(zip(greedy, logits[greedy].argmax(-1).tolist())) if greedy else {}
        out = []
        for i, seq in enumerate(seqs):
            token = choice[i] if i in choice else seq.sample(logits[i])
            piece = seq.push(token)
            if not seq.finished and self.cache.length(_slot(seq)) >= self.max_seq_len:
                piece += seq.finish("length")  # no room to feed this token back
            out.append((seq, piece))
        return out


def _slot(seq: Sequence) -> int:
    """The KV cache slot of a sequence in the batch (it has one from admission until it leaves)."""
    assert seq.slot is not None, "a sequence in the batch has a slot"
    return seq.slot
