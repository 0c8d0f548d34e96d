"""Where methods' training steps differ, layer by layer: each adapted layer's forward and backward alone.

    python -m benchmarks.layers --model sd-v1-4 --methods C2,lora-r4 --passes 3
    python -m benchmarks.layers --model tiny --methods C2,lora-r4 --batch-size 10

The target layers of the UNet are grouped by kind, weight shape and the input shape they see at the
benchmark's resolution and batch. One layer of each group runs forward plus backward (to its input and its
adapter) `--reps` times: the frozen base layer, then each method added as in `benchmarks.run`. Methods take
turns over `--passes` passes in alternating order, and each time is the median over the passes, so a slow
stretch of a noisy CPU does not fall on one method alone. The table sorts the groups by count x (first
method - last method): the layers a step's difference between those two comes from. It leaves out what
every method runs alike (attention, norms, the layers no method adapts).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from filteratom_sd.core.fast_paths import TRAIN_PATHS
from filteratom_sd.core.layer import set_train_path

from benchmarks.harness import (
    METHODS,
    BenchSettings,
    MethodHarness,
    build_unet,
    decompose_if_needed,
    default_targets,
    make_inputs,
)
from benchmarks.repeats import pass_order


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd-v1-4", help='"sd-v1-4" (config, random weights), "tiny", or a UNet folder')
    parser.add_argument("--methods", default="C2,lora-r4", help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--train-path", choices=TRAIN_PATHS, default="auto")
    parser.add_argument("--reps", type=int, default=20, help="timed calls per layer and pass (after 3 warm-up calls)")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--cache-dir", default=None, help="decomposition cache (a temporary folder when not given)")
    return parser.parse_args(argv)


def layer_groups(unet: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[tuple, list[str]]:
    """(kind, weight shape, input shape) -> the target layers of that form, from one forward of the base UNet."""
    targets = set(default_targets(unet))
    seen: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            seen.setdefault(name, tuple(args[0].shape))
        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in unet.named_modules() if n in targets]
    with torch.no_grad():
        unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
    for hook in hooks:
        hook.remove()
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name in sorted(seen):
        module = unet.get_submodule(name)
        groups[(type(module).__name__, tuple(module.weight.shape), seen[name])].append(name)
    return dict(groups)


def call_seconds(layer: nn.Module, input_shape: tuple[int, ...], reps: int) -> float:
    """Median seconds of one forward + backward of `layer` on a random input that wants its gradient."""
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(0)).requires_grad_(True)

    def step() -> None:
        out = layer(x)
        out.backward(torch.full_like(out, 1e-3))

    for _ in range(3):
        step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(unet: nn.Module, settings: BenchSettings, method: str, groups: dict[tuple, list[str]],
            reps: int) -> dict[tuple, float]:
    """Seconds per call of one layer of each group, with `method` added ("base": the frozen layers alone)."""
    harness = MethodHarness(method, settings)
    harness.add(unet)
    set_train_path(unet, settings.train_path)
    unet.train()
    try:
        return {key: call_seconds(unet.get_submodule(names[0]), key[2], reps) for key, names in groups.items()}
    finally:
        harness.unload(unet)
        unet.eval()


def table(groups: dict[tuple, list[str]], times: dict[str, dict[tuple, float]], methods: list[str],
          first: str, last: str) -> str:
    """Markdown rows, largest count x (`first` - `last`) first, and the totals over all groups."""
    head = ["layer", "weight", "input", "count", *[f"{m} (ms)" for m in methods],
            f"count x ({first} - {last}) (ms)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]

    def gap(key: tuple) -> float:
        return len(groups[key]) * (times[first][key] - times[last][key])

    for key in sorted(groups, key=gap, reverse=True):
        cells = [key[0], "x".join(map(str, key[1])), "x".join(map(str, key[2])), str(len(groups[key]))]
        cells += [f"{times[m][key] * 1e3:.3f}" for m in methods] + [f"{gap(key) * 1e3:+.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    totals = [f"**{sum(len(groups[k]) * times[m][k] for k in groups) * 1e3:.1f}**" for m in methods]
    lines.append("| all | | | " + str(sum(map(len, groups.values()))) + " | " + " | ".join(totals)
                 + f" | **{sum(map(gap, groups)) * 1e3:+.1f}** |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    methods = ["base", *[m for m in args.methods.split(",") if m and m != "base"]]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        print(f"Error: unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}.", file=sys.stderr)
        return 2
    settings = BenchSettings(model=args.model, resolution=args.resolution, batch_size=args.batch_size,
                             device="cpu", train_path=args.train_path)
    with tempfile.TemporaryDirectory(prefix="fa-layers-") as tmp:
        cache_dir = Path(args.cache_dir or tmp)
        os.environ["FILTERATOM_SD_CACHE_DIR"] = str(cache_dir)
        unet = build_unet(settings, torch.device("cpu"))
        for method in methods:
            if MethodHarness(method, settings).kind == "filter-atoms":
                decompose_if_needed(unet, method, cache_dir)
        groups = layer_groups(unet, make_inputs(unet, settings, torch.device("cpu"), settings.batch_size))
        runs: dict[str, list[dict[tuple, Any]]] = defaultdict(list)
        for index in range(args.passes):
            for method in pass_order(methods, index):
                runs[method].append(measure(unet, settings, method, groups, args.reps))
                print(f"{method}: pass {index + 1} of {args.passes} done", file=sys.stderr, flush=True)
    times = {m: {k: statistics.median(run[k] for run in runs[m]) for k in groups} for m in methods}
    compared = methods[1:] if len(methods) > 2 else methods[::-1]  # two methods against each other, or one against base
    print(table(groups, times, methods[1:] + ["base"], compared[0], compared[-1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
