"""The fa-sd command line: every command runs, and user mistakes end in one `Error:` line, exit 2, nothing written."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from filteratom_sd.cli import main
from filteratom_sd.models import load_pipeline
from filteratom_sd.training.loop import train

from .train_helpers import CASTLE, quick_settings


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """Run `fa-sd ARGS` in this process; returns (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["fa-sd", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(result: tuple[int, str, str], fragment: str) -> None:
    code, _, err = result
    lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert code == 2, err
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """An adapter trained for a few steps on the bundled model."""
    out = tmp_path_factory.mktemp("cli") / "castle"
    return train(quick_settings(out, lr=5e-2), progress=False).adapter_path


def _folder_with(tmp_path, files: dict[str, bytes]):
    folder = tmp_path / "images"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize("case, extra, fragment", [
    ("missing folder", ["--images", "{tmp}/nowhere"], "does not exist"),
    ("empty folder", ["--images", "{empty}"], "holds no .jpg, .png, .webp or .gif"),
    ("only corrupt images", ["--images", "{corrupt}"], "could be read"),
    ("unknown preset", ["--preset", "C9"], "C9"),
    ("unknown method", ["--method", "dora"], "Unknown method 'dora'"),
    ("zero steps", ["--steps", "0"], "--steps must be a positive integer"),
    ("negative lr", ["--lr", "-1"], "--lr must be positive"),
    ("resolution not a multiple of 8", ["--resolution", "63"], "multiple of 8"),
    ("bad mixed precision", ["--mixed-precision", "fp8"], "fp8"),
    ("bad method option", ["--method-option", "rank"], "key=value"),
    ("missing config file", ["--config", "{tmp}/none.yaml"], "Cannot read the config file"),
    ("unknown setting in config", ["--config", "{badconfig}"], "Unknown training setting(s): 'stepz'"),
])
def test_train_user_mistakes(tmp_path, monkeypatch, capsys, case, extra, fragment):
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = _folder_with(tmp_path, {"a.png": b"not a png", "b.jpg": b"\xff\xd8 truncated"})
    badconfig = tmp_path / "bad.yaml"
    badconfig.write_text("stepz: 3\n")
    out = tmp_path / "out"
    args = ["train", "--concept", "castle", "--images", str(CASTLE), "--output-dir", str(out), "--steps", "2", "--quiet"]
    args += [a.format(tmp=tmp_path, empty=empty, corrupt=corrupt, badconfig=badconfig) for a in extra]
    assert_user_error(run_cli(args, monkeypatch, capsys), fragment)
    assert not out.exists(), f"{case}: the output folder was created"


def test_train_refuses_another_concepts_run(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "training_config.yaml").write_text("concept: tower\n")
    args = ["train", "--concept", "castle", "--images", str(CASTLE), "--output-dir", str(out), "--steps", "2"]
    assert_user_error(run_cli(args, monkeypatch, capsys), "'tower'")
    assert_user_error(run_cli([*args, "--resume"], monkeypatch, capsys), "not 'castle'")
    assert sorted(p.name for p in out.iterdir()) == ["training_config.yaml"]
    assert (out / "training_config.yaml").read_text() == "concept: tower\n"


def test_train_through_the_cli_writes_the_adapter(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(["train", "--concept", "castle", "--images", str(CASTLE), "--output-dir", str(out),
                                 "--steps", "2", "--batch-size", "1", "--quiet", "--token", "<ksk>"],
                                monkeypatch, capsys)
    assert code == 0, err
    assert "Adapter:" in stdout and (out / "castle.safetensors").is_file()
    code, stdout, _ = run_cli(["inspect", str(out / "castle.safetensors"), "--json"], monkeypatch, capsys)
    assert code == 0 and json.loads(stdout)["token"] == "<ksk>"


def test_sample_with_and_without_an_adapter(adapter, tmp_path, monkeypatch, capsys):
    base_dir, tuned_dir = tmp_path / "base", tmp_path / "tuned"
    common = ["sample", "--prompt", "a <castle>", "--prompt", "a red star on a blue background", "-n", "2",
              "--steps", "2", "--seed", "5"]
    code, stdout, err = run_cli([*common, "--out", str(base_dir)], monkeypatch, capsys)
    assert code == 0, err
    code, stdout, err = run_cli([*common, "--out", str(tuned_dir), "--adapter", str(adapter), "--grid"],
                                monkeypatch, capsys)
    assert code == 0, err
    written = sorted(p.name for p in tuned_dir.iterdir())
    assert written == ["00-a-castle-0.png", "00-a-castle-1.png", "00-a-castle-grid.png",
                       "01-a-red-star-on-a-blue-background-0.png", "01-a-red-star-on-a-blue-background-1.png",
                       "01-a-red-star-on-a-blue-background-grid.png"]
    assert len(stdout.splitlines()) == 6
    assert (base_dir / "00-a-castle-0.png").read_bytes() != (tuned_dir / "00-a-castle-0.png").read_bytes()


def test_sample_fused_matches_unfused(adapter, tmp_path, monkeypatch, capsys):
    import numpy as np
    from PIL import Image

    args = ["sample", "--prompt", "a <castle>", "--steps", "2", "--adapter", str(adapter)]
    assert run_cli([*args, "--out", str(tmp_path / "a")], monkeypatch, capsys)[0] == 0
    assert run_cli([*args, "--out", str(tmp_path / "b"), "--fuse"], monkeypatch, capsys)[0] == 0
    a = np.asarray(Image.open(tmp_path / "a" / "00-a-castle-0.png"), dtype=int)
    b = np.asarray(Image.open(tmp_path / "b" / "00-a-castle-0.png"), dtype=int)
    assert abs(a - b).max() <= 2  # fp32 rounding of W + dW vs the unfused sum


def test_sample_batches_keep_each_image_of_its_seed(adapter, tmp_path, monkeypatch, capsys):
    import numpy as np
    from PIL import Image

    args = ["sample", "--prompt", "a <castle>", "--steps", "2", "--adapter", str(adapter), "-n", "3", "--seed", "4"]
    assert run_cli([*args, "--out", str(tmp_path / "batched"), "--batch-size", "2"], monkeypatch, capsys)[0] == 0
    for n in range(3):  # image n is the one a call with --seed 4+n draws alone
        single = tmp_path / f"single-{n}"
        assert run_cli([*args[:-4], "--seed", str(4 + n), "--out", str(single)], monkeypatch, capsys)[0] == 0
        a = np.asarray(Image.open(tmp_path / "batched" / f"00-a-castle-{n}.png"), dtype=int)
        b = np.asarray(Image.open(single / "00-a-castle-0.png"), dtype=int)
        assert abs(a - b).max() <= 1  # batched GEMMs round differently, never by more than a level


def test_sample_user_mistakes(adapter, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"\x00" * 64)
    cases = [
        (["--adapter", str(adapter)], "at least one --prompt"),
        (["--prompt", "x", "--adapter", str(tmp_path / "missing.safetensors")], "No adapter file"),
        (["--prompt", "x", "--adapter", str(bogus)], "bogus.safetensors"),
        (["--prompt", "x", "--adapter", str(adapter), "--adapter-scale", "1", "--adapter-scale", "2"], "one --adapter-scale"),
        (["--prompt", "x", "-n", "0"], "--num-images must be positive"),
        (["--prompt", "x", "--batch-size", "0"], "--batch-size must be positive"),
        (["--prompt", "x", "--height", "60"], "multiples of 8"),
        (["--prompts-file", str(tmp_path / "none.txt")], "Cannot read the prompts file"),
        (["--prompt", "x", "--model", str(tmp_path / "no-model")], "no-model"),
    ]
    for extra, fragment in cases:
        assert_user_error(run_cli(["sample", *extra, "--out", str(out)], monkeypatch, capsys), fragment)
    assert not out.exists()


def test_adapter_for_another_base_is_refused(adapter, tmp_path, monkeypatch, capsys):
    pipe = load_pipeline(None)
    with torch.no_grad():
        pipe.unet.conv_in.weight.mul_(1.5)
    other = tmp_path / "other-model"
    pipe.save_pretrained(other)
    result = run_cli(["sample", "--prompt", "x", "--model", str(other), "--adapter", str(adapter), "--out",
                      str(tmp_path / "out")], monkeypatch, capsys)
    assert_user_error(result, "differ from this model's weights")
    assert not (tmp_path / "out").exists()


def test_inspect_reports_metadata_and_refuses_non_adapters(adapter, tmp_path, monkeypatch, capsys):
    code, stdout, _ = run_cli(["inspect", str(adapter)], monkeypatch, capsys)
    assert code == 0
    assert "method: filter-atoms" in stdout and "token: <castle>" in stdout
    assert f"size_bytes: {adapter.stat().st_size}" in stdout
    info = json.loads(run_cli(["inspect", str(adapter), "--json"], monkeypatch, capsys)[1])
    assert info["trainable_parameters"] > 0 and len(info["targets"]) > 0
    assert info["config"]["m"] == 9 and info["config"]["kc"] == 16  # preset C2
    not_ours = tmp_path / "x.safetensors"
    not_ours.write_text("hello")
    assert_user_error(run_cli(["inspect", str(not_ours)], monkeypatch, capsys), "x.safetensors")
    assert_user_error(run_cli(["inspect", str(tmp_path / "none.safetensors")], monkeypatch, capsys), "none.safetensors")


def test_decompose_reports_layers_and_writes_the_cache(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    code, stdout, err = run_cli(["decompose", "--preset", "C1", "--cache-dir", str(cache)], monkeypatch, capsys)
    assert code == 0, err
    layer_lines = [line for line in stdout.splitlines() if " error " in line]
    assert layer_lines and all(float(line.split(" error ")[1].split()[0]) < 1.0 for line in layer_lines)
    assert f"{len(layer_lines)} layers" in stdout.splitlines()[-1]
    assert len(list(cache.glob("*.safetensors"))) == 1
    assert_user_error(run_cli(["decompose", "--preset", "C7", "--cache-dir", str(cache)], monkeypatch, capsys), "C7")
