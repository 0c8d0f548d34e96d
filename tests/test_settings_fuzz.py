"""Fuzzing `fa-sd train`'s YAML settings and flags: exit 0 or exit 2 with one `Error:` line, never "unexpected",
and nothing outside the output folder touched.

Runs stop where the base model would load (every check comes before it), so each example takes milliseconds.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from filteratom_sd.training.settings import TrainingSettings

from .cli_runner import refuse_model_loading, run_cli
from .train_helpers import CASTLE

# every setting, and one misspelt name
SETTING_NAMES = [f.name for f in dataclasses.fields(TrainingSettings)] + ["stepz"]
SOUND = {
    "method": ["filter-atoms", "lora", "liera", "bitfit", "full", "oft"], "preset": ["C1", "C2", "C3", None],
    "method_options": [{}, {"m": 6}, {"rank": 2}, {"target_modules": ["conv"]}], "lr": [1e-3, 0.5, None],
    "seed": [0, 7, 2**63 - 1], "validation_prompts": [[], ["a <castle>"]], "prompt_templates": [["a {}"]],
    "class_prompt": ["a castle", ["a castle", "a tower"]], "token": ["<k>"], "max_grad_norm": [0.5],
    "guidance_scale": [1.0, 7.5], "mixed_precision": ["no", "bf16"], "resolution": [32, 64], "on_nan": ["stop"],
    "keep": ["best", "last"], "report_to": ["none"], "monitor": [False], "lr_scheduler": ["cosine"],
    "instance_prompt": ["a photo of <castle>"], "caption_dropout": [0.1], "noise_offset": [0.05],
}
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | text)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(text | st.integers(0, 3), inner, max_size=3), max_leaves=6)


@st.composite
def setting_values(draw):
    name = draw(st.sampled_from(SETTING_NAMES))
    sound = SOUND.get(name)
    if sound is not None and draw(st.booleans()):
        return name, draw(st.sampled_from(sound))
    return name, draw(values)


configs = st.one_of(
    st.none(),
    st.lists(setting_values(), max_size=5).map(dict),
    text.map(lambda t: t + "\n"),
    st.binary(max_size=40),
)
FLAGS = {
    "--steps": st.integers(-3, 3).map(str) | text, "--lr": st.floats(allow_nan=True).map(str) | text,
    "--seed": st.integers(-(2**70), 2**70).map(str), "--token": text, "--preset": st.sampled_from(["C1", "C9", ""]),
    "--method": st.sampled_from(["lora", "loha", "dora", ""]), "--resolution": st.integers(-8, 80).map(str),
    "--method-option": st.sampled_from(["m=6", "rank=2", "m", "m=!!python/name:os.system", "=1", "m=[1, 2]",
                                        "kc=*a", "target_modules=['^(a+)+$']"]),
    "--class-prompt": text, "--validation-prompt": text, "--min-snr-gamma": st.floats(allow_nan=True).map(str),
    "--unmasked-weight": st.floats(allow_nan=True).map(str), "--checkpoint-every": st.integers(-2, 4).map(str),
    "--on-nan": st.sampled_from(["skip", "halt"]), "--mixed-precision": st.sampled_from(["no", "fp8"]),
    "--num-class-images": st.integers(-2, 3).map(str), "--batch-size": st.integers(-1, 3).map(str),
    "--max-grad-norm": st.floats(allow_nan=True).map(str), "--weight-decay": st.floats(allow_nan=True).map(str),
    "--guidance-scale": st.floats(allow_nan=True).map(str), "--noise-offset": st.floats(allow_nan=True).map(str),
    "--caption-dropout": st.floats(allow_nan=True).map(str), "--keep": st.sampled_from(["best", "last", "first"]),
    "--instance-prompt": text, "--caption-template": text, "--max-drift": st.floats(allow_nan=True).map(str),
}
SWITCHES = ["--prior-preservation", "--masked-loss", "--flip", "--gradient-checkpointing", "--random-crop"]
flag_lists = st.lists(st.one_of(
    st.sampled_from(sorted(FLAGS)).flatmap(lambda flag: FLAGS[flag].map(lambda value: [flag, value])),
    st.sampled_from(SWITCHES).map(lambda switch: [switch]),
), max_size=4)


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _dump(config) -> bytes:
    if isinstance(config, bytes):
        return config
    if isinstance(config, str):
        return config.encode()
    return yaml.safe_dump(config, allow_unicode=True).encode()


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=configs, flags=flag_lists)
def test_train_settings_and_flags_exit_0_or_2_with_one_error_line(monkeypatch, capsys, config, flags):
    refuse_model_loading(monkeypatch)
    castle_before = _tree(CASTLE)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        monkeypatch.chdir(root)
        args = ["train", "--concept", "castle", "--images", str(CASTLE), "--output-dir", str(root / "out"), "--quiet"]
        if config is not None:
            (root / "settings.yaml").write_bytes(_dump(config))
            args += ["--config", str(root / "settings.yaml")]
        args += [part for flag in flags for part in flag]
        before = _tree(root)
        code, _, err = run_cli(args, monkeypatch, capsys)
        errors = [line for line in err.splitlines() if line.startswith("Error:")]
        assert code in (0, "model loaded") or (code == 2 and len(errors) == 1), (args, code, err)
        assert "unexpected" not in err and "Traceback" not in err, (args, err)
        after = {k: v for k, v in _tree(root).items() if not k.startswith("out" + os.sep)}
        assert after == before, (args, "files outside the output folder changed")
    assert _tree(CASTLE) == castle_before
