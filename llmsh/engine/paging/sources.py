"""Where pages come from and go to: the `PageSource` protocol, its adapter for runtime models, and the `PageHook`
that models call into the pager with.

The pager never touches a model's modules itself; it asks a source to read a page's tensors from their home
(the mmap'd safetensors), to install tensors as the page's parameters, and to release them. The runtime model
implements the hooks (contract D); unit tests use a source over plain tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from llmsh.engine.paging.core import Pager


@dataclass(frozen=True)
class PageInfo:
    """One page as the pager sees it: a name ('embed', 'block.0', 'head') and its bytes on the device."""

    name: str
    nbytes: int
    on_demand: bool = False  # run only when chosen (a MoE expert), not in forward order: never prefetched in order


class PageSource(Protocol):
    """A model's pages, seen by the pager."""

    device: str

    def page_infos(self) -> list[PageInfo]:
        """The pages in forward order."""

    def read(self, index: int, device: str, *, pin: bool = False,
             out: list["torch.Tensor"] | None = None) -> dict[str, "torch.Tensor"]:
        """Fresh tensors of one page, read from its home on disk (pinned host memory if `pin`); with `out`, read into
        those buffers (an evicted page's of the same `layout`: passed only to sources that have a `layout` method)."""

    def deps(self, index: int) -> list[int]:
        """Other pages this page's modules read (e.g. a tied head reads the embedding); may be absent."""

    def install(self, index: int, tensors: dict[str, "torch.Tensor"]) -> None:
        """Make `tensors` the page's parameters (a pointer swap: cheap, done at a safe point)."""

    def release(self, index: int) -> None:
        """Drop the page's parameters so their memory is freed."""

    # optional: discard(index), called when tensors `read` for a page are dropped without being installed

    def is_resident(self, index: int) -> bool:
        """Whether the page's parameters are materialised now."""

    def set_hook(self, fn: Callable[[int], None] | None) -> None:
        """Call fn(page_index) right before the page's modules run (None removes it)."""


class ModelSource:
    """Adapter from a runtime `Model` (contract D paging hooks) to `PageSource`."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.device = str(model.device)
        self._pages = list(model.pages())
        # which of each page's tensors the checkpoint gives as views of its file (fixed by the file and the dtype)
        self._views = [[self._view(n) is not None for n in p.param_names] for p in self._pages]
        self._layouts = [self._layout_now(i) for i in range(len(self._pages))]

    def page_infos(self) -> list[PageInfo]:
        return [PageInfo(p.name, int(p.nbytes), bool(getattr(p, "on_demand", False))) for p in self._pages]

    def param_names(self, index: int) -> list[str]:
        return list(self._pages[index].param_names)

    def read(self, index: int, device: str, *, pin: bool = False,
             out: list["torch.Tensor"] | None = None) -> dict[str, "torch.Tensor"]:
        """The page's tensors in host memory. A tensor the file stores as the model uses it is a view of the mapped
        file, its pages faulted in from the page cache here (no copy: 475 MiB of GPT-2 took ~0.1 s to copy, a core
        and memory bandwidth taken from the model computing beside it); `release` drops them from our RSS again.
        The rest is copied out of the mmap into fresh memory (or, with `out`, the buffers of an evicted page of the
        same `layout`, whose views are left alone) in one pass that converts the dtype, un-transposes and assembles
        fused matrices on the way. Pinned memory (`pin`, for a CUDA copy) is always a copy."""
        import torch

        checkpoint = self.model.checkpoint
        result = {}
        for i, (name, is_view) in enumerate(zip(self._pages[index].param_names, self._views[index])):
            view = self._view(name) if is_view and not pin else None
            if view is not None:
                checkpoint.populate(name)
                result[name] = view
                continue
            t = out[i] if out is not None else torch.empty(checkpoint.shape(name), dtype=self._dtype(name),
                                                           pin_memory=pin)
            result[name] = checkpoint.read_into(name, t)
        return result

    def _view(self, name: str) -> "torch.Tensor | None":
        """The parameter as a view of its mapped file, where the checkpoint can give one in the model's dtype."""
        view = getattr(self.model.checkpoint, "view", None)
        return view(name, self._dtype(name)) if view is not None else None

    def layout(self, index: int) -> tuple | None:
        """Shape and dtype of each tensor of this page, and whether it is a view of the file (pages of equal layout
        share the buffers of their copies; views are the file's pages, never written); None if the page was not
        resident when the source was made, or if it has nothing `read` copies."""
        return self._layouts[index]

    def _layout_now(self, index: int) -> tuple | None:
        names, views = self._pages[index].param_names, self._views[index]
        if any(self.model.module.get_parameter(n).is_meta for n in names) or all(views):
            return None
        return tuple((tuple(self.model.checkpoint.shape(n)), str(self._dtype(n)), v) for n, v in zip(names, views))

    def _dtype(self, name: str) -> "torch.dtype":
        """The model's dtype, or uint8 for a matrix kept quantized (GGUF or --quant: runtime/quant.py)."""
        param_dtype = getattr(self.model.checkpoint, "param_dtype", None)
        return param_dtype(name, self.model.dtype) if param_dtype else self.model.dtype

    def deps(self, index: int) -> list[int]:
        """Pages that must be resident too while this one runs: a tied head reads the embedding matrix."""
        return [0] if index == len(self._pages) - 1 and index > 0 and self._tied_head() else []

    def _tied_head(self) -> bool:
        tied = getattr(self.model, "_tied", None)
        if isinstance(tied, dict) and tied:
            return any(len(tied.get(p, [p])) > 1 for p in self._pages[0].param_names)
        cfg = getattr(self.model, "config", None)
        return bool(getattr(cfg, "tie_embeddings", getattr(cfg, "tie_word_embeddings", False)))

    def install(self, index: int, tensors: dict[str, "torch.Tensor"]) -> None:
        self.model.materialize_page(index, self.device, tensors)

    def release(self, index: int) -> None:
        self.model.release_page(index)
        self.discard(index)

    def discard(self, index: int) -> None:
        """Tensors `read` for this page are dropped (released, or never installed): the file pages of its views
        leave our RSS (the page cache keeps them for the next read); copies are freed with their last reference."""
        drop = getattr(self.model.checkpoint, "drop", None)
        if drop is None:
            return
        for name, is_view in zip(self._pages[index].param_names, self._views[index]):
            if is_view:
                drop(name)

    def is_resident(self, index: int) -> bool:
        probe = getattr(self.model, "page_resident", None)
        if probe is not None:
            return bool(probe(index))
        return True  # a freshly loaded model has every page materialised

    def set_hook(self, fn: Callable[[int], None] | None) -> None:
        self.model.set_page_hook(fn)


class PageHook:
    """What a model calls before running a page (`hook(index)`: page it in and hold it), and, where it can run a
    whole step at once, before the step (`hook.hold_all()`: True if every page is resident and now held). A batch-1
    step of GPT-2 paged layer by layer cost ~1.5-3 ms more than one call over all layers (a Python hook and a C call
    per layer), 10-20 % of the step."""

    def __init__(self, pager: "Pager", pid: int) -> None:
        self.pager, self.pid = pager, pid

    def __call__(self, index: int) -> None:
        self.pager.ensure(self.pid, index)

    def hold_all(self) -> bool:
        return self.pager.hold_all(self.pid)
