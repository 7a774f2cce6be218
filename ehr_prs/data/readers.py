"""Readers for the three inputs of docs/design.md: a MEDS dataset, a PRS table and MEDS labels.

Every reader checks what it is handed before anything downstream sees it: column types are
taken from the `meds` package's own schemas and compared with the file's parquet metadata
(never trusted), and each problem stops with an `InputError` that names the file, the column
and, where there is one, the subject, and says what would be right. Data shards are checked
from their parquet footers (and, in a data/<split>/ layout, their subject_id column), so
validating a large cohort does not read its events. A PRS table is read whole by
`read_prs_table`, or by subject in bounded batches by `scan_prs_table` (a cohort-sized table:
a million people x 3,481 float32 scores is 14 GB).

`select_label_rows` is the one policy every command that reads labels follows (risk, baseline,
finetune, predict, fewshot): rows that cannot be scored are dropped with one warning line
giving the counts, or refused with `--strict-labels`.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from ehr_prs.errors import InputError

# meds and pyarrow are imported inside the readers that use them: every `ehr-prs COMMAND --help`
# imports this module, and meds + pyarrow alone take ~0.2 s.
if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flexible_schema import PyArrowSchema

# PGS Catalog score ids: "PGS" and six digits (PGS000001 ...). Other columns are not scores.
PRS_COLUMN_PATTERN = re.compile(r"^PGS\d{6}$")

# meds.train_split, meds.tuning_split, meds.held_out_split (tests/test_layout.py checks they agree).
KNOWN_SPLITS = ("train", "tuning", "held_out")

# The normalised event columns every reader downstream gets, whatever the file stored.
EVENT_SCHEMA = {
    "subject_id": pl.Int64,
    "time": pl.Datetime("us"),
    "code": pl.String,
    "numeric_value": pl.Float32,
}

CODES_SCHEMA = {"code": pl.String, "description": pl.String, "parent_codes": pl.List(pl.String)}


# ----------------------------------------------------------------------------------------
# Column type checks against a `meds` schema
# ----------------------------------------------------------------------------------------

def _is_stringish(t: pa.DataType) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(t):  # polars Categorical / Enum columns are written this way
        return _is_stringish(t.value_type)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _safe_cast_ok(want: pa.DataType, got: pa.DataType) -> bool:
    """True when `got` can be cast to `want` without changing any value that matters.

    Accepted: narrower integers to int64, any float/int to float32 (numeric_value is float32 by
    the MEDS schema; writers often store float64), naive timestamps of any unit to
    timestamp[us], the string family (string, large_string, string_view, dictionary of
    strings) to string, and bool to bool.
    """
    import pyarrow as pa

    if want == got:
        return True
    if pa.types.is_integer(want):
        if not pa.types.is_integer(got):
            return False
        if pa.types.is_unsigned_integer(got):
            return got.bit_width < 64
        return got.bit_width <= want.bit_width
    if pa.types.is_floating(want):
        return pa.types.is_floating(got) or pa.types.is_integer(got) or pa.types.is_null(got)
    if pa.types.is_timestamp(want):
        return pa.types.is_timestamp(got) and got.tz is None
    if _is_stringish(want):
        return _is_stringish(got) or pa.types.is_null(got)
    if pa.types.is_list(want) or pa.types.is_large_list(want):
        return (pa.types.is_list(got) or pa.types.is_large_list(got)) and _is_stringish(got.value_type)
    return False


def check_schema(
    schema: type[PyArrowSchema], got: pa.Schema, path: Path, what: str, allow_extra: bool | None = None
) -> None:
    """Check a file's arrow schema against a `meds` schema class; raise InputError naming the column.

    Uses the schema class's own required/optional columns and types; `allow_extra` overrides the
    class's `allow_extra_columns`.
    """
    import meds
    import pyarrow as pa

    names = set(got.names)
    missing = [c for c in schema.required_columns() if c not in names]
    if missing:
        raise InputError(
            f"{path}: {what} is missing required column(s) {missing}; found columns {got.names}. "
            f"A {what} needs {schema.required_columns()} (MEDS {meds.__version__} {schema.__name__})."
        )
    for col in schema.columns():
        if col not in names:
            continue
        want, have = schema.column_type(col), got.field(col).type
        if not _safe_cast_ok(want, have):
            extra = " (timestamps must be naive, in UTC or local time without a zone)" if (
                pa.types.is_timestamp(have) and have.tz is not None
            ) else ""
            raise InputError(
                f"{path}: column {col!r} has type {have}, but the MEDS {schema.__name__} needs {want}{extra}. "
                f"Write the column as {want}."
            )
    allow = schema.allow_extra_columns if allow_extra is None else allow_extra
    if not allow:
        extra_cols = [c for c in got.names if c not in set(schema.columns())]
        if extra_cols:
            raise InputError(
                f"{path}: {what} has column(s) {extra_cols} that the MEDS {schema.__name__} does not allow; "
                f"allowed columns are {schema.columns()}."
            )


def _parquet_schema(path: Path, what: str) -> pq.FileMetaData:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata
    except (OSError, pa.ArrowException) as err:
        raise InputError(f"{path}: cannot read this {what} as parquet ({err}); is the file complete?") from err


def _check_no_nulls_from_stats(meta: pq.FileMetaData, path: Path, columns: list[str]) -> None:
    """Fail on nulls in non-nullable columns using row-group statistics (no data read)."""
    names = meta.schema.to_arrow_schema().names
    for col in columns:
        j = names.index(col)
        for i in range(meta.num_row_groups):
            stats = meta.row_group(i).column(j).statistics
            if stats is not None and stats.has_null_count and stats.null_count > 0:
                raise InputError(
                    f"{path}: column {col!r} has {stats.null_count} null value(s) in row group {i}; "
                    f"MEDS requires every event to have a {col}."
                )


# ----------------------------------------------------------------------------------------
# MEDS dataset
# ----------------------------------------------------------------------------------------

@dataclass
class MedsDataset:
    """A validated MEDS dataset on disk; `scan` gives its events with normalised column types."""

    root: Path
    metadata: dict
    codes: pl.DataFrame
    subject_splits: pl.DataFrame
    shards: dict[str, list[Path]]
    # True when the data files are a flat data/*.parquet and splits come from subject_splits only.
    flat: bool = False
    _has_numeric: dict[Path, bool] = field(default_factory=dict, repr=False)
    _subject_index: pl.DataFrame | None = field(default=None, repr=False)

    @property
    def splits(self) -> list[str]:
        """Split names that have data, in train/tuning/held_out order."""
        return [s for s in KNOWN_SPLITS if s in self.shards]

    def _check_split(self, split: str) -> None:
        if split not in self.shards:
            raise InputError(
                f"{self.root}: no split {split!r} in this MEDS dataset; it has {self.splits}."
            )

    def scan_file(self, path: Path, split: str | None = None) -> pl.LazyFrame:
        """Events of one data file, normalised (and, for a flat layout, filtered to `split`)."""
        path = Path(path)
        lf = pl.scan_parquet(path)
        numeric = (
            pl.col("numeric_value").cast(pl.Float32)
            if self._has_numeric.get(path, True)
            else pl.lit(None, dtype=pl.Float32).alias("numeric_value")
        )
        lf = lf.select(
            pl.col("subject_id").cast(pl.Int64),
            pl.col("time").cast(pl.Datetime("us")),
            pl.col("code").cast(pl.String),
            numeric,
        )
        if self.flat and split is not None:
            ids = self.subject_splits.filter(pl.col("split") == split).select("subject_id")
            lf = lf.join(ids.lazy(), on="subject_id", how="semi", maintain_order="left")
        return lf

    def scan(self, split: str | None = None) -> pl.LazyFrame:
        """All events (of one split, or every split) as subject_id, time, code, numeric_value."""
        if split is not None:
            self._check_split(split)
        splits = [split] if split is not None else self.splits
        if self.flat:
            files = sorted({p for s in splits for p in self.shards[s]})
            return pl.concat([self.scan_file(p, split) for p in files], how="vertical")
        return pl.concat([self.scan_file(p) for s in splits for p in self.shards[s]], how="vertical")

    def subject_index(self) -> pl.DataFrame:
        """subject_id (Int64) -> split (String) of every subject with events, read once and cached.

        Reads the subject_id column only. In a data/<split>/ layout a subject whose events sit in
        two split folders, or whose folder disagrees with metadata/subject_splits.parquet, is an
        InputError naming the subject, the splits and a file: either is a silent train/test leak.
        In a flat layout the split comes from subject_splits; subjects it does not list are absent.
        """
        if self._subject_index is not None:
            return self._subject_index
        if self.flat:
            files = sorted({p for s in self.splits for p in self.shards[s]})
            ids = _unique_subjects(files)
            index = self.subject_splits.join(ids, on="subject_id", how="semi")
        else:
            index = pl.concat(
                [_unique_subjects(self.shards[s]).with_columns(pl.lit(s).alias("split")) for s in self.splits]
            )
            _check_one_split_per_subject(self, index)
        self._subject_index = index.select("subject_id", "split").sort("subject_id")
        return self._subject_index

    def first_event_times(self, subject_ids: pl.Series, splits: list[str]) -> pl.DataFrame:
        """subject_id -> first_time: each subject's earliest timed event other than MEDS_BIRTH.

        The tokenizer writes birth as an age and static facts as a prefix, so a prediction time
        before this instant gives the model an empty history. Subjects with no such event are absent.
        """
        import meds

        ids = pl.DataFrame({"subject_id": subject_ids.cast(pl.Int64).unique()})
        parts = [
            self.scan(s).filter(pl.col("time").is_not_null() & (pl.col("code") != meds.birth_code))
            .join(ids.lazy(), on="subject_id", how="semi")
            .group_by("subject_id").agg(pl.col("time").min().alias("first_time"))
            for s in splits if s in self.shards
        ]
        if not parts:
            return pl.DataFrame(schema={"subject_id": pl.Int64, "first_time": pl.Datetime("us")})
        return pl.concat(pl.collect_all(parts)).group_by("subject_id").agg(pl.col("first_time").min())


def _unique_subjects(files: list[Path]) -> pl.DataFrame:
    """The distinct subject ids of some data files, reading only that column."""
    if not files:
        return pl.DataFrame(schema={"subject_id": pl.Int64})
    return pl.scan_parquet(files).select(pl.col("subject_id").cast(pl.Int64)).unique().collect()


def _check_one_split_per_subject(ds: MedsDataset, index: pl.DataFrame) -> None:
    """InputError when a subject's events sit in two split folders, or in a folder other than its listed split."""
    import meds

    twice = index.filter(pl.col("subject_id").is_duplicated())
    if twice.height:
        sid = twice["subject_id"].min()
        splits = sorted(twice.filter(pl.col("subject_id") == sid)["split"].to_list(), key=KNOWN_SPLITS.index)
        n = twice["subject_id"].n_unique()
        raise InputError(
            f"{ds.root / meds.data_subdirectory}: subject {sid} has events in more than one split ({', '.join(splits)})"
            f"{f', and so do {n - 1} other subject(s)' if n > 1 else ''}; a subject's events must all sit in one "
            f"split, otherwise the model is trained on subjects it is later tested on. Move them into one data/<split>/ folder."
        )
    listed = index.join(ds.subject_splits.rename({"split": "listed"}), on="subject_id", how="inner")
    wrong = listed.filter(pl.col("split") != pl.col("listed")).sort("subject_id")
    if wrong.height:
        sid, folder, split = wrong.row(0)
        raise InputError(
            f"{ds.root}: subject {sid} is listed under split {split!r} in {meds.subject_splits_filepath} but its events "
            f"are in data/{folder}/ ({wrong.height} subject(s) disagree); a subject in two splits leaks between "
            f"training and testing. Make the split folder and {meds.subject_splits_filepath} agree."
        )


