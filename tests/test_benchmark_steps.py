"""The in-process step benchmark: per-round ratios to the last method, and a run on the bundled UNet with the
per-layer A/B of grouped builds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmarks.steps import ratio_table

ROOT = Path(__file__).resolve().parent.parent


def test_ratios_are_taken_round_by_round_against_the_last_method():
    times = {"C2": [2.0, 1.0, 3.0, 4.0, 1.0], "lora-r4": [1.0, 1.0, 2.0, 2.0, 4.0]}
    lines = ratio_table(times).splitlines()
    # C2's ratios per round: 2, 1, 1.5, 2, 0.25 -> median 1.5, quartiles (inclusive) 1 and 2; median step 2.0
    assert lines[2] == "| C2 | 2.0000 | 1.500 | 1.000-2.000 |"
    assert lines[3] == "| lora-r4 | 2.0000 | 1.000 | 1.000-1.000 |"


def test_script_prints_a_row_per_method_and_refuses_unknown_ones():
    command = [sys.executable, "-m", "benchmarks.steps", "--model", "tiny", "--resolution", "32", "--rounds", "2"]
    proc = subprocess.run([*command, "--methods", "C2,C2:per-layer,lora-r4"], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split(" | ")[0] for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert rows == ["| method", "| C2", "| C2:per-layer", "| lora-r4"]
    for methods in ("C2,lora-r4:per-layer", "C9,lora-r4"):
        proc = subprocess.run([*command, "--methods", methods], capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert proc.returncode == 2 and proc.stderr.startswith("Error: ") and len(proc.stderr.splitlines()) == 1
