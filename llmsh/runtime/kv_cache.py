"""A slotted KV cache and the per-forward batch context that lets sequences at different positions share a step.

Continuous batching needs sequences to join and leave a running batch. The cache is one pair of buffers per layer shaped
`(rows, n_kv_head, capacity, head_dim)`; a request owns a *slot* (a row) from `alloc()` until `free()`. A forward over a
batch names its slots and each row's positions: keys/values are written at `[slot, :, position]` and attention reads
positions `0..L-1` of those slots with a mask `j <= position` (and `j > position - window` for sliding-window layers).
Rows beyond a sequence's length hold stale data that the mask hides; buffers start zeroed so stale data is always finite.

A cache made with `grow=True` (what `Model.new_cache` makes) starts empty and grows as the sequences need it: rows up
to the highest slot taken, positions in blocks of BLOCK (by half its size at a time when room allows, so a long
sequence is copied a logarithmic number of times). `fit()` gives memory back when sequences leave. Preallocating
every slot at the whole context instead cost 16 x 2048 positions per process (1.2 GB for a small model) whatever the
requests needed, outside any budget. The layout stays one rectangular buffer per layer because the C decode kernels
index it as `slot * stride + position`; `max_batch` and `max_seq_len` are the rows and positions the cache holds now
(what C may index), `n_slots` and `context` the limits, `stride` the positions between one (row, head) and the next.

On Linux CPUs the growth costs no copy: the buffers are mapped once at their whole size (n_slots x context), memory
the OS commits only where it is written, and growing just raises the bounds; shrinking gives the pages outside them
back (MADV_DONTNEED, after which they read as zeros again). Growing by copying had cost a `map` job of 256 prompts
through GPT-2 124M in float32 14 resizes, 8.4 s in-process (GPT-2 124M float32, 64 rows from 320 to 512 positions:
grow 0.57 s, shrink 0.45 s; mapped: 0.00 and 0.09 s), and the copy's peak of old and new buffers.
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from llmsh.runtime import kernels

BLOCK = 64  # positions: a growing cache's capacity is a multiple of this (or the whole context)
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)   # Linux's value: address space only, no commit charge


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


class KVCache:
    """Per-layer key/value buffers with slot allocation; `lengths[slot]` is how many positions that slot holds."""

    def __init__(self, n_layer: int, max_batch: int, n_kv_head: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, *, grow: bool = False) -> None:
        self.n_slots, self.context, self.growable = max_batch, max_seq_len, grow
        self._shape = (n_layer, n_kv_head, head_dim)
        self.dtype, self.device = dtype, device
        self.bytes_per_position = 2 * n_layer * n_kv_head * head_dim * dtype.itemsize   # K and V, every layer
        self.on_resize: list[Callable[[], None]] = []   # the buffers moved (e.g. the C decoder's cached addresses)
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        self._maps: list[mmap.mmap] = []   # with mapped buffers (see the module docstring): one per k, v tensor
        self.max_batch = self.max_seq_len = 0
        if grow and not self._map_whole():
            self._resize(0, 0)
        elif not grow:
            self._resize(max_batch, max_seq_len)
        self.lengths = [0] * max_batch
        self._free = list(range(max_batch))

    # ---- slots ---------------------------------------------------------------------------------------------------
    def alloc(self) -> int:
        """Take the lowest free slot (low slots keep running batches contiguous); RuntimeError when all are taken."""
        if not self._free:
            raise RuntimeError(f"KV cache full: all {self.n_slots} slots are in use")
        self._free.sort()
        slot = self._free.pop(0)
        self.lengths[slot] = 0
        self.reserve(slot + 1, 0)
        return slot

    def free(self, slot: int) -> None:
        """Give a slot back; its stale contents are masked out for the next owner."""
        if slot in self._free or not 0 <= slot < self.n_slots:
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

    def used_slots(self) -> list[int]:
        """The allocated slots, lowest first."""
        free = set(self._free)
        return [s for s in range(self.n_slots) if s not in free]

    def rows_with(self, joining: int) -> int:
        """Rows the buffers need once `joining` more slots are taken (the lowest free ones, as `alloc` takes)."""
        used = self.used_slots()
        rows = used[-1] + 1 if used else 0
        if joining and self._free:                     # (a full cache: the joiners wait, nothing grows)
            rows = max(rows, sorted(self._free)[min(joining, len(self._free)) - 1] + 1)
        return rows

    @torch.inference_mode(False)  # normal tensors, as made in __init__, whether or not a forward is running
    def move(self, src: int, dst: int) -> None:
        """Move the sequence in slot src to the free slot dst (to compact the rows before `fit`)."""
        if dst not in self._free or src in self._free:
            raise ValueError(f"cannot move slot {src} to {dst}")
        n = self.lengths[src]
        for t in (*self.k, *self.v):
            t[dst, :, :n] = t[src, :, :n]
        self._free.remove(dst)
        self.lengths[dst] = n
        self.free(src)

    # ---- memory --------------------------------------------------------------------------------------------------
    @property
    def stride(self) -> int:
        """Positions between the starts of consecutive (row, head) runs of the buffers (what C indexes them by)."""
        return self.k[0].shape[2] if self.k else 0

    @property
    def nbytes(self) -> int:
        """Bytes held by all key and value buffers."""
        return self.nbytes_of(self.max_batch, self.max_seq_len)

    def nbytes_of(self, rows: int, positions: int) -> int:
        """Bytes of buffers of this many rows and positions."""
        return rows * positions * self.bytes_per_position

    def plan(self, rows: int, positions: int, max_bytes: int | None = None) -> tuple[int, int]:
        """The (rows, positions) the buffers will have after `reserve(rows, positions, max_bytes)`: never less than
        now. Each grows by half its size at a time (positions to a block): growing copies the cache, so small steps
        would copy it at every join and every few tokens. Past max_bytes (a KV budget nearly spent) the rows grow
        only as asked and the positions to as many as max_bytes holds; when even that is too little, the least
        that holds what is asked (the caller has made room for it)."""
        if not self.growable:
            return self.max_batch, self.max_seq_len
        r0, c0 = self.max_batch, self.max_seq_len
        rows = min(self.n_slots, max(r0, rows))
        positions = min(self.context, max(c0, positions))
        cap = c0 if positions == c0 else min(self.context, _round_up(max(positions, c0 + c0 // 2), BLOCK))
        for r in (min(self.n_slots, max(rows, r0 + r0 // 2)) if rows > r0 else rows, rows):
            c = cap
            if max_bytes is not None and self.nbytes_of(r, c) > max_bytes:
                c = max(positions, min(c, max_bytes // max(1, r * self.bytes_per_position)))
            if max_bytes is None or self.nbytes_of(r, c) <= max_bytes:
                return r, c
        return rows, positions

    def reserve(self, rows: int, positions: int, max_bytes: int | None = None) -> None:
        """Make room for slots below `rows` to hold `positions` positions (a growing cache; others are full-size)."""
        if positions > self.context or rows > self.n_slots:
            raise ValueError(f"{positions} positions in {rows} slots do not fit this cache "
                             f"({self.n_slots} slots of {self.context})")
        shape = self.plan(rows, positions, max_bytes)
        if shape != (self.max_batch, self.max_seq_len):
            self._resize(*shape)

    def fitted(self, rows: int, positions: int, exact: bool = False) -> tuple[int, int]:
        """The smallest (rows, positions) a growing cache takes to hold this many: positions to the block, or
        `exact`ly."""
        if not self.growable:
            return self.max_batch, self.max_seq_len
        if not rows:
            return 0, 0
        return rows, positions if exact else min(self.context, _round_up(positions, BLOCK))

    def fit(self, slack: float = 0.5, exact: bool = False) -> None:
        """Give back what the allocated slots do not need (a growing cache): all of it when none is taken, else when
        the rows up to the highest slot taken at their longest sequence's positions (to the block, or `exact`ly)
        need at most `slack` of the bytes held (1.0: whenever anything can be given back). Half by default, because
        growth is by half: at 0.75 a full batch that lost a few sequences shrank and grew back at the next joins,
        every few steps (64 rows of GPT-2 124M: ~0.2 s a resize, 18% of a `map` job's engine time). The KV budget
        takes spare capacity back first when it needs room (paging/kv.py)."""
        if not self.growable:
            return
        used = self.used_slots()
        rows, cap = self.fitted(used[-1] + 1 if used else 0, max((self.lengths[s] for s in used), default=0), exact)
        need = self.nbytes_of(rows, cap)
        if (rows, cap) != (self.max_batch, self.max_seq_len) and (need <= self.nbytes * slack or not need):
            self._resize(rows, cap)

    @torch.inference_mode(False)
    def _map_whole(self) -> bool:
        """Map every buffer at its whole size, committed only where written (CPU, Linux); False where it cannot."""
        if torch.device(self.device).type != "cpu" or not sys.platform.startswith("linux"):
            return False
        n_layer, n_kv, hd = self._shape
        shape = (self.n_slots, n_kv, self.context, hd)
        nbytes = self.n_slots * n_kv * self.context * hd * self.dtype.itemsize
        try:
            maps = [mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
                    for _ in range(2 * n_layer)]
        except (OSError, ValueError):  # (strict overcommit, a tiny address space): grow by copying instead
            return False
        self._maps = maps
        tensors = [torch.frombuffer(m, dtype=self.dtype).view(shape) for m in maps]
        self.k, self.v = tensors[:n_layer], tensors[n_layer:]
        return True

    def _give_back(self, rows: int, cap: int) -> None:
        """Mapped buffers: hand the OS back the pages outside the new bounds (rows, cap) and inside the old ones.
        They read as zeros after; a page only partly outside keeps its stale values, finite like any the mask hides."""
        old_rows, old_cap = self.max_batch, self.max_seq_len
        n_kv, hd = self._shape[1], self._shape[2]
        run = self.context * hd * self.dtype.itemsize                  # bytes of one (row, head) run of positions
        ranges = [(rows * n_kv * run, old_rows * n_kv * run)] if old_rows > rows else []
        if old_cap > cap:
            per = hd * self.dtype.itemsize
            ranges += [(r * run + cap * per, r * run + old_cap * per) for r in range(min(rows, old_rows) * n_kv)]
        page = mmap.PAGESIZE
        ranges = [(-(-a // page) * page, b // page * page) for a, b in ranges]
        ranges = [(a, b - a) for a, b in ranges if b > a]
        for m in self._maps:
            for at, n in ranges:
                m.madvise(mmap.MADV_DONTNEED, at, n)

    @torch.inference_mode(False)
    def _resize(self, rows: int, cap: int) -> None:
        """New bounds (rows, cap): mapped buffers only give back what they no longer hold (see `_give_back`);
        others are new buffers of (rows, cap), keeping what fits of the old and zero elsewhere; one layer at a time, so the
        peak is the cache plus one layer's buffer. (Only what is not copied is zeroed: one pass over the bytes.)"""
        if self._maps:
            self._give_back(rows, cap)
            self.max_batch, self.max_seq_len = rows, cap
            return
        n_layer, n_kv, hd = self._shape
        keep_r, keep_c = min(rows, self.max_batch), min(cap, self.max_seq_len)
        for bufs in (self.k, self.v):
            for i in range(n_layer):
                new = torch.empty((rows, n_kv, cap, hd), dtype=self.dtype, device=self.device)
                if i < len(bufs) and keep_r and keep_c:
                    new[:keep_r, :, :keep_c] = bufs[i][:keep_r, :, :keep_c]
                    new[:keep_r, :, keep_c:].zero_()
                    new[keep_r:].zero_()
                else:
                    new.zero_()
                if i < len(bufs):
                    bufs[i] = new
                else:
                    bufs.append(new)
        self.max_batch, self.max_seq_len = rows, cap
        for fn in self.on_resize:
            fn()


@dataclass
class Step:
    """Everything a forward needs to know about the batch: positions, where to write K/V, what to attend to."""

    input_pos: Tensor                      # (B, T) absolute position of every input token
    cache: KVCache | None = None
    slots: Tensor | slice | None = None    # rows of the cache: a slice when contiguous (a view, no gather)
    length: int = 0                        # L: attend over cache positions 0..L-1
    uniform_start: int | None = None       # every row starts at this position (write with a slice, maybe no mask)
    in_c: bool = False                     # decode attention by the C kernels (see attend): update returns whole layers
    segments: list[tuple[int, int]] | None = None  # packed prompts (see `packed`): each one's [start, end) of the row
    _masks: dict = field(default_factory=dict)
    _c_rows: tuple[Tensor, Tensor] | None = None   # (slots, positions) as int64 arrays for C, made once per step

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
        return cls(input_pos, cache, rows, length, uniform, in_c=T == 1 and _c_attends(cache))

    @classmethod
    def packed(cls, cache: KVCache, slots: list[int], lengths: list[int], device: torch.device | str) -> Step:
        """Fresh prompts of `lengths` tokens concatenated into one row (1, sum of lengths), each to its slot.

        Padding prompts of different lengths to one width wastes the padding; running them one at a time makes each
        matrix product as short as its prompt. One row makes every product as long as all the prompts together
        (GPT-2's 768 x 3072 bf16 product on an AMX Xeon: 986 GFLOP/s at 136 rows, 1705 at 512), while attention
        stays within each prompt (`attend` runs one causal attention per segment)."""
        ends = list(itertools.accumulate(lengths))
        segments = [(end - n, end) for n, end in zip(lengths, ends)]
        pos = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
        return cls(pos, cache, torch.tensor(slots, device=device), ends[-1], None, segments=segments)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this step's k, v (B, n_kv, T, hd) into the cache; return the attended keys/values (B, n_kv, L, hd),
        or, where the C kernels attend (`in_c`), the layer's whole cache buffers, which they index by slot."""
        if self.cache is None:
            return k, v
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        if self.segments is not None:  # packed fresh prompts: each to its slot; they attend to their own k, v
            assert isinstance(self.slots, Tensor), "a packed step names its slots"
            for slot, (a, b) in zip(self.slots.tolist(), self.segments):
                kc[slot, :, :b - a] = k[0, :, a:b]
                vc[slot, :, :b - a] = v[0, :, a:b]
            return k, v
        T = k.shape[2]
        if self.uniform_start is not None and isinstance(self.slots, slice):
            s = self.uniform_start
            kc[self.slots, :, s:s + T] = k
            vc[self.slots, :, s:s + T] = v
            if self.in_c:
                return kc, vc
            return kc[self.slots, :, :self.length], vc[self.slots, :, :self.length]
        rows = self._row_index(k.device)[:, None]                       # (B, 1)
        kc[rows, :, self.input_pos] = k.transpose(1, 2)                  # indexed view is (B, T, n_kv, hd)
        vc[rows, :, self.input_pos] = v.transpose(1, 2)
        rows = rows[:, 0]
        if self.in_c:
            return kc, vc
        if isinstance(self.slots, slice):
            return kc[self.slots, :, :self.length], vc[self.slots, :, :self.length]
        return kc[rows, :, :self.length], vc[rows, :, :self.length]

    def c_rows(self) -> tuple[Tensor, Tensor]:
        """Each row's slot and position as contiguous int64 tensors (what the C attention reads)."""
        if self._c_rows is None:
            slots = self._row_index(self.input_pos.device).to(torch.int64).contiguous()
            self._c_rows = slots, self.input_pos[:, -1].to(torch.int64).contiguous()
        return self._c_rows

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
            if self.segments is not None:                  # packed prompts: causal within each, nothing across
                pos = self.input_pos[0]
                seg = torch.cat([torch.full((b - a,), i, device=pos.device) for i, (a, b) in enumerate(self.segments)])
                m = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])
                if window is not None and windowed:
                    m = m & (pos[None, :] > pos[:, None] - window)
                self._masks[window] = (m[None, None], False)               # (1, 1, T, T)
            elif not windowed and self.uniform_start == 0 and L == T:
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