def _read_dataset_json(root: Path) -> dict:
    import meds

    path = root / meds.dataset_metadata_filepath
    if not path.is_file():
        raise InputError(
            f"{root}: not a MEDS dataset: {path} is missing. A MEDS root holds data/, "
            f"metadata/dataset.json, metadata/codes.parquet and metadata/subject_splits.parquet."
        )
    try:
        metadata = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(metadata, dict):
        raise InputError(f"{path}: must hold a JSON object (MEDS DatasetMetadataSchema), got {type(metadata).__name__}")
    try:
        meds.DatasetMetadataSchema.validate(metadata)
    except Exception as err:  # flexible_schema's message is generic: name the fields ourselves
        props = meds.DatasetMetadataSchema.schema()["properties"]
        py = {"string": str, "array": list}
        bad = {k: props[k]["type"] for k, v in metadata.items()
               if k in props and v is not None and not isinstance(v, py[props[k]["type"]])}
        raise InputError(
            f"{path}: does not match the MEDS DatasetMetadataSchema: field(s) {list(bad) or '?'} should be "
            f"{list(bad.values()) or 'as in meds.DatasetMetadataSchema'} ({err})."
        ) from err
    return metadata


def _read_subject_splits(root: Path) -> pl.DataFrame:
    import meds

    path = root / meds.subject_splits_filepath
    if not path.is_file():
        raise InputError(
            f"{root}: {path} is missing; a MEDS dataset needs metadata/subject_splits.parquet with columns "
            f"subject_id (int64) and split (one of {list(KNOWN_SPLITS)})."
        )
    meta = _parquet_schema(path, "subject split file")
    check_schema(meds.SubjectSplitSchema, meta.schema.to_arrow_schema(), path, "subject split file")
    df = pl.read_parquet(path).select(pl.col("subject_id").cast(pl.Int64), pl.col("split").cast(pl.String))
    for col in ("subject_id", "split"):
        if df[col].null_count():
            raise InputError(f"{path}: column {col!r} has {df[col].null_count()} null value(s); every row needs one.")
    unknown = sorted(set(df["split"].unique().to_list()) - set(KNOWN_SPLITS))
    if unknown:
        raise InputError(
            f"{path}: column 'split' has unknown split name(s) {unknown}; use {list(KNOWN_SPLITS)}."
        )
    dup = df.filter(pl.col("subject_id").is_duplicated())
    if dup.height:
        raise InputError(
            f"{path}: subject {dup['subject_id'][0]} appears in more than one row; each subject belongs to one split."
        )
    return df


