"""PRS standardisation: per-score mean and std fitted on genotyped training subjects, saved as JSON.

Raw polygenic scores differ in scale and, by genetic ancestry, in mean; the model reads
z-scores. Statistics come from the training split only (optionally within groups given by a
column such as `ancestry`; a group with fewer than `min_group_subjects` genotyped training
subjects, or unseen at fit time, uses the pooled statistics). A subject is genotyped when it
has a row with at least one score; a missing single score inside a genotyped row becomes 0
(its group's mean). A subject that is not genotyped gets `prs_mask` False and an all-zero
vector that the model must never read as a person of average risk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl

from modeling_ehr_prs.errors import InputError

FILE_NAME = "prs_standardizer.json"
FORMAT_NAME = "ehr-prs-prs-standardizer"
FORMAT_VERSION = 1
POOLED = "__pooled__"


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
        min_group_subjects: int = 20,
    ):
        self.columns = list(columns)
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
        min_group_subjects: int = 20,
    ) -> PrsStandardizer:
        """Fit on the genotyped rows of `frame` whose subject is in `train_subject_ids`."""
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
        return cls(columns, mean.tolist(), std.tolist(), group_column, groups, min_group_subjects)

    def check_columns(self, columns: list[str], source: str = "PRS table") -> None:
        """InputError unless `columns` are exactly the fitted score columns, in order."""
        if list(columns) == self.columns:
            return
        missing = [c for c in self.columns if c not in set(columns)]
        extra = [c for c in columns if c not in set(self.columns)]
        detail = (f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}; " if missing else "") + (
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}" if extra else "same columns in another order"
        )
        raise InputError(
            f"{source}: score columns differ from the ones the PRS standardiser was fitted on "
            f"({self.n_prs} columns, {self.columns[:3]}...): {detail}. Use a PRS table with the same score columns."
        )

    def transform(self, frame: pl.DataFrame | None, subject_ids: np.ndarray | pl.Series) -> tuple[np.ndarray, np.ndarray]:
        """Standardised scores for `subject_ids`, in that order.

        Returns prs float16 [n, n_prs] (zeros where not genotyped) and prs_mask bool [n].
        """
        ids = pl.DataFrame({"subject_id": pl.Series(subject_ids, dtype=pl.Int64)})
        n = ids.height
        if frame is None or not self.columns:
            return np.zeros((n, self.n_prs), dtype=np.float16), np.zeros(n, dtype=bool)
        keep = ["subject_id", *self.columns] + ([self.group_column] if self.group_column else [])
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
        return np.clip(z, -60000, 60000).astype(np.float16), mask

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
        return cls(d["columns"], d["mean"], d["std"], d.get("group_column"), d.get("groups"), d.get("min_group_subjects", 20))

    from_pretrained = load
