"""Filter atoms vs peft's LoRA (and LieRA) on one UNet: step time, memory, file size, load, sampling.

    python -m benchmarks.run --model sd-v1-4 --resolution 64 --json bench.json
    python -m benchmarks.run --model sd-v1-4 --decomposition          # whole-UNet decomposition time
    python -m benchmarks.run --model tiny --resolution 64              # the bundled tiny UNet
    python -m benchmarks.run --resolution 512 --dtype fp16 --gradient-checkpointing   # on a GPU
    python -m benchmarks.run --resolution 512 --dtype bf16 --batch-size 4 --compile --methods base,C2,lora-r4
    python -m benchmarks.run --methods C2,lora-r4 --repeat 3      # alternating passes: medians, per-pass ratios

Run it from the repository root (the harness is `benchmarks/harness.py`, not part of the installed package).

Each method runs in a fresh Python process (peaks never mix); the report is JSON (--json) plus a
markdown table on stdout (see docs/performance.md for what each column means).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

from filteratom_sd.core.fast_paths import TRAIN_PATHS
from filteratom_sd.training.settings import COMPILE_MODES

from benchmarks.harness import (
    ATTENTION,
    DTYPES,
    METHODS,
    BenchSettings,
    device_info,
    markdown_table,
    measure_decomposition,
    measure_method,
    resolve_device,
    settings_dict,
)
from benchmarks.repeats import median_result, pass_order, spread_table


REPO_ROOT = Path(__file__).resolve().parent.parent  # workers run `-m benchmarks.run` from here
MMAP_THRESHOLD = 4 * 2**30  # bytes: above the largest temporaries (SD v1.4 attention scores at 512 px: ~1 GB)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd-v1-4", help='"sd-v1-4" (config, random weights), "tiny", or a UNet folder')
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--attention", choices=ATTENTION, default="sdpa")
    parser.add_argument("--device", default="auto", help='"auto", "cpu", "cuda", "cuda:1", ...')
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--sample-steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=1,
                        help="passes over the methods, alternating their order; medians and per-pass ratios reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--channels-last", action="store_true", help="GPU only")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="GPU only")
    parser.add_argument("--train-path", choices=TRAIN_PATHS, default="auto",
                        help="adapted layers' training path: through the activations, the weight, or the cheaper (ablation)")
    parser.add_argument("--recompute-weights", action="store_true",
                        help="rebuild each effective weight in the backward instead of keeping it (on with --gradient-checkpointing)")
    parser.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                        help="torch.compile the UNet for the training steps (inductor; optional MODE, e.g. reduce-overhead)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of one training step")
    parser.add_argument("--cache-dir", default=None, help="decomposition cache (default: a fresh temporary folder)")
    parser.add_argument("--decomposition", action="store_true", help="time the whole-UNet decomposition instead")
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc's mmap threshold alone (default: raise it in every worker, see docs/performance.md)")
    parser.add_argument("--json", type=Path, default=None, help="write the full report here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace, work_dir: str | None = None) -> BenchSettings:
    names = {f.name for f in fields(BenchSettings)}
    values = {k: v for k, v in vars(args).items() if k in names}
    return BenchSettings(**values, work_dir=work_dir)


def worker_command(args: argparse.Namespace, method: str, result: Path, cache_dir: str) -> list[str]:
    argv = [sys.executable, "-m", "benchmarks.run", "--worker", method, "--result", str(result)]
    for key, value in vars(args).items():
        if key in ("worker", "result", "json", "methods", "decomposition", "cache_dir", "system_malloc", "repeat") \
                or value in (None, False):
            continue
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv + ["--cache-dir", cache_dir]


def worker_env(args: argparse.Namespace) -> dict[str, str]:
    """Every worker gets the same allocator behaviour, so no method's numbers depend on what ran before it."""
    env = dict(os.environ)
    if not args.system_malloc:
        # glibc mmaps large temporaries and page-faults them on every call unless earlier frees raised its
        # threshold: a fixed high threshold removes that (CPU sampling 0.9 s -> 0.4 s on SD v1.4 at 64 px).
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    return env


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        settings = settings_from(args, work_dir=str(args.result.parent))
        args.result.write_text(json.dumps(measure_method(args.worker, settings)))
        return 0
    settings = settings_from(args)
    if args.decomposition:
        report = {"settings": settings_dict(settings), "decomposition": measure_decomposition(settings)}
        text = json.dumps(report, indent=2)
        print(text)
        if args.json:
            args.json.write_text(text + "\n")
        return 0
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        print(f"Error: unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}.", file=sys.stderr)
        return 2
    if args.repeat < 1:
        print(f"Error: --repeat must be at least 1, got {args.repeat}.", file=sys.stderr)
        return 2
    results: dict[str, dict] = {}
    passes: list[dict[str, dict]] = []
    report = {
        "settings": {**settings_dict(settings), "malloc_mmap_threshold": None if args.system_malloc else MMAP_THRESHOLD},
        "device": device_info(resolve_device(settings.device)),
        "methods": results,
        "table": markdown_table(results),
    }
    with tempfile.TemporaryDirectory(prefix="fa-bench-") as tmp:
        cache_dir = args.cache_dir or str(Path(tmp) / "decompositions")
        for index in range(args.repeat):
            passes.append({})
            for method in pass_order(methods, index):
                passes[-1][method] = _run_worker(args, method, Path(tmp) / f"{method}-{index}", cache_dir)
                print(f"{method}: done" + (f" (pass {index + 1} of {args.repeat})" if args.repeat > 1 else ""),
                      file=sys.stderr, flush=True)
                for name in methods:  # the table keeps the methods' order; medians over the passes so far
                    runs = [p[name] for p in passes if name in p]
                    if runs:
                        results[name] = runs[0] if args.repeat == 1 else median_result(runs)
                report["table"] = markdown_table(results)
                if args.repeat > 1:
                    report["passes"] = passes
                    report["spread"] = spread_table(passes)
                if args.json:  # after every method, so a run cut short still leaves what it measured
                    args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.repeat > 1:
        print(report["spread"] + "\n")
    print(report["table"])
    return 0


def _run_worker(args: argparse.Namespace, method: str, work: Path, cache_dir: str) -> dict:
    """One method measured in a fresh process: its result, or {"error": ...} with the worker's last line."""
    work.mkdir()
    result = work / "result.json"
    proc = subprocess.run(worker_command(args, method, result, cache_dir), capture_output=True, text=True,
                          env=worker_env(args), cwd=REPO_ROOT)
    if proc.returncode != 0 or not result.is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"failed: {last}"}
    measured = json.loads(result.read_text())
    if "profile" in measured:
        print(f"{method}: one training step\n{measured['profile']}", file=sys.stderr)
    return measured


if __name__ == "__main__":
    sys.exit(main())
