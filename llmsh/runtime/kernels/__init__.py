"""The C decode kernels (cpu_decode.c): compiled for this machine on first use, loaded with ctypes.

Compiling at run time, as torch.compile's CPU backend also does, lets `-march=native` use the vector units this
CPU has (AVX-512, AVX2 or NEON) and keeps the package pure Python to install. The shared library is cached under
the user cache directory (platformdirs, honouring XDG_CACHE_HOME), keyed by the source, the flags, the compiler
and the machine, and written atomically, so concurrent processes and upgrades never load a stale or partial file.

Threads come from OpenMP (`-fopenmp`): torch has already loaded its own libgomp under the same soname, so the
kernels join torch's runtime rather than starting a second pool, and take torch.get_num_threads() per call. A
compiler without OpenMP gets a single-threaded build.

Without a C compiler, or with LLMSH_KERNELS=0, `library()` returns None and the runtime decodes with torch ops
alone: slower at small batches, same results to float rounding.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from llmsh import paths

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_decode.c")
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-shared", "-fPIC"]
if platform.machine() in ("x86_64", "AMD64"):
    FLAGS.append("-mprefer-vector-width=512")   # GCC defaults to 256-bit vectors; 512 streamed bf16 weights faster
MAX_HEAD_DIM = 512                              # lm_rope's scratch row

_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
SIGNATURES = {
    "lm_linear": [_P, _L, _L, _P, _L, _P, _I, _I, _P, _I],
    "lm_silu_mul": [_P, _L, _L, _P],
    "lm_gelu": [_P, _L, _I],
    "lm_rmsnorm": [_P, _L, _L, _P, _I, _F, _P],
    "lm_layernorm": [_P, _L, _L, _P, _P, _I, _F, _P],
    "lm_rope": [_P, _L, _L, _L, _L, _P, _P, _P],
    "lm_attention": [_P, _L, _L, _L, _L, _P, _P, _I, _L, _P, _P, _L, _F, _P, _P, _I],
    "lm_layers": [_P, _P, _L, _P],
    "lm_scratch_floats": [_L] * 8,
    "lm_qk_norm": [_P, _L, _L, _L, _L, _L, _P, _P, _I, _F, _I],
    "lm_rmsnorm_plus_one": [_P, _L, _L, _P, _I, _F, _P],
    "lm_attention_softcap": [_P, _L, _L, _L, _L, _P, _P, _I, _L, _P, _P, _L, _F, _F, _P, _P, _I],
    "lm_attention_half": [_P, _P, _P, _P],
    "lm_attend": [_P, _L, _L, _L, _L, _P, _P, _I, _L, _P, _P, _L, _F, _F, _P, _P, _I],
    "lm_route": [_P, _L, _L, _P, _L, _L, _I, _I, _I, _P, _P, _P],
    "lm_expert": [_P, _L, _P, _L, _L, _P, _P, _P, _L, _I, _P, _P, _I],
    "lm_rope_partial": [_P, _L, _L, _L, _L, _L, _P, _P, _P],
    "lm_bf16_dot": [],
    "lm_amx": [_I],
    "lm_moe_layers": [_P, _P, _P, _L, _P, _P],
    "lm_transpose": [_P, _L, _L, _L, _P, _L, _I],
}
RESTYPES = {"lm_scratch_floats": _L, "lm_bf16_dot": _I, "lm_amx": _I, "lm_moe_layers": _I, "lm_transpose": _I}


class Layer(ctypes.Structure):
    """lm_layer: one layer's parameter and KV cache addresses (0 where the layer has no such tensor)."""

    # one list per C type: a list mixing c_long and c_float fields would be typed list[tuple[str, type[object]]]
    _fields_ = [(name, _P) for name in ("norm1", "norm1_bias", "w_qkv", "b_qkv", "w_o", "b_o", "norm2", "norm2_bias",
                                        "w_up", "b_up", "w_down", "b_down", "k_cache", "v_cache")] + \
        [("window", _L)] + [("attn_scale", _F)] + \
        [(name, _P) for name in ("q_norm", "k_norm", "post_norm1", "post_norm2", "rope_cos", "rope_sin")] + \
        [("softcap", _F)]


class Step(ctypes.Structure):
    """lm_step: what every layer of one decode step shares."""

    _fields_ = [(name, _L) for name in ("M", "dim", "n_head", "n_kv", "head_dim", "hidden", "max_seq")] + \
        [(name, _I) for name in ("is_bf16", "is_gpt2", "exact_gelu", "n_threads")] + [("eps", _F)] + \
        [(name, _P) for name in ("rope_cos", "rope_sin", "pos", "slots", "scratch")] + [("rotary_dim", _L)] + \
        [("gemma", _I)]


def compiler() -> str | None:
    """$CC, else the first of cc, gcc, clang on PATH."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return next((found for name in ("cc", "gcc", "clang") if (found := shutil.which(name))), None)


def _cache_key(cc: str, flags: list[str]) -> str:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    h = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(SOURCE.parent.glob("*.c"))))  # sources include others
    for part in (" ".join(flags), cc, version, platform.machine(), platform.processor(), _cpu_flags()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def _cpu_flags() -> str:
    """-march=native depends on the CPU: a cache shared between machines (NFS home) must not mix them."""
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return ""


def build(cc: str, out_dir: Path, flags: list[str] = FLAGS, source: Path = SOURCE) -> Path:
    """Compile source (SOURCE, or another C file of this folder) with flags into out_dir (if not there yet) and
    return the shared library's path."""
    target = out_dir / f"{source.stem}-{_cache_key(cc, flags)}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, "-o", tmp, str(source), "-lm"], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"{cc} failed")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def library(source: str = SOURCE.name) -> ctypes.CDLL | None:
    """The loaded kernels, or None (no compiler, a failed build, or LLMSH_KERNELS=0): callers fall back to torch.
    `source` names another C file of this folder to build instead (quant_decode.c, which includes cpu_decode.c)."""
    if os.environ.get("LLMSH_KERNELS", "1") == "0":
        return None
    cc = compiler()
    if cc is None:
        log.info("no C compiler found: decoding with torch ops only (install gcc or clang for faster decoding)")
        return None
    import torch  # noqa: F401  (loads torch's libgomp first, which the OpenMP build then shares)

    error: Exception | None = None
    for flags in (FLAGS + ["-fopenmp"], FLAGS):          # OpenMP if the compiler and runtime have it, else serial
        try:                                             # (an unwritable cache directory is an OSError here too)
            lib = ctypes.CDLL(str(build(cc, paths.cache_dir() / "kernels", flags, SOURCE.with_name(source))))
            break
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            error = e
    else:
        log.warning("could not build the CPU decode kernels (%s): decoding with torch ops only", error)
        return None
    return declare(lib)


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Give lib's functions their C signatures (ctypes then converts and checks the arguments)."""
    for name, argtypes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, RESTYPES.get(name)
    return lib
