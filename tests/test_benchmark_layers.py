"""The per-layer benchmark on the bundled tiny UNet: every target layer in exactly one group, and a table whose
rows and totals are the measured times, sorted by where the two compared methods differ most."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.harness import BenchSettings, build_unet, default_targets, make_inputs
from benchmarks.layers import layer_groups, table

ROOT = Path(__file__).resolve().parent.parent


def test_every_target_layer_falls_in_one_group_of_its_own_shapes():
    settings = BenchSettings(model="tiny", resolution=32, batch_size=3)
    unet = build_unet(settings, torch.device("cpu"))
    groups = layer_groups(unet, make_inputs(unet, settings, torch.device("cpu"), 3))
    names = [n for members in groups.values() for n in members]
    assert sorted(names) == sorted(default_targets(unet))
    for (kind, weight, inputs), members in groups.items():
        for name in members:
            module = unet.get_submodule(name)
            assert type(module).__name__ == kind and tuple(module.weight.shape) == weight
        assert inputs[0] == 3  # the batch
        assert inputs[1 if kind == "Conv2d" else -1] == weight[1]  # the layer's input channels


def test_the_table_sorts_by_count_times_the_difference_and_sums_every_group():
    groups = {("Linear", (8, 4), (1, 2, 4)): ["a", "b", "c"], ("Conv2d", (8, 4, 3, 3), (1, 4, 2, 2)): ["d"]}
    lin, conv = groups
    times = {"C2": {lin: 0.002, conv: 0.010}, "lora-r4": {lin: 0.001, conv: 0.004}, "base": {lin: 0.0005, conv: 0.003}}
    lines = table(groups, times, ["C2", "lora-r4", "base"], "C2", "lora-r4").splitlines()
    assert lines[2].startswith("| Conv2d | 8x4x3x3 | 1x4x2x2 | 1 | 10.000 | 4.000 | 3.000 | +6.00 |")
    assert lines[3].startswith("| Linear | 8x4 | 1x2x4 | 3 | 2.000 | 1.000 | 0.500 | +3.00 |")
    # totals: 3 x 2 + 10 = 16 ms, 3 x 1 + 4 = 7 ms, 3 x 0.5 + 3 = 4.5 ms; the gap 9 ms
    assert lines[4] == "| all | | | 4 | **16.0** | **7.0** | **4.5** | **+9.0** |"


def test_script_prints_a_row_per_group_and_refuses_unknown_methods():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.layers", "--model", "tiny", "--resolution", "32",
                           "--methods", "C1,lora-r4", "--passes", "1", "--reps", "1"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| layer | weight | input | count | C1 (ms) | lora-r4 (ms) | base (ms) |")
    assert rows[-1].startswith("| all | | | 119 |")  # the bundled UNet's 119 target layers
    assert all(float(cell) > 0 for row in rows[1:-1] for cell in row.split("|")[5:8])
    bad = subprocess.run([sys.executable, "-m", "benchmarks.layers", "--methods", "C9"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("Error: unknown method(s) C9")