def _c_attends(cache: KVCache) -> bool:
    """Whether the C kernels can attend over this cache: CPU buffers of float32 or bfloat16, laid out as they index."""
    if torch.device(cache.device).type != "cpu" or cache.dtype not in (torch.float32, torch.bfloat16) or kernels.library() is None:
        return False
    return all(t.is_contiguous() for t in cache.k[:1] + cache.v[:1])


def attend(q: Tensor, k: Tensor, v: Tensor, step: Step, window: int | None = None, scale: float | None = None,
           cap: float | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with grouped-query heads; q (B, nh, T, hd), k/v (B, n_kv, L, hd).

    Decoding (T == 1) folds each group's query heads into the query axis, (B, n_kv, n_rep, hd), so every query row
    reads its group's keys without copying K/V n_rep times (repeat_interleave cost 4-9x the attention itself).
    Where the step decodes on the CPU (`step.in_c`), the C kernels attend instead, reading k/v (then the layer's
    whole cache buffers) at each row's slot in place, up to its position; only they take `cap` (Gemma 2's soft cap).
    """
    if step.in_c:
        return _attend_in_c(q, k, v, step, window, scale, cap)
    assert cap is None, "soft-capped logits outside the C kernels: gemma.softcapped_attention"
    if step.segments is not None and len(step.segments) > 1:  # each packed prompt alone, as a fresh cache-less step
        return torch.cat([attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], Step.build(step.input_pos[:, a:b]), window,
                                 scale) for a, b in step.segments], dim=2)
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


def _attend_in_c(q: Tensor, kc: Tensor, vc: Tensor, step: Step, window: int | None, scale: float | None,
                 cap: float | None) -> Tensor:
    """attend's decode step through lm_attend: kc/vc are whole (rows, n_kv, capacity, hd) cache buffers. torch's
    CPU attention for one query token per row cost 3-6x this (64 rows of GPT-2 124M: 8.8 against 1.5 ms a layer
    in bfloat16), more than a large batch's matrix products."""
    lib = kernels.library()
    assert lib is not None, "in_c is set only where the kernels load"
    B, nh, _, hd = q.shape
    slots, pos = step.c_rows()
    qf = q.reshape(B, nh * hd).to(torch.float32).contiguous()
    out = torch.empty(B, nh * hd)
    n_threads = torch.get_num_threads()
    scores = torch.empty(n_threads * kc.shape[2])
    lib.lm_attend(qf.data_ptr(), B, nh, kc.shape[1], hd, kc.data_ptr(), vc.data_ptr(), int(kc.dtype == torch.bfloat16),
                  kc.shape[2], slots.data_ptr(), pos.data_ptr(), window or 0,
                  ctypes.c_float(hd ** -0.5 if scale is None else scale), ctypes.c_float(cap or 0.0),
                  scores.data_ptr(), out.data_ptr(), n_threads)
    return out.view(B, nh, 1, hd).to(q.dtype)
