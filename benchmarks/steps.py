"""Training steps of several methods interleaved in one process: step-time ratios a noisy CPU cannot tilt.

    python -m benchmarks.steps --model sd-v1-4 --methods C2,lora-r4 --rounds 30
    python -m benchmarks.steps --model tiny --methods C2,C2:per-layer,lora-r4 --rounds 300

Each method trains its own copy of the base UNet (built once; SD v1.4 takes 3.4 GB per method in fp32) with its
adapter and AdamW. Rounds of one step per method follow, in alternating order, and the table gives each method's
median step and the median and quartiles of its per-round ratio to the last method. Separate processes
(`benchmarks.run --repeat`) can differ by 20-30 % on a shared CPU; steps milliseconds apart in one process meet the
same machine. `NAME:per-layer` builds a filter-atom method's training weights layer by layer instead of per group of
same-shaped layers (`filter_atoms.grouped`), the A/B of that change.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from filteratom_sd.core.fast_paths import TRAIN_PATHS
from filteratom_sd.core.layer import set_train_path
from filteratom_sd.filter_atoms.grouped import set_grouped_builds

from benchmarks.harness import METHODS, BenchSettings, MethodHarness, build_unet, decompose_if_needed, training_step
from benchmarks.repeats import pass_order

PER_LAYER = ":per-layer"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd-v1-4", help='"sd-v1-4" (config, random weights), "tiny", or a UNet folder')
    parser.add_argument("--methods", default="C2,lora-r4",
                        help=f"comma-separated, from {','.join(METHODS)}; a filter-atom one may end in {PER_LAYER}; "
                             "ratios are to the last")
    parser.add_argument("--rounds", type=int, default=20, help="timed steps per method (at least 2), after 2 warm-up steps")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--train-path", choices=TRAIN_PATHS, default="auto")
    parser.add_argument("--cache-dir", default=None, help="decomposition cache (a temporary folder when not given)")
    return parser.parse_args(argv)


def unknown_methods(methods: list[str], settings: BenchSettings) -> list[str]:
    """The names in `methods` this benchmark cannot run."""
    wrong = []
    for method in methods:
        name, per_layer = method.removesuffix(PER_LAYER), method.endswith(PER_LAYER)
        if name not in METHODS or (per_layer and MethodHarness(name, settings).kind != "filter-atoms"):
            wrong.append(method)
    return wrong


def method_step(base: torch.nn.Module, settings: BenchSettings, method: str, cache_dir: Path) -> Callable[[], None]:
    """One AdamW step of `method` on its own copy of `base` (the frozen UNet alone for "base": its input's gradient)."""
    name = method.removesuffix(PER_LAYER)
    unet = copy.deepcopy(base)
    harness = MethodHarness(name, settings)
    if harness.kind == "filter-atoms":
        decompose_if_needed(unet, name, cache_dir)
    params = harness.add(unet)
    if method.endswith(PER_LAYER):
        set_grouped_builds(unet, False)
    set_train_path(unet, settings.train_path)
    return training_step(unet, params, settings, torch.device("cpu"))[0]


def ratio_table(times: dict[str, list[float]]) -> str:
    """Markdown: each method's median step and its per-round ratio to the last method (median, quartiles)."""
    reference = list(times)[-1]
    lines = [f"| method | median step (s) | ÷ {reference}, median | quartiles |", "|---|---:|---:|---|"]
    for method, values in times.items():
        ratios = [a / b for a, b in zip(values, times[reference])]
        low, _, high = statistics.quantiles(ratios, n=4, method="inclusive")
        lines.append(f"| {method} | {statistics.median(values):.4f} | {statistics.median(ratios):.3f} | "
                     f"{low:.3f}-{high:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    settings = BenchSettings(model=args.model, resolution=args.resolution, batch_size=args.batch_size, device="cpu",
                             train_path=args.train_path)
    wrong = unknown_methods(methods, settings)
    if wrong or len(set(methods)) != len(methods) or args.rounds < 2:
        print(f"Error: give distinct methods from {', '.join(METHODS)} (a filter-atom one may end in {PER_LAYER}) "
              f"and at least 2 rounds{'; unknown: ' + ', '.join(wrong) if wrong else ''}.", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="fa-steps-") as tmp:
        cache_dir = Path(args.cache_dir or tmp)
        os.environ["FILTERATOM_SD_CACHE_DIR"] = str(cache_dir)
        base = build_unet(settings, torch.device("cpu"))
        steps = {method: method_step(base, settings, method, cache_dir) for method in methods}
        del base
        for step in steps.values():  # warm-up: first-call allocations, and the groups' first (per-layer) pass
            step()
            step()
        times: dict[str, list[float]] = {method: [] for method in methods}
        for index in range(args.rounds):
            for method in pass_order(methods, index):
                start = time.perf_counter()
                steps[method]()
                times[method].append(time.perf_counter() - start)
    print(ratio_table(times))
    return 0


if __name__ == "__main__":
    sys.exit(main())
