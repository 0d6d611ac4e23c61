"""Per-request sampling: repetition penalty → temperature → top-k → top-p → draw, each request with its own seed.

The order and the exact maths follow transformers' logits processors, so that a seeded request means the same thing
here as there. Temperature 0 means greedy (argmax).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit integer


@dataclass
class SamplingParams:
    """How one request picks tokens and when it stops."""

    max_tokens: int = 128
    temperature: float = 0.0          # 0: greedy
    top_k: int = 0                    # 0: off
    top_p: float = 1.0                # 1: off
    repetition_penalty: float = 1.0   # 1: off; >1 discourages tokens already in prompt or output
    seed: int | None = None           # None: a fresh random seed
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raise ValueError with one human line if a value is out of range."""
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, f"max_tokens must be a positive integer, got {self.max_tokens!r}"),
            (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0,
             f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}"),
            (isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}"),
            (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}"),
            (isinstance(self.repetition_penalty, (int, float)) and self.repetition_penalty > 0,
             f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}"),
            (self.seed is None
             or (isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed <= MAX_SEED),
             f"seed must be a whole number from 0 to {MAX_SEED}, got {self.seed!r}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be a list of non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        """True when the choice is a plain argmax."""
        return self.temperature == 0

    @classmethod
    def from_config(cls, gen_cfg: dict[str, Any] | None = None, **overrides: Any) -> SamplingParams:
        """Defaults from a generation_config.json dict (do_sample, temperature, top_k, top_p, …), then overrides (None = keep)."""
        gen_cfg = gen_cfg or {}
        values: dict[str, Any] = {}
        if gen_cfg.get("do_sample"):
            values["temperature"] = float(gen_cfg.get("temperature", 1.0) or 1.0)
            if gen_cfg.get("top_k") is not None:
                values["top_k"] = int(gen_cfg["top_k"])
            if gen_cfg.get("top_p") is not None:
                values["top_p"] = float(gen_cfg["top_p"])
        if gen_cfg.get("repetition_penalty") is not None:
            values["repetition_penalty"] = float(gen_cfg["repetition_penalty"])
        if gen_cfg.get("max_new_tokens"):
            values["max_tokens"] = int(gen_cfg["max_new_tokens"])
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown sampling option {sorted(unknown)[0]!r} (known: {', '.join(sorted(known))})")
        values.update({k: v for k, v in overrides.items() if v is not None})
        params = cls(**values)
        params.validate()
        return params


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """Divide positive / multiply negative logits of already-seen token ids by penalty (CTRL, as transformers)."""
    score = logits.gather(-1, seen)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(-1, seen, score)


def logits_to_probs(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Probabilities (vocab,) after temperature, top-k and nucleus (top-p) filtering."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -float("inf"))
    return torch.softmax(logits, dim=-1)


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator, seen: Tensor | None = None) -> int:
    """Pick the next token id from one row of logits (vocab,)."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None and seen.numel():
        logits = apply_repetition_penalty(logits, seen.to(logits.device), params.repetition_penalty)
    if params.greedy:
        return int(logits.argmax())
    probs = logits_to_probs(logits, params.temperature, params.top_k, params.top_p).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))
