"""`fa-sd frontier`: a 2-seed x 2-step sweep scored at every step, its reuse and resume, and the report."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

import filteratom_sd.evaluation.frontier as frontier_module
from filteratom_sd.errors import UserInputError
from filteratom_sd.evaluation.compare import parse_method_specs
from filteratom_sd.evaluation.frontier import FrontierRequest, learning_rates, run_dir, run_frontier
from filteratom_sd.evaluation.frontier_report import budget_pairs, matched, write_tables

from .train_helpers import CASTLE

TRAINING = {"batch_size": 1, "validation_steps": 1}
PROMPTS = {"prompts": ["a {} on a red background", "a {} on a blue background"], "seeds": [0], "steps": 2,
           "guidance_scale": 5.0, "batch_size": 2}
SPEC = "filter-atoms:C1,lr=5e-3"


def _request(out, prompts_file) -> FrontierRequest:
    return FrontierRequest("castle", str(CASTLE), parse_method_specs(SPEC), out, seeds=[0, 1], steps=2, score_every=1,
                           training=dict(TRAINING), prompts_file=str(prompts_file))


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.yaml"
    path.write_text(yaml.safe_dump(PROMPTS))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, prompts_file):
    out = tmp_path_factory.mktemp("frontier")
    return out, run_frontier(_request(out, prompts_file))


def test_every_run_is_scored_at_the_base_and_each_checkpoint(finished):
    out, (points, costs) = finished
    assert [(p.seed, p.step) for p in points] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert {p.lr for p in points} == {5e-3}
    base = [p for p in points if p.step == 0]
    assert base[0].fidelity == base[1].fidelity  # the base model is scored once and shared
    spec = parse_method_specs(SPEC)[0]
    for seed in (0, 1):
        folder = run_dir(out, spec, 5e-3, seed)
        assert (folder / "checkpoints" / "step-000001" / "castle.safetensors").is_file()
        assert set(json.loads((folder / "scores.json").read_text())["steps"]) == {"1", "2"}
        # scored at the steps asked for: the final adapter is the last step, not the drift monitor's pick
        assert not (folder / "monitor.json").exists()
        final, first = load_file(folder / "castle.safetensors"), load_file(folder / "checkpoints" / "step-000001" / "castle.safetensors")
        assert final.keys() == first.keys() and not all(torch.equal(final[k], first[k]) for k in final)
    assert costs[SPEC].trainable_parameters > 0 and costs[SPEC].adapter_bytes > 0
    saved = json.loads((out / "frontier.json").read_text())["points"]
    assert len(saved) == len(points)


def test_a_finished_sweep_trains_and_samples_nothing(finished, prompts_file, monkeypatch):
    out, (points, _) = finished

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was redone")

    monkeypatch.setattr("filteratom_sd.training.loop.train", refuse)
    monkeypatch.setattr(frontier_module._Scorer, "score", refuse)
    again, _ = run_frontier(_request(out, prompts_file))
    assert [p.to_dict() for p in again] == [p.to_dict() for p in points]


def test_an_interrupted_sweep_redoes_only_the_unfinished_run(tmp_path, finished, prompts_file, monkeypatch):
    out, (points, _) = finished
    spec = parse_method_specs(SPEC)[0]
    unfinished = run_dir(out, spec, 5e-3, 1)
    (unfinished / "train.json").unlink()  # as if seed 1 had been killed after its step-1 checkpoint
    scores = json.loads((unfinished / "scores.json").read_text())
    del scores["steps"]["2"]
    (unfinished / "scores.json").write_text(json.dumps(scores))
    import filteratom_sd.training.loop as train_module

    trained, real_train = [], train_module.train

    def counting(settings, **kwargs):
        trained.append((settings.seed, kwargs["resume"]))
        return real_train(settings, **kwargs)

    monkeypatch.setattr(train_module, "train", counting)
    again, _ = run_frontier(_request(out, prompts_file))
    assert trained == [(1, True)]  # seed 0 reused; seed 1 resumed from its checkpoint
    assert len(again) == len(points)


def test_learning_rate_grids_and_request_checks(tmp_path):
    lora, pinned = parse_method_specs("lora:r=1,filter-atoms:C2,lr=2e-3")
    assert learning_rates(lora) == (3e-4, 1e-3, 3e-3) and learning_rates(pinned) == (2e-3,)
    with pytest.raises(UserInputError, match="multiple"):
        FrontierRequest("castle", str(CASTLE), [lora], tmp_path, steps=250, score_every=100).validate()
    with pytest.raises(UserInputError, match="seeds"):
        FrontierRequest("castle", str(CASTLE), [lora], tmp_path, seeds=[0, 0]).validate()


def test_report_tables_and_budget_pairs(finished):
    out, (points, costs) = finished
    text = write_tables(points, costs, out, "test sweep", extra_level=0.99)
    assert (out / "frontiers.png").stat().st_size > 0 and (out / "tables.md").read_text() == text
    level_line = next(line for line in text.splitlines() if line.startswith("Common fidelity level"))
    assert "second level 0.990" in level_line
    row = next(line for line in text.splitlines() if line.startswith(f"| {SPEC} |"))
    assert "not reached" in row or points[0].fidelity >= 0.99
    seeds = [p for p in points if p.seed == 0]
    best = max(p.fidelity for p in seeds)
    assert matched(seeds, "alignment", best + 1e-6).mean is None


def test_budget_pairs_take_the_closest_parameter_count():
    from filteratom_sd.evaluation.frontier import RunCosts

    costs = {"filter-atoms:C1": RunCosts(10_000, 1, 1.0), "lora:r=1": RunCosts(33_000, 1, 1.0),
             "lokr": RunCosts(9_000, 1, 1.0), "filter-atoms:C2": RunCosts(200_000, 1, 1.0)}
    pairs = {a: (b, round(r, 2)) for a, b, r in budget_pairs(costs)}
    assert pairs == {"filter-atoms:C1": ("lokr", 0.9), "filter-atoms:C2": ("lora:r=1", 0.17)}


def test_cli_passes_its_options_and_turns_bad_ones_into_user_errors(tmp_path, monkeypatch, capsys):
    from .test_cli import assert_user_error, run_cli

    seen = {}

    def capture(request):
        request.validate()
        seen["request"] = request
        return [], {}

    monkeypatch.setattr(frontier_module, "run_frontier", capture)
    base = ["frontier", "--concept", "castle", "--images", str(CASTLE), "--methods", "filter-atoms:C1,lora:r=1",
            "--out", str(tmp_path), "--quiet"]
    code, out, _ = run_cli(base + ["--seeds", "3,4", "--steps", "200", "--score-every", "50",
                                   "--prompts-file", "p.yaml"], monkeypatch, capsys)
    request = seen["request"]
    assert code == 0 and (request.seeds, request.steps, request.score_every) == ([3, 4], 200, 50)
    assert request.prompts_file == "p.yaml" and request.training == {} and "Common fidelity level" in out
    assert_user_error(run_cli(base + ["--seeds", "a,b"], monkeypatch, capsys), "--seeds")
    assert_user_error(run_cli(base + ["--steps", "250"], monkeypatch, capsys), "multiple of --score-every")
