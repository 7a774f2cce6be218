"""Time-gap and age tokens: how the passing of time is written into a token sequence.

The default scheme follows the paper's code: between two events more than a day apart goes
one token for the gap, in days 1-6, weeks 1-4, months 1-11, years 1-9 or decades 1-9. Each
token stands for a whole number of days (its lower edge: `TIME/2w` = 14 days), which the risk
engine sums to know how far a generated path has gone. A lookup table from gap-in-days to
token index makes the mapping one vectorised gather.
"""

from __future__ import annotations

import numpy as np

DAYS_PER_MONTH = 30.4375  # 365.25 / 12
DAYS_PER_YEAR = 365.25

# Gaps are clipped here before the table lookup: anything longer is the last decade token.
MAX_GAP_DAYS = 100 * 366

AGE_BIN_YEARS = 5
MAX_AGE_YEARS = 100


def default_time_scheme() -> list[tuple[str, int]]:
    """The (token, days) pairs of the default scheme, shortest first."""
    scheme = [(f"TIME/{d}d", d) for d in range(1, 7)]
    scheme += [(f"TIME/{w}w", 7 * w) for w in range(1, 5)]
    scheme += [(f"TIME/{m}mo", int(round(m * DAYS_PER_MONTH))) for m in range(1, 12)]
    scheme += [(f"TIME/{y}y", int(round(y * DAYS_PER_YEAR))) for y in range(1, 10)]
    scheme += [(f"TIME/{10 * k}y", int(round(10 * k * DAYS_PER_YEAR))) for k in range(1, 10)]
    return scheme


def gap_lookup(scheme: list[tuple[str, int]]) -> np.ndarray:
    """Table t[d] = index into `scheme` of the token for a gap of d whole days, -1 for d < 1 day.

    A gap takes the longest token whose day count is <= the gap, so a token's days are a lower
    bound on the gap it replaced and decoding never overstates elapsed time.
    """
    days = np.array([d for _, d in scheme], dtype=np.int64)
    if np.any(np.diff(days) <= 0):
        raise ValueError("time scheme days must be strictly increasing")
    gaps = np.arange(MAX_GAP_DAYS + 1)
    return (np.searchsorted(days, gaps, side="right") - 1).astype(np.int32)


def age_tokens() -> list[str]:
    """Age-at-first-event tokens: `AGE/0`, `AGE/5`, ..., `AGE/100` (age in completed years, binned)."""
    return [f"AGE/{a}" for a in range(0, MAX_AGE_YEARS + 1, AGE_BIN_YEARS)]


def age_bin_index(age_years: np.ndarray) -> np.ndarray:
    """Index into `age_tokens()` for ages in (fractional) years; negative ages clamp to 0."""
    idx = np.floor(np.asarray(age_years, dtype=np.float64) / AGE_BIN_YEARS)
    return np.clip(idx, 0, MAX_AGE_YEARS // AGE_BIN_YEARS).astype(np.int32)
