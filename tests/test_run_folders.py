"""Run folders and resume: a run's identity checked on --resume, --overwrite, the folder lock, leftovers of killed writes,
folders that are not runs, a real full disk and repeated random kills. See docs/reliability.md rows 34 onwards."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from filteratom_sd.core.adapter_file import read_adapter
from filteratom_sd.tiny.bundled import bundled_model_path
from filteratom_sd.training.loop import train
from filteratom_sd.training.run_identity import changed_settings, run_identity

from .test_cli import assert_user_error, run_cli
from .train_helpers import CASTLE, ROOT, adapter_bytes, quick_settings

FA_SD = Path(sys.executable).with_name("fa-sd")
needs_cli = pytest.mark.skipif(not FA_SD.is_file(), reason="the fa-sd console script is not installed beside python")


def _args(out: Path, steps: int = 6, *extra: str, images: Path = CASTLE) -> list[str]:
    """The CLI twin of quick_settings(out, steps=steps)."""
    return ["train", "--concept", "castle", "--images", str(images), "--output-dir", str(out), "--steps", str(steps),
            "--batch-size", "2", "--checkpoint-every", "2", "--validation-every", "10000", "--no-monitor", "--quiet", *extra]


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes (TensorBoard logs left out: they only ever grow)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "logs" not in p.relative_to(folder).parts}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 6-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("runs") / "finished"
    train(quick_settings(out, steps=6), progress=False)
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Adapter bytes of uninterrupted runs, by step count (trained on first use)."""
    root, made = tmp_path_factory.mktemp("whole"), {}

    def adapter_after(steps: int) -> bytes:
        if steps not in made:
            train(quick_settings(root / str(steps), steps=steps), progress=False)
            made[steps] = adapter_bytes(root / str(steps))
        return made[steps]

    return adapter_after


@pytest.fixture
def run(finished, tmp_path) -> Path:
    """A private copy of the finished run."""
    return Path(shutil.copytree(finished, tmp_path / "run"))


def _changed_images(tmp_path: Path, caption_only: bool) -> Path:
    folder = Path(shutil.copytree(CASTLE, tmp_path / "images"))
    if caption_only:
        (folder / "castle_0.txt").write_text("a <castle> at dusk")
    else:
        first = sorted(folder.glob("*.png"))[0]
        shutil.copyfile(sorted(folder.glob("*.png"))[1], first)
    return folder


def _changed_base_model(tmp_path: Path) -> Path:
    model = Path(shutil.copytree(bundled_model_path(), tmp_path / "model"))
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v * 1.1 if v.ndim == 4 else v for k, v in tensors.items()}, str(weights))
    return model


@pytest.mark.parametrize("case, extra, named", [
    ("seed", ["--seed", "9"], "seed"),
    ("learning rate", ["--lr", "0.5"], "lr"),
    ("preset", ["--preset", "C1"], "preset"),
    ("method option", ["--method-option", "scale=0.5"], "method_options"),
    ("images", ["images"], "images"),
    ("captions", ["captions"], "images"),
    ("base model", ["model"], "base model"),
])
def test_resume_refuses_a_changed_setting_naming_it(run, tmp_path, monkeypatch, capsys, case, extra, named):
    images = CASTLE
    if extra == ["images"] or extra == ["captions"]:
        images, extra = _changed_images(tmp_path, caption_only=extra == ["captions"]), []
    elif extra == ["model"]:
        extra = ["--model", str(_changed_base_model(tmp_path))]
    before = _snapshot(run)
    result = run_cli([*_args(run, 6, images=images), *extra, "--resume"], monkeypatch, capsys)
    assert_user_error(result, "Cannot resume")
    assert named in result[2], result[2]
    assert _snapshot(run) == before, f"{case}: the run folder changed"


def _identity(**changes):
    settings = quick_settings(Path("run"), **changes).to_dict()
    return run_identity(settings, 1e-3, "images-hash", None, "base-digest")


