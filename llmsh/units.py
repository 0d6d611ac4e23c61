"""Units the user types and reads: durations (`5m`, `30s`)."""

from __future__ import annotations


def parse_duration(text: str) -> float | None:
    """'5m' → 300.0, '30s', '1h', '250ms', '0' → 0.0; 'forever'/'never'/'-1' → None (keep resident); ValueError otherwise."""
    t = text.strip().lower()
    if t in ("forever", "never", "inf", "none", "-1"):
        return None
    for suffix, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0), ("d", 86400.0), ("", 1.0)):
        if t.endswith(suffix):
            num = t[: len(t) - len(suffix)] if suffix else t
            try:
                value = float(num)
            except ValueError:
                break
            if value < 0:
                break
            return value * scale
    raise ValueError(f"bad duration {text!r}: expected e.g. 30s, 5m, 1h, 0 (release when idle) or 'forever'")