def _read_codes(root: Path) -> pl.DataFrame:
    import meds

    path = root / meds.code_metadata_filepath
    if not path.is_file():
        return pl.DataFrame(schema=CODES_SCHEMA)
    meta = _parquet_schema(path, "code metadata file")
    check_schema(meds.CodeMetadataSchema, meta.schema.to_arrow_schema(), path, "code metadata file")
    df = pl.read_parquet(path)
    casts = [pl.col("code").cast(pl.String)]
    casts.append(pl.col("description").cast(pl.String) if "description" in df.columns
                 else pl.lit(None, dtype=pl.String).alias("description"))
    casts.append(pl.col("parent_codes").cast(pl.List(pl.String)) if "parent_codes" in df.columns
                 else pl.lit(None, dtype=pl.List(pl.String)).alias("parent_codes"))
    extra = [c for c in df.columns if c not in CODES_SCHEMA]
    return df.select(*casts, *extra)


def _find_shards(root: Path, subject_splits: pl.DataFrame) -> tuple[dict[str, list[Path]], bool]:
    import meds

    data = root / meds.data_subdirectory
    if not data.is_dir():
        raise InputError(f"{root}: {data} is missing; MEDS events live in data/<split>/*.parquet or data/*.parquet.")
    flat_files = sorted(data.glob("*.parquet"))
    subdirs = sorted(p for p in data.iterdir() if p.is_dir())
    nested = {d.name: sorted(d.rglob("*.parquet")) for d in subdirs}
    nested = {k: v for k, v in nested.items() if v}
    if flat_files and nested:
        raise InputError(
            f"{data}: holds both parquet files directly ({flat_files[0].name}, ...) and split folders "
            f"({sorted(nested)}); use one layout: data/<split>/*.parquet or data/*.parquet."
        )
    if nested:
        unknown = sorted(set(nested) - set(KNOWN_SPLITS))
        if unknown:
            raise InputError(
                f"{data}: folder(s) {unknown} are not known split names; data/<split>/ must use {list(KNOWN_SPLITS)}."
            )
        return nested, False
    if flat_files:
        present = [s for s in KNOWN_SPLITS if s in set(subject_splits["split"].to_list())]
        if not present:
            raise InputError(f"{root / meds.subject_splits_filepath}: has no subjects, so no split can be read.")
        return {s: flat_files for s in present}, True
    raise InputError(f"{data}: no parquet data files found (looked for data/*.parquet and data/<split>/**/*.parquet).")


