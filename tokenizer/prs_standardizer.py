"""PRS standardisation: per-score mean and std fitted on genotyped training subjects, saved as JSON.

Raw polygenic scores differ in scale and, by genetic ancestry, in mean; the model reads
z-scores. Statistics come from the training split only (optionally within groups given by a
column such as `ancestry`; a group with fewer than `min_group_subjects` genotyped training
subjects, or unseen at fit time, uses the pooled statistics). A subject is genotyped when it
has a row with at least one score; a missing single score inside a genotyped row becomes 0
(its group's training mean). A subject that is not genotyped gets `prs_mask` False and an
all-zero vector that the model must never read as a person of average risk. A column with
fewer than two distinct training values (all missing, or constant) carries no information: it
is 0 for everyone. Missing cells and such columns are reported (one warning line) when the
standardiser is fitted and when it is applied; columns are matched by name, in any order.

`fit` takes a table in memory; `fit_scan` streams a `scan_prs_table` handle in bounded batches
(per-column counts, means and sums of squared deviations in float64, merged batch by batch), so
fitting on a cohort-sized table never holds it; both give the same statistics to float64
rounding. `transform` works through the subjects asked for in blocks of BLOCK_ROWS rows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from ehr_prs.errors import InputError
from ehr_prs.privacy import MIN_SUBJECTS
from ehr_prs.data.readers import warn

if TYPE_CHECKING:
    from ehr_prs.data.readers import PrsScan

FILE_NAME = "prs_standardizer.json"
FORMAT_NAME = "ehr-prs-prs-standardizer"
FORMAT_VERSION = 1
POOLED = "__pooled__"
# Rows converted to float64 at a time when fitting or applying (3,481 scores: ~28 MB a block).
BLOCK_ROWS = 1024


def _names(columns: list[str], n: int = 5) -> str:
    return ", ".join(columns[:n]) + (f", ... ({len(columns)} in all)" if len(columns) > n else "")


def _moments(frame: pl.DataFrame, columns: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (ddof=1) per column, nulls ignored; NaN where a column has too few values."""
    if not columns:
        return np.zeros(0), np.zeros(0)
    row = frame.select(
        [pl.col(c).cast(pl.Float64).mean().alias(f"m{i}") for i, c in enumerate(columns)]
        + [pl.col(c).cast(pl.Float64).std().alias(f"s{i}") for i, c in enumerate(columns)]
    ).row(0)
    n = len(columns)
    as_arr = lambda xs: np.array([np.nan if x is None else x for x in xs], dtype=np.float64)  # noqa: E731
    return as_arr(row[:n]), as_arr(row[n:])


class _RunningMoments:
    """Per-column count, mean and sum of squared deviations of float64 blocks, merged block by block.

    The pairwise update of Chan, Golub and LeVeque (1979): exact in exact arithmetic and, unlike
    sums of squares, free of cancellation when a score's mean is large against its spread. A
    column whose values are all equal gets std exactly 0 and mean exactly that value, as a
    whole-table computation gives. `rows` counts the rows seen; `null_hist[k]` the rows with k
    missing scores (for the fit's warning).
    """

    def __init__(self, k: int):
        self.rows = 0
        self.n = np.zeros(k, dtype=np.int64)
        self.mean = np.zeros(k)
        self.m2 = np.zeros(k)
        self.lo = np.full(k, np.inf)
        self.hi = np.full(k, -np.inf)
        self.null_hist = np.zeros(k + 1, dtype=np.int64)

    def update(self, x: np.ndarray) -> None:
        """Add a block [rows, k] of float64 scores (NaN = missing)."""
        self.rows += x.shape[0]
        present = ~np.isnan(x)
        self.null_hist += np.bincount((~present).sum(axis=1), minlength=self.null_hist.size)
        nb = present.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mb = np.where(present, x, 0.0).sum(axis=0) / nb
            d = np.where(present, x - mb, 0.0)
        m2b = (d * d).sum(axis=0)
        self.lo = np.minimum(self.lo, np.where(present, x, np.inf).min(axis=0, initial=np.inf))
        self.hi = np.maximum(self.hi, np.where(present, x, -np.inf).max(axis=0, initial=-np.inf))
        has = nb > 0
        n = self.n + nb
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = mb - self.mean
            mean = np.where(self.n == 0, mb, self.mean + delta * (nb / n))
            m2 = self.m2 + m2b + delta * delta * (self.n * (nb / n))
        self.mean = np.where(has, mean, self.mean)
        self.m2 = np.where(has, np.where(self.n == 0, m2b, m2), self.m2)
        self.n = n

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std (ddof=1) per column; NaN where a column has too few values (as `_moments`)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(self.n > 0, self.mean, np.nan)
            std = np.where(self.n > 1, np.sqrt(np.maximum(self.m2, 0.0) / (self.n - 1)), np.nan)
        constant = (self.n > 0) & (self.lo == self.hi)
        mean = np.where(constant, self.lo, mean)
        std = np.where(constant & (self.n > 1), 0.0, std)
        return mean, std


