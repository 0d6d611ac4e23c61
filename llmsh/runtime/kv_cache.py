"""A slotted KV cache and the per-forward batch context that lets sequences at different positions share a step.

Continuous batching needs sequences to join and leave a running batch. The cache is one pair of buffers per layer shaped
`(max_batch, n_kv_head, max_seq_len, head_dim)`, allocated once; a request owns a *slot* (a row) from `alloc()` until
`free()`. A forward over a batch names its slots and each row's positions: keys/values are written at
`[slot, :, position]` and attention reads positions `0..L-1` of those slots with a mask `j <= position` (and
`j > position - window` for sliding-window layers). Rows beyond a sequence's length hold stale data that the mask
hides; buffers start zeroed so stale data is always finite.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


class KVCache:
    """Per-layer key/value buffers with slot allocation; `lengths[slot]` is how many positions that slot holds."""

    def __init__(self, n_layer: int, max_batch: int, n_kv_head: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (max_batch, n_kv_head, max_seq_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.lengths = [0] * max_batch
        self._free = list(range(max_batch))

    def alloc(self) -> int:
        """Take the lowest free slot (low slots keep running batches contiguous); RuntimeError when all are taken."""
        if not self._free:
            raise RuntimeError(f"KV cache full: all {self.max_batch} slots are in use")
        self._free.sort()
        slot = self._free.pop(0)
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        """Give a slot back; its stale contents are masked out for the next owner."""
        if slot in self._free or not 0 <= slot < self.max_batch:
            raise ValueError(f"slot {slot} is not allocated")
        self.lengths[slot] = 0
        self._free.append(slot)

    def length(self, slot: int) -> int:
        """Positions held by slot."""
        return self.lengths[slot]

    @property
    def free_slots(self) -> int:
        """How many slots can still be allocated."""
        return len(self._free)

    @property
    def nbytes(self) -> int:
        """Bytes held by all key and value buffers."""
        return sum(t.nbytes for t in self.k) + sum(t.nbytes for t in self.v)


@dataclass
class Step:
    """Everything a forward needs to know about the batch: positions, where to write K/V, what to attend to."""

    input_pos: Tensor                      # (B, T) absolute position of every input token
    cache: KVCache | None = None
    slots: Tensor | slice | None = None    # rows of the cache: a slice when contiguous (a view, no gather)
    length: int = 0                        # L: attend over cache positions 0..L-1
    uniform_start: int | None = None       # every row starts at this position (write with a slice, maybe no mask)
    _masks: dict = field(default_factory=dict)

    @classmethod
    def build(cls, input_pos: Tensor, cache: KVCache | None = None, slots: list[int] | None = None) -> Step:
        """Context for tokens at `input_pos` (B, T) written to `slots` of cache (None: no cache, plain causal)."""
        B, T = input_pos.shape
        starts = input_pos[:, 0].tolist()
        uniform = starts[0] if all(s == starts[0] for s in starts) else None
        if cache is None:
            return cls(input_pos, None, None, T, uniform)
        assert slots is not None, "a cached step names its slots"
        lo = slots[0]
        rows: Tensor | slice = slice(lo, lo + B) if slots == list(range(lo, lo + B)) else \
            torch.tensor(slots, device=input_pos.device)
        length = int(input_pos[:, -1].max()) + 1
        return cls(input_pos, cache, rows, length, uniform)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this step's k, v (B, n_kv, T, hd) into the cache; return the attended keys/values (B, n_kv, L, hd)."""
        if self.cache is None:
            return k, v
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        T = k.shape[2]
        if self.uniform_start is not None and isinstance(self.slots, slice):
            s = self.uniform_start
            kc[self.slots, :, s:s + T] = k
            vc[self.slots, :, s:s + T] = v
            return kc[self.slots, :, :self.length], vc[self.slots, :, :self.length]
        rows = self._row_index(k.device)[:, None]                       # (B, 1)
        kc[rows, :, self.input_pos] = k.transpose(1, 2)                  # indexed view is (B, T, n_kv, hd)
        vc[rows, :, self.input_pos] = v.transpose(1, 2)
        rows = rows[:, 0]
        if isinstance(self.slots, slice):
            return kc[self.slots, :, :self.length], vc[self.slots, :, :self.length]
        return kc[rows, :, :self.length], vc[rows, :, :self.length]

    def _row_index(self, device: torch.device) -> Tensor:
        if isinstance(self.slots, slice):
            return torch.arange(self.slots.start, self.slots.stop, device=device)
        assert isinstance(self.slots, Tensor), "a cached step has its rows"
        return self.slots

    def mask(self, window: int | None = None) -> tuple[Tensor | None, bool]:
        """(attn_mask, is_causal) for scaled_dot_product_attention; mask is (B, 1, T, L) bool, True = attend."""
        if window not in self._masks:
            B, T = self.input_pos.shape
            L = self.length
            windowed = window is not None and L > window
            if not windowed and self.uniform_start == 0 and L == T:
                self._masks[window] = (None, T > 1)        # one fresh prompt batch, no padding: plain causal
            elif not windowed and self.uniform_start is not None and T == 1 and L == self.uniform_start + 1:
                self._masks[window] = (None, False)        # decode, every row at the last position: see everything
            else:
                j = torch.arange(L, device=self.input_pos.device)
                pos = self.input_pos[:, :, None]                      # (B, T, 1)
                m = j <= pos                                          # (B, T, L)
                if window is not None and windowed:
                    m = m & (j > pos - window)
                self._masks[window] = (m[:, None], False)              # (B, 1, T, L)
        return self._masks[window]


def attend(q: Tensor, k: Tensor, v: Tensor, step: Step, window: int | None = None, scale: float | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with grouped-query heads; q (B, nh, T, hd), k/v (B, n_kv, L, hd).

    Decoding (T == 1) folds each group's query heads into the query axis, (B, n_kv, n_rep, hd), so every query row
    reads its group's keys without copying K/V n_rep times (repeat_interleave cost 4-9x the attention itself).
    """
    mask, causal = step.mask(window)
    B, nh, T, hd = q.shape
    n_rep = nh // k.shape[1]
    if n_rep > 1 and T == 1:
        y = F.scaled_dot_product_attention(q.reshape(B, k.shape[1], n_rep, hd), k, v, attn_mask=mask, scale=scale)
        return y.view(B, nh, 1, hd)
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)   # (B, nh, L, hd)
        v = v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