def read_meds_dataset(root: str | os.PathLike) -> MedsDataset:
    """Open and validate a MEDS 0.4 dataset at `root`; raise InputError on anything malformed.

    Validation reads metadata files and parquet footers: each data shard's columns are checked
    against `meds.DataSchema` (safe widening casts accepted) and its row-group statistics for
    nulls in subject_id and code. In a data/<split>/ layout it also reads the subject_id column,
    to refuse a subject whose events sit in two splits (`MedsDataset.subject_index`).
    """
    import meds

    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: no such folder; pass the root of a MEDS dataset (it holds data/ and metadata/).")
    metadata = _read_dataset_json(root)
    subject_splits = _read_subject_splits(root)
    codes = _read_codes(root)
    shards, flat = _find_shards(root, subject_splits)
    has_numeric: dict[Path, bool] = {}
    for path in sorted({p for files in shards.values() for p in files}):
        meta = _parquet_schema(path, "MEDS data shard")
        arrow = meta.schema.to_arrow_schema()
        check_schema(meds.DataSchema, arrow, path, "MEDS data shard")
        _check_no_nulls_from_stats(meta, path, ["subject_id", "code"])
        has_numeric[path] = "numeric_value" in arrow.names
    ds = MedsDataset(root, metadata, codes, subject_splits, shards, flat, has_numeric)
    if not flat:
        ds.subject_index()  # subject ids only: a subject in two split folders is a train/test leak
    return ds


# ----------------------------------------------------------------------------------------
# PRS table
# ----------------------------------------------------------------------------------------

# A streamed PRS batch holds about this many bytes of float32 scores (~4,800 subjects of the
# paper's 3,481 scores), whatever the cohort's size.
PRS_BATCH_BYTES = 64 << 20
# Subjects per row group of the parquet copy that `scan_prs_table` makes of a CSV table.
CSV_ROW_GROUP_ROWS = 4096
_PRS_NULL_VALUES = ["", "NA", "na", "NaN", "nan", "null", "NULL", "None"]


@dataclass
class PrsTable:
    """A validated wide PRS table: subject_id Int64, score columns Float32 (null = not scored)."""

    path: Path
    frame: pl.DataFrame
    score_columns: list[str]


def _prs_format(path: Path) -> str:
    """'parquet' or 'csv' (with its separator) from the file name; InputError for anything else."""
    suffixes = "".join(path.suffixes).lower()
    if suffixes.endswith(".parquet") or suffixes.endswith(".pq"):
        return "parquet"
    if any(suffixes.endswith(s) for s in (".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt")):
        return "tsv" if ".tsv" in suffixes else "csv"
    raise InputError(f"{path}: PRS table must be .parquet or .csv (or .tsv); got {path.name!r}.")


def _read_prs_frame(path: Path) -> pl.DataFrame:
    import pyarrow as pa

    fmt = _prs_format(path)
    try:
        if fmt == "parquet":
            return pl.read_parquet(path)
        # Infer types from the whole file so that a stray word deep in a column is caught
        # (the column then reads as text and is reported below, with the offending subject).
        return pl.read_csv(path, separator="\t" if fmt == "tsv" else ",", infer_schema_length=None,
                           null_values=_PRS_NULL_VALUES)
    except (OSError, pl.exceptions.PolarsError, pa.ArrowException) as err:
        raise InputError(f"{path}: cannot read this PRS table ({err}).") from err


def _prs_score_columns(path: Path, columns: list[str]) -> list[str]:
    """The score columns (PGS Catalog ids, file order); InputError without subject_id or without scores."""
    if "subject_id" not in columns:
        raise InputError(f"{path}: PRS table has no 'subject_id' column; found {columns[:8]}{'...' if len(columns) > 8 else ''}.")
    scores = [c for c in columns if PRS_COLUMN_PATTERN.match(c)]
    if not scores:
        raise InputError(
            f"{path}: no score columns; a PRS table names each score by its PGS Catalog id "
            f"(PGS000001, ...: 'PGS' and six digits). Found columns {columns[:8]}."
        )
    return scores


def _check_prs_subject_ids(path: Path, ids: pl.Series) -> None:
    """subject_id must be integers without empty values (duplicates are checked by `_check_prs_unique`)."""
    if not ids.dtype.is_integer():
        raise InputError(
            f"{path}: column 'subject_id' has type {ids.dtype}; it must hold integer MEDS subject ids "
            f"(first value {ids[0]!r})."
        )
    if ids.null_count():
        raise InputError(f"{path}: column 'subject_id' has {ids.null_count()} empty value(s).")


