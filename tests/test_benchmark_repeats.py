"""Repeated benchmark passes: medians, per-pass ratios and the alternating order, on made-up results."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.repeats import median_result, pass_order, ratios, spread_table

ROOT = Path(__file__).resolve().parent.parent

# Two passes where the machine ran 30 % slower during the second: each method's ratio stays put within a pass.
PASSES = [
    {"C2": {"train_step_s": 1.0, "peak_train_bytes": 100, "sample_unfused_s": 1.1, "sample_base_s": 1.0},
     "lora-r4": {"train_step_s": 1.25, "peak_train_bytes": 100, "sample_unfused_s": 1.5, "sample_base_s": 1.0}},
    {"lora-r4": {"train_step_s": 1.625, "peak_train_bytes": 104, "sample_unfused_s": 2.6, "sample_base_s": 2.0},
     "C2": {"train_step_s": 1.3, "peak_train_bytes": 102, "sample_unfused_s": 2.4, "sample_base_s": 2.0}},
]


def test_passes_alternate_the_method_order():
    methods = ["C1", "C2", "lora-r4"]
    assert pass_order(methods, 0) == methods
    assert pass_order(methods, 1) == ["lora-r4", "C2", "C1"]
    assert pass_order(methods, 2) == methods


def test_a_methods_result_is_the_median_of_its_runs():
    runs = [{"train_step_s": 3.0, "trainable_params": 10, "peak_train_bytes": 7, "label": "a"},
            {"error": "failed: out of memory"},
            {"train_step_s": 1.0, "trainable_params": 10, "peak_train_bytes": 8, "label": "b"}]
    merged = median_result(runs)
    assert merged["train_step_s"] == 2.0  # the mean of the two middle floats
    assert merged["peak_train_bytes"] == 7 and isinstance(merged["peak_train_bytes"], int)  # a measured value
    assert merged["trainable_params"] == 10 and merged["label"] == "a" and merged["passes"] == 2
    assert median_result([{"error": "failed: x"}]) == {"error": "failed: x"}


def test_ratios_pair_each_pass_with_lora_or_with_the_runs_own_base():
    assert ratios(PASSES, "C2", "train_step_s", None) == pytest.approx([0.8, 0.8])
    assert ratios(PASSES, "C2", "peak_train_bytes", None) == pytest.approx([1.0, 102 / 104])
    assert ratios(PASSES, "C2", "sample_unfused_s", "sample_base_s") == pytest.approx([1.1, 1.2])
    # a pass where a method failed gives no ratio
    failed = PASSES + [{"C2": {"error": "failed: x"}, "lora-r4": {"train_step_s": 1.0}}]
    assert ratios(failed, "C2", "train_step_s", None) == pytest.approx([0.8, 0.8])


def test_the_spread_table_has_the_median_and_range_per_method():
    table = spread_table(PASSES).splitlines()
    assert [line.split("|")[1].strip() for line in table[2:]] == ["C2", "lora-r4"]
    c2 = [cell.strip() for cell in table[2].split("|")[2:-1]]
    assert c2[0] == "0.80× (0.80–0.80, 2)"  # the second pass's slower machine does not move it
    assert c2[3] == "1.15× (1.10–1.20, 2)"
    assert c2[2] == "–"  # no load + merge measured


def test_a_repeat_below_one_is_an_error():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--methods", "C1", "--repeat", "0"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "Error: --repeat must be at least 1, got 0."
