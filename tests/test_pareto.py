"""Pareto fronts and matched-fidelity values against hand-computed cases."""

import pytest

from filteratom_sd.evaluation.pareto import common_fidelity, pareto_front, value_at_fidelity


def test_front_keeps_the_non_dominated_points_by_increasing_fidelity():
    points = [(0.5, 0.9), (0.6, 0.7), (0.55, 0.6), (0.7, 0.7), (0.8, 0.2), (0.4, 0.8), (0.8, 0.1)]
    # (0.6, 0.7) is beaten by (0.7, 0.7); (0.55, 0.6) by (0.7, 0.7); (0.4, 0.8) by (0.5, 0.9); (0.8, 0.1) by (0.8, 0.2)
    assert pareto_front(points) == [0, 3, 4]


def test_front_of_duplicates_and_single_points():
    assert pareto_front([]) == []
    assert pareto_front([(0.3, 0.3)]) == [0]
    assert pareto_front([(0.3, 0.3), (0.3, 0.3)]) == [0]
    assert pareto_front([(0.2, 0.5), (0.2, 0.9)]) == [1]


def test_value_at_fidelity_interpolates_between_front_points():
    front = [(0.5, 0.9), (0.7, 0.7), (0.8, 0.2)]
    assert value_at_fidelity(front, 0.6) == pytest.approx(0.8)
    assert value_at_fidelity(front, 0.75) == pytest.approx(0.45)
    assert value_at_fidelity(front, 0.7) == pytest.approx(0.7)
    assert value_at_fidelity(front, 0.8) == pytest.approx(0.2)
    assert value_at_fidelity(front, 0.3) == pytest.approx(0.9)  # below the front: its most aligned point
    assert value_at_fidelity(front, 0.81) is None  # never that faithful
    assert value_at_fidelity([], 0.5) is None


def test_common_fidelity_is_the_lowest_maximum():
    assert common_fidelity([[(0.5, 0.9), (0.7, 0.7)], [(0.6, 0.5), (0.9, 0.1)], []]) == pytest.approx(0.7)
    assert common_fidelity([]) is None
