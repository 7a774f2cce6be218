"""ehr_prs.privacy: the All of Us 20-subject rule and the one small-cell suppression every report uses."""

from __future__ import annotations

import copy

import numpy as np

from ehr_prs.privacy import HIDDEN, MIN_SUBJECTS, small, suppress_cells


def test_the_rule_is_20_subjects_and_small_counts_print_as_a_bound():
    assert MIN_SUBJECTS == 20
    assert [small(n) for n in (0, 1, 19, 20, 500)] == [0, "<20", "<20", 20, 500]
    assert small(4, min_cell=5) == "<5" and small(5, min_cell=5) == 5
    assert small(np.int64(7)) == "<20" and type(small(np.int64(30))) is int  # JSON-ready


def test_a_count_recoverable_from_the_total_is_hidden_with_a_second_one():
    # Sex in a report that also publishes the totals (319 rows, 29 positive).
    cells = {"F": {"n": 194, "n_positive": 24}, "M": {"n": 125, "n_positive": 5}}
    primary = {level: small(c["n_positive"]) for level, c in cells.items()}
    assert primary == {"F": 24, "M": "<20"}
    assert 29 - primary["F"] == cells["M"]["n_positive"]  # primary suppression alone gives M's 5 back
    suppress_cells(cells, ("n", "n_positive"))
    assert cells == {"F": {"n": 194, "n_positive": HIDDEN}, "M": {"n": 125, "n_positive": "<20"}}
    # Nothing printed now pins M down: 29 minus an unknown.
    assert [c["n_positive"] for c in cells.values()] == ["hidden", "<20"]


def test_complementary_suppression_hides_the_smallest_positive_count_only():
    cells = {"a": {"n": 3}, "b": {"n": 500}, "c": {"n": 30}, "d": {"n": 0}, "e": {"n": 30}}
    suppress_cells(cells, ["n"])
    # a is suppressed; of the shown counts the smallest positive one goes (c before e: ties by level);
    # a 0 reveals nothing about the others and stays.
    assert {k: c["n"] for k, c in cells.items()} == {"a": "<20", "b": 500, "c": "hidden", "d": 0, "e": 30}


def test_two_suppressed_counts_need_no_third_and_a_second_pass_changes_nothing():
    two = {"a": {"n": 5}, "b": {"n": 12}, "c": {"n": 500}}
    suppress_cells(two, ("n",))
    assert [c["n"] for c in two.values()] == ["<20", "<20", 500]
    once = {"x": {"n": 40, "k": "<20"}, "y": {"n": 8, "k": 33}, "z": {"n": 90, "k": 61}}
    suppress_cells(once, ("n", "k"))
    again = copy.deepcopy(once)
    suppress_cells(again, ("n", "k"))  # what a report does with counts read back from metrics.json
    assert again == once == {"x": {"n": "hidden", "k": "<20"}, "y": {"n": "<20", "k": "hidden"},
                             "z": {"n": 90, "k": 61}}


def test_min_cell_sets_the_threshold_and_numpy_counts_are_suppressed_too():
    cells = {"a": {"n": np.int64(4)}, "b": {"n": np.int64(6)}, "c": {"n": 9}}
    suppress_cells(cells, ("n",), min_cell=5)
    assert [c["n"] for c in cells.values()] == ["<5", "hidden", 9]