@pytest.mark.parametrize("name, value", [
    ("method", "lora"), ("preset", "C1"), ("method_options", {"scale": 0.5}), ("seed", 9), ("lr", 0.5),
    ("batch_size", 1), ("gradient_accumulation_steps", 2), ("resolution", 32), ("center_crop", False), ("flip", True),
    ("mixed_precision", "bf16"), ("prior_loss_weight", 0.5), ("min_snr_gamma", 5.0), ("masked_loss", True),
    ("unmasked_weight", 0.5), ("adam_weight_decay", 0.0), ("max_grad_norm", 0.5), ("lr_warmup_steps", 3),
    ("token", "<ksk>"), ("prompt_templates", ["a photo of {}"]),
])
def test_every_setting_that_changes_the_weights_is_in_the_identity(name, value):
    before, after = _identity(), _identity(**{name: value})
    if name == "lr":  # the identity holds the learning rate the run uses
        after = run_identity(quick_settings(Path("run"), lr=value).to_dict(), value, "images-hash", None, "base-digest")
    assert changed_settings(before, after), name


@pytest.mark.parametrize("name, value", [
    ("steps", 50), ("checkpoint_every", 7), ("checkpoints_total_limit", 9), ("validation_prompts", ["a <castle>"]),
    ("validation_every", 3), ("validation_steps", 4), ("guidance_scale", 2.0), ("on_nan", "stop"),
    ("gradient_checkpointing", True), ("output_dir", "elsewhere"),
])
def test_settings_safe_to_change_are_not_in_the_identity(name, value):
    assert changed_settings(_identity(), _identity(**{name: value})) == []


def test_inputs_enter_the_identity_by_content():
    settings = quick_settings(Path("run")).to_dict()
    base = run_identity(settings, 1e-3, "a", None, "digest")
    assert changed_settings(base, run_identity(settings, 1e-3, "b", None, "digest")) == ["the images or their captions"]
    assert changed_settings(base, run_identity(settings, 1e-3, "a", "c", "digest")) == ["the class images"]
    assert changed_settings(base, run_identity(settings, 1e-3, "a", None, "other")) == ["the base model's weights"]
    moved = run_identity({**settings, "images": "/elsewhere", "model": "/copy"}, 1e-3, "a", None, "digest")
    assert changed_settings(base, moved) == []


def test_resume_logs_safe_changes_and_equals_an_uninterrupted_run(run, uninterrupted, monkeypatch, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="filteratom_sd"):
        code, _, err = run_cli([*_args(run, 8, "--checkpoint-every", "3", "--validation-every", "7"), "--resume"],
                               monkeypatch, capsys)
    assert code == 0, err
    assert "steps: 6 -> 8" in caplog.text and "checkpoint_every: 2 -> 3" in caplog.text
    assert adapter_bytes(run) == uninterrupted(8)
    assert read_adapter(run / "castle.safetensors").metadata["steps"] == "8"


def test_resume_with_fewer_steps_than_the_last_checkpoint_is_refused(run, monkeypatch, capsys):
    before = _snapshot(run)
    result = run_cli([*_args(run, 3), "--resume"], monkeypatch, capsys)
    assert_user_error(result, "step 4")
    assert "--steps 3" in result[2]
    assert _snapshot(run) == before


def test_resume_at_the_last_checkpoints_step_writes_that_steps_adapter(run, uninterrupted, monkeypatch, capsys):
    code, _, err = run_cli([*_args(run, 4), "--resume"], monkeypatch, capsys)
    assert code == 0, err
    assert adapter_bytes(run) == uninterrupted(4)


@pytest.mark.parametrize("target", ["step-000002", "step-000002/params.safetensors"])
def test_resume_path_picks_a_checkpoint(run, uninterrupted, monkeypatch, capsys, target):
    code, _, err = run_cli([*_args(run, 3), "--resume", str(run / "checkpoints" / target)], monkeypatch, capsys)
    assert code == 0, err
    assert adapter_bytes(run) == uninterrupted(3)


def test_resume_path_that_is_not_a_checkpoint_is_refused(run, tmp_path, monkeypatch, capsys):
    before = _snapshot(run)
    for target in (tmp_path / "nowhere", run / "samples"):
        assert_user_error(run_cli([*_args(run, 6), "--resume", str(target)], monkeypatch, capsys), "not a checkpoint")
    assert _snapshot(run) == before


