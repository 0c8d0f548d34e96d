"""The benchmark's measurements on the bundled tiny UNet: consistent numbers, real files, a table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.harness import BenchSettings, markdown_table, measure_method

ROOT = Path(__file__).resolve().parent.parent
QUICK = dict(model="tiny", resolution=32, train_steps=1, sample_steps=1, warmup=1, rounds=1, threads=1)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    out = {}
    for method in ("base", "C1", "lora-r4"):
        work = tmp_path_factory.mktemp(method)
        out[method] = measure_method(method, BenchSettings(**QUICK, work_dir=str(work)))
        out[method]["work"] = str(work)
    return out


def test_trainable_counts_and_optimizer_state_match_the_methods(results):
    assert results["base"]["trainable_params"] == 0 and results["base"]["optimizer_state_bytes"] == 0
    for method in ("C1", "lora-r4"):
        r = results[method]
        # AdamW keeps two fp32 moments per trainable parameter
        assert r["optimizer_state_bytes"] == 2 * 4 * r["trainable_params"] > 0
    # peft's LoRA r=4 on the same targets: r * (in + out) per target, far above C1's atoms
    assert results["lora-r4"]["trainable_params"] > 5 * results["C1"]["trainable_params"]


def test_adapter_file_size_is_the_written_file(results):
    for method in ("C1", "lora-r4"):
        r = results[method]
        written = Path(r["work"]) / f"{method}.safetensors"
        assert r["adapter_file_bytes"] == written.stat().st_size
        # fp32 parameters dominate the file
        assert r["adapter_file_bytes"] >= 4 * r["trainable_params"]


def test_every_timing_is_positive_and_the_table_has_a_row_per_method(results):
    for method in ("C1", "lora-r4"):
        r = results[method]
        for key in ("train_step_s", "sample_base_s", "sample_unfused_s", "sample_fused_s", "load_fuse_s",
                    "load_merge_s"):
            assert r[key] > 0, key
        assert r["peak_train_bytes"] > 0
    table = markdown_table({k: v for k, v in results.items()}).splitlines()
    assert [line.split("|")[1].strip() for line in table[2:]] == ["base", "C1", "lora-r4"]
    assert "1.00×" in table[2]  # the floor against itself


def test_script_reports_unknown_methods_as_an_error():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--methods", "C9"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("Error: unknown method(s) C9")


def test_script_writes_json_and_table(tmp_path):
    report = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--model", "tiny",
                           "--methods", "C1", "--resolution", "32", "--train-steps", "1", "--sample-steps", "1",
                           "--rounds", "1", "--threads", "1", "--json", str(report)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    assert data["methods"]["C1"]["trainable_params"] == 10_248 and "error" not in data["methods"]["C1"]
    assert data["table"] in proc.stdout