def _non_numeric_error(path: Path, col: str, dtype: pl.DataType, subject_and_col: pl.DataFrame) -> InputError:
    """The error for a score column that is not numeric, naming the first subject whose value is not a number."""
    bad = subject_and_col.filter(pl.col(col).is_not_null() & pl.col(col).cast(pl.Float64, strict=False).is_null())
    detail = f"; subject {bad['subject_id'][0]} has {bad[col][0]!r}" if bad.height else ""
    return InputError(
        f"{path}: score column {col!r} is not numeric (type {dtype}{detail}); scores must be numbers, "
        f"empty or NA for a subject without the score."
    )


def _is_numeric_score(dtype: pl.DataType) -> bool:
    return dtype.is_numeric() or dtype == pl.Null


def _check_prs_unique(path: Path, ids: pl.Series) -> None:
    dup = ids.filter(ids.is_duplicated())
    if dup.len():
        raise InputError(f"{path}: subject {dup[0]} has more than one row; keep one row per subject.")


def _finite_scores(path: Path, df: pl.DataFrame, scores: list[str]) -> pl.DataFrame:
    """subject_id as Int64, scores as Float32 with NaN read as null; InputError naming an infinite score.

    Float32 is what the model reads; NaN means "no score" like null. Casting can overflow to inf,
    so the infinity check runs after it. The checks run on numpy blocks of columns: polars
    expressions over thousands of columns cost ~0.2 s a call, paid by every streamed batch.
    """
    import numpy as np

    df = df.with_columns(pl.col("subject_id").cast(pl.Int64))
    schema = df.schema
    recast = [c for c in scores if schema[c] != pl.Float32]
    if recast:
        df = df.with_columns(pl.col(recast).cast(pl.Float32))
    with_nan = []
    for j in range(0, len(scores), 512):
        cols = scores[j:j + 512]
        x = df.select(cols).to_numpy()  # nulls read as NaN here
        inf_rows = np.isinf(x)
        if inf_rows.any():
            col = int(np.flatnonzero(inf_rows.any(axis=0))[0])
            subject = df["subject_id"][int(np.flatnonzero(inf_rows[:, col])[0])]
            raise InputError(
                f"{path}: score column {cols[col]!r} is infinite (or beyond float32 range) for subject {subject}; "
                f"scores must be finite numbers, or empty for a subject without the score."
            )
        n_nan = np.isnan(x).sum(axis=0)
        with_nan += [c for c, k in zip(cols, n_nan) if k and k > df.get_column(c).null_count()]
    if with_nan:
        df = df.with_columns(pl.col(with_nan).fill_nan(None))
    return df


