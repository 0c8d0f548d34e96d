"""The training loop on the bundled tiny model: learning, outputs, determinism, resume, interrupts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
import torch
import yaml

import filteratom_sd.training.loop as train_module
from filteratom_sd.core.adapter_file import read_adapter
from filteratom_sd.training.data import instance_prompts, load_concept_images
from filteratom_sd.errors import TrainingError, UserInputError
from filteratom_sd.models import load_pipeline
from filteratom_sd.core.api import load_adapter
from filteratom_sd.tiny.domain import PALETTE, SHAPES
from filteratom_sd.training.loop import TrainingInterrupted, snr_weights, train
from filteratom_sd.resources import shipped_config
from filteratom_sd.training.settings import resolve_settings

from .train_helpers import CASTLE, adapter_bytes, quick_settings


def _sample(pipe, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return pipe("a <castle>", num_inference_steps=3, guidance_scale=5.0, generator=generator, output_type="np").images


def test_a_run_writes_every_output_and_the_adapter_changes_samples(tmp_path):
    out = tmp_path / "run"
    result = train(quick_settings(out, lr=5e-2), progress=False)
    assert result.adapter_path == out / "castle.safetensors"
    for name in ("training_config.yaml", "README.md", "samples/final.png"):
        assert (out / name).is_file(), name
    assert (out / "checkpoints" / "step-000002" / "params.safetensors").is_file()
    assert list((out / "logs").iterdir()), "no TensorBoard events"
    saved = yaml.safe_load((out / "training_config.yaml").read_text())
    assert saved["concept"] == "castle" and saved["steps"] == 4 and saved["preset"] == "C2"
    card = (out / "README.md").read_text()
    assert "<castle>" in card and f"{result.trainable_parameters:,}" in card
    assert f"final training loss: {result.losses[-1]:.4f} " in card  # the number the CLI prints
    assert str(tmp_path) not in card and str(CASTLE.parent) not in card  # travels without local paths

    adapter = read_adapter(result.adapter_path)
    assert adapter.method == "filter-atoms" and adapter.token == "<castle>"
    assert adapter.num_parameters == result.trainable_parameters > 0

    pipe = load_pipeline(None)
    before = _sample(pipe)
    load_adapter(pipe, result.adapter_path)
    after = _sample(pipe)
    assert abs(after - before).max() > 1e-2


def test_training_lowers_the_loss_on_the_concept(tmp_path):
    result = train(quick_settings(tmp_path / "run", steps=40, batch_size=5, checkpoint_every=100, lr=1e-2),
                   progress=False)
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)


def test_same_seed_gives_identical_adapter_bytes_and_another_seed_does_not(tmp_path):
    train(quick_settings(tmp_path / "a", seed=3), progress=False)
    train(quick_settings(tmp_path / "b", seed=3), progress=False)
    train(quick_settings(tmp_path / "c", seed=4), progress=False)
    assert adapter_bytes(tmp_path / "a") == adapter_bytes(tmp_path / "b")
    assert adapter_bytes(tmp_path / "a") != adapter_bytes(tmp_path / "c")


def _interrupt_at(monkeypatch, step_to_stop: int, signum: int) -> None:
    """Send ourselves a signal during the given step (the loop finishes the step, then stops)."""
    calls = {"n": 0}
    real_loss = train_module._loss

    def loss_then_signal(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step_to_stop:
            os.kill(os.getpid(), signum)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "_loss", loss_then_signal)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_saves_and_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, signum):
    train(quick_settings(tmp_path / "whole", steps=6, checkpoint_every=100), progress=False)

    out = tmp_path / "stopped"
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)  # SIG_IGN where started in the background
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 3, signum)
        with pytest.raises(TrainingInterrupted) as stopped:
            train(quick_settings(out, steps=6, checkpoint_every=100), progress=False)
    assert stopped.value.step == 3 and stopped.value.signum == signum
    assert (out / "checkpoints" / "step-000003").is_dir() and (out / "castle.safetensors").is_file()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers restored

    result = train(quick_settings(out, steps=6, checkpoint_every=100), resume=True, progress=False)
    assert len(result.losses) == 6
    assert adapter_bytes(out) == adapter_bytes(tmp_path / "whole")


def test_checkpoints_rotate_keeping_the_newest(tmp_path):
    out = tmp_path / "run"
    train(quick_settings(out, steps=7, checkpoint_every=1, checkpoints_total_limit=2), progress=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000005", "step-000006"]


def test_an_earlier_run_is_not_overwritten_without_being_asked(tmp_path):
    out = tmp_path / "run"
    train(quick_settings(out, steps=2), progress=False)
    before = adapter_bytes(out)
    with pytest.raises(UserInputError, match="--resume or --overwrite"):
        train(quick_settings(out, steps=2, seed=9), progress=False)
    with pytest.raises(UserInputError, match="'castle', not 'tower'"):
        train(quick_settings(out, concept="tower", steps=2), resume=True, progress=False)
    assert adapter_bytes(out) == before
    train(quick_settings(out, steps=2, seed=9), overwrite=True, progress=False)
    assert adapter_bytes(out) != before


def test_non_finite_loss_is_skipped_or_stops(tmp_path, monkeypatch):
    real_loss = train_module._loss
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(train_module, "_loss", sometimes_nan)
    result = train(quick_settings(tmp_path / "skip"), progress=False)
    assert result.skipped_steps == 1
    assert all(torch.isfinite(t).all() for t in read_adapter(result.adapter_path).tensors.values())

    calls["n"] = 0
    with pytest.raises(TrainingError, match="NaN/inf at step 1"):
        train(quick_settings(tmp_path / "stop", on_nan="stop"), progress=False)
    assert not (tmp_path / "stop" / "castle.safetensors").exists()


def test_prior_preservation_generates_missing_class_images(tmp_path):
    out = tmp_path / "run"
    class_dir = tmp_path / "class"
    train(quick_settings(out, steps=2, prior_preservation=True, class_prompt="a grey square",
                         class_images=str(class_dir), num_class_images=2), progress=False)
    assert len(list(class_dir.glob("*.png"))) == 2
    assert (out / "castle.safetensors").is_file()


class _OneProcess:
    """What prepare_class_images asks of an accelerator, for one process on the CPU."""

    is_main_process = True
    device = torch.device("cpu")

    def wait_for_everyone(self) -> None:
        pass


def test_class_images_are_the_same_images_in_batches_and_after_an_interruption(tmp_path):
    import numpy as np
    from filteratom_sd.generation import image_generator
    from filteratom_sd.training.prior import prepare_class_images

    pipe = load_pipeline(None)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a grey square", "a red star on a blue background"]

    def drawn(folder, batch, count=5):
        settings = quick_settings(tmp_path / "run", prior_preservation=True, class_prompt=prompts, resolution=64,
                                  class_images=str(folder), num_class_images=count, sample_batch_size=batch,
                                  guidance_scale=5.0)
        return prepare_class_images(pipe, settings, _OneProcess())

    one_by_one = [np.asarray(pipe(prompts[i % 2], num_inference_steps=2, guidance_scale=5.0, height=64, width=64,
                                  generator=image_generator(0, 12_345 + i)).images[0], dtype=int) for i in range(5)]
    batched = drawn(tmp_path / "batched", 3)
    drawn(tmp_path / "resumed", 2, count=3)  # a run stopped after 3 images, then continued to 5
    resumed = drawn(tmp_path / "resumed", 4)
    for images in (batched, resumed):
        assert [i.caption for i in images] == [prompts[i % 2] for i in range(5)]
        # batched GEMMs round differently: a pixel may move by one level, never more
        assert all(np.abs(np.asarray(i.image, dtype=int) - ref).max() <= 1 for i, ref in zip(images, one_by_one))
    assert len(set(np.asarray(i.image).tobytes() for i in batched)) == 5


def test_min_snr_weights_match_the_formula():
    alphas_cumprod = torch.tensor([0.9, 0.5, 0.1])
    t = torch.tensor([0, 1, 2])
    snr = alphas_cumprod / (1 - alphas_cumprod)  # 9, 1, 1/9
    eps = snr_weights(alphas_cumprod, t, 5.0, v_prediction=False)
    assert torch.allclose(eps, torch.tensor([5 / 9, 1.0, 1.0]))
    v = snr_weights(alphas_cumprod, t, 5.0, v_prediction=True)
    assert torch.allclose(v, torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))


def test_method_learning_rates_follow_the_method_unless_given(tmp_path):
    tiny = quick_settings(tmp_path / "x")
    assert tiny.learning_rate() == (3e-3, "lr_by_method")  # the shipped tiny.yaml: filter atoms at 3e-3
    full = quick_settings(tmp_path / "y", method="full", preset=None)
    assert full.learning_rate() == (5e-6, "method default")
    assert quick_settings(tmp_path / "z", lr=3e-4).learning_rate() == (3e-4, "given")


@pytest.mark.parametrize("by_name", [True, False])
def test_prompt_preserving_recipe_covers_the_whole_domain(tmp_path, by_name):
    recipe = "tiny-prompt-preserving" if by_name else str(shipped_config("training", "tiny-prompt-preserving"))
    settings = resolve_settings(dict(concept="castle", images=str(CASTLE), output_dir=str(tmp_path)), recipe)
    assert settings.prior_preservation and settings.train_token and settings.token_init == "square"
    assert settings.lr_by_method == {"filter-atoms": 1e-3} and settings.lr_scheduler == "cosine"  # over tiny.yaml
    words = {w.strip(",") for p in settings.class_prompts for w in p.split()}
    backgrounds = {m for p in settings.class_prompts for m in re.findall(r"(\w+),? background", p)}
    assert set(SHAPES) <= words and backgrounds == set(PALETTE)
    assert len(set(settings.class_prompts)) >= 64 and settings.num_class_images >= len(settings.class_prompts)
    prompts = instance_prompts(load_concept_images(settings.images), settings.trigger, settings.prompt_templates)
    assert set(prompts) == {"a <castle> on a white background"}


def test_masked_loss_counts_only_the_masked_latent_pixels(tmp_path):
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from filteratom_sd.training.latents import LatentSet
    from filteratom_sd.training.loop import _loss

    latents = torch.randn(1, 4, 4, 4)
    weights = torch.zeros(1, 1, 4, 4)
    weights[..., :2] = 1.0  # only the left half of the image is the concept
    instance = LatentSet(latents, torch.zeros_like(latents), weights, torch.zeros(1, 3, 8), [0], scaling=1.0,
                         view_prompts=["a <castle>"])
    prediction = torch.randn(1, 4, 4, 4)

    def fake_unet(noisy, timesteps, embeddings):
        return SimpleNamespace(sample=prediction)

    scheduler = DDPMScheduler()
    settings = quick_settings(tmp_path, batch_size=1)
    loss = _loss(fake_unet, instance, None, settings, scheduler, scheduler.alphas_cumprod, "epsilon",
                 torch.Generator().manual_seed(0), "cpu", torch.float32)
    generator = torch.Generator().manual_seed(0)
    torch.randint(0, 1, (1,), generator=generator)  # the view index drawn first
    torch.randn(latents.shape, generator=generator)  # the latent sample (std 0 here)
    noise = torch.randn(latents.shape, generator=generator)
    expected = (prediction - noise)[..., :2].pow(2).mean()
    assert torch.isclose(loss, expected)


def test_the_model_card_snippet_runs_as_written_from_the_adapter_folder(tmp_path):
    out = tmp_path / "run"
    train(quick_settings(out, steps=2), progress=False)
    (snippet,) = re.findall(r"```python\n(.*?)```", (out / "README.md").read_text(), flags=re.S)
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=out, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "castle-sample.png").is_file()


def test_the_training_path_changes_the_route_not_the_adapter(tmp_path, monkeypatch):
    from filteratom_sd.core import fast_paths

    calls = []
    for op in (fast_paths.TapConvOp, fast_paths.BlockLinearOp):
        original = op.apply
        monkeypatch.setattr(op, "apply", lambda *a, _original=original: calls.append(1) or _original(*a))
    adapters = {}
    for path in ("weight", "activations"):
        calls.clear()
        result = train(quick_settings(tmp_path / path, train_path=path, checkpoint_every=100))
        # the bundled model's layers are below the activation paths' size, so only "activations" takes them
        assert (len(calls) > 0) == (path == "activations")
        adapters[path] = read_adapter(result.adapter_path).tensors
        written = yaml.safe_load((tmp_path / path / "training_config.yaml").read_text())
        assert written["train_path"] == path
    assert adapters["weight"].keys() == adapters["activations"].keys()
    # rounding only: AdamW amplifies it in near-zero gradients, yet the whole difference stays ~1e-4 where another
    # seed's adapter differs from this one by ~4 (norm over all tensors)
    gap = sum(float((adapters["activations"][n] - t).norm()) ** 2 for n, t in adapters["weight"].items()) ** 0.5
    assert gap < 1e-3
    assert any(not torch.equal(adapters["activations"][n], t) for n, t in adapters["weight"].items())


def test_an_unknown_training_path_is_refused():
    with pytest.raises(UserInputError, match="--train-path must be one of auto, activations, weight"):
        resolve_settings(dict(concept="castle", images=str(CASTLE), train_path="fast"))
