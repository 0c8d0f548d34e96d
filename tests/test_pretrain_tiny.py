"""scripts/pretrain_tiny.py in miniature: seeded, and a run cut into pieces equals an uninterrupted one."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--vae-steps", "3", "--vae-batch-size", "2", "--dataset-size", "6", "--unet-steps", "3", "--batch-size", "2",
        "--checkpoint-every", "100", "--eval-prompts", "0"]
WEIGHTS = ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
           "text_encoder/model.safetensors"]


@pytest.fixture(scope="module")
def pretrain():
    spec = importlib.util.spec_from_file_location("pretrain_tiny_under_test", ROOT / "scripts" / "pretrain_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(pretrain, monkeypatch, work: Path, out: Path, *extra: str) -> None:
    monkeypatch.setattr(sys, "argv", ["pretrain_tiny.py", *TINY, "--work-dir", str(work), "--out", str(out), *extra])
    pretrain.main()


def test_interrupted_run_resumes_to_the_same_weights(pretrain, monkeypatch, tmp_path):
    _run(pretrain, monkeypatch, tmp_path / "w1", tmp_path / "a")
    pieces = 0
    while not (tmp_path / "b" / "model_index.json").exists():
        _run(pretrain, monkeypatch, tmp_path / "w2", tmp_path / "b", "--max-steps-this-run", "2")
        pieces += 1
        assert pieces < 10
    assert pieces == 3  # stops in the VAE stage (2/3), then in the UNet stage (1/3), then finishes
    for name in WEIGHTS:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "tokenizer" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer" / "tokenizer.json").read_text()


def test_other_seed_gives_other_weights_and_a_work_dir_keeps_its_settings(pretrain, monkeypatch, tmp_path):
    _run(pretrain, monkeypatch, tmp_path / "w1", tmp_path / "a")
    _run(pretrain, monkeypatch, tmp_path / "w2", tmp_path / "b", "--seed", "1")
    assert (tmp_path / "a" / WEIGHTS[0]).read_bytes() != (tmp_path / "b" / WEIGHTS[0]).read_bytes()
    with pytest.raises(SystemExit, match="different seed"):
        _run(pretrain, monkeypatch, tmp_path / "w1", tmp_path / "c", "--seed", "1")
