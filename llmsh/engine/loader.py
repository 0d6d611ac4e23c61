"""Loading models into processes: a bounded thread pool (disk → host → device), and where models are found.

Loading is slow (reading and checking gigabytes), so it runs on a small `ThreadPoolExecutor` instead of the event
loop or an engine thread; progress goes straight into the process row (`ps` shows it, `load` streams it). The pool is
bounded (two workers) because loads are disk-bound: more parallel loads only thrash the page cache.

`find_models()` answers `models` and resolves `load NAME`: folders under the configured model dirs
(`config.toml`'s `model_dirs`, `LLMSH_MODEL_PATH`) and the models in the local Hugging Face hub cache.
"""

from __future__ import annotations

import concurrent.futures
import gc
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from llmsh.engine.process import Process, ProcessTable, ProcState
from llmsh.engine.scheduler import Scheduler
from llmsh.engine.threads import release_openmp_workers, wanted_threads
from llmsh.models import default_name, find_models, hf_cache_dir, model_dirs, resolve_model  # noqa: F401
from llmsh.protocol.names import usable_name
from llmsh.runtime.errors import CheckpointChanged  # torch-free

LOADER_WORKERS = 2
# requests decoded together per process; more queue (bounded) until a slot frees. Wider batches pay on the CPU too
# since their attention runs in C: GPT-2 124M bfloat16 on 2 cores, 64 rows 787 tok/s against 491 at 16
DEFAULT_MAX_BATCH = 64

_torch_configured = False


def configure_torch_threads() -> int:
    """Set torch's intra-op threads once, before the first load; returns the count.

    All compute of a device happens on its one engine thread, so intra-op parallelism is the only parallelism that helps:
    use every core this process may run on (`sched_getaffinity`, not `cpu_count()`, which overcounts in containers and
    cgroups and makes OpenMP threads fight over too few cores). The event loop and loader threads are mostly waiting on
    sockets and disk and release the GIL, so they need no reserved core. The inter-op pool is left alone: nothing here
    uses it (no `torch.jit.fork`), and calling `set_num_interop_threads` from the main thread was measured (torch 2.13,
    Linux) to leave every *other* Python thread - our engine threads - with a single intra-op thread.
    `LLMSH_TORCH_THREADS` overrides the count (e.g. to share a machine). Each device's engine thread sets its own
    count again and lowers it while other programs keep cores busy (threads.py).
    """
    global _torch_configured
    import torch

    n = wanted_threads()
    if not _torch_configured:
        torch.set_num_threads(n)
        _torch_configured = True
    return torch.get_num_threads()


class LoadAborted(Exception):
    """KILL arrived while loading: the progress callback stops the load."""


class ModelRuntime:
    """Adapts a loaded `llmsh.runtime.Model` to what the scheduler needs (see `process.Runtime`)."""

    def __init__(self, model: Any, max_batch: int = DEFAULT_MAX_BATCH, max_seq_len: int | None = None,
                 folder: str | None = None) -> None:
        self.model = model
        self.max_batch = max_batch
        # the context: the model's own (its config's max_position_embeddings, n_positions or GGUF context_length),
        # or less with `load --ctx N`. No cap is needed for memory's sake: the KV cache grows with what the requests
        # hold, within the KV budget (runtime/kv_cache.py, engine/paging/kv.py)
        self.max_seq_len = min(context_length(model), max_seq_len or context_length(model))
        self.batch: Any = None
        self.files = _weight_files(folder) if folder else {}
        self._checked = 0.0

    def changed_files(self) -> str | None:
        """Why the checkpoint cannot be trusted any more (a weight file changed on disk since the load), else None.

        Weights are mmap'd: reading a page of a file truncated under us is a SIGBUS that would take the whole engine
        down. A stat per file, at most every FILE_CHECK_S, catches a changed file before a step touches it."""
        now = time.monotonic()
        if not self.files or now - self._checked < FILE_CHECK_S:
            return None
        self._checked = now
        for path, (size, mtime) in self.files.items():
            where = f"{Path(path).name} in {Path(path).parent}"
            try:
                st = os.stat(path)
            except OSError as e:
                return f"{where} is missing {CheckpointChanged.MARK} ({e.strerror}); load the model again"
            if (st.st_size, st.st_mtime_ns) != (size, mtime):
                what = f"size {size} -> {st.st_size}" if st.st_size != size else "modification time differs"
                return f"{where} changed {CheckpointChanged.MARK} ({what}); load the model again"
        return None

    def new_batch(self) -> Any:
        from llmsh.runtime.generation import BatchGenerator

        self.batch = BatchGenerator(self.model, self.max_batch, self.max_seq_len)
        return self.batch

    def new_sequence(self, prompt_ids: list[int], params: Any) -> Any:
        from llmsh.runtime.generation import Sequence

        return Sequence(self.model, prompt_ids, params)

    def resident_bytes(self) -> int:
        """Weights on the device plus the KV cache this process has allocated (`ps` RES, `mem` RES)."""
        model = self.model
        if model is None:
            return 0
        n = int(model.weight_bytes())
        cache = getattr(self.batch, "cache", None)
        return n + int(getattr(cache, "nbytes", 0) or 0)

    def close(self) -> None:
        """Drop the model and its cache and give the memory back (the CUDA caching allocator too)."""
        device = str(getattr(self.model, "device", "cpu"))
        self.model = None
        self.batch = None
        gc.collect()
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
        _trim_heap()


