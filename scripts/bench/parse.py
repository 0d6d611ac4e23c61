"""Parsing long command lines (issue 14): a line of many statements, and one long quoted prompt, at 100 KB and 1 MB.

What a parse costs per byte should not grow with the line (linear), and a 1 MB line should parse well under a second
(the kernel parses lines over 64 KiB off its event loop, the client on every `llmsh -c`). The reference, measured in
the same run, is `str.split` of the same text: the cheapest pass over it that a Python program can make and still
produce words, so `ratio_split` says how many such passes our parse costs.
Reported per input: seconds at 1 MB, seconds per MB at 100 KB and at 1 MB (their ratio is `linear`: ~1 when linear).
Last line: parse_1mb_s=<statements line, s> prompt_1mb_s=<prompt line, s> linear=<worst 1MB/100KB per-byte ratio>
ratio_split=<statements line: parse / str.split>
Usage: python scripts/bench/parse.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from llmsh.commands.parser import parse  # noqa: E402

MB = 1_000_000


def statements(size: int) -> str:
    """`echo a;` repeated: ~150k statements per MB, the line from the issue."""
    return "echo a;" * (size // 7)


def prompt(size: int) -> str:
    """One `run` with a quoted prompt of `size` bytes of words."""
    return 'run g "' + "word " * (size // 5) + '" --max-tokens 1'


def best(fn: Callable[[str], object], arg: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per input (best is kept)")
    opts = ap.parse_args()
    print(f"# machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}; "
          "shared machine: numbers are noisy")
    results: dict[str, tuple[float, float]] = {}
    for name, make in (("statements", statements), ("prompt", prompt)):
        small, big = make(MB // 10), make(MB)
        n = len(parse(big).statements)
        t_small, t_big = best(parse, small, opts.repeats), best(parse, big, opts.repeats)
        linear = (t_big / len(big)) / (t_small / len(small))
        results[name] = (t_big, linear)
        print(f"{name:<10} {len(big) / MB:.2f} MB, {n} statements: {t_big:.3f} s "
              f"({t_small / len(small) * MB:.3f} s/MB at 100 KB, {t_big / len(big) * MB:.3f} s/MB at 1 MB, "
              f"linear {linear:.2f})")
    line = statements(MB)
    split = best(lambda text: text.replace(";", " ; ").split(), line, opts.repeats)
    ratio = results["statements"][0] / split
    print(f"str.split of the statements line: {split:.3f} s (parse / split = {ratio:.1f})")
    print(f"parse_1mb_s={results['statements'][0]:.3f} prompt_1mb_s={results['prompt'][0]:.3f} "
          f"linear={max(r[1] for r in results.values()):.2f} ratio_split={ratio:.1f}")


if __name__ == "__main__":
    main()
