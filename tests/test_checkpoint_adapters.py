"""Every checkpoint is an adapter: loadable, inspectable and samplable, equal to the adapter of a run stopped there."""

from __future__ import annotations

import json

import pytest
import torch

from filteratom_sd.core.adapter_file import read_adapter
from filteratom_sd.models import load_pipeline
from filteratom_sd.core.api import load_adapter
from filteratom_sd.training.loop import train

from .test_cli import assert_user_error, run_cli
from .train_helpers import quick_settings


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 4-step run with a checkpoint at step 2, and a 2-step run with the same seed."""
    root = tmp_path_factory.mktemp("checkpoint-adapters")
    train(quick_settings(root / "long", steps=4, checkpoint_every=2, lr=5e-2), progress=False)
    train(quick_settings(root / "short", steps=2, checkpoint_every=2, lr=5e-2), progress=False)
    return root


def _sample(pipe):
    generator = torch.Generator().manual_seed(0)
    return pipe("a <castle>", num_inference_steps=3, guidance_scale=5.0, generator=generator, output_type="np").images


def test_a_checkpoint_holds_the_adapter_of_its_step(runs):
    checkpoint = runs / "long" / "checkpoints" / "step-000002"
    at_checkpoint = read_adapter(checkpoint)  # the folder resolves to the adapter file in it
    stopped_there = read_adapter(runs / "short" / "castle.safetensors")
    assert at_checkpoint.path == checkpoint / "castle.safetensors"
    assert at_checkpoint.tensors.keys() == stopped_there.tensors.keys()
    for key, tensor in stopped_there.tensors.items():
        assert torch.equal(at_checkpoint.tensors[key], tensor), key
    assert at_checkpoint.metadata["step"] == "2" and stopped_there.metadata["step"] == "2"
    final = read_adapter(runs / "long")
    assert final.metadata["step"] == "4"
    assert {k: v for k, v in at_checkpoint.metadata.items() if k != "step"} == \
        {k: v for k, v in final.metadata.items() if k != "step"}
    assert not all(torch.equal(final.tensors[k], v) for k, v in at_checkpoint.tensors.items())


def test_a_checkpoint_folder_loads_into_a_pipeline_like_the_adapter_file(runs):
    pipe = load_pipeline(None)
    name = load_adapter(pipe, runs / "long" / "checkpoints" / "step-000002")
    from_checkpoint = _sample(pipe)
    pipe2 = load_pipeline(None)
    load_adapter(pipe2, runs / "short" / "castle.safetensors")
    assert name == "castle"
    assert abs(from_checkpoint - _sample(pipe2)).max() < 1e-6


def test_inspect_and_sample_take_a_checkpoint_folder(runs, tmp_path, monkeypatch, capsys):
    checkpoint = runs / "long" / "checkpoints" / "step-000002"
    code, out, err = run_cli(["inspect", str(checkpoint), "--json"], monkeypatch, capsys)
    assert code == 0, err
    assert json.loads(out)["file"] == str(checkpoint / "castle.safetensors")
    code, out, err = run_cli(["sample", "--adapter", str(checkpoint), "--prompt", "a <castle>", "--steps", "2",
                              "--out", str(tmp_path / "samples")], monkeypatch, capsys)
    assert code == 0, err
    assert len(list((tmp_path / "samples").glob("*.png"))) == 1


def test_a_folder_without_an_adapter_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    assert_user_error(run_cli(["inspect", str(tmp_path / "empty")], monkeypatch, capsys), "holds no filteratom-sd adapter")
