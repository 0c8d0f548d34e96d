"""Faults on purpose: killed and interrupted runs, full or read-only disks, hostile files. See docs/reliability.md."""

from __future__ import annotations

import errno
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import filteratom_sd.output_paths as output_paths
import filteratom_sd.training.loop as train_module
import filteratom_sd.training.preflight as preflight
from filteratom_sd.core.adapter_file import read_adapter
from filteratom_sd.training.data import load_concept_images
from filteratom_sd.errors import AdapterFormatError, ConfigError, DataError, TrainingError, UserInputError
from filteratom_sd.training.loop import train
from filteratom_sd.training.settings import read_yaml

from .train_helpers import CASTLE, adapter_bytes, quick_settings

FA_SD = Path(sys.executable).with_name("fa-sd")
needs_cli = pytest.mark.skipif(not FA_SD.is_file(), reason="the fa-sd console script is not installed beside python")


def _train_command(out: Path, steps: int, *extra: str) -> list[str]:
    return [str(FA_SD), "train", "--concept", "castle", "--images", str(CASTLE), "--output-dir", str(out),
            "--steps", str(steps), "--batch-size", "2", "--checkpoint-every", "2", "--validation-every", "10000",
            "--quiet", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _wait_for_checkpoint(out: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if list((out / "checkpoints").glob("step-*/state.json")):
            return
        time.sleep(0.05)


@needs_cli
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert subprocess.run(_train_command(whole, 8), env=_env(), capture_output=True).returncode == 0
    process = subprocess.Popen(_train_command(killed, 8), env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    _wait_for_checkpoint(killed, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    from safetensors.torch import load_file

    for checkpoint in (killed / "checkpoints").glob("step-*"):  # nothing half-written under a final name
        assert load_file(str(checkpoint / "params.safetensors")) and (checkpoint / "state.json").read_text()
    if (killed / "castle.safetensors").exists():
        read_adapter(killed / "castle.safetensors")
    resumed = subprocess.run(_train_command(killed, 8, "--resume"), env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert adapter_bytes(killed) == adapter_bytes(whole)


@needs_cli
@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_save_and_exit_with_128_plus_the_signal(tmp_path, signum, status):
    out = tmp_path / "run"
    process = subprocess.Popen(_train_command(out, 400), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    _wait_for_checkpoint(out, process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=300)
    assert process.returncode == status, err[-2000:]
    assert "--resume" in err.strip().splitlines()[-1]
    assert (out / "castle.safetensors").is_file() and read_adapter(out / "castle.safetensors").num_parameters > 0


def test_a_read_only_output_folder_fails_before_training(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can write to read-only folders")
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        with pytest.raises(Exception) as raised:
            train(quick_settings(parent / "run"), progress=False)
        assert "writ" in str(raised.value).lower() or isinstance(raised.value, OSError)
    finally:
        parent.chmod(0o700)


def test_an_unwritable_output_folder_is_refused_before_loading_anything(tmp_path, monkeypatch):
    parent = tmp_path / "locked"
    parent.mkdir()
    # root may write anywhere, so the permission answer is simulated for the folder the run would be made in
    monkeypatch.setattr(output_paths.os, "access", lambda path, mode: Path(path) != parent)
    monkeypatch.setattr(train_module, "load_pipeline", _must_not_run)
    with pytest.raises(UserInputError, match=f"Cannot write to {parent}"):
        train(quick_settings(parent / "run" / "deeper"), progress=False)
    assert list(parent.iterdir()) == []


def test_a_disk_too_small_for_the_run_is_refused_before_training(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = preflight.shutil.disk_usage
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: real(path)._replace(free=2**20))
    with pytest.raises(UserInputError, match="Not enough free space") as raised:
        train(quick_settings(out), progress=False)
    # C2 on the tiny test UNet: adapter + checkpoints need more than the 1 MiB left
    assert "1.0 MiB are free" in str(raised.value)
    assert not out.exists()


def _must_not_run(*args, **kwargs):
    raise AssertionError("the model was loaded although the output folder is unwritable")


def test_disk_full_while_saving_the_adapter_leaves_no_file_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    import filteratom_sd.core.adapter_file as adapter_io

    real_save_file = adapter_io.save_file

    def full_disk(tensors, filename, *args, **kwargs):
        if "checkpoints" in Path(filename).parts:  # each checkpoint holds an adapter too: those still fit
            return real_save_file(tensors, filename, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(adapter_io, "save_file", full_disk)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="disk holding .* is full"):
        train(quick_settings(out, steps=4, checkpoint_every=2), progress=False)
    assert not (out / "castle.safetensors").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".castle")]  # the temporary file is gone
    assert (out / "checkpoints" / "step-000002" / "state.json").is_file()


def test_out_of_memory_gets_advice_and_status_1(tmp_path, monkeypatch, capsys):
    from filteratom_sd.cli import main

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_module, "_loss", oom)
    monkeypatch.setattr(sys, "argv", ["fa-sd", "train", "--concept", "castle", "--images", str(CASTLE),
                                      "--output-dir", str(tmp_path / "run"), "--steps", "2", "--quiet"])
    with pytest.raises(SystemExit) as done:
        main()
    err = capsys.readouterr().err
    assert done.value.code == 1 and "--gradient-checkpointing" in err and "Traceback" not in err


def test_a_pickle_named_safetensors_is_refused_without_being_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(AdapterFormatError):
        read_adapter(path)
    torch.save({"x": torch.zeros(1)}, tmp_path / "ckpt.safetensors")
    with pytest.raises(AdapterFormatError):
        read_adapter(tmp_path / "ckpt.safetensors")
    assert not marker.exists()


def test_yaml_with_python_tags_is_refused(tmp_path):
    config = tmp_path / "evil.yaml"
    config.write_text("steps: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(config)


def _hostile_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(folder / "good.png")
    good = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.new("RGB", (1, 1)).save(folder / "one_pixel.png")
    Image.new("I;16", (16, 16), 40000).save(folder / "sixteen_bit.png")
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    frames = [Image.new("RGB", (16, 16), c) for c in ((0, 0, 255), (0, 255, 0))]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    frames[0].save(folder / "animated.webp", save_all=True, append_images=frames[1:])
    Image.new("RGB", (16, 16), (9, 9, 9)).save(folder / "really_a_png.jpg", format="PNG")
    (folder / "text.png").write_text("hello")
    os.symlink(folder, folder / "loop.png")  # a link to its own folder
    os.symlink(folder / "missing.png", folder / "dangling.png")
    return folder


def test_hostile_image_folders_keep_what_is_usable(tmp_path, monkeypatch):
    folder = _hostile_folder(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30 * 30)  # so a 32x32 image is a "bomb"
    Image.new("RGB", (64, 64)).save(folder / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    names = {i.path.name: i for i in load_concept_images(folder)}
    assert set(names) == {"good.png", "sixteen_bit.png", "cmyk.jpg", "animated.gif", "animated.webp",
                          "really_a_png.jpg"}
    assert names["cmyk.jpg"].image.getpixel((4, 4))[0] > 200  # cyan-free, magenta+yellow -> red
    assert names["animated.gif"].image.getpixel((4, 4)) == (0, 0, 255)  # the first frame
    assert names["sixteen_bit.png"].image.getpixel((4, 4))[0] >= 254  # rescaled to the 8-bit range


def test_only_bad_files_is_a_data_error(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_text("nope")
    os.symlink(folder, folder / "b.jpg")
    with pytest.raises(DataError, match="could be read|holds no"):
        load_concept_images(folder)


def test_a_thousand_word_prompt_is_truncated_with_a_warning(caplog):
    import logging

    from filteratom_sd.models import load_pipeline
    from filteratom_sd.generation import truncate_prompt

    pipe = load_pipeline(None)
    long_prompt = " ".join(["castle"] * 1000)
    with caplog.at_level(logging.WARNING):
        short = truncate_prompt(pipe.tokenizer, long_prompt)
    assert "truncated" in caplog.text
    assert len(pipe.tokenizer(short).input_ids) <= pipe.tokenizer.model_max_length
    assert truncate_prompt(pipe.tokenizer, "a castle") == "a castle"


def test_every_fault_table_row_names_a_test_that_exists():
    table = (Path(__file__).resolve().parent.parent / "docs" / "reliability.md").read_text()
    rows = [row for row in table.splitlines() if re.match(r"\| \d+ \|", row)]
    assert len(rows) >= 60 and [int(row.split("|")[1]) for row in rows] == list(range(1, len(rows) + 1))
    named: list[tuple[str, str]] = []
    for row in rows:
        cell = row.rstrip(" |").rsplit("|", 1)[-1].strip()
        if cell == "same":  # the previous row's test covers this one too
            continue
        named, module = [], None
        for reference in re.findall(r"`((?:test_\w+|…)(?:::\w+)?)`", cell):
            prefix, _, test = reference.partition("::")  # a module alone names all of its tests
            module = module if prefix == "…" else prefix
            named.append((module, test))
        assert named, row
        for module, test in named:
            source = Path(__file__).with_name(f"{module}.py")
            assert source.is_file(), (row, module)
            assert not test or re.search(rf"^def {test}\(", source.read_text(), re.M), (row, module, test)
