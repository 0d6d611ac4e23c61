"""`load()` a Hugging Face folder into a `Model`: the plain-PyTorch network plus tokenizer, configs and checkpoint.

Loading builds the network on the `meta` device (no memory), reads every parameter as a zero-copy view of the
mmap'd safetensors (converted only when the dtype or device differs) and assigns them with
`load_state_dict(assign=True)`. `Model` then offers the scheduler's API (`new_cache`, `prefill`, `decode_step`), the
simple one (`generate`, `stream`) and the pager's hooks (`pages`, `set_page_hook`, `release_page`, `materialize_page`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from llmsh.runtime import fast_decode, gemma, gpt2, hub, integrity, layout_cache, llama, moe
from llmsh.runtime.checkpoint import Checkpoint
from llmsh.runtime.config_check import check_sizes
from llmsh.runtime.decoders import decoder_for
from llmsh.runtime.errors import LoadError
from llmsh.runtime.generation import BatchGenerator, Sequence
from llmsh.runtime.kv_cache import KVCache, Step
from llmsh.runtime.sampling import SamplingParams
from llmsh.runtime.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llmsh.runtime.quant import QuantizedCheckpoint

FAMILIES: dict[str, ModuleType] = {t: m for m in (gpt2, llama, gemma, moe) for t in m.MODEL_TYPES}
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


@dataclass
class Page:
    """A unit the pager moves: the parameters of the embedding, of one block, or of the head."""

    name: str
    param_names: list[str]
    nbytes: int
    on_demand: bool = False    # a MoE expert: runs only when chosen, out of the pages' order


class Model:
    """A loaded model: network, tokenizer, configs, and the generation and paging APIs."""

    def __init__(self, module: nn.Module, *, name: str, path: Path, hf_config: dict[str, Any],
                 checkpoint: Checkpoint | QuantizedCheckpoint, tokenizer: Tokenizer | None,
                 generation_config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> None:
        # a family's Transformer and its Config: Any, as their attributes differ per family (and nn.Module's
        # __getattr__ would type each one Tensor | Module)
        net: Any = module
        self.module, self.name, self.path = net, name, path
        self.config: Any = net.config
        self.hf_config, self.checkpoint, self.tokenizer = hf_config, checkpoint, tokenizer
        self.generation_config, self.device, self.dtype = generation_config, device, dtype
        self.max_seq_len: int = self.config.max_seq_len
        on_demand: set[str] = getattr(module, "on_demand_pages", set())
        params = dict(module.named_parameters(remove_duplicate=False))
        self._pages = [Page(n, names, sum(self._param_nbytes(p, params[p]) for p in names), n in on_demand)
                       for n, names in net.pages()]
        self._tied: dict[str, list[str]] = {}  # parameter name -> every name sharing that tensor
        by_id: dict[int, list[str]] = {}
        for pname, param in params.items():
            by_id.setdefault(id(param), []).append(pname)
        for names in by_id.values():
            for pname in names:
                self._tied[pname] = names
        # small-batch CPU decode steps through the C kernels (fast_decode.py); None: torch modules only
        self.fast_decode: fast_decode.FastDecoder | None = decoder_for(self)

    def __repr__(self) -> str:
        return f"Model({self.name!r}, {type(self.config).__name__}, device={self.device}, dtype={self.dtype})"

    # ---- sizes -------------------------------------------------------------------------------------------------
    def _param_nbytes(self, pname: str, param: Tensor) -> int:
        shape = self.checkpoint.shape(pname)
        dtype = param.dtype    # the model's dtype, or uint8 for quantized bytes (quant.py)
        return int(torch.Size(shape).numel()) * dtype.itemsize

    def weight_bytes(self) -> int:
        """Bytes of all (distinct) parameters in the loaded dtype."""
        return sum(p.nbytes for p in self._pages)

    def bytes_read_per_token(self) -> int:
        """Weight bytes a batch-1 decode step streams (what memory bandwidth bounds decoding by): every parameter
        except embedding tables that are only looked up, one row per token, unless the head multiplies by them (tied),
        and of a mixture of experts only the top_k of n_experts experts a token runs (their mean size)."""
        from llmsh.runtime.quant import QEmbedding

        read = self.weight_bytes()
        n_experts, top_k = getattr(self.config, "n_experts", 0), getattr(self.config, "top_k", 0)
        if n_experts:
            expert_bytes = sum(p.nbytes for p in self._pages if p.on_demand)
            read -= expert_bytes - expert_bytes * top_k // n_experts
        for name, mod in self.module.named_modules():
            if isinstance(mod, nn.Embedding) and len(self._tied[f"{name}.weight"]) == 1:
                read -= mod.weight.nbytes - mod.weight[0].nbytes
            elif isinstance(mod, QEmbedding) and len(self._tied[f"{name}.weight"]) == 1:
                read -= mod.weight.nbytes - mod.row_bytes
        return read

    # ---- scheduler API ---------------------------------------------------------------------------------------
    def new_cache(self, max_batch: int, max_seq_len: int) -> KVCache:
        """A KV cache of max_batch slots of up to max_seq_len positions (capped to the model's context); it starts
        empty and grows with what the sequences hold (kv_cache.py)."""
        cfg = self.config
        cache = KVCache(cfg.n_layer, max_batch, cfg.n_kv_head, min(max_seq_len, self.max_seq_len), cfg.head_dim,
                        self.dtype, self.device, grow=True)
        if self.fast_decode is not None:
            cache.on_resize.append(self.fast_decode.weights_changed)  # it caches the buffers' addresses too
        return cache

    @torch.inference_mode()
    def prefill(self, cache: KVCache, slots: list[int], token_ids: list[list[int]]) -> Tensor:
        """Run prompts into their slots (after what the slot holds); returns float32 logits (B, vocab) of each last token."""
        lengths = [len(t) for t in token_ids]
        starts = [cache.lengths[s] for s in slots]
        vocab = self.config.vocab_size
        if any(i < 0 or i >= vocab for t in token_ids for i in t):
            raise ValueError(f"token ids must be in [0, {vocab}) for this model")
        for s, start, n in zip(slots, starts, lengths):
            if n == 0 or start + n > cache.context:
                raise ValueError(f"slot {s}: {n} prompt tokens after {start} do not fit the context of {cache.context}")
        cache.reserve(max(slots) + 1, max(start + n for start, n in zip(starts, lengths)))
        if lengths == [1] * len(slots) and self.fast_decode is not None and len(slots) <= fast_decode.MAX_ROWS:
            # one token each is a decode step: the C kernels stream the weights once (a bf16 1.1B model's first
            # token after load: 0.2 s instead of 0.9 s through the modules' GEMV)
            return self.decode_step(cache, slots, [t[0] for t in token_ids])
        if any(starts) and len(slots) > 1:  # continuing slots: one at a time, so padding never runs past a slot's end
            return torch.cat([self.prefill(cache, [s], [t]) for s, t in zip(slots, token_ids)])
        if len(slots) == 1:
            return self._prefill(cache, slots, token_ids, starts[0])
        return torch.cat([self._prefill_packed(cache, [slots[i] for i in pack], [token_ids[i] for i in pack])
                          if len(pack) > 1 else self._prefill(cache, [slots[pack[0]]], [token_ids[pack[0]]], 0)
                          for pack in packs(lengths)])

    def _prefill(self, cache: KVCache, slots: list[int], token_ids: list[list[int]], start: int) -> Tensor:
        T = max(len(t) for t in token_ids)
        idx = torch.zeros(len(token_ids), T, dtype=torch.long)
        for b, t in enumerate(token_ids):
            idx[b, :len(t)] = torch.tensor(t)
        pos = (start + torch.arange(T)).expand(len(token_ids), T)
        last = torch.tensor([len(t) - 1 for t in token_ids], device=self.device)
        step = Step.build(pos.to(self.device), cache, slots)
        logits = self.module(idx.to(self.device), step, last=last)
        for s, t in zip(slots, token_ids):
            cache.lengths[s] = start + len(t)
        return logits.float()

    def _prefill_packed(self, cache: KVCache, slots: list[int], token_ids: list[list[int]]) -> Tensor:
        """Fresh prompts as one row (Step.packed); float32 logits of each prompt's last token, in order."""
        lengths = [len(t) for t in token_ids]
        idx = torch.tensor([t for ids in token_ids for t in ids], dtype=torch.long, device=self.device)[None]
        step = Step.packed(cache, slots, lengths, self.device)
        last = torch.tensor([b - 1 for _, b in step.segments or []], device=self.device)
        logits = self.module(idx, step, last=last)                      # (prompts, vocab): row 0 at each end
        for s, n in zip(slots, lengths):
            cache.lengths[s] = n
        return logits.float()

    @torch.inference_mode()
    def decode_step(self, cache: KVCache, slots: list[int], tokens: list[int]) -> Tensor:
        """Feed one token per slot at that slot's own position; returns float32 logits (B, vocab)."""
        pos = [cache.lengths[s] for s in slots]
        if max(pos) >= cache.context:
            raise ValueError(f"a slot is full ({cache.context} positions); finish that sequence")
        cache.reserve(max(slots) + 1, max(pos) + 1)
        if self.fast_decode is not None and len(slots) <= fast_decode.MAX_ROWS:
            logits = self.fast_decode(cache, slots, tokens, pos)                      # float32 already
        else:
            # rows in slot order: a run of consecutive slots is a slice of the cache, whose keys and values the
            # attention reads in place; any other order gathers (copies) every row's whole cache in every layer
            # (GPT-2 124M, 64 rows: 19 ms a layer, more than the step's matmuls)
            order = sorted(range(len(slots)), key=slots.__getitem__)
            idx = torch.tensor([tokens[i] for i in order], dtype=torch.long, device=self.device)[:, None]   # (B, 1)
            input_pos = torch.tensor([pos[i] for i in order], dtype=torch.long, device=self.device)[:, None]
            sorted_logits = self.module(idx, Step.build(input_pos, cache, [slots[i] for i in order]))[:, -1].float()
            logits = torch.empty_like(sorted_logits)
            logits[order] = sorted_logits
        for s in slots:
            cache.lengths[s] += 1
        return logits

    @torch.inference_mode()
    def forward(self, token_ids: list[int]) -> Tensor:
        """Logits (T, vocab) of every position of one sequence, without a cache (tests, scoring)."""
        idx = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        pos = torch.arange(len(token_ids), device=self.device)[None]
        return self.module(idx, Step.build(pos))[0].float()

    # ---- simple API ------------------------------------------------------------------------------------------
    def _sequences(self, prompts: list[str], kwargs: dict[str, Any]) -> list[Sequence]:
        if self.tokenizer is None:
            raise ValueError(f"{self.name} has no tokenizer.json, so it cannot take text prompts")
        params = SamplingParams.from_config(self.generation_config, **kwargs)
        return [Sequence(self, self.tokenizer.encode(p), params) for p in prompts]

    def generate(self, prompts: list[str], **sampling: Any) -> list[str]:
        """Complete each prompt (continuous batch of all of them); sampling: max_tokens, temperature, top_k, top_p,
        repetition_penalty, seed, stop. Returns the generated texts (without the prompts)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        seqs = self._sequences(prompts, sampling)
        if not seqs:
            return []
        longest = max(len(s.prompt_ids) for s in seqs) + seqs[0].params.max_tokens
        gen = BatchGenerator(self, max_batch=len(seqs), max_seq_len=longest)
        for s in seqs:
            gen.add(s)
        while gen.has_work:
            gen.step()
        return [s.text for s in seqs]

    def stream(self, prompt: str, **sampling: Any) -> Iterator[str]:
        """Yield the text pieces of one completion as they are generated."""
        (seq,) = self._sequences([prompt], sampling)
        gen = BatchGenerator(self, max_batch=1, max_seq_len=len(seq.prompt_ids) + seq.params.max_tokens)
        gen.add(seq)
        try:
            while gen.has_work:
                for _, piece in gen.step():
                    if piece:
                        yield piece
        finally:
            gen.remove(seq)

    # ---- paging hooks ----------------------------------------------------------------------------------------
    def pages(self) -> list[Page]:
        """Pages in execution order: 'embed', 'block.0' … 'block.N-1', 'head' (a tied head uses embed's matrix)."""
        return list(self._pages)

    def set_page_hook(self, fn: Callable[[int], None] | None) -> None:
        """Call fn(page_index) right before that page's modules run, in every forward; None removes it."""
        self.module.page_hook = fn

    def _set_param(self, pname: str, tensor: Tensor) -> None:
        param = nn.Parameter(tensor, requires_grad=False)
        for name in self._tied[pname]:  # tied weights stay one Parameter
            owner, _, attr = name.rpartition(".")
            setattr(self.module.get_submodule(owner), attr, param)
        if self.fast_decode is not None:
            self.fast_decode.weights_changed()   # it caches parameter addresses

    def page_tensors(self, i: int) -> dict[str, Tensor]:
        """The current tensors of page i by parameter name (a pager can copy these to keep a host copy)."""
        return {p: self.module.get_parameter(p).data for p in self._pages[i].param_names}

    def release_page(self, i: int) -> None:
        """Drop page i's parameters (replaced by meta tensors of the same shape); a forward needs materialize first."""
        for p in self._pages[i].param_names:
            t = self.module.get_parameter(p)
            self._set_param(p, torch.empty(t.shape, dtype=t.dtype, device="meta"))

    def materialize_page(self, i: int, device: str | torch.device | None = None,
                         host: dict[str, Tensor] | None = None) -> None:
        """Bring page i back on device, from `host` tensors if given, else re-read from the mmap'd checkpoint."""
        device = torch.device(device) if device is not None else self.device
        for p in self._pages[i].param_names:
            if host is not None:
                dtype = self.dtype if host[p].is_floating_point() else None     # quantized bytes stay bytes
                t = host[p].to(device=device, dtype=dtype, non_blocking=True)
                if not t.is_contiguous():
                    t = t.contiguous()  # our Linear weights are contiguous (in, out), as loading makes them
                self._set_param(p, t)
            else:
                self._set_param(p, self.checkpoint.load_tensor(p, device, self.dtype))

    def page_resident(self, i: int) -> bool:
        """True if page i's parameters are materialized (not meta)."""
        return all(not self.module.get_parameter(p).is_meta for p in self._pages[i].param_names)


# ---- loading -------------------------------------------------------------------------------------------------
def _read_json(path: Path, required: bool = True) -> dict[str, Any]:
    if not path.exists():
        if required:
            raise LoadError(f"no {path.name} in {path.parent}; a Hugging Face model folder needs one")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise LoadError(f"{path.name} in {path.parent} is not valid JSON ({e}); re-download it") from None
    if not isinstance(data, dict):
        raise LoadError(f"{path.name} in {path.parent} is not a JSON object; re-download it")
    return data


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device a user's `--device` names, or LoadError (one line) if this machine cannot run it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise LoadError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LoadError(f"device {device} requested but CUDA is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise LoadError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    return dev


def packs(lengths: list[int], max_tokens: int = 4096) -> list[list[int]]:
    """Indices of prompts in order, cut into packs of at most `max_tokens` tokens (a longer prompt alone): one packed
    prefill each, so that its activations stay bounded."""
    out: list[list[int]] = []
    total = 0
    for i, n in enumerate(lengths):
        if out and total + n <= max_tokens:
            out[-1].append(i)
            total += n
        else:
            out.append([i])
            total = n
    return out


def resolve_dtype(dtype: str | torch.dtype | None, stored: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a model runs in: the user's `dtype`, or for None/"auto" the `stored` one where it computes fast on
    `device` (float32 on CPUs for float16 checkpoints); LoadError (one line) for one llmsh cannot run."""
    if dtype is None or dtype == "auto":
        dt = stored if stored in (torch.float32, torch.bfloat16) or device.type == "cuda" else torch.float32
    elif isinstance(dtype, torch.dtype):
        dt = dtype
    elif str(dtype).lower().removeprefix("torch.") in DTYPE_NAMES:
        dt = DTYPE_NAMES[str(dtype).lower().removeprefix("torch.")]
    else:
        raise LoadError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    if dt not in (torch.float32, torch.bfloat16, torch.float16):
        raise LoadError(f"dtype {dt} is not supported; use float32, bfloat16 or float16")
    if dt == torch.float16 and device.type != "cuda":
        raise LoadError("float16 needs a CUDA device (CPU float16 matmuls are slow and lossy); use bfloat16 or float32")
    return dt


def load_hf(path_or_name: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
            *, verify: bool = True, progress: Callable[[float, str], None] | None = None,
            quant: str | None = None) -> Model:
    """Load a Hugging Face folder or hub-cache name; LoadError (one line) for every user-facing failure.
    quant (q8_0, q4_0, q4_k): keep the matrices quantized (quant.py), quantized once and cached."""
    report = progress or (lambda frac, msg: None)
    started = time.perf_counter()
    folder = hub.resolve(str(path_or_name))
    report(0.0, f"reading {folder}")
    hf_config = _read_json(folder / "config.json")
    model_type = hf_config.get("model_type")
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        supported = ", ".join(sorted(FAMILIES))
        raise LoadError(f"model_type {model_type!r} in {folder / 'config.json'} is not supported; "
                        f"llmsh runs: {supported} (GPT-2; the Llama family: Llama 2/3, Mistral, Qwen2/3, Phi-3/4, SmolLM; "
                        "Gemma 2/3; the experts of Mixtral and Qwen3-MoE)")
    dev = resolve_device(device)
    if quant and dev.type != "cpu":
        raise LoadError(f"--quant {quant} keeps matrices in blocks for the CPU kernels, and {dev} has none; load the "
                        "checkpoint on cuda without --quant (float16 or bfloat16), or with --quant on the cpu")
    base = Checkpoint(folder)
    if verify and integrity.has_checksums(folder):
        integrity.verify_folder(folder, progress=lambda f, m: report(0.05 + 0.6 * f, m))
    dt = resolve_dtype(dtype, base.dtype(), dev)
    check_sizes(hf_config, folder / "config.json")  # n_layer 0, n_head 0…: one line here, not a failing first step
    try:
        cfg = family.Config.from_hf(hf_config)
    except KeyError as e:
        raise LoadError(f"config.json in {folder} lacks {e.args[0]!r}, which {model_type} models need") from None
    base.key_map = lambda name: family.hf_keys(name, cfg)
    base.transposed = lambda name: family.transposed(name, cfg)
    base.parts = lambda name: family.fused_parts(name, cfg)
    checkpoint: Checkpoint | QuantizedCheckpoint = base
    with torch.device("meta"):
        module = family.Transformer(cfg)
    if quant:  # matrices from a quantized copy of the checkpoint (made once, cached): quant.py
        from llmsh.runtime import quant as quant_mod

        checkpoint = quant_mod.quantized_checkpoint(base, module, quant,
                                                    progress=lambda f, m: report(0.05 + 0.6 * f, m))
        quant_mod.quantize_module(module, checkpoint, dt)    # (dt: the rows a quantized embedding table gives)
    cache_layout = checkpoint is base and dev.type == "cpu"
    if cache_layout:  # transposed and fused matrices as an earlier load built them (layout_cache.py)
        base.layout = layout_cache.open_cached(folder, dt, files=base.paths())
    built: dict[str, Tensor] = {}
    expected = module.state_dict()
    state: dict[str, Tensor] = {}
    by_key: dict[str, Tensor] = {}  # a tied head reads the embedding's key: convert/copy it once, not twice
    for i, name in enumerate(expected):
        shape, key = checkpoint.shape(name), checkpoint.hf_key(name)
        if list(expected[name].shape) != shape:
            raise LoadError(f"tensor {key} in {folder} has shape {shape} but config.json implies "
                            f"{list(expected[name].shape)}; the weights and config.json do not match")
        if key not in by_key:
            by_key[key] = checkpoint.load_tensor(name, dev, dt)
            lname = base.layout_name(name) if cache_layout else None
            if lname is not None and (base.layout is None or lname not in base.layout.entries):
                built[lname] = by_key[key]
        state[name] = by_key[key]
        report(0.65 + 0.3 * (i + 1) / len(expected), f"loading {name}")
    module.load_state_dict(state, assign=True, strict=True)
    if built and base.layout is None:
        report(0.95, "caching the transposed matrices for the next load")
        layout_cache.write(folder, dt, built, files=base.paths())
        base.layout = layout_cache.open_cached(folder, dt, files=base.paths())  # pages re-read from it (same values)
    module.setup(dev)
    module.eval().requires_grad_(False)
    gen_cfg = _read_json(folder / "generation_config.json", required=False)
    tokenizer = Tokenizer(folder, hf_config, gen_cfg) if (folder / "tokenizer.json").exists() else None
    name = str(path_or_name) if not Path(str(path_or_name)).expanduser().exists() else folder.name
    model = Model(module, name=name, path=folder, hf_config=hf_config, checkpoint=checkpoint, tokenizer=tokenizer,
                  generation_config=gen_cfg, device=dev, dtype=dt)
    report(1.0, f"loaded {name} in {time.perf_counter() - started:.2f}s")
    return model

