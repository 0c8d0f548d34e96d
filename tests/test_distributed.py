"""Data-parallel training under `accelerate launch --num_processes 2` on the CPU (gloo); only the main process writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from filteratom_sd.core.adapter_file import read_adapter

from .train_helpers import CASTLE


def _fa_sd_script() -> Path:
    return Path(sys.executable).with_name("fa-sd")


@pytest.mark.skipif(not _fa_sd_script().is_file(), reason="the fa-sd console script is not installed beside python")
def test_two_cpu_processes_train_one_adapter(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", str(_fa_sd_script()),
               "train", "--concept", "castle", "--images", str(CASTLE), "--steps", "3", "--batch-size", "1",
               "--checkpoint-every", "2", "--output-dir", str(out), "--quiet",
               "--train-token", "--token-init", "square"]  # the token's gradient is averaged apart from DDP's
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "castle.safetensors", "checkpoints", "logs",
                                                     "monitor", "monitor.json", "samples", "training_config.yaml"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    assert len(list((out / "logs").iterdir())) == 1, "a second process wrote TensorBoard logs"
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*"))
    adapter = read_adapter(out / "castle.safetensors")
    assert adapter.num_parameters > 0 and any(t.abs().sum() > 0 for t in adapter.tensors.values())
    assert adapter.token_embedding is not None
