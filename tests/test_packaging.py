"""A built wheel carries its shipped data: installed into a fresh folder, it trains and samples from anywhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CASTLE = ROOT / "assets" / "concepts" / "castle"


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the package source (no stale build/ folder of the checkout involved)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "filteratom_sd", source / "filteratom_sd", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-q",
         "-w", str(out), str(source)], cwd=source)
    (found,) = out.glob("filteratom_sd-*.whl")
    return found


def test_the_wheel_holds_the_shipped_data_and_no_dev_tooling(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in ("filteratom_sd/resources/configs/training/tiny.yaml",
                    "filteratom_sd/resources/configs/training/tiny-prompt-preserving.yaml",
                    "filteratom_sd/resources/configs/eval/dreambooth.yaml",
                    "filteratom_sd/resources/configs/prompt_templates.yaml",
                    "filteratom_sd/resources/configs/models/sd-v1-4-unet.json",
                    "filteratom_sd/resources/tiny-sd/model_index.json",
                    "filteratom_sd/resources/tiny-sd/unet/diffusion_pytorch_model.safetensors",
                    "filteratom_sd/resources/tiny-sd/text_encoder/model.safetensors",
                    "filteratom_sd/resources/tiny-sd/tokenizer/tokenizer.json"):
        assert shipped in names, shipped
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "scripts/", "assets/"))]


def test_an_installed_wheel_trains_and_samples_outside_the_repository(wheel, tmp_path):
    site = tmp_path / "site"
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir", "-q", "--target", str(site),
         str(wheel)], cwd=tmp_path)
    work = tmp_path / "elsewhere"
    shutil.copytree(CASTLE, work / "castle-photos")
    # the installed copy comes first; dependencies come from this environment
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    where = run([sys.executable, "-c", "import filteratom_sd; print(filteratom_sd.__file__)"], work, env)
    assert Path(where.stdout.strip()).is_relative_to(site)
    fa_sd = [sys.executable, "-c", "from filteratom_sd.cli import main; main()"]
    (work / "fast.yaml").write_text("validation_steps: 2\nmonitor: false\n")
    run(fa_sd + ["train", "--concept", "castle", "--images", "castle-photos", "--steps", "2", "--batch-size", "1",
                 "--config", "fast.yaml", "--quiet"], work, env)
    adapter = work / "outputs" / "castle" / "castle.safetensors"
    assert adapter.is_file()
    sampled = run(fa_sd + ["sample", "--adapter", str(adapter), "--prompt", "a <castle>", "--steps", "2",
                           "--out", "samples"], work, env)
    assert [Path(line).name for line in sampled.stdout.split()] == ["00-a-castle-0.png"]
    assert (work / "samples" / "00-a-castle-0.png").is_file()