class PrsStandardizer:
    """Z-scores PRS columns with training statistics; `transform` gives (prs, prs_mask)."""

    def __init__(
        self,
        columns: list[str],
        mean: list[float],
        std: list[float],
        group_column: str | None = None,
        groups: dict[str, dict[str, list[float]]] | None = None,
        min_group_subjects: int = MIN_SUBJECTS,
        uninformative: list[str] | None = None,
    ):
        self.columns = list(columns)
        # Columns without two distinct training values: standardised to 0 for everyone.
        self.uninformative = [c for c in (uninformative or []) if c in set(columns)]
        self.mean = np.asarray(mean, dtype=np.float64)
        self.std = np.asarray(std, dtype=np.float64)
        self.group_column = group_column
        self.groups = groups or {}
        self.min_group_subjects = min_group_subjects

    @property
    def n_prs(self) -> int:
        return len(self.columns)

    @classmethod
    def empty(cls) -> PrsStandardizer:
        """The standardiser of a dataset without PRS: n_prs = 0, every subject not genotyped."""
        return cls([], [], [])

    @classmethod
    def fit(
        cls,
        frame: pl.DataFrame,
        columns: list[str],
        train_subject_ids: pl.Series | None = None,
        group_column: str | None = None,
        min_group_subjects: int = MIN_SUBJECTS,
        source: str = "PRS table",
    ) -> PrsStandardizer:
        """Fit on the genotyped rows of `frame` whose subject is in `train_subject_ids`.

        Missing cells of genotyped training subjects and columns without information (all missing
        or constant) are reported in one warning line naming `source`.
        """
        _check_group_column_present(group_column, frame.columns, columns)
        rows = frame
        if train_subject_ids is not None:
            rows = rows.join(pl.DataFrame({"subject_id": train_subject_ids.cast(pl.Int64)}), on="subject_id", how="semi")
        rows = rows.filter(pl.any_horizontal(pl.col(columns).is_not_null())) if columns else rows.clear()
        _check_enough_rows(rows.height, columns)
        mean, std = _moments(rows, columns)
        nulls = np.asarray(rows.select(pl.col(columns).is_null().sum()).row(0), dtype=np.int64) if columns else np.zeros(0)
        per_row = rows.select(pl.sum_horizontal(pl.col(columns).is_null()).alias("k"))["k"].to_numpy() if columns else []
        null_hist = np.bincount(np.asarray(per_row, dtype=np.int64), minlength=len(columns) + 1)
        groups = []
        if group_column is not None:
            sizes = rows.group_by(group_column).len()
            for g, n in sizes.sort(group_column, nulls_last=True).iter_rows():
                if g is None or n < min_group_subjects:
                    continue
                groups.append((g, *_moments(rows.filter(pl.col(group_column) == g), columns)))
        return cls._from_moments(columns, mean, std, rows.height, nulls, null_hist, group_column, groups,
                                 min_group_subjects, source)

    @classmethod
    def fit_scan(
        cls,
        scan: PrsScan,
        train_subject_ids: pl.Series | None = None,
        group_column: str | None = None,
        min_group_subjects: int = MIN_SUBJECTS,
        source: str | None = None,
    ) -> PrsStandardizer:
        """`fit` streamed over a `scan_prs_table` handle: one pass in bounded batches, never the whole table.

        Reads every row (so each score is checked as `read_prs_table` checks it) and keeps the
        genotyped rows of `train_subject_ids`, BLOCK_ROWS at a time: memory follows the batch
        size, not the cohort. Gives the statistics of `fit` on the same table to float64
        rounding (about 1e-15 relative), and the same groups, columns and warning.
        """
        columns = scan.score_columns
        source = str(scan.path) if source is None else source
        _check_group_column_present(group_column, scan.columns, columns)
        # Training rows as a mask over the file's rows (batches come in file order, every row once).
        train = np.ones(scan.n_rows, dtype=bool)
        if train_subject_ids is not None:
            train[:] = False
            train[scan.rows_of(train_subject_ids)] = True
        pooled = _RunningMoments(len(columns))
        by_group: dict[object, _RunningMoments] = {}
        group_dtype = scan.schema[group_column] if group_column is not None else None
        offset = 0
        for batch in scan.iter_batches():
            # Row selection in numpy: polars expressions over thousands of columns cost ~0.2 s a batch.
            keep = train[offset:offset + batch.height]
            offset += batch.height
            for start in range(0, batch.height, BLOCK_ROWS):
                stop = min(start + BLOCK_ROWS, batch.height)
                x = batch.slice(start, stop - start).select(columns).to_numpy().astype(np.float64)  # NaN = missing
                rows = keep[start:stop] & ~np.isnan(x).all(axis=1)  # genotyped training rows
                x = x[rows]
                pooled.update(x)
                if group_column is None:
                    continue
                g = batch.get_column(group_column).slice(start, stop - start).filter(pl.Series(rows))
                for value in g.drop_nulls().unique(maintain_order=True).to_list():
                    acc = by_group.setdefault(value, _RunningMoments(len(columns)))
                    acc.update(x[(g == value).fill_null(False).to_numpy()])
        _check_enough_rows(pooled.rows, columns)
        mean, std = pooled.result()
        nulls = pooled.rows - pooled.n
        groups = []
        if by_group:
            order = pl.Series("g", list(by_group), dtype=group_dtype).sort().to_list()
            for g in order:
                acc = by_group[g]
                if acc.rows >= min_group_subjects:
                    groups.append((g, *acc.result()))
        return cls._from_moments(columns, mean, std, pooled.rows, nulls, pooled.null_hist, group_column, groups,
                                 min_group_subjects, source)

    @classmethod
    def _from_moments(cls, columns: list[str], mean: np.ndarray, std: np.ndarray, n_rows: int, nulls: np.ndarray,
                      null_hist: np.ndarray, group_column: str | None, groups: list[tuple], min_group_subjects: int,
                      source: str) -> PrsStandardizer:
        """The standardiser from pooled and per-group moments (NaN = too few values), with the fit's warning."""
        uninformative = [c for c, sd in zip(columns, std) if not (np.isfinite(sd) and sd > 0)]
        _report_fit(n_rows, columns, nulls, null_hist, uninformative, source)
        mean = np.nan_to_num(mean, nan=0.0)
        std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
        fitted: dict[str, dict[str, list[float]]] = {}
        for g, gm, gs in groups:
            gm = np.where(np.isfinite(gm), gm, mean)
            gs = np.where(np.isfinite(gs) & (gs > 0), gs, std)
            fitted[str(g)] = {"mean": gm.tolist(), "std": gs.tolist()}
        return cls(columns, mean.tolist(), std.tolist(), group_column, fitted, min_group_subjects, uninformative)

    def check_columns(self, columns: list[str], source: str = "PRS table", other_columns: list[str] | None = None) -> None:
        """Columns are matched by name, in any order: InputError naming the fitted columns `columns` lacks.

        Extra score columns are ignored, with one note. `other_columns` (the table's non-score
        columns) must hold the group column when the standardiser was fitted within groups.
        """
        if other_columns is not None:
            self._check_group_column(other_columns, source)
        have = set(columns)
        missing = [c for c in self.columns if c not in have]
        if missing:
            raise InputError(
                f"{source}: lacks {len(missing)} of the {self.n_prs} score columns the model's PRS standardiser was "
                f"fitted on: {_names(missing)}. Give a PRS table with all of them (any order; extra columns are ignored)."
            )
        fitted = set(self.columns)
        extra = [c for c in columns if c not in fitted]
        if extra:
            warn(f"{source}: ignoring {len(extra)} score column(s) the model was not trained on ({_names(extra)}); "
                 f"using its {self.n_prs} columns, matched by name.")

    def _check_group_column(self, columns: list[str], source: str) -> None:
        if self.group_column and self.groups and self.group_column not in set(columns):
            raise InputError(
                f"{source}: has no column {self.group_column!r}, but the model's PRS standardiser standardises within "
                f"{self.group_column} groups ({_names(list(self.groups), 4)}). Add the column; a subject whose "
                f"{self.group_column} is empty or another value gets the pooled statistics."
            )

    def transform(self, frame: pl.DataFrame | None, subject_ids: np.ndarray | pl.Series,
                  stats: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Standardised scores for `subject_ids`, in that order; columns are read by name.

        Returns prs float16 [n, n_prs] (zeros where not genotyped) and prs_mask bool [n]. If `stats`
        is a dict it receives rows, genotyped, imputed_cells (missing scores of genotyped rows, set to
        the training mean), imputed_rows, empty_columns (no value in any genotyped row here) and
        example (a subject and column with a missing score); see `missing_note`.
        """
        ids = pl.DataFrame({"subject_id": pl.Series(subject_ids, dtype=pl.Int64)})
        n = ids.height
        if frame is None or not self.columns:
            if stats is not None:
                stats.update(rows=n, genotyped=0, imputed_cells=0, imputed_rows=0, empty_columns=[], example=None)
            return np.zeros((n, self.n_prs), dtype=np.float16), np.zeros(n, dtype=bool)
        self._check_group_column(frame.columns, "PRS table")
        keep = ["subject_id", *self.columns] + ([self.group_column] if self.group_column and self.groups else [])
        rows = ids.join(frame.select(keep), on="subject_id", how="left", maintain_order="left")
        means = np.vstack([self.mean] + [np.asarray(v["mean"]) for v in self.groups.values()])  # [1 + G, n_prs]
        stds = np.vstack([self.std] + [np.asarray(v["std"]) for v in self.groups.values()])
        if self.group_column and self.groups:
            index = {g: i + 1 for i, g in enumerate(self.groups)}
            g = rows.get_column(self.group_column).cast(pl.String)
            gi = g.replace_strict(index, default=0, return_dtype=pl.Int32).fill_null(0).to_numpy()
        else:
            gi = np.zeros(n, dtype=np.int64)
        blank = [self.columns.index(c) for c in self.uninformative]
        out = np.zeros((n, self.n_prs), dtype=np.float16)
        mask = np.zeros(n, dtype=bool)
        holes_total, holes_rows, example = 0, 0, None
        seen = np.zeros(self.n_prs, dtype=bool)  # columns with a value in some genotyped row
        # Block by block, so the float64 temporaries follow BLOCK_ROWS, not the number of subjects.
        for start in range(0, n, BLOCK_ROWS):
            stop = min(start + BLOCK_ROWS, n)
            x = rows.slice(start, stop - start).select(pl.col(self.columns).cast(pl.Float64)).to_numpy()  # NaN = missing
            missing = np.isnan(x)
            m = ~missing.all(axis=1)
            b = gi[start:stop]
            z = (x - means[b]) / stds[b]
            z[missing] = 0.0
            z[~m] = 0.0
            if blank:
                z[:, blank] = 0.0
            out[start:stop] = np.clip(z, -60000, 60000).astype(np.float16)
            mask[start:stop] = m
            if stats is not None:
                holes = missing & m[:, None]  # [rows, n_prs] missing scores of genotyped rows
                holes_total += int(holes.sum())
                holes_rows += int(holes.any(axis=1).sum())
                seen |= (~missing[m]).any(axis=0)
                if example is None and holes.any():
                    r, c = np.nonzero(holes)
                    example = (int(ids["subject_id"][start + int(r[0])]), self.columns[int(c[0])])
        if stats is not None:
            empty = [self.columns[j] for j in np.flatnonzero(~seen)] if mask.any() else []
            stats.update(rows=n, genotyped=int(mask.sum()), imputed_cells=holes_total, imputed_rows=holes_rows,
                         empty_columns=empty, example=example)
        return out, mask

    def missing_note(self, stats: dict, source: str = "PRS table") -> str | None:
        """The warning line for missing scores found by `transform(..., stats)`, or None when there are none."""
        if not stats.get("imputed_cells"):
            return None
        sid, col = stats["example"]
        empty = (f"; {len(stats['empty_columns'])} column(s) have no value for any genotyped subject here "
                 f"({_names(stats['empty_columns'])})") if stats["empty_columns"] else ""
        return (f"{source}: {stats['imputed_cells']} missing score(s) in {stats['imputed_rows']} of the "
                f"{stats['genotyped']} genotyped subject row(s) (e.g. subject {sid}, {col}) take the training mean "
                f"(z = 0){empty}; {stats['rows'] - stats['genotyped']} of {stats['rows']} row(s) have no score at all "
                f"and count as not genotyped.")

    # -- JSON state ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "n_prs": self.n_prs,
            "columns": self.columns,
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "group_column": self.group_column,
            "groups": self.groups,
            "min_group_subjects": self.min_group_subjects,
            "uninformative_columns": self.uninformative,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `prs_standardizer.json` into `directory` (beside the tokenizer)."""
        path = Path(directory) / FILE_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    save_pretrained = save

    @classmethod
    def load(cls, directory: str | os.PathLike) -> PrsStandardizer:
        """Read `prs_standardizer.json` from a folder (or the file itself)."""
        path = Path(directory)
        if path.is_dir():
            path = path / FILE_NAME
        if not path.is_file():
            raise InputError(f"{path}: no PRS standardiser here; `ehr-prs tokenize` writes it into OUT/tokenizer/.")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise InputError(f"{path}: not valid JSON ({err}).") from err
        if d.get("format") != FORMAT_NAME or d.get("format_version") != FORMAT_VERSION:
            raise InputError(
                f"{path}: PRS standardiser format {d.get('format')!r} version {d.get('format_version')!r}; this code "
                f"reads {FORMAT_NAME!r} version {FORMAT_VERSION}. Re-run `ehr-prs tokenize`."
            )
        if len(d["columns"]) != d["n_prs"] or len(d["mean"]) != d["n_prs"] or len(d["std"]) != d["n_prs"]:
            raise InputError(f"{path}: n_prs, columns, mean and std lengths disagree; the file is damaged.")
        return cls(d["columns"], d["mean"], d["std"], d.get("group_column"), d.get("groups"), d.get("min_group_subjects", MIN_SUBJECTS),
                   d.get("uninformative_columns"))

    from_pretrained = load


def _check_group_column_present(group_column: str | None, table_columns: list[str], columns: list[str]) -> None:
    if group_column is not None and group_column not in table_columns:
        raise InputError(
            f"PRS table has no column {group_column!r} to standardise within; columns include "
            f"{[c for c in table_columns if c not in columns][:8]}."
        )


def _check_enough_rows(n_rows: int, columns: list[str]) -> None:
    if columns and n_rows < 2:
        raise InputError(
            f"PRS table has {n_rows} genotyped training subject(s); standardisation needs at least 2 "
            f"(subjects in the train split with at least one score)."
        )


def _report_fit(n_rows: int, columns: list[str], nulls: np.ndarray, null_hist: np.ndarray, uninformative: list[str],
                source: str) -> None:
    """Warn (one line) about missing cells of genotyped training subjects and columns without information.

    `nulls[j]`: rows missing column j; `null_hist[k]`: rows missing k scores (a row with a hole
    outside the all-missing columns is one missing more scores than there are such columns).
    """
    if not columns:
        return
    nulls = [int(k) for k in nulls]
    cells = int(sum(nulls))
    all_missing = [c for c, k in zip(columns, nulls) if k == n_rows]
    constant = [c for c in uninformative if c not in set(all_missing)]
    parts = []
    holes = cells - len(all_missing) * n_rows
    if holes:
        subjects = int(np.asarray(null_hist)[len(all_missing) + 1:].sum())
        parts.append(f"{holes} score cell(s) of {subjects} genotyped train subject(s) are missing "
                     f"({holes / (n_rows * len(columns)):.2%} of cells) and take the training mean (z = 0)")
    if uninformative:
        kinds = ([f"all missing: {_names(all_missing)}"] if all_missing else []) + (
            [f"constant: {_names(constant)}"] if constant else [])
        parts.append(f"{len(uninformative)} of {len(columns)} score column(s) carry no information on the "
                     f"{n_rows} genotyped train subjects ({'; '.join(kinds)}) and are 0 for everyone")
    if parts:
        warn(f"{source}: " + "; ".join(parts) + "; subjects with no score at all count as not genotyped.")