def read_prs_table(path: str | os.PathLike) -> PrsTable:
    """Read and validate a wide PRS table (parquet or CSV) whole: subject_id plus PGS-named score columns.

    Score columns are those matching PRS_COLUMN_PATTERN, in file order, cast to Float32; nulls
    (and NaN, read as null) mean "not scored" and are kept, never filled. Other columns
    (ancestry, batch) are kept unchanged. For a cohort-sized table use `scan_prs_table`, which
    checks the same things and reads the scores of the subjects asked for, in bounded batches.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: PRS table not found; pass --prs a parquet or CSV file.")
    df = _read_prs_frame(path)
    scores = _prs_score_columns(path, df.columns)
    if df.height == 0:
        raise InputError(f"{path}: PRS table is empty (no rows); it needs one row per genotyped subject.")
    _check_prs_subject_ids(path, df["subject_id"])
    df = df.with_columns(pl.col("subject_id").cast(pl.Int64))
    for col in scores:
        # A CSV column with no value at all reads as text: it is a score nobody has, not an error.
        if not _is_numeric_score(df[col].dtype) and df[col].null_count() < df.height:
            raise _non_numeric_error(path, col, df[col].dtype, df.select("subject_id", col))
    _check_prs_unique(path, df["subject_id"])
    return PrsTable(path, _finite_scores(path, df, scores), score_columns=scores)


class PrsScan:
    """A PRS table read by subject, in bounded batches: only its footer and subject ids stay in memory.

    `scan_prs_table` opens it. `subjects(ids)` gives a `PrsTable` holding the rows of those
    subjects only (what a shard of MEDS subjects, or a process's share of label rows, needs);
    `iter_batches()` streams the whole table (a standardiser fit). Only the parquet row groups
    holding the subjects asked for are decoded, `batch_rows` rows at a time, so memory follows
    the batch and the file's row-group size, never the number of subjects. Every row handed out
    is typed and checked as `read_prs_table` does (an infinite score is an InputError naming
    the subject). `counts` records what was decoded (row groups, rows, largest batch).
    """

    def __init__(self, path: Path, file: Path, metadata: pq.FileMetaData, schema: pl.Schema, score_columns: list[str],
                 subject_ids: pl.Series, batch_rows: int):
        import numpy as np

        self.path = path
        self.file = file  # what is read: the table itself, or a parquet copy of a CSV table
        self._metadata = metadata  # parsed once: a footer of thousands of columns takes ~30 ms to read
        row_group_rows = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        self.schema = schema
        self.columns = list(schema)
        self.score_columns = score_columns
        self.batch_rows = batch_rows
        ids = subject_ids.cast(pl.Int64).to_numpy()
        self._order = np.argsort(ids, kind="stable")  # subject -> file row, through a sorted copy
        self._sorted_ids = ids[self._order]
        self._starts = np.concatenate([[0], np.cumsum(row_group_rows, dtype=np.int64)])
        self.counts = {"row_groups": 0, "rows_decoded": 0, "rows_returned": 0, "max_batch_rows": 0}

    @property
    def n_rows(self) -> int:
        return int(self._sorted_ids.size)

    @property
    def n_row_groups(self) -> int:
        return int(self._starts.size - 1)

    def rows_of(self, subject_ids: Iterable[int] | pl.Series) -> np.ndarray:
        """File row numbers (sorted, int64) of the subjects that have a row; others are ignored."""
        import numpy as np

        if isinstance(subject_ids, pl.Series):
            want = subject_ids.drop_nulls().cast(pl.Int64).to_numpy()
        else:
            want = np.asarray(list(subject_ids) if not isinstance(subject_ids, np.ndarray) else subject_ids, dtype=np.int64)
        want = np.unique(want)
        if self._sorted_ids.size == 0 or want.size == 0:
            return np.zeros(0, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._sorted_ids, want), self._sorted_ids.size - 1)
        hit = self._sorted_ids[pos] == want
        return np.sort(self._order[pos[hit]]).astype(np.int64)

    def iter_batches(self, subject_ids: Iterable[int] | pl.Series | None = None) -> Iterator[pl.DataFrame]:
        """The rows of `subject_ids` (None: every row), in file order, at most `batch_rows` a batch.

        Each batch has the table's columns: subject_id Int64, scores Float32 (null = not scored),
        other columns as stored. Row groups without a wanted subject are not read.
        """
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = None if subject_ids is None else self.rows_of(subject_ids)
        if rows is not None and rows.size == 0:
            return
        try:
            pf = pq.ParquetFile(self.file, metadata=self._metadata)
        except (OSError, pa.ArrowException) as err:
            raise InputError(f"{self.path}: cannot read this PRS table ({err}); was it changed while in use?") from err
        with pf:
            for rg in range(self.n_row_groups):
                lo, hi = int(self._starts[rg]), int(self._starts[rg + 1])
                if rows is not None:
                    a, b = np.searchsorted(rows, [lo, hi])
                    if a == b:
                        continue
                    wanted = rows[a:b]
                self.counts["row_groups"] += 1
                pos = lo
                for batch in pf.iter_batches(batch_size=self.batch_rows, row_groups=[rg], use_threads=False):
                    n = batch.num_rows
                    self.counts["rows_decoded"] += n
                    self.counts["max_batch_rows"] = max(self.counts["max_batch_rows"], n)
                    if rows is not None:
                        i, j = np.searchsorted(wanted, [pos, pos + n])
                        pos += n
                        if i == j:
                            continue
                        if j - i < n:
                            batch = batch.take(pa.array(wanted[i:j] - (pos - n)))
                    else:
                        pos += n
                    df = pl.from_arrow(batch)
                    self.counts["rows_returned"] += df.height
                    yield _finite_scores(self.path, df, self.score_columns)

    def subjects(self, subject_ids: Iterable[int] | pl.Series) -> PrsTable:
        """A `PrsTable` of the rows of `subject_ids` only (in file order; subjects without a row are absent).

        Its frame is what `read_prs_table(path).frame` holds for these subjects, so it goes
        wherever a `PrsTable` does (`PrsStandardizer.transform`, `inputs_at_prediction_times`).
        Memory: those subjects' rows plus one batch.
        """
        parts = list(self.iter_batches(subject_ids))
        frame = pl.concat(parts, how="vertical") if parts else _finite_scores(
            self.path, pl.DataFrame(schema=self.schema), self.score_columns)
        return PrsTable(self.path, frame, self.score_columns)


def scan_prs_table(path: str | os.PathLike, batch_bytes: int = PRS_BATCH_BYTES) -> PrsScan:
    """Open and validate a wide PRS table without reading its scores: the streaming `read_prs_table`.

    Checks what `read_prs_table` checks from the parquet footer and the subject_id column (a
    score column of text reads that column alone to name the subject); infinite scores are
    found as rows are read. A CSV table is first copied, streaming, to a temporary parquet file
    with row groups of CSV_ROW_GROUP_ROWS subjects (removed with the scan); for a parquet table,
    row groups of a few thousand subjects (`ehr-prs simulate` writes about 3,000) keep reading
    one shard of subjects cheap.
    """
    import shutil
    import tempfile
    import weakref

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: PRS table not found; pass --prs a parquet or CSV file.")
    fmt = _prs_format(path)
    file, tmp = path, None
    try:
        if fmt != "parquet":
            tmp = Path(tempfile.mkdtemp(prefix="ehr-prs-table-"))
            file = tmp / "prs.parquet"
            pl.scan_csv(path, separator="\t" if fmt == "tsv" else ",", infer_schema_length=None,
                        null_values=_PRS_NULL_VALUES).sink_parquet(file, row_group_size=CSV_ROW_GROUP_ROWS)
        with pq.ParquetFile(file) as pf:
            schema = pl.from_arrow(pf.schema_arrow.empty_table()).schema
            scores = _prs_score_columns(path, list(schema))
            meta = pf.metadata
            if meta.num_rows == 0:
                raise InputError(f"{path}: PRS table is empty (no rows); it needs one row per genotyped subject.")
            ids = pl.from_arrow(pf.read(columns=["subject_id"], use_threads=False).column(0))
            _check_prs_subject_ids(path, ids)
            for col in scores:
                if not _is_numeric_score(schema[col]):
                    pair = pl.from_arrow(pf.read(columns=["subject_id", col], use_threads=False))
                    if pair[col].null_count() < pair.height:  # an all-empty CSV column reads as text: no score
                        raise _non_numeric_error(path, col, schema[col], pair)
            _check_prs_unique(path, ids)
    except (OSError, pl.exceptions.PolarsError, pa.ArrowException) as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise InputError(f"{path}: cannot read this PRS table ({err}).") from err
    except InputError:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    scan = PrsScan(path, file, meta, schema, scores, ids, max(1, batch_bytes // (4 * len(scores))))
    if tmp is not None:
        weakref.finalize(scan, shutil.rmtree, tmp, True)
    return scan


# ----------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------

def read_labels(path: str | os.PathLike) -> pl.DataFrame:
    """Read a MEDS label file (parquet): subject_id Int64, prediction_time Datetime(us), boolean_value.

    Extra columns are kept (a prediction file carries predicted_boolean_probability). Rows must
    be unique per (subject_id, prediction_time) and have no nulls in those three columns.
    """
    import meds

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: label file not found; pass a MEDS label parquet file.")
    meta = _parquet_schema(path, "MEDS label file")
    arrow = meta.schema.to_arrow_schema()
    check_schema(meds.LabelSchema, arrow, path, "MEDS label file", allow_extra=True)
    if "boolean_value" not in arrow.names:
        raise InputError(
            f"{path}: MEDS label file has no 'boolean_value' column; binary tasks need subject_id, "
            f"prediction_time and boolean_value. Found {arrow.names}."
        )
    df = pl.read_parquet(path).with_columns(
        pl.col("subject_id").cast(pl.Int64),
        pl.col("prediction_time").cast(pl.Datetime("us")),
        pl.col("boolean_value").cast(pl.Boolean),
    )
    for col in ("subject_id", "prediction_time", "boolean_value"):
        nulls = df.filter(pl.col(col).is_null())
        if nulls.height:
            who = f" (first: subject {nulls['subject_id'][0]})" if col != "subject_id" else ""
            raise InputError(f"{path}: column {col!r} has {nulls.height} null value(s){who}; every label row needs one.")
    dup = df.filter(pl.struct("subject_id", "prediction_time").is_duplicated())
    if dup.height:
        raise InputError(
            f"{path}: subject {dup['subject_id'][0]} has more than one label at prediction_time "
            f"{dup['prediction_time'][0]}; keep one row per (subject_id, prediction_time)."
        )
    return df


# ----------------------------------------------------------------------------------------
# The label-row policy shared by every command
# ----------------------------------------------------------------------------------------

STRICT_LABELS_HELP = (
    "refuse (exit 2) label rows that cannot be scored -- a subject with no events in --meds, or a "
    "prediction_time before the subject's first event -- instead of dropping them with a warning"
)


def warn(message: str) -> None:
    """One line on stderr that a user should read but that does not stop the command."""
    print(f"warning: {message}", file=sys.stderr)


def _examples(rows: pl.DataFrame, n: int = 3, with_time: bool = False) -> str:
    rows = rows.sort("subject_id", "prediction_time")
    if with_time:
        items = [f"{s} at {t}" for s, t in rows.select("subject_id", "prediction_time").head(n).iter_rows()]
    else:
        items = [str(s) for s in rows["subject_id"].unique(maintain_order=True).head(n).to_list()]
    return ", ".join(items) + (", ..." if rows["subject_id"].n_unique() > n else "")


@dataclass
class LabelSelection:
    """Label rows a command can score, and the rows it dropped and why (see `select_label_rows`).

    rows: the kept rows in the file's order, with a `split` column. absent: rows whose subject
    has no events in the MEDS data. early: rows of the wanted splits whose prediction_time is
    before the subject's first event (an empty history). n_other_splits: rows of subjects in
    splits the command does not read (normal: one label file serves every split).
    """

    rows: pl.DataFrame
    n_rows: int
    absent: pl.DataFrame
    early: pl.DataFrame
    n_other_splits: int
    splits: list[str]

    @property
    def n_dropped(self) -> int:
        return self.absent.height + self.early.height

    def counts(self) -> dict[str, int]:
        """The numbers a command's summary reports (also written into finetune's summary JSON)."""
        return {"label_rows": self.n_rows, "used": self.rows.height, "other_splits": self.n_other_splits,
                "dropped_no_events": self.absent.height, "dropped_before_first_event": self.early.height}

    def reasons(self, ds: MedsDataset) -> str:
        """Why rows were dropped: counts and a few example subjects, one clause per reason."""
        import meds

        parts = []
        listed = f" (or no split in {meds.subject_splits_filepath})" if ds.flat else ""
        if self.absent.height:
            parts.append(f"{self.absent.height} whose subject has no events in {ds.root}{listed} "
                         f"({self.absent['subject_id'].n_unique()} subject(s), e.g. {_examples(self.absent)})")
        if self.early.height:
            parts.append(f"{self.early.height} whose prediction_time is before the subject's first event, so the "
                         f"history would be empty (e.g. subject {_examples(self.early, with_time=True)})")
        return "; ".join(parts)

    def summary(self) -> str:
        """One line for the command's output: rows used, rows of other splits, rows dropped."""
        where = ", ".join(self.splits)
        dropped = (f"; dropped {self.n_dropped} (no events: {self.absent.height}, before first event: "
                   f"{self.early.height})") if self.n_dropped else ""
        other = f", {self.n_other_splits} belong to other splits" if self.n_other_splits else ""
        return f"label rows: {self.rows.height} of {self.n_rows} used (split {where}){other}{dropped}"