def test_resume_without_a_checkpoint_is_refused_and_keeps_the_adapter(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    train(quick_settings(out, steps=2), progress=False)  # 2 steps, checkpoint every 2: finished with no checkpoint
    before = _snapshot(out)
    assert_user_error(run_cli([*_args(out, 2), "--resume"], monkeypatch, capsys), "no checkpoint")
    assert _snapshot(out) == before


def test_overwrite_removes_the_old_runs_outputs_first(run, uninterrupted, monkeypatch, capsys):
    (run / "samples" / "step-000500.png").write_bytes(b"an old validation grid")
    config = run / "training_config.yaml"  # the earlier run was another concept's
    config.write_text(config.read_text().replace("concept: castle", "concept: tower"))
    (run / "castle.safetensors").rename(run / "tower.safetensors")
    (run / "notes.txt").write_text("the user's own")
    code, _, err = run_cli([*_args(run, 3, "--checkpoint-every", "100"), "--overwrite"], monkeypatch, capsys)
    assert code == 0, err
    assert not (run / "checkpoints").exists() or not list((run / "checkpoints").iterdir())
    assert not (run / "samples" / "step-000500.png").exists() and not (run / "tower.safetensors").exists()
    assert (run / "notes.txt").read_text() == "the user's own"
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
    assert adapter_bytes(run) == uninterrupted(3)
    # the old run's checkpoints cannot come back through a later --resume
    assert_user_error(run_cli([*_args(run, 3), "--resume"], monkeypatch, capsys), "no checkpoint")
    assert adapter_bytes(run) == uninterrupted(3)


def test_leftovers_of_killed_writes_are_cleaned_at_the_next_run(run, monkeypatch, capsys):
    leftovers = [run / ".castle.safetensors.k2j4h_1x.tmp", run / "samples" / ".final.png.a8b7c6d5.tmp",
                 run / ".training_config.yaml.zz99yy88.tmp", run / "checkpoints" / ".step-000006.tmp" / "state.json",
                 run / ".fa-sd-trash-3k2j1h0g" / "checkpoints" / "step-000020" / "state.json"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("half")
    (run / ".keep-me").write_text("a user's hidden file")
    code, _, err = run_cli([*_args(run, 6), "--resume"], monkeypatch, capsys)
    assert code == 0, err
    assert not [p for p in leftovers if p.exists()]
    assert not (run / "checkpoints" / ".step-000006.tmp").exists() and not (run / ".fa-sd-trash-3k2j1h0g").exists()
    assert (run / ".keep-me").read_text() == "a user's hidden file"


def test_a_folder_that_is_not_a_run_is_refused_unless_overwrite(tmp_path, monkeypatch, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("mine")
    (out / "notes.txt").write_text("mine too")
    assert_user_error(run_cli(_args(out, 2), monkeypatch, capsys), "not a fa-sd run")
    assert_user_error(run_cli([*_args(out, 2), "--resume"], monkeypatch, capsys), "not a fa-sd run")
    assert _snapshot(out) == {"README.md": b"mine", "notes.txt": b"mine too"}
    code, _, err = run_cli([*_args(out, 2), "--overwrite"], monkeypatch, capsys)
    assert code == 0, err
    assert "castle" in (out / "README.md").read_text() and (out / "notes.txt").read_text() == "mine too"


def test_resume_and_overwrite_together_are_refused(run, monkeypatch, capsys):
    before = _snapshot(run)
    assert_user_error(run_cli([*_args(run, 6), "--resume", "--overwrite"], monkeypatch, capsys), "contradict")
    assert _snapshot(run) == before


@pytest.mark.parametrize("where", ["the file itself", "under the file"])
def test_an_output_dir_that_is_a_file_is_refused(tmp_path, monkeypatch, capsys, where):
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    out = mine if where == "the file itself" else mine / "run"
    fragment = "exists and is not a folder" if where == "the file itself" else "which is a file"
    assert_user_error(run_cli(_args(out, 2), monkeypatch, capsys), fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"] and mine.read_text() == "mine"


def test_an_empty_existing_folder_is_used(tmp_path, monkeypatch, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    code, _, err = run_cli(_args(out, 2), monkeypatch, capsys)
    assert code == 0, err
    assert (out / "castle.safetensors").is_file()


@pytest.mark.parametrize("where", ["same folder", "inside it"])
def test_class_images_in_the_concept_images_are_refused(tmp_path, monkeypatch, capsys, where):
    images = Path(shutil.copytree(CASTLE, tmp_path / "images"))
    before = _snapshot(images)
    class_images = images if where == "same folder" else images / "class"
    out = tmp_path / "run"
    args = [*_args(out, 2, images=images), "--prior-preservation", "--class-prompt", "a castle",
            "--num-class-images", "2", "--class-images", str(class_images)]
    assert_user_error(run_cli(args, monkeypatch, capsys), "--class-images")
    assert _snapshot(images) == before and not class_images.exists() or class_images == images
    assert not out.exists()


def _train_process(out: Path, steps: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([str(FA_SD), *_args(out, steps), *extra], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and not condition():
        time.sleep(0.05)
    assert condition(), "the training process stopped before it got there"


def _checkpoint_steps(out: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*/state.json"))


@pytest.fixture
def one_thread():
    """This process at the killed training process's thread count: the thread count changes floating-point sums."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@needs_cli
def test_a_folder_in_use_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path, monkeypatch, capsys, caplog,
                                                                          one_thread):
    out = tmp_path / "run"
    process = _train_process(out, 400)
    try:
        _wait_for(lambda: bool(_checkpoint_steps(out)), process)
        for extra in (["--resume"], ["--overwrite"]):
            result = run_cli([*_args(out, 400), *extra], monkeypatch, capsys)
            assert_user_error(result, f"in use by process {process.pid}")
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate()
    last = _checkpoint_steps(out)[-1]
    with caplog.at_level(logging.INFO, logger="filteratom_sd"):
        code, _, err = run_cli([*_args(out, last + 1), "--resume"], monkeypatch, capsys)
    assert code == 0, err
    assert f"process {process.pid}" in caplog.text and "stale" in caplog.text
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    train(quick_settings(tmp_path / "whole", steps=last + 1), progress=False)
    assert adapter_bytes(out) == adapter_bytes(tmp_path / "whole")


def _mount_tmpfs(folder: Path, megabytes: int) -> None:
    folder.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root on Linux")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs: room for one C2 run on the tiny model (about 11.5 MiB by the pre-check), not for two."""
    folder = tmp_path / "disk"
    _mount_tmpfs(folder, 16)
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def test_resume_on_a_nearly_full_disk_does_not_count_its_own_checkpoints_twice(small_disk, uninterrupted, monkeypatch,
                                                                              capsys):
    out = small_disk / "run"
    train(quick_settings(out, steps=6), progress=False)
    assert shutil.disk_usage(small_disk).free < 9.5 * 2**20  # a fresh run would be refused now
    code, _, err = run_cli([*_args(out, 6), "--resume"], monkeypatch, capsys)
    assert code == 0, err
    assert adapter_bytes(out) == uninterrupted(6)
    assert_user_error(run_cli(_args(small_disk / "second", 6), monkeypatch, capsys), "Not enough free space")


@needs_cli
def test_a_real_full_disk_mid_run_fails_cleanly_and_resumes(small_disk):
    out = small_disk / "run"
    process = _train_process(out, 10)
    filler = small_disk / "filler"
    try:
        _wait_for(lambda: bool(_checkpoint_steps(out)), process)
        with open(filler, "wb") as handle:  # fill every byte left, as another program would
            try:
                while True:
                    handle.write(b"\0" * 65536)
                    handle.flush()
            except OSError:
                pass
    finally:
        _, err = process.communicate(timeout=300)
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert process.returncode == 1 and len(errors) == 1 and "disk" in errors[0] and "unexpected" not in errors[0], err
    for checkpoint in (out / "checkpoints").glob("step-*"):  # nothing half-written under a final name
        assert load_file(str(checkpoint / "params.safetensors")) and json.loads((checkpoint / "state.json").read_text())
    filler.unlink()
    resumed = _train_process(out, 10, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    # the reference runs in a process like the killed one: the thread count changes the floating-point sums
    whole = _train_process(small_disk.parent / "whole", 10)
    _, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err[-2000:]
    assert adapter_bytes(out) == adapter_bytes(small_disk.parent / "whole")


@needs_cli
def test_random_kill_soak_small(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "kill_soak.py"), "--kills", "3", "--steps", "8",
                           "--work-dir", str(tmp_path), "--seed", "1"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "soak.json").read_text())
    assert report["kills"] == 3 and report["identical"] is True

