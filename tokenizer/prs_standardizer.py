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
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl

from ehr_prs.errors import InputError
from ehr_prs.privacy import MIN_SUBJECTS
from ehr_prs.data.readers import warn

FILE_NAME = "prs_standardizer.json"
FORMAT_NAME = "ehr-prs-prs-standardizer"
FORMAT_VERSION = 1
POOLED = "__pooled__"


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
        if group_column is not None and group_column not in frame.columns:
            raise InputError(
                f"PRS table has no column {group_column!r} to standardise within; columns include "
                f"{[c for c in frame.columns if c not in columns][:8]}."
            )
        rows = frame
        if train_subject_ids is not None:
            rows = rows.join(pl.DataFrame({"subject_id": train_subject_ids.cast(pl.Int64)}), on="subject_id", how="semi")
        rows = rows.filter(pl.any_horizontal(pl.col(columns).is_not_null())) if columns else rows.clear()
        if columns and rows.height < 2:
            raise InputError(
                f"PRS table has {rows.height} genotyped training subject(s); standardisation needs at least 2 "
                f"(subjects in the train split with at least one score)."
            )
        mean, std = _moments(rows, columns)
        uninformative = [c for c, sd in zip(columns, std) if not (np.isfinite(sd) and sd > 0)]
        _report_fit(rows, columns, uninformative, source)
        mean = np.nan_to_num(mean, nan=0.0)
        std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
        groups: dict[str, dict[str, list[float]]] = {}
        if group_column is not None:
            sizes = rows.group_by(group_column).len()
            for g, n in sizes.sort(group_column, nulls_last=True).iter_rows():
                if g is None or n < min_group_subjects:
                    continue
                gm, gs = _moments(rows.filter(pl.col(group_column) == g), columns)
                gm = np.where(np.isfinite(gm), gm, mean)
                gs = np.where(np.isfinite(gs) & (gs > 0), gs, std)
                groups[str(g)] = {"mean": gm.tolist(), "std": gs.tolist()}
        return cls(columns, mean.tolist(), std.tolist(), group_column, groups, min_group_subjects, uninformative)

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
        x = rows.select(pl.col(self.columns).cast(pl.Float64)).to_numpy()  # [n, n_prs], NaN = missing
        missing = np.isnan(x)
        mask = ~missing.all(axis=1)
        means = np.vstack([self.mean] + [np.asarray(v["mean"]) for v in self.groups.values()])  # [1 + G, n_prs]
        stds = np.vstack([self.std] + [np.asarray(v["std"]) for v in self.groups.values()])
        if self.group_column and self.groups:
            index = {g: i + 1 for i, g in enumerate(self.groups)}
            g = rows.get_column(self.group_column).cast(pl.String)
            gi = g.replace_strict(index, default=0, return_dtype=pl.Int32).fill_null(0).to_numpy()
        else:
            gi = np.zeros(n, dtype=np.int64)
        z = (x - means[gi]) / stds[gi]
        z[missing] = 0.0
        z[~mask] = 0.0
        if self.uninformative:
            z[:, [self.columns.index(c) for c in self.uninformative]] = 0.0
        if stats is not None:
            holes = missing & mask[:, None]  # [n, n_prs] missing scores of genotyped rows
            r, c = np.nonzero(holes)
            empty = [self.columns[j] for j in np.flatnonzero(holes[mask].all(axis=0))] if mask.any() else []
            stats.update(rows=n, genotyped=int(mask.sum()), imputed_cells=int(holes.sum()),
                         imputed_rows=int(holes.any(axis=1).sum()), empty_columns=empty,
                         example=(int(ids["subject_id"][int(r[0])]), self.columns[int(c[0])]) if r.size else None)
        return np.clip(z, -60000, 60000).astype(np.float16), mask

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


def _report_fit(rows: pl.DataFrame, columns: list[str], uninformative: list[str], source: str) -> None:
    """Warn (one line) about missing cells of genotyped training subjects and columns without information."""
    if not columns:
        return
    nulls = rows.select(pl.col(columns).is_null().sum()).row(0)
    cells = int(sum(nulls))
    all_missing = [c for c, k in zip(columns, nulls) if k == rows.height]
    constant = [c for c in uninformative if c not in set(all_missing)]
    parts = []
    holes = cells - len(all_missing) * rows.height
    if holes:
        subjects = rows.filter(pl.any_horizontal(pl.col([c for c in columns if c not in set(all_missing)]).is_null())).height
        parts.append(f"{holes} score cell(s) of {subjects} genotyped train subject(s) are missing "
                     f"({holes / (rows.height * len(columns)):.2%} of cells) and take the training mean (z = 0)")
    if uninformative:
        kinds = ([f"all missing: {_names(all_missing)}"] if all_missing else []) + (
            [f"constant: {_names(constant)}"] if constant else [])
        parts.append(f"{len(uninformative)} of {len(columns)} score column(s) carry no information on the "
                     f"{rows.height} genotyped train subjects ({'; '.join(kinds)}) and are 0 for everyone")
    if parts:
        warn(f"{source}: " + "; ".join(parts) + "; subjects with no score at all count as not genotyped.")