def select_label_rows(
    ds: MedsDataset, labels: pl.DataFrame, splits: list[str] | None, source: str | os.PathLike,
    strict: bool = False,
) -> LabelSelection:
    """The label rows of `splits` (None: every split) that can be scored, with one policy for every command.

    A row is dropped when its subject has no events in the MEDS data (nothing to score) or when
    its prediction_time is before the subject's first timed event other than MEDS_BIRTH (the
    model would see static facts only). Dropped rows are reported in one warning line with counts
    and example subjects; `strict` (--strict-labels) makes them an InputError instead, and so is
    a selection that keeps no row. Rows of subjects in other splits are left out silently and
    counted. Reads subject ids and event times only.
    """
    wanted = list(ds.splits if splits is None else dict.fromkeys(splits))
    n_rows = labels.height
    index = ds.subject_index()
    joined = labels.drop("split", strict=False).join(index, on="subject_id", how="left", maintain_order="left")
    absent = joined.filter(pl.col("split").is_null())
    present = joined.filter(pl.col("split").is_not_null())
    mine = present.filter(pl.col("split").is_in(wanted))
    n_other = present.height - mine.height
    first = ds.first_event_times(mine["subject_id"], wanted)
    with_first = mine.join(first, on="subject_id", how="left", maintain_order="left")
    is_early = pl.col("first_time").is_null() | (pl.col("prediction_time") < pl.col("first_time"))
    early = with_first.filter(is_early).drop("first_time")
    rows = with_first.filter(~is_early).drop("first_time")
    sel = LabelSelection(rows, n_rows, absent, early, n_other, wanted)
    if rows.height == 0:
        why = f": {sel.reasons(ds)}" if sel.n_dropped else ""
        in_splits = sorted(set(present["split"].to_list()) - set(wanted), key=KNOWN_SPLITS.index)
        raise InputError(
            f"{source}: no label row can be scored in split {', '.join(wanted)} of {ds.root}"
            f"{why}{f' (the other rows are in split(s) {in_splits})' if n_other else ''}. "
            f"Labels need subjects with events in this split and a prediction_time at or after their first event."
        )
    if sel.n_dropped:
        if strict:
            raise InputError(
                f"{source}: {sel.n_dropped} of {n_rows} label row(s) cannot be scored: {sel.reasons(ds)}. "
                f"Remove them from the label file, or drop --strict-labels to skip them with a warning."
            )
        warn(f"{source}: dropped {sel.n_dropped} of {n_rows} label row(s) that cannot be scored: "
             f"{sel.reasons(ds)}; --strict-labels makes this an error.")
    return sel


