"""Careless and hostile command-line input: one `Error:` line, exit 2, before the base model loads, nothing written."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from filteratom_sd import FilterAtomConfig, add_filter_atoms, save_adapter

from .cli_runner import refuse_model_loading, run_cli
from .tiny_unet import make_unet
from .train_helpers import CASTLE


@pytest.fixture
def no_model(monkeypatch):
    """Loading a base pipeline raises `ModelLoaded` instead."""
    refuse_model_loading(monkeypatch)


def assert_refused(result, *fragments: str) -> str:
    """Exit 2 with exactly one `Error:` line holding every fragment; returns that line."""
    code, _, err = result
    lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err and "unexpected" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], err
    return lines[0]


def _concept_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    shutil.copytree(CASTLE, folder)
    return folder


def _train(tmp_path: Path, *extra: str) -> list[str]:
    return ["train", "--concept", "castle", "--images", str(CASTLE), "--output-dir", str(tmp_path / "out"),
            "--steps", "2", "--quiet", *extra]


def _config(tmp_path: Path, text: str | bytes) -> str:
    path = tmp_path / "settings.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


ANCHOR_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8)
) + "validation_prompts: *i\n"


@pytest.mark.parametrize("case, config, fragments", [
    ("endless file", "/dev/zero", ["/dev/zero", "larger than"]),
    ("anchor bomb", ANCHOR_BOMB, ["alias"]),
    ("binary", bytes(range(256)) * 4, ["not a UTF-8 text file"]),
    ("NUL bytes", b"steps: 3\n\x00\x00\n", ["not a UTF-8 text file"]),
    ("python tag", "steps: !!python/object/apply:os.system ['touch {tmp}/pwned']\n", ["tag"]),
    ("binary tag", "concept: !!binary aGVsbG8=\n", ["tag"]),
    ("set tag", "validation_prompts: !!set {a, b}\n", ["tag"]),
    ("int key", "1: 2\n", ["setting names"]),
    ("list", "- steps\n- 3\n", ["mapping"]),
])
def test_config_files_are_read_with_bounds(tmp_path, monkeypatch, capsys, no_model, case, config, fragments):
    if isinstance(config, str) and config.startswith("/dev/"):
        path = config
    else:
        path = _config(tmp_path, config.replace("{tmp}", str(tmp_path)) if isinstance(config, str) else config)
    assert_refused(run_cli(_train(tmp_path, "--config", path), monkeypatch, capsys), *fragments)
    assert not (tmp_path / "out").exists() and not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("option, fragment", [
    ("m=!!python/name:os.system", "tag"),
    ("m=!!python/object/apply:os.system ['true']", "tag"),
    ("m=*undefined", "--method-option"),
    ("m=[unclosed", "--method-option"),
])
def test_method_options_are_plain_yaml_values(tmp_path, monkeypatch, capsys, no_model, option, fragment):
    assert_refused(run_cli(_train(tmp_path, "--method-option", option), monkeypatch, capsys), fragment)


@pytest.mark.parametrize("case", ["huge caption", "binary caption", "non-UTF-8 metadata", "text null", "text 123",
                                  "text mapping", "file_name a list"])
def test_captions_are_bounded_text(tmp_path, monkeypatch, capsys, no_model, case):
    folder = _concept_copy(tmp_path)
    first = sorted(p.name for p in folder.glob("*.png"))[0]
    entry = {"file_name": first, "text": "a <castle>"}
    if case == "huge caption":
        (folder / first).with_suffix(".txt").write_bytes(b"a castle " * (60 * 2**20 // 9))
        fragments = [Path(first).with_suffix(".txt").name, "larger than"]
    elif case == "binary caption":
        (folder / first).with_suffix(".txt").write_bytes(b"\xff\xfe\x00a\x00" * 10)
        fragments = [Path(first).with_suffix(".txt").name, "not a UTF-8 text file"]
    elif case == "non-UTF-8 metadata":
        (folder / "metadata.jsonl").write_bytes(json.dumps(entry).encode().replace(b"a <castle>", b"\xe9t\xe9"))
        fragments = ["metadata.jsonl", "not a UTF-8 text file"]
    else:
        value = {"text null": None, "text 123": 123, "text mapping": {}, "file_name a list": [first]}[case]
        entry["file_name" if case == "file_name a list" else "text"] = value
        (folder / "metadata.jsonl").write_text(json.dumps(entry) + "\n")
        fragments = ["metadata.jsonl", "line 1"]
    args = _train(tmp_path)
    args[args.index(str(CASTLE))] = str(folder)
    assert_refused(run_cli(args, monkeypatch, capsys), *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, config, fragments", [
    (["--lr", "inf"], None, ["--lr"]),
    (["--lr", "nan"], None, ["--lr"]),
    ([], "adam_weight_decay: .inf\n", ["adam_weight_decay"]),
    ([], "adam_weight_decay: -0.1\n", ["adam_weight_decay"]),
    ([], "max_grad_norm: -1\n", ["max_grad_norm"]),
    ([], "max_grad_norm: 0\n", ["max_grad_norm"]),
    ([], "max_grad_norm: x\n", ["max_grad_norm"]),
    ([], "max_grad_norm: .nan\n", ["max_grad_norm"]),
    ([], "guidance_scale: .nan\n", ["guidance_scale"]),
    ([], "seed: abc\n", ["seed"]),
    (["--seed", str(2**70)], None, ["--seed"]),
    (["--seed", "-1"], None, ["--seed"]),
    (["--token", ""], None, ["--token"]),
    (["--token", "   "], None, ["--token"]),
    ([], "validation_prompts: abc\n", ["validation_prompts"]),
    ([], "validation_prompts: 5\n", ["validation_prompts"]),
    ([], "validation_prompts: [a <castle>, 5]\n", ["validation_prompts"]),
    ([], "class_prompt: 5\n", ["class_prompt"]),
    ([], "method_options: [1, 2]\n", ["method_options"]),
    ([], "method_options: {1: 2}\n", ["method_options"]),
    ([], "prompt_templates: []\n", ["prompt_templates"]),
    ([], "prompt_templates: ['a photo of {x}']\n", ["prompt_templates"]),
    ([], "prompt_templates: ['{} and {}']\n", ["prompt_templates"]),
    ([], "prompt_templates: ['{0}']\n", ["prompt_templates"]),
    ([], "prompt_templates: ['a { {}']\n", ["prompt_templates"]),
    ([], "prompt_templates: a {}\n", ["prompt_templates"]),
    ([], "checkpoint_every: '5'\n", ["checkpoint_every"]),
    ([], "center_crop: 'yes'\n", ["center_crop"]),
    ([], "lr_by_method: {filter-atoms: .inf}\n", ["lr_by_method"]),
    ([], "prior_loss_weight: .nan\n", ["prior_loss_weight"]),
    ([], "mixed_precision: 5\n", ["mixed_precision"]),
    (["--concept", "c" * 245], None, ["concept", "characters"]),
    (["--concept", "a\x00b"], None, ["concept"]),
])
def test_settings_are_refused_before_the_model_loads(tmp_path, monkeypatch, capsys, no_model, extra, config, fragments):
    args = _train(tmp_path, *extra)
    if config is not None:
        args += ["--config", _config(tmp_path, config)]
    if "--concept" in extra:
        del args[1:3]
    assert_refused(run_cli(args, monkeypatch, capsys), *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["settings.yaml"])


@pytest.mark.parametrize("extra", [[], ["--lr", "1e-3", "--seed", str(2**63 - 1), "--token", "<k>"]])
def test_sound_settings_reach_the_model(tmp_path, monkeypatch, capsys, no_model, extra):
    config = _config(tmp_path, "max_grad_norm: 0.5\nadam_weight_decay: 0\nvalidation_prompts: [a <castle>]\n"
                               "prompt_templates: ['a photo of {}']\nmethod_options: {m: 6}\nclass_prompt: a castle\n")
    code, _, err = run_cli(_train(tmp_path, "--config", config, *extra), monkeypatch, capsys)
    assert code == "model loaded", err


def test_a_long_thin_image_is_named_before_the_model_loads(tmp_path, monkeypatch, capsys, no_model):
    folder = _concept_copy(tmp_path)
    Image.new("RGB", (24_000, 1_000), (40, 90, 200)).save(folder / "panorama.png")
    args = _train(tmp_path, "--resolution", "512")
    args[args.index(str(CASTLE))] = str(folder)
    line = assert_refused(run_cli(args, monkeypatch, capsys), "panorama.png", "24000x1000")
    assert "crop" in line and "--gradient-checkpointing" not in line
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    unet = make_unet()
    add_filter_atoms(unet, FilterAtomConfig(m=4, kc=8))
    return save_adapter(unet, tmp_path_factory.mktemp("cli") / "castle.safetensors")


@pytest.mark.parametrize("extra, fragments", [
    (["--adapter-scale", "nan"], ["--adapter-scale"]),
    (["--adapter-scale", "inf"], ["--adapter-scale"]),
    (["--adapter-scale", "1e30"], ["--adapter-scale"]),
    (["--guidance-scale", "nan"], ["--guidance-scale"]),
    (["--guidance-scale", "-3"], ["--guidance-scale"]),
    (["--seed", str(2**70)], ["--seed"]),
    (["--out", "{file}"], ["--out", "not a folder"]),
    (["--prompts-file", "{binary}"], ["not a UTF-8 text file"]),
    (["--prompts-file", "{huge}"], ["larger than"]),
])
def test_sample_input_is_checked_before_the_model_loads(adapter, tmp_path, monkeypatch, capsys, no_model, extra,
                                                          fragments):
    existing = tmp_path / "picture.png"
    existing.write_bytes(b"mine")
    binary, huge = tmp_path / "prompts.bin", tmp_path / "prompts.txt"
    binary.write_bytes(bytes(range(256)))
    huge.write_bytes(b"a castle\n" * (3 * 2**20 // 9))
    extra = [a.format(file=existing, binary=binary, huge=huge) for a in extra]
    args = ["sample", "--prompt", "a <castle>", "--adapter", str(adapter), "--out", str(tmp_path / "samples"), *extra]
    assert_refused(run_cli(args, monkeypatch, capsys), *fragments)
    assert existing.read_bytes() == b"mine" and not (tmp_path / "samples").exists()


def test_eval_out_must_not_be_a_folder(adapter, tmp_path, monkeypatch, capsys, no_model):
    folder = tmp_path / "results"
    folder.mkdir()
    args = ["eval", "--adapter", str(adapter), "--images", str(CASTLE), "--out", str(folder)]
    assert_refused(run_cli(args, monkeypatch, capsys), "--out", "is a folder")
    assert list(folder.iterdir()) == []


def test_inspect_flags_patterns_that_loading_will_not_run(adapter, tmp_path, monkeypatch, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(adapter), framework="pt") as handle:
        meta, tensors = dict(handle.metadata()), {k: handle.get_tensor(k) for k in handle.keys()}
    config = json.loads(meta["config"])
    config["exclude_modules"] = ["^(.*.*)*Z$"]
    meta["config"] = json.dumps(config)
    crafted = tmp_path / "crafted.safetensors"
    save_file(tensors, str(crafted), metadata=meta)
    code, out, err = run_cli(["inspect", str(crafted)], monkeypatch, capsys)
    assert code == 0, err
    assert "warning" in out.lower() and "exclude_modules" in out and "nested repetition" in out
    code, out, err = run_cli(["inspect", str(crafted), "--json"], monkeypatch, capsys)
    assert code == 0 and any("exclude_modules" in w for w in json.loads(out)["warnings"])
    code, out, _ = run_cli(["inspect", str(adapter), "--json"], monkeypatch, capsys)
    assert code == 0 and json.loads(out)["warnings"] == []


def test_inspect_refuses_a_non_finite_adapter_in_one_line(adapter, tmp_path, monkeypatch, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(adapter), framework="pt") as handle:
        meta, tensors = dict(handle.metadata()), {k: handle.get_tensor(k) for k in handle.keys()}
    key = sorted(k for k in tensors if k.endswith("delta_atoms"))[0]
    tensors[key] = torch.full_like(tensors[key], math.nan)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    assert_refused(run_cli(["inspect", str(bad)], monkeypatch, capsys), "bad.safetensors", key)


def test_the_largest_accepted_seed_draws_every_derived_generator():
    from filteratom_sd.checks import MAX_SEED
    from filteratom_sd.evaluation.drift import _generator as probe_generator
    from filteratom_sd.evaluation.prompt_sets import PromptSet
    from filteratom_sd.generation import SEED_STRIDE, image_generator

    # class images (prior.py) and the drift monitor's probes derive seeds from --seed; they once overflowed past 2**64
    assert image_generator(MAX_SEED, 12_345 + 99).initial_seed() == (MAX_SEED * SEED_STRIDE + 12_444) % 2**64
    assert probe_generator(MAX_SEED, 7).initial_seed() == (MAX_SEED * 1_000_003 + 7) % 2**64
    # below 2**64 nothing changed: the images of ordinary seeds are the ones earlier versions drew
    assert image_generator(3, 7).initial_seed() == 3 * SEED_STRIDE + 7
    assert probe_generator(5, 2).initial_seed() == 5 * 1_000_003 + 2
    PromptSet(["a photo of {}"], [0, MAX_SEED]).validate()


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_an_out_under_a_file_is_refused_before_the_model_loads(adapter, tmp_path, monkeypatch, capsys, no_model,
                                                               command):
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    if command == "sample":
        args = ["sample", "--prompt", "a <castle>", "--adapter", str(adapter), "--out", str(mine / "samples")]
    else:
        args = ["eval", "--adapter", str(adapter), "--images", str(CASTLE), "--out", str(mine / "eval.json")]
    assert_refused(run_cli(args, monkeypatch, capsys), "--out", "which is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"] and mine.read_text() == "mine"
