"""Readers for the three inputs of DESIGN.md: a MEDS dataset, a PRS table and MEDS labels.

Every reader checks what it is handed before anything downstream sees it: column types are
taken from the `meds` package's own schemas and compared with the file's parquet metadata
(never trusted), and each problem stops with an `InputError` that names the file, the column
and, where there is one, the subject, and says what would be right. Data shards are checked
from their parquet footers only, so validating a large cohort does not read it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import meds
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from flexible_schema import PyArrowSchema

from modeling_ehr_prs.errors import InputError

# PGS Catalog score ids: "PGS" and six digits (PGS000001 ...). Other columns are not scores.
PRS_COLUMN_PATTERN = re.compile(r"^PGS\d{6}$")

KNOWN_SPLITS = (meds.train_split, meds.tuning_split, meds.held_out_split)

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


def _read_dataset_json(root: Path) -> dict:
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

    Validation reads only metadata files and parquet footers: each data shard's columns are
    checked against `meds.DataSchema` (safe widening casts accepted) and its row-group
    statistics for nulls in subject_id and code.
    """
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
    return MedsDataset(root, metadata, codes, subject_splits, shards, flat, has_numeric)


# ----------------------------------------------------------------------------------------
# PRS table
# ----------------------------------------------------------------------------------------

@dataclass
class PrsTable:
    """A validated wide PRS table: subject_id Int64, score columns Float32 (null = not scored)."""

    path: Path
    frame: pl.DataFrame
    score_columns: list[str]


def _read_prs_frame(path: Path) -> pl.DataFrame:
    suffixes = "".join(path.suffixes).lower()
    try:
        if suffixes.endswith(".parquet") or suffixes.endswith(".pq"):
            return pl.read_parquet(path)
        if any(suffixes.endswith(s) for s in (".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt")):
            sep = "\t" if ".tsv" in suffixes else ","
            # Infer types from the whole file so that a stray word deep in a column is caught
            # (the column then reads as text and is reported below, with the offending subject).
            return pl.read_csv(
                path, separator=sep, infer_schema_length=None,
                null_values=["", "NA", "na", "NaN", "nan", "null", "NULL", "None"],
            )
    except (OSError, pl.exceptions.PolarsError, pa.ArrowException) as err:
        raise InputError(f"{path}: cannot read this PRS table ({err}).") from err
    raise InputError(f"{path}: PRS table must be .parquet or .csv (or .tsv); got {path.name!r}.")


def _first_subject(df: pl.DataFrame, mask: pl.Expr) -> object:
    return df.filter(mask)["subject_id"][0]


def read_prs_table(path: str | os.PathLike) -> PrsTable:
    """Read and validate a wide PRS table (parquet or CSV): subject_id plus PGS-named score columns.

    Score columns are those matching PRS_COLUMN_PATTERN, in file order, cast to Float32; nulls
    (and NaN, read as null) mean "not scored" and are kept, never filled. Other columns
    (ancestry, batch) are kept unchanged.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: PRS table not found; pass --prs a parquet or CSV file.")
    df = _read_prs_frame(path)
    if "subject_id" not in df.columns:
        raise InputError(f"{path}: PRS table has no 'subject_id' column; found {df.columns[:8]}{'...' if df.width > 8 else ''}.")
    scores = [c for c in df.columns if PRS_COLUMN_PATTERN.match(c)]
    if not scores:
        raise InputError(
            f"{path}: no score columns; a PRS table names each score by its PGS Catalog id "
            f"(PGS000001, ...: 'PGS' and six digits). Found columns {df.columns[:8]}."
        )
    if df.height == 0:
        raise InputError(f"{path}: PRS table is empty (no rows); it needs one row per genotyped subject.")
    if not df["subject_id"].dtype.is_integer():
        raise InputError(
            f"{path}: column 'subject_id' has type {df['subject_id'].dtype}; it must hold integer MEDS subject ids "
            f"(first value {df['subject_id'][0]!r})."
        )
    if df["subject_id"].null_count():
        raise InputError(f"{path}: column 'subject_id' has {df['subject_id'].null_count()} empty value(s).")
    df = df.with_columns(pl.col("subject_id").cast(pl.Int64))
    for col in scores:
        dtype = df[col].dtype
        if not (dtype.is_numeric() or dtype == pl.Null):
            bad = df.filter(pl.col(col).is_not_null() & pl.col(col).cast(pl.Float64, strict=False).is_null())
            detail = f"; subject {bad['subject_id'][0]} has {bad[col][0]!r}" if bad.height else ""
            raise InputError(
                f"{path}: score column {col!r} is not numeric (type {dtype}{detail}); scores must be numbers, "
                f"empty or NA for a subject without the score."
            )
    dup = df.filter(pl.col("subject_id").is_duplicated())
    if dup.height:
        raise InputError(f"{path}: subject {dup['subject_id'][0]} has more than one row; keep one row per subject.")
    # Float32 is what the model reads; NaN means "no score" like null. Casting can overflow to inf,
    # so the infinity check runs after it.
    df = df.with_columns(pl.col(scores).cast(pl.Float32).fill_nan(None))
    inf_any = df.select(pl.col(scores).is_infinite().any()).row(0)
    for col, is_inf in zip(scores, inf_any):
        if is_inf:
            subject = _first_subject(df, pl.col(col).is_infinite())
            raise InputError(
                f"{path}: score column {col!r} is infinite (or beyond float32 range) for subject {subject}; "
                f"scores must be finite numbers, or empty for a subject without the score."
            )
    return PrsTable(path, df, scores)


# ----------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------

def read_labels(path: str | os.PathLike) -> pl.DataFrame:
    """Read a MEDS label file (parquet): subject_id Int64, prediction_time Datetime(us), boolean_value.

    Extra columns are kept (a prediction file carries predicted_boolean_probability). Rows must
    be unique per (subject_id, prediction_time) and have no nulls in those three columns.
    """
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
