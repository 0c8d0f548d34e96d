"""The kept-step rule on synthetic monitor curves."""

from __future__ import annotations

import random

from filteratom_sd.evaluation.best_step import BestStepRule, choose_step

RULE = BestStepRule(alignment_margin=0.1, prior_margin=0.05, drift_margin=0.1)


def record(step, fidelity, alignment=0.8, drift=0.0, prior=0.9, fit=0.0):
    return {"step": step, "fidelity": fidelity, "alignment": alignment, "prior_drift": drift,
            "prior_accuracy": prior, "concept_fit": fit}


def test_the_most_faithful_step_within_the_margins_is_kept():
    curve = [record(0, 0.40), record(100, 0.50, drift=0.02), record(200, 0.62, alignment=0.75, drift=0.08),
             record(300, 0.70, alignment=0.60, drift=0.09),   # alignment fell 0.2: outside
             record(400, 0.75, drift=0.30),                   # drifted: outside
             record(500, 0.80, prior=0.80)]                   # prior accuracy fell 0.1: outside
    choice = choose_step(curve, RULE)
    assert choice.step == 200 and choice.within_margins
    assert "highest fidelity of the 2 monitored step(s) within the margins" in choice.reason
    assert "fidelity 0.620" in choice.reason and "prior drift 0.080" in choice.reason


def test_margins_are_inclusive_and_ties_keep_the_earlier_step():
    curve = [record(0, 0.4), record(50, 0.6, alignment=0.7, drift=0.1, prior=0.85), record(100, 0.6)]
    assert choose_step(curve, RULE).step == 50


def test_without_a_step_within_the_margins_the_least_exceeding_one_is_kept():
    curve = [record(0, 0.4), record(100, 0.7, drift=0.25), record(200, 0.8, drift=0.15), record(300, 0.9, alignment=0.5)]
    choice = choose_step(curve, RULE)
    # excess in margins: 1.5, 0.5, 2.0
    assert choice.step == 200 and not choice.within_margins
    assert choice.reason.startswith("no monitored step stayed within the margins")


def test_unmeasured_scores_are_not_checked_and_concept_fit_stands_in_for_fidelity():
    curve = [record(0, None, alignment=None, prior=None), record(10, None, alignment=None, prior=None, fit=0.3),
             record(20, None, alignment=None, prior=None, fit=0.5, drift=0.05),
             record(30, None, alignment=None, prior=None, fit=0.7, drift=0.2)]
    choice = choose_step(curve, RULE)
    assert choice.step == 20 and choice.within_margins and "fidelity 0.500" in choice.reason


def test_nothing_to_choose_without_step_zero_or_a_later_step():
    assert choose_step([record(0, 0.4)], RULE) is None
    assert choose_step([record(100, 0.4)], RULE) is None


def test_a_new_record_can_only_move_the_choice_to_itself():
    rng = random.Random(0)
    for _ in range(200):
        curve = [record(0, rng.random(), rng.random(), 0.0, rng.random())]
        previous = None
        for step in range(1, 12):
            curve.append(record(step, rng.random(), rng.random(), rng.random() * 0.3, rng.random()))
            choice = choose_step(curve, RULE)
            assert previous is None or choice.step in (previous, step)
            previous = choice.step