FILE_CHECK_S = 0.05  # how often a running process re-checks its weight files (a stat each: microseconds)


def _weight_files(folder: str) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of each weight file of a model folder (or of a GGUF file itself), as loaded."""
    out: dict[str, tuple[int, int]] = {}
    files = [Path(folder)] if Path(folder).is_file() else sorted(Path(folder).glob("*.safetensors"))
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        out[str(f)] = (st.st_size, st.st_mtime_ns)
    return out


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc `malloc_trim`). After a first large free glibc raises its mmap
    threshold, so later KV caches and weight copies live on the heap, where `free` alone keeps them in our RSS."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl…): nothing to do
        pass


def context_length(model: Any) -> int:
    """The model's context in tokens: what its family's config took from config.json (max_position_embeddings,
    n_positions) or the GGUF file (context_length), the rows of its position tables."""
    return int(model.max_seq_len)


class Loader:
    """The bounded loader pool; `start()` creates a `loading` process and loads it in the background."""

    def __init__(self, procs: ProcessTable, sched: Scheduler, workers: int = LOADER_WORKERS) -> None:
        self.procs = procs
        self.sched = sched
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="llmsh-loader")
        self.tasks: dict[int, str] = {}  # thread ident → what it is loading, for `threads`
        self.max_batch = int(os.environ.get("LLMSH_MAX_BATCH", DEFAULT_MAX_BATCH))

    def start(
        self, source: str, *, name: str | None = None, device: str = "cpu", dtype: str | None = None, nice: int = 0,
        max_batch: int | None = None, ctx: int | None = None, pid: int | None = None, quant: str | None = None,
    ) -> tuple[Process, concurrent.futures.Future]:
        """Register a `loading` process for `source` (path or model name) and queue its load; returns it at once."""
        for what, v in (("--max-batch", max_batch), ("--ctx", ctx)):
            if v is not None and v < 1:
                raise ValueError(f"{what} {v}: give a positive number")
        path = resolve_model(source)
        base = name if name is not None else usable_name(default_name(path))
        if name is None:
            base = self.procs.unique_name(base)
        proc = self.procs.add(base, path, device=device, dtype=dtype or "", nice=nice, pid=pid)
        proc.progress_text = "queued"
        sizes = (max_batch or self.max_batch, ctx)
        return proc, self.pool.submit(self._load, proc, path, device, dtype, sizes, quant)

    def _load(self, proc: Process, path: str, device: str, dtype: str | None, sizes: tuple[int, int | None],
              quant: str | None = None) -> Process:
        me = threading.get_ident()
        self.tasks[me] = f"load pid {proc.pid} ({proc.name})"
        try:
            return self._load_inner(proc, path, device, dtype, sizes, quant)
        finally:
            self.tasks.pop(me, None)
            release_openmp_workers()  # idle workers kept here would make the engine thread's team sleep (threads.py)

    def _load_inner(
        self, proc: Process, path: str, device: str, dtype: str | None, sizes: tuple[int, int | None],
        quant: str | None = None,
    ) -> Process:
        if proc.abort_load:
            return proc
        try:
            configure_torch_threads()
            from llmsh.runtime import load

            def progress(frac: float, text: str) -> None:
                if proc.abort_load:
                    raise LoadAborted()
                proc.progress, proc.progress_text = float(frac), text
                self.procs.changed(proc, "progress")

            model = load(path, device=device, dtype=dtype, progress=progress, quant=quant)
        except LoadAborted:
            return proc
        except Exception as e:  # LoadError is the expected one; anything else still must not kill the kernel
            line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if not _is_load_error(e):
                line = f"{type(e).__name__}: {line}"
            self.sched.fail_load(proc, line)
            gc.collect()  # whatever the failed load had allocated is garbage now
            return proc
        if proc.abort_load:  # killed while the last bytes came in
            del model
            gc.collect()
            return proc
        ctx, limit = sizes[1], context_length(model)
        if ctx is not None and ctx > limit:  # Ollama's num_ctx may lower the context, never raise it
            del model
            self.sched.fail_load(proc, f"--ctx {ctx} is over the model's context of {limit} tokens; give at most {limit}")
            gc.collect()
            return proc
        proc.dtype = str(getattr(model, "dtype", dtype or "")).replace("torch.", "")
        proc.device = str(getattr(model, "device", device))
        proc.runtime = ModelRuntime(model, *sizes, folder=path if os.path.exists(path) else None)
        proc.progress, proc.progress_text = 1.0, "ready"
        if not self.sched.attach(proc):  # killed in the meantime
            rt, proc.runtime = proc.runtime, None
            del model
            rt.close()
        return proc

    def threads(self) -> list[dict[str, Any]]:
        """The loader pool's threads, for `threads`."""
        return [
            {"thread": t, "pool": "loader", "task": self.tasks.get(t.ident or 0, "idle")}
            for t in list(getattr(self.pool, "_threads", ()))
        ]

    def close(self) -> None:
        """Kernel shutdown: abort queued loads, do not wait for a running one."""
        for p in self.procs:
            if p.state is ProcState.LOADING:
                p.abort_load = True
        self.pool.shutdown(wait=False, cancel_futures=True)


def _is_load_error(e: BaseException) -> bool:
    try:
        from llmsh.runtime import LoadError

        return isinstance(e, LoadError)
    except Exception:
        return False
