"""Memory budgets per device: parsing `--mem-budget cpu=4GiB,cuda:0=20GiB` and the default when none is given.

A budget is what the pager may keep resident on a device; the default is the device's free memory less a margin,
so the kernel leaves the rest of the machine alone. Torch is consulted only when it is already imported, so
parsing budgets never pulls torch into a process.
"""

from __future__ import annotations

import re
import sys

from llmsh.fmt import format_bytes  # noqa: F401  (re-exported for the pager's modules)

UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "m": 1024**2,
    "g": 1024**3,
    "t": 1024**4,
}
USAGE = "expected DEVICE=SIZE[,DEVICE=SIZE…] like cpu=4GiB,cuda:0=20GiB,kv=512MiB (units B KiB MiB GiB KB MB GB)"
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")
_DEVICE = re.compile(r"^(cpu|kv|cuda(:[0-9]+)?|mps|kv:(cpu|cuda(:[0-9]+)?))$")
MIN_MARGIN = 512 * 1024**2  # leave at least this much free on the device, or 10 % of it, whichever is larger
MARGIN_FRACTION = 0.10


class BudgetError(ValueError):
    """A budget string that cannot be understood; the message is one line saying what is expected."""


def parse_size(text: str) -> int:
    """'4GiB' → 4294967296; '1.5 MB' → 1500000; raises BudgetError."""
    m = _SIZE.match(text)
    if not m or m.group(2).lower() not in UNITS:
        raise BudgetError(f"bad size {text.strip()!r}: expected a number and a unit like 512MiB or 4GB")
    value = float(m.group(1)) * UNITS[m.group(2).lower()]
    if value < 1:
        raise BudgetError(f"bad size {text.strip()!r}: must be at least 1 byte")
    return int(value)


def normalize_device(name: str) -> str:
    """'cuda' → 'cuda:0'; 'CPU' → 'cpu'; KV budgets keep their 'kv' prefix."""
    name = name.strip().lower()
    if name == "cuda":
        return "cuda:0"
    if name == "kv":
        return "kv:cpu"
    if name == "kv:cuda":
        return "kv:cuda:0"
    return name


def parse_budget(spec: str | None) -> dict[str, int]:
    """'cpu=4GiB,cuda:0=20GiB' → {'cpu': …, 'cuda:0': …}; '' or None → {} (defaults apply); raises BudgetError."""
    if spec is None or not spec.strip():
        return {}
    out: dict[str, int] = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        dev, eq, size = part.partition("=")
        dev = dev.strip().lower()
        if not eq:
            # A bare size means the budget of the CPU (the only device every machine has).
            dev, size = "cpu", part
        if not _DEVICE.match(dev):
            raise BudgetError(f"bad device {dev!r} in budget {spec!r}: {USAGE}")
        dev = normalize_device(dev)
        if dev in out:
            raise BudgetError(f"device {dev!r} given twice in budget {spec!r}: {USAGE}")
        try:
            out[dev] = parse_size(size)
        except BudgetError:
            raise BudgetError(f"bad size {size.strip()!r} for {dev}; {USAGE}") from None
    return out


def default_budget(device: str) -> int:
    """The device's free memory less a margin (max of 512 MiB and 10 % of its total)."""
    device = normalize_device(device)
    if device.startswith("kv:"):
        # KV caches share the device with weights: by default a quarter of the weights' default budget.
        return default_budget(device[3:]) // 4
    if device.startswith("cuda"):
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            index = int(device.partition(":")[2] or 0)
            free, total = torch.cuda.mem_get_info(index)
            return max(0, int(free - max(MIN_MARGIN, MARGIN_FRACTION * total)))
        return 0
    import psutil

    vm = psutil.virtual_memory()
    return max(0, int(vm.available - max(MIN_MARGIN, MARGIN_FRACTION * vm.total)))
