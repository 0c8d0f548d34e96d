"""`fa-sd compare` and `fa-sd eval`: method specs, a 2-method x 2-step comparison, reuse of finished runs, the report."""

from __future__ import annotations

import json
import sys

import pytest
import yaml
from PIL import Image

import filteratom_sd.evaluation.compare as compare_module
from filteratom_sd.evaluation.prompt_sets import load_prompt_set
from filteratom_sd.evaluation.runs import default_metric_set
from filteratom_sd.cli import main
from filteratom_sd.evaluation.compare import CompareRequest, parse_method_specs, run_comparison
from filteratom_sd.errors import UserInputError

from .train_helpers import CASTLE

# The cheapest settings that still train, sample and score: 2 steps of batch 1, 2 prompts x 2 seeds, 2 sampler steps.
TRAINING = {"batch_size": 1, "checkpoint_every": 100, "validation_steps": 1, "lr_by_method": {"filter-atoms": 5e-3}}
PROMPTS = {"prompts": ["a {} on a red background", "a {} on a blue background"], "seeds": [0, 1], "steps": 2,
           "guidance_scale": 5.0, "batch_size": 4}


def test_method_specs_parse_presets_options_aliases_and_learning_rates():
    specs = parse_method_specs("filter-atoms:C1, lora:r=4,alpha=8,bitfit,lokr:factor=2,lr=1e-2,filter-atoms:preset=C3")
    assert [s.text for s in specs] == ["filter-atoms:C1", "lora:r=4,alpha=8", "bitfit", "lokr:factor=2,lr=1e-2",
                                       "filter-atoms:preset=C3"]
    c1, lora, bitfit, lokr, c3 = specs
    assert (c1.method, c1.preset, c1.options) == ("filter-atoms", "C1", {})
    assert (lora.method, lora.options, lora.lr) == ("lora", {"rank": 4, "alpha": 8}, None)
    assert (bitfit.method, bitfit.options, bitfit.preset) == ("bitfit", {}, None)
    assert (lokr.options, lokr.lr) == ({"factor": 2}, 1e-2)
    assert c3.preset == "C3"
    assert [s.slug for s in specs] == ["filter-atoms-c1", "lora-r-4-alpha-8", "bitfit", "lokr-factor-2-lr-1e-2",
                                       "filter-atoms-preset-c3"]
    assert lokr.training_values() == {"method": "lokr", "method_options": {"factor": 2}, "lr": 1e-2}


@pytest.mark.parametrize("text,fragment", [
    ("r=4,lora", "name a method first"),
    ("lora:C1", "only filter-atoms takes a preset"),
    ("nosuch", "Unknown method"),
    ("filter-atoms:C9", "filter-atoms:C9"),
    ("lora:r=0", "rank"),
    ("lora:bogus=1", "bogus"),
    ("lora:lr=-1", "lr must be a positive number"),
    ("lora,lora", "twice"),
    (" , ", "lists no method"),
])
def test_bad_method_specs_are_user_errors_with_one_sentence(text, fragment):
    with pytest.raises(UserInputError) as info:
        parse_method_specs(text)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_prompt_sets_shipped_in_configs():
    tiny, sd = load_prompt_set(None, bundled=True), load_prompt_set(None, bundled=False)
    assert len(tiny.prompts) == 8 and all("{}" in p and "background" in p for p in tiny.prompts)
    assert len(sd.prompts) == 25 and sd.for_token("<castle>")[0] == "a <castle> in the jungle"
    assert (default_metric_set(None), default_metric_set("CompVis/stable-diffusion-v1-4")) == ("tiny", "embedding")


def test_a_bad_prompt_set_is_a_user_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"prompts": ["no token here"], "seeds": [0]}))
    with pytest.raises(UserInputError, match="each with"):
        load_prompt_set(path)


def _request(out, prompts_file, **overrides) -> CompareRequest:
    values = dict(concept="castle", images=str(CASTLE), specs=parse_method_specs("filter-atoms:C1,lora:r=2"), out=out,
                  steps=2, training=dict(TRAINING), prompts_file=str(prompts_file))
    values.update(overrides)
    return CompareRequest(**values)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.yaml"
    path.write_text(yaml.safe_dump(PROMPTS))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, prompts_file):
    """A finished 2-method x 2-step comparison and its rows."""
    out = tmp_path_factory.mktemp("comparison")
    return out, run_comparison(_request(out, prompts_file))


