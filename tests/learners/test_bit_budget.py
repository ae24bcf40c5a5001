"""Known answers for the per-layer bit budget projection."""

from __future__ import annotations

import pytest

from learners.bit_budget import average_bits, project_bits
from pocketflow.errors import ConfigError

SIZES = {"a": 100, "b": 1000, "c": 10000}


def test_uniform_proposal_at_the_budget_stays_put():
    assert project_bits({"a": 4, "b": 4, "c": 4}, SIZES, 4.0) == {"a": 4, "b": 4, "c": 4}


def test_projection_meets_the_budget_and_keeps_the_order():
    bits = project_bits({"a": 8, "b": 6, "c": 5}, SIZES, 4.0)
    assert average_bits(bits, SIZES) <= 4.0 + 1e-9
    assert bits["a"] >= bits["b"] >= bits["c"]
    assert average_bits(bits, SIZES) > 3.9  # the slack is spent


@pytest.mark.parametrize("budget", [2.0, 2.5, 3.3, 5.0, 7.9])
def test_every_budget_is_met_within_bounds(budget):
    proposed = {"a": 2, "b": 8, "c": 3}
    bits = project_bits(proposed, SIZES, budget)
    assert all(2 <= b <= 8 for b in bits.values())
    assert average_bits(bits, SIZES) <= budget + 1e-9


def test_generous_budget_raises_the_proposal_to_use_it():
    assert project_bits({"a": 3, "b": 5, "c": 7}, SIZES, 8.0) == {"a": 8, "b": 8, "c": 8}


def test_budget_below_the_smallest_width_is_an_error():
    with pytest.raises(ConfigError, match="below the smallest width"):
        project_bits({"a": 4}, SIZES, 1.5)