# ----------------------------------------------------------------------------------------
# Demographics: a subject's sex from static codes, in every common MEDS spelling
# ----------------------------------------------------------------------------------------

# MEDS has no fixed sex code; each ETL writes its own. The spellings read are in sex_from_code.
SEX_CODE_PATTERN = r"(?i)^(?:gender|sex)/{1,2}(f|female|8532|m|male|8507)$"
_FEMALE_VALUES = ("f", "female", "8532")


def sex_from_code(code: pl.Expr | None = None) -> pl.Expr:
    """'F' or 'M' for a code that spells a sex, null for every other code.

    The spellings, matched case-insensitively on the whole code (SEX_CODE_PATTERN):
      Gender/F, Gender/M            ehr-prs simulate; OMOP via meds_etl and `ehr-prs omop-to-meds`
                                    (the OMOP Gender vocabulary's concept codes); EHRSHOT/FEMR
      Gender/FEMALE, Gender/MALE    OMOP ETLs that write the concept name instead of its code
      Gender/8532, Gender/8507      OMOP ETLs that write the concept id (8532 FEMALE, 8507 MALE)
      GENDER//F, GENDER//M          MIMIC-IV in MEDS (MIMIC_IV_MEDS / MEDS_transforms conventions:
                                    `GENDER//` + the patients table's gender), other MEDS_transforms ETLs
      SEX/F, SEX//Female, ...       the same with SEX as the prefix
    Anything else (other values such as Gender/U, other prefixes) is unknown, never guessed.

    One rule for the baselines' `sex_female` feature, evaluation's sex subgroups and the record
    ceiling, so that MIMIC's `GENDER//F` and OMOP's `Gender/F` read the same everywhere.
    """
    value = (pl.col("code") if code is None else code).str.extract(SEX_CODE_PATTERN, 1).str.to_lowercase()
    return (pl.when(value.is_null()).then(pl.lit(None, dtype=pl.String))
            .when(value.is_in(_FEMALE_VALUES)).then(pl.lit("F")).otherwise(pl.lit("M")))


def subject_sex(events: pl.DataFrame, by: list[str] | None = None) -> pl.DataFrame:
    """`by` (default subject_id) + sex ('F'/'M') for the groups whose sex codes agree.

    `events` needs a `code` column; a group with no sex code, or with codes that disagree
    (both F and M), is left out (unknown), so callers join it with how="left".
    """
    by = by or ["subject_id"]
    return (events.select(*by, sex_from_code().alias("sex")).drop_nulls("sex").unique()
            .filter(pl.len().over(by) == 1))
