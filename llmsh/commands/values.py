"""Argument types shared by command specs: each turns a word into a value or raises argparse's usage error."""

from __future__ import annotations

import argparse

MAX_SEED = 2**63 - 1  # a 64-bit generator seed (torch.Generator.manual_seed)


def seed_value(text: str) -> int:
    """`--seed S`: a whole number 0..2**63-1 (1e23 or -1 is a usage error, not an overflow in the sampler)."""
    try:
        value = int(text, 10)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 0 to {MAX_SEED}")
    return value
