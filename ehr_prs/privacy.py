"""The small-cell rule of health-data dissemination, in one place: the threshold and the suppression.

All of Us (Data and Statistics Dissemination Policy): no count of fewer than 20 participants is
published, and no code seen in fewer than 20 subjects enters a vocabulary or a report. Every
stage that builds a vocabulary or writes a count reads `MIN_SUBJECTS` (or a `--min-subjects` /
`--min-cell` flag defaulting to it) and suppresses counts with `small` / `suppress_cells`.
(The hub-loadable model files cannot import this package; they spell out 20 with a comment.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping
from numbers import Integral
from typing import Any

MIN_SUBJECTS = 20  # All of Us: no code seen in fewer than 20 subjects enters a vocabulary or a report

HIDDEN = "hidden"  # what a count hidden by complementary suppression reads


def small(count: int, min_cell: int = MIN_SUBJECTS) -> int | str:
    """A count to publish (primary suppression): the number, or "<20" (with min_cell 20) when 0 < count < min_cell."""
    return f"<{min_cell}" if 0 < count < min_cell else int(count)


def suppress_cells(cells: Mapping[str, MutableMapping[str, Any]], keys: Iterable[str],
                   min_cell: int = MIN_SUBJECTS) -> None:
    """Primary and complementary suppression, in place, of the counts `keys` of the levels of one variable.

    `cells` maps each level (of a variable, or the deciles of a group) to its cell; a cell's count
    under `keys` is an int or an already suppressed string. Primary: a count with 0 < n < min_cell
    becomes "<min_cell". Complementary: the levels' counts add up to a published total, so when
    exactly one count of a key is suppressed it could be recovered by subtraction; the smallest
    positive count left (ties: the first level name) becomes "hidden". Applying it twice changes
    nothing, so a report may re-apply it to counts read back from an older JSON file.
    """
    for key in keys:
        for cell in cells.values():
            value = cell.get(key)
            if isinstance(value, Integral) and not isinstance(value, bool):  # numpy ints too
                cell[key] = small(value, min_cell)
        suppressed = [level for level, cell in cells.items() if isinstance(cell.get(key), str)]
        shown = [(cell[key], level) for level, cell in cells.items()
                 if isinstance(cell.get(key), int) and cell[key] > 0]
        if len(suppressed) == 1 and shown:
            _, level = min(shown)
            cells[level][key] = HIDDEN


__all__ = ["HIDDEN", "MIN_SUBJECTS", "small", "suppress_cells"]