def test_comparison_writes_report_table_plot_grids_and_results(finished):
    out, records = finished
    assert [r.label for r in records] == ["base", "filter-atoms:C1", "lora:r=2"]
    base, c1, lora = records
    assert base.trainable_parameters == 0 and base.method is None
    for r in (c1, lora):
        assert r.trainable_parameters > 0 and r.adapter_bytes > 0 and r.train_seconds > 0 and r.images == 4
        assert (out / "runs" / r.slug / "castle.safetensors").stat().st_size == r.adapter_bytes
    assert c1.trainable_parameters < lora.trainable_parameters  # C1 tunes a few atoms, LoRA r=2 whole factors
    assert (c1.lr, c1.lr_source) == (5e-3, "lr_by_method") and (lora.lr, lora.lr_source) == (1e-3, "method default")
    for r in records:
        assert 0 <= r.fidelity <= 1 and 0 <= r.alignment <= 1 and 1 <= r.diversity <= 4

    report = (out / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(records)  # header and one row each
    assert table[2].startswith(f"| filter-atoms:C1 | {c1.fidelity:.3f} | {c1.diversity:.2f} | {c1.alignment:.3f} | "
                               f"{c1.trainable_parameters:,} |")
    assert "![alignment against fidelity](alignment-vs-fidelity.png)" in report
    with Image.open(out / "alignment-vs-fidelity.png") as plot:
        assert plot.format == "PNG" and plot.size[0] >= 400
    for r in records:
        assert f"(grids/{r.slug}.png)" in report
        with Image.open(out / "grids" / f"{r.slug}.png") as grid:
            assert grid.size == (2 * 64, 2 * 64)  # 2 prompts x 2 seeds of 64 px
    results = json.loads((out / "results.json").read_text())
    assert [run["label"] for run in results["runs"]] == ["base", "filter-atoms:C1", "lora:r=2"]
    assert results["steps"] == 2 and results["metric_set"] == "tiny"


def test_a_second_run_into_the_same_folder_trains_and_samples_nothing(finished, prompts_file, monkeypatch):
    out, records = finished
    calls = []
    monkeypatch.setattr(compare_module, "train", lambda *a, **k: calls.append("train"))
    monkeypatch.setattr(compare_module, "sample_with_adapter", lambda *a, **k: calls.append("sample"))
    again = run_comparison(_request(out, prompts_file))
    assert calls == []
    assert all(r.reused for r in again)
    assert [r.to_dict() for r in again] == [r.to_dict() for r in records]


def test_only_unfinished_or_changed_runs_are_redone(finished, prompts_file, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished[0], out)
    (out / "runs" / "lora-r-2" / "metrics.json").unlink()  # trained, not yet scored: score it, do not train
    trained = []
    real_train = compare_module.train
    monkeypatch.setattr(compare_module, "train", lambda s, **k: trained.append(s.method) or real_train(s, **k))
    records = run_comparison(_request(out, prompts_file))
    assert trained == [] and [r.reused for r in records] == [True, True, False]
    assert records[2].to_dict() == finished[1][2].to_dict()  # same adapter, same seeds: the same scores

    # Another seed for LoRA: it trains again, the base row is reused.
    records = run_comparison(_request(out, prompts_file, seed=1, specs=parse_method_specs("lora:r=2")))
    assert trained == ["lora"] and [r.reused for r in records] == [True, False]
    assert records[1].train_key != finished[1][2].train_key


def _cli(args, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["fa-sd", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr()


def test_cli_eval_scores_base_and_adapter_exactly_as_the_comparison_did(finished, prompts_file, tmp_path, monkeypatch,
                                                                          capsys):
    out, records = finished
    adapter = out / "runs" / "filter-atoms-c1" / "castle.safetensors"
    json_path = tmp_path / "scores.json"
    code, captured = _cli(["eval", "--adapter", str(adapter), "--base", "--images", str(CASTLE), "--prompts-file",
                           str(prompts_file), "--out", str(json_path)], monkeypatch, capsys)
    assert code == 0, captured.err
    report = json.loads(json_path.read_text())
    base, c1 = report["results"]
    assert (base["label"], base["adapter"], c1["method"], c1["token"]) == ("base", None, "filter-atoms", "<castle>")
    for row, record in ((base, records[0]), (c1, records[1])):  # same adapter, same seeds: the same scores
        assert (row["fidelity"], row["diversity"], row["alignment"]) == (record.fidelity, record.diversity, record.alignment)
    assert report["metric_set"] == "tiny" and report["prompt_set"]["seeds"] == [0, 1] and report["references"] == 5
    assert "castle: fidelity" in captured.out


def test_cli_eval_refuses_mistakes_with_one_error_line(tmp_path, monkeypatch, capsys):
    for args, fragment in ((["eval", "--images", str(CASTLE)], "at least one --adapter"),
                           (["eval", "--adapter", str(tmp_path / "none.safetensors"), "--images", str(CASTLE)], "No adapter"),
                           (["eval", "--base", "--token", "<dog>", "--images", str(CASTLE)], "tiny metrics"),
                           (["eval", "--base", "--token", "<castle>", "--images", str(tmp_path)], "no .jpg")):
        code, captured = _cli([*args, "--out", str(tmp_path / "x.json")], monkeypatch, capsys)
        errors = [line for line in captured.err.splitlines() if line.startswith("Error:")]
        assert code == 2 and len(errors) == 1 and fragment in errors[0], captured.err
    assert not (tmp_path / "x.json").exists()


def test_cli_compare_refuses_a_bad_method_list_before_anything_is_written(tmp_path, monkeypatch, capsys):
    out = tmp_path / "report"
    code, captured = _cli(["compare", "--concept", "castle", "--images", str(CASTLE), "--methods", "lora:C2",
                           "--out", str(out)], monkeypatch, capsys)
    errors = [line for line in captured.err.splitlines() if line.startswith("Error:")]
    assert code == 2 and len(errors) == 1 and "only filter-atoms takes a preset" in errors[0]
    assert not out.exists()
