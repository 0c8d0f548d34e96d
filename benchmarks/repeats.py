"""Repeated benchmark passes: one result per method from several, and each pass's ratios against LoRA r=4.

On a shared or thermally limited machine one process can run 20-30 % slower than the next, so a single pass can
rank two methods either way. Passes alternate the method order, and the ratio of two methods is taken within each
pass (neighbouring processes), which a slow drift of the machine moves alike.
"""

from __future__ import annotations

import statistics
from typing import Any

# The ratios the report gives per pass: (result key, column name, the divisor's key in the same run; None: the
# same key in LoRA r=4's run of that pass).
RATIOS = (("train_step_s", "train step × LoRA r=4", None), ("peak_train_bytes", "peak train mem × LoRA r=4", None),
          ("load_merge_s", "load + merge × LoRA r=4", None),
          ("sample_unfused_s", "sample unfused × base", "sample_base_s"))


def pass_order(methods: list[str], index: int) -> list[str]:
    """The methods in the given order on even passes, reversed on odd ones."""
    return list(methods) if index % 2 == 0 else list(reversed(methods))


def median_result(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's result: the median of every number all its runs measured, the rest from the first run.

    Integers (counts, bytes) take the lower median, a value one run measured.
    """
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    merged = dict(ok[0])
    for key, value in ok[0].items():
        values = [r.get(key) for r in ok]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and \
                all(isinstance(v, (int, float)) for v in values):
            integers = all(isinstance(v, int) for v in values)
            merged[key] = statistics.median_low(values) if integers else statistics.median(values)
    merged["passes"] = len(ok)
    return merged


def ratios(passes: list[dict[str, dict[str, Any]]], method: str, key: str, divisor: str | None,
           against: str = "lora-r4") -> list[float]:
    """Per pass, `method`'s `key` over `divisor` of its own run, or over `key` of `against`'s run in that pass."""
    out = []
    for results in passes:
        run = results.get(method, {})
        a, b = run.get(key), run.get(divisor) if divisor else results.get(against, {}).get(key)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0:
            out.append(a / b)
    return out


def spread_table(passes: list[dict[str, dict[str, Any]]]) -> str:
    """Markdown: per method, the median and range of its per-pass ratios (and how many passes gave one)."""
    methods = list(passes[0]) if passes else []
    header = "| method | " + " | ".join(f"{name} (median, range, passes)" for _, name, _ in RATIOS) + " |"
    rows = [header, "|" + "|".join(["---"] + ["---:"] * len(RATIOS)) + "|"]
    for method in methods:
        cells = []
        for key, _, divisor in RATIOS:
            found = ratios(passes, method, key, divisor)
            cells.append(f"{statistics.median(found):.2f}× ({min(found):.2f}–{max(found):.2f}, {len(found)})"
                         if found else "–")
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
