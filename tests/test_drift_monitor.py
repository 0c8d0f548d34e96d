"""The drift monitor: deterministic scores, drift against the base, a drifting run ranked above a gentle one,
the kept step written as the adapter, --max-drift, and the training flags reaching the loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

import filteratom_sd.training.loop as train_module
from filteratom_sd.core.adapter_file import read_adapter
from filteratom_sd.training.data import load_concept_images
from filteratom_sd.evaluation.drift import DriftMonitor, ProbeSet, relative_mse
from filteratom_sd.core.inject import add_adapter
from filteratom_sd.methods.registry import method_class
from filteratom_sd.models import load_pipeline
from filteratom_sd.evaluation.probes import TinyProbeScorer, tiny_probe_prompts
from filteratom_sd.training.loop import train
from filteratom_sd.tiny.checker import analyse, mask_similarity

from .test_cli import run_cli
from .train_helpers import CASTLE, quick_settings


def test_relative_mse_against_a_direct_computation():
    base = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    moved = torch.tensor([[3.0, 5.0], [1.0, 0.0]])
    assert relative_mse(moved, base) == pytest.approx((1 + 1) / 25)
    assert relative_mse(base, base) == 0.0


def _monitor(pipe) -> DriftMonitor:
    concept, context, prior = tiny_probe_prompts("<castle>", ["a square on a red background"])
    probes = ProbeSet(tuple(concept[:2]), tuple(context[:3]), tuple(prior[:3]), seed=1, sample_steps=3)
    return DriftMonitor(pipe, probes, TinyProbeScorer(), [i.image for i in load_concept_images(CASTLE)])


def _scores(record) -> dict:
    return {k: v for k, v in record.to_dict().items() if k != "seconds"}


def test_monitor_scores_are_deterministic_and_zero_drift_at_the_start():
    pipe = load_pipeline(None)
    add_adapter(pipe.unet, method_class("filter-atoms").from_config_dict({"preset": "C2"}))
    latents = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    monitor = _monitor(pipe)
    start = monitor.prepare(pipe.unet, latents, ["a <castle>"] * 3)
    assert start.record.step == 0 and start.record.prior_drift == 0.0 and start.record.concept_fit == 0.0
    assert len(start.images) == 8 and 0.0 <= start.record.fidelity <= 1.0
    # fidelity covers every token prompt, the 2 plain ones and the 3 naming a new background (pairwise IoUs)
    references = [analyse(i.image).mask for i in load_concept_images(CASTLE)]
    expected = np.mean([max(mask_similarity(analyse(im).mask, ref) for ref in references) for im in start.images[:5]])
    assert start.record.fidelity == pytest.approx(expected, abs=1e-12)
    assert _scores(monitor.score(pipe.unet, 0).record) == _scores(start.record)

    with torch.no_grad():
        for p in pipe.unet.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    first, second = monitor.score(pipe.unet, 5).record, monitor.score(pipe.unet, 5).record
    assert _scores(first) == _scores(second)
    assert first.prior_drift > 1e-4

    again = _monitor(pipe)  # a resumed run: the cached reference gives the same scores
    assert again.prepare(pipe.unet, latents, ["a <castle>"] * 3, cached=monitor.reference) is None
    assert _scores(again.score(pipe.unet, 5).record) == _scores(first)


def _monitored(out, lr):
    return train(quick_settings(out, steps=8, lr=lr, monitor=True, monitor_every=4, checkpoint_every=100), progress=False)


def test_a_drifting_run_is_ranked_above_a_gentle_one(tmp_path):
    _monitored(tmp_path / "gentle", 1e-4)
    _monitored(tmp_path / "drifting", 5e-2)
    gentle = json.loads((tmp_path / "gentle" / "monitor.json").read_text())["records"]
    drifting = json.loads((tmp_path / "drifting" / "monitor.json").read_text())["records"]
    assert [r["step"] for r in gentle] == [r["step"] for r in drifting] == [0, 4, 8]
    timing = ("seconds", "elapsed_seconds")
    assert gentle[0] == {**drifting[0], **{k: gentle[0][k] for k in timing}}  # same base, same probes
    assert drifting[-1]["prior_drift"] > 10 * gentle[-1]["prior_drift"] > 0


def test_the_kept_step_is_the_adapter_and_the_card_says_why(tmp_path):
    out = tmp_path / "run"
    # generous margins: every step is within them, so the most faithful monitored step is kept
    result = train(quick_settings(out, steps=6, lr=5e-2, monitor=True, monitor_every=2, checkpoint_every=2, checkpoints_total_limit=5,
                                  alignment_margin=1.0, prior_margin=1.0, drift_margin=100.0), progress=False)
    monitor = json.loads((out / "monitor.json").read_text())
    records = [r for r in monitor["records"] if r["step"] > 0]
    best = max(records, key=lambda r: (r["fidelity"], -r["step"]))
    assert result.kept_step == best["step"] == monitor["kept"]["step"]
    assert monitor["kept"]["within_margins"] and result.kept_reason == monitor["kept"]["reason"]
    kept = read_adapter(out / "castle.safetensors")
    assert kept.metadata["step"] == str(best["step"])
    if best["step"] < 6:  # the checkpoint of that step holds the same adapter
        at_step = read_adapter(out / "checkpoints" / f"step-{best['step']:06d}")
        assert all(torch.equal(at_step.tensors[k], v) for k, v in kept.tensors.items())
    card = (out / "README.md").read_text()
    assert f"The adapter is step {best['step']} of 6" in card and "monitor/curve.png" in card
    assert (out / "monitor" / "curve.png").stat().st_size > 1000
    assert monitor["monitor_share"] > 0 and monitor["training_seconds"] > 0
    elapsed = [r["elapsed_seconds"] for r in monitor["records"]]  # wall time to each monitored step
    assert elapsed == sorted(elapsed) and elapsed[0] >= 0 and len(set(elapsed)) == len(elapsed)
    assert monitor["kept"]["elapsed_seconds"] == next(r["elapsed_seconds"] for r in records if r["step"] == best["step"])


def test_keep_last_and_no_monitor(tmp_path):
    last = train(quick_settings(tmp_path / "last", lr=5e-2, monitor=True, monitor_every=2, keep="last"), progress=False)
    assert last.kept_step == 4 and read_adapter(tmp_path / "last").metadata["step"] == "4"
    off = train(quick_settings(tmp_path / "off", monitor=False), progress=False)
    assert off.kept_step == 4 and "monitor is off" in off.kept_reason
    assert not (tmp_path / "off" / "monitor.json").exists()


def test_max_drift_stops_training_at_the_first_monitored_step_past_it(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(["train", "--concept", "castle", "--images", str(CASTLE), "--output-dir", str(out),
                                 "--steps", "8", "--batch-size", "2", "--lr", "5e-2", "--monitor-every", "2",
                                 "--max-drift", "1e-9", "--checkpoint-every", "100", "--quiet"], monkeypatch, capsys)
    assert code == 0, err
    monitor = json.loads((out / "monitor.json").read_text())
    assert [r["step"] for r in monitor["records"]] == [0, 2]
    assert "passed --max-drift 1e-09 at step 2" in monitor["stopped_early"]
    assert "Stopped early: prior drift" in stdout and "Kept step 2" in stdout
    assert read_adapter(out).metadata["step"] == "2"


def test_training_flags_reach_the_loop(tmp_path, monkeypatch, capsys):
    import diffusers.optimization
    from accelerate import Accelerator

    seen: dict = {}
    real_scheduler, real_clip, real_adamw, real_loss = (diffusers.optimization.get_scheduler,
                                                        Accelerator.clip_grad_norm_, torch.optim.AdamW,
                                                        train_module._loss)

    def scheduler(name, optimizer, **kwargs):
        seen["scheduler"] = (name, kwargs["num_warmup_steps"], kwargs["num_training_steps"])
        return real_scheduler(name, optimizer, **kwargs)

    def clip(self, parameters, max_norm, *args, **kwargs):
        seen["max_norm"] = max_norm
        return real_clip(self, parameters, max_norm, *args, **kwargs)

    class AdamW(real_adamw):
        def __init__(self, params, **kwargs):
            seen["weight_decay"] = kwargs["weight_decay"]
            super().__init__(params, **kwargs)

    def loss(unet, instance, prior, settings, *args):
        seen.update(dropout=instance.caption_dropout, prompts=instance.view_prompts, offset=settings.noise_offset,
                    prior_weight=settings.prior_loss_weight)
        return real_loss(unet, instance, prior, settings, *args)

    monkeypatch.setattr(diffusers.optimization, "get_scheduler", scheduler)
    monkeypatch.setattr(Accelerator, "clip_grad_norm_", clip)
    monkeypatch.setattr(torch.optim, "AdamW", AdamW)
    monkeypatch.setattr(train_module, "_loss", loss)
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--concept", "castle", "--images", str(CASTLE), "--output-dir", str(out),
                            "--steps", "2", "--batch-size", "2", "--lr-scheduler", "cosine", "--lr-warmup-steps", "1",
                            "--weight-decay", "0.5", "--max-grad-norm", "0.25", "--caption-dropout", "0.5",
                            "--noise-offset", "0.1", "--instance-prompt", "a <castle> on a white background",
                            "--prior-loss-weight", "0.3", "--report-to", "none", "--no-monitor", "--quiet"],
                           monkeypatch, capsys)
    assert code == 0, err
    assert seen["scheduler"] == ("cosine", 1, 2) and seen["max_norm"] == 0.25 and seen["weight_decay"] == 0.5
    assert seen["dropout"] == 0.5 and seen["offset"] == 0.1 and seen["prior_weight"] == 0.3
    assert set(seen["prompts"]) == {"a <castle> on a white background"}
    saved = yaml.safe_load((out / "training_config.yaml").read_text())
    assert saved["report_to"] == "none" and saved["monitor"] is False and not (out / "logs").exists()


@pytest.mark.parametrize("option", [{"noise_offset": 0.1}, {"caption_dropout": 0.5}])
def test_noise_offset_and_caption_dropout_change_training(tmp_path, option):
    plain = train(quick_settings(tmp_path / "plain", monitor=False), progress=False)
    changed = train(quick_settings(tmp_path / "changed", monitor=False, **option), progress=False)
    assert plain.losses != changed.losses
