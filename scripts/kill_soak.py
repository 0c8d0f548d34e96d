"""Random-kill soak: kill `fa-sd train` with SIGKILL again and again, resume each time, compare with an uninterrupted run.

Half of the kills come at a random moment of the run (start-up, training, saving, sampling), the other half
the moment a write is under way (a checkpoint folder or an atomic file still under its temporary name).
After every kill the run folder must hold only complete checkpoints and a readable adapter (if any);
at the end the adapter must equal, byte for byte, the adapter of the same run never interrupted.

    .venv/bin/python scripts/kill_soak.py --kills 20            # by hand (minutes)
    .venv/bin/python scripts/kill_soak.py --kills 3 --steps 8   # the size the tests run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONCEPT = "castle"
_TEMPORARY = re.compile(r"^\..+\.tmp$")


def fa_sd() -> str:
    """The fa-sd console script beside this Python (a virtual environment), else the one on PATH."""
    beside = Path(sys.executable).with_name("fa-sd")
    return str(beside) if beside.is_file() else shutil.which("fa-sd") or "fa-sd"


def train_command(out: Path, args: argparse.Namespace, *extra: str) -> list[str]:
    """One small training run on the bundled castle images."""
    return [fa_sd(), "train", "--concept", CONCEPT, "--images", str(ROOT / "assets" / "concepts" / CONCEPT),
            "--output-dir", str(out), "--steps", str(args.steps), "--batch-size", "2",
            "--checkpoint-every", str(args.checkpoint_every), "--validation-every", "10000",
            "--seed", str(args.seed), "--quiet", *extra]


def same_adapter(a: Path, b: Path) -> bool:
    """Whether two adapter files are byte-identical."""
    return a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()


def writes_under_way(out: Path) -> set[str]:
    """Temporary names present now: writes that have started and not yet been renamed."""
    found = set()
    for folder in (out, out / "checkpoints", out / "samples"):
        try:
            found.update(str(folder / e.name) for e in os.scandir(folder) if _TEMPORARY.match(e.name))
        except OSError:
            continue
    return found


def check_folder(out: Path) -> list[str]:
    """Problems a kill must never cause: a checkpoint or adapter under its final name that does not load."""
    from safetensors.torch import load_file

    from filteratom_sd import read_adapter

    problems = []
    for checkpoint in sorted((out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() else []:
        try:
            load_file(str(checkpoint / "params.safetensors"))
            json.loads((checkpoint / "state.json").read_text())
        except Exception as exc:  # any failure to load is the finding
            problems.append(f"{checkpoint.name}: {type(exc).__name__}: {exc}")
    adapter = out / f"{CONCEPT}.safetensors"
    if adapter.exists():
        try:
            read_adapter(adapter)
        except Exception as exc:  # any failure to read is the finding
            problems.append(f"{adapter.name}: {type(exc).__name__}: {exc}")
    return problems


def has_checkpoint(out: Path) -> bool:
    """Whether a complete checkpoint exists to resume from."""
    return bool(list(out.glob("checkpoints/step-*/state.json")))


def next_command(out: Path, args: argparse.Namespace) -> list[str]:
    """What a user would run next: --resume with a checkpoint, --overwrite with a run folder and none, else a fresh run."""
    if has_checkpoint(out):
        return train_command(out, args, "--resume")
    return train_command(out, args, "--overwrite") if out.exists() else train_command(out, args)


def kill_at_random(process: subprocess.Popen, out: Path, rng: random.Random, duration: float,
                   writes_left: int) -> str | None:
    """Kill at a uniform random moment of a typical run; None if the run ended first."""
    try:
        process.wait(timeout=rng.uniform(0.0, duration))
        return None
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        return "random moment"


def kill_in_a_write(process: subprocess.Popen, out: Path, rng: random.Random, duration: float,
                    writes_left: int) -> str | None:
    """Kill while a write is under way: the adapter's (one time in three), else the n-th write, n random in what
    the run has left to write; None if the run ended first."""
    adapter_only = rng.random() < 1 / 3
    wanted, seen, old = 1 if adapter_only else rng.randint(1, max(1, writes_left)), set(), writes_under_way(out)
    deadline = time.time() + 3 * duration
    while process.poll() is None and time.time() < deadline:
        now = {p for p in writes_under_way(out) - old if not adapter_only or Path(p).name.startswith(f".{CONCEPT}.")}
        seen |= now
        if now and len(seen) >= wanted:
            process.send_signal(signal.SIGKILL)
            return f"during write {len(seen)} ({Path(sorted(now)[0]).name})"
        time.sleep(0.0005)
    return None


def writes_left(out: Path, args: argparse.Namespace) -> int:
    """About how many writes a resumed run has ahead: its settings, its checkpoints, the adapter and the card."""
    done = [int(p.parent.name.split("-")[1]) for p in out.glob("checkpoints/step-*/state.json")]
    return (args.steps - max(done, default=0)) // args.checkpoint_every + 3


def soak(args: argparse.Namespace) -> dict:
    """Run the soak; returns the report."""
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    reference, out = work / "reference", work / "killed"
    for folder in (reference, out):
        shutil.rmtree(folder, ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    rng = random.Random(args.seed)
    started = time.time()
    whole = subprocess.Popen(train_command(reference, args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    duration, whole_seconds = args.duration, None
    events, problems, attempts = [], [], 0
    while len(events) < args.kills:
        attempts += 1
        if whole.poll() is not None and whole_seconds is None:
            whole_seconds = time.time() - started
            duration = max(duration, whole_seconds)
        command, ahead, before = next_command(out, args), writes_left(out, args), writes_under_way(out)
        begun = time.time()
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        mode = kill_at_random if len(events) % 2 == 0 else kill_in_a_write
        how = mode(process, out, rng, duration, ahead)
        _, err = process.communicate()
        if how is None:
            if process.returncode != 0:
                problems.append(f"attempt {attempts} failed: {err.decode(errors='replace').strip()[-500:]}")
                break
            duration = max(duration, time.time() - begun)
            continue
        found = check_folder(out)
        problems += [f"after kill {len(events) + 1}: {p}" for p in found]
        events.append({"kill": len(events) + 1, "how": how, "after_s": round(time.time() - begun, 2),
                       "resumed_with": command[-1] if command[-1] in ("--resume", "--overwrite") else "",
                       "checkpoints": sorted(p.parent.name for p in out.glob("checkpoints/step-*/state.json")),
                       "left_temporary_files": sorted(Path(p).name for p in writes_under_way(out) - before)})
    final = subprocess.run(next_command(out, args), env=env, capture_output=True, text=True)
    if final.returncode != 0:
        problems.append(f"the final resume failed: {final.stderr.strip()[-500:]}")
    _, whole_err = whole.communicate()
    if whole.returncode != 0:
        problems.append(f"the uninterrupted run failed: {whole_err.decode(errors='replace').strip()[-500:]}")
    leftovers = sorted(p.name for p in out.rglob(".*"))
    if leftovers:
        problems.append(f"hidden files left after the final run: {leftovers}")
    identical = same_adapter(out / f"{CONCEPT}.safetensors", reference / f"{CONCEPT}.safetensors")
    return {"kills": len(events), "attempts": attempts + 1, "steps": args.steps, "seed": args.seed,
            "kills_inside_writes": sum(bool(e["left_temporary_files"]) for e in events),
            "identical": identical, "problems": problems, "seconds": round(time.time() - started, 1), "events": events}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs before the run may finish (default 20).")
    parser.add_argument("--steps", type=int, default=24, help="Training steps of the run (default 24).")
    parser.add_argument("--checkpoint-every", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the kill moments and of the training run.")
    parser.add_argument("--duration", type=float, default=15.0,
                        help="Seconds a run is first assumed to take; random kills fall in [0, this] (grows when a run finishes).")
    parser.add_argument("--work-dir", default=None, help="Where the two runs go (default: a temporary folder).")
    args = parser.parse_args()
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="fa-sd-soak-")
    report = soak(args)
    (Path(args.work_dir) / "soak.json").write_text(json.dumps(report, indent=2))
    for event in report["events"]:
        print(f"kill {event['kill']:2d} {event['how']:40s} after {event['after_s']:5.1f} s, "
              f"checkpoints {','.join(c[-3:] for c in event['checkpoints']) or '-'}, "
              f"left {len(event['left_temporary_files'])} temporary")
    print(f"{report['kills']} kills ({report['kills_inside_writes']} inside writes) in {report['attempts']} attempts, "
          f"{report['seconds']} s; final adapter identical to the uninterrupted run: {report['identical']}")
    for problem in report["problems"]:
        print(f"PROBLEM: {problem}")
    return 0 if report["identical"] and not report["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
