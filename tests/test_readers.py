"""Readers: the happy path on tiny hand-made files, and one test per input error they must catch."""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ehr_prs.errors import InputError
from ehr_prs.data.readers import (
    PRS_COLUMN_PATTERN,
    read_labels,
    read_meds_dataset,
    read_prs_table,
)

T = datetime


def _events(subjects: list[int], numeric_type: pa.DataType = pa.float32(), id_type: pa.DataType = pa.int64()) -> pa.Table:
    rows = []
    for s in subjects:
        rows += [(s, None, "MEDS_BIRTH", None), (s, T(2000, 1, 1), "Gender/F", None),
                 (s, T(2010, 5, 1), "LOINC/4548-4", 6.1), (s, T(2011, 1, 1), "ICD10CM/E11.9", None)]
    cols = list(zip(*rows))
    return pa.table({
        "subject_id": pa.array(cols[0], id_type),
        "time": pa.array(cols[1], pa.timestamp("us")),
        "code": pa.array(cols[2], pa.string()),
        "numeric_value": pa.array(cols[3], numeric_type),
    })


def make_meds(root: Path, flat: bool = False, **kw) -> Path:
    """A 5-subject MEDS dataset: 3 train, 1 tuning, 1 held_out."""
    splits = {"train": [1, 5, 9], "tuning": [12], "held_out": [40]}
    (root / "metadata").mkdir(parents=True)
    (root / "metadata" / "dataset.json").write_text(json.dumps({"dataset_name": "tiny", "meds_version": "0.4.1"}))
    pq.write_table(pa.table({
        "subject_id": pa.array([s for v in splits.values() for s in v], pa.int64()),
        "split": [k for k, v in splits.items() for _ in v],
    }), root / "metadata" / "subject_splits.parquet")
    pq.write_table(pa.table({
        "code": ["MEDS_BIRTH", "Gender/F", "LOINC/4548-4", "ICD10CM/E11.9"],
        "description": ["birth", "female", "HbA1c", "T2D"],
        "parent_codes": pa.array([None, None, None, ["SNOMED/44054006"]], pa.list_(pa.string())),
    }), root / "metadata" / "codes.parquet")
    if flat:
        (root / "data").mkdir()
        pq.write_table(_events([1, 5, 9, 12, 40], **kw), root / "data" / "0.parquet")
    else:
        for split, subjects in splits.items():
            (root / "data" / split).mkdir(parents=True)
            pq.write_table(_events(subjects, **kw), root / "data" / split / "0.parquet")
    return root


# ---------------------------------------------------------------- MEDS: happy paths


def test_meds_dataset_reads_splits_and_normalises_types(tmp_path):
    # float64 numeric_value and int32 subject_id are safe casts: accepted, then normalised.
    ds = read_meds_dataset(make_meds(tmp_path / "m", numeric_type=pa.float64(), id_type=pa.int32()))
    assert ds.splits == ["train", "tuning", "held_out"]
    assert ds.metadata["dataset_name"] == "tiny"
    assert ds.codes.height == 4 and ds.codes.columns[:3] == ["code", "description", "parent_codes"]
    assert ds.subject_splits.schema == pl.Schema({"subject_id": pl.Int64, "split": pl.String})
    train = ds.scan("train").collect()
    assert train.schema == pl.Schema({"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String,
                                      "numeric_value": pl.Float32})
    assert train.height == 12 and sorted(train["subject_id"].unique()) == [1, 5, 9]
    assert ds.scan().collect().height == 20
    assert train["time"].null_count() == 3  # static birth rows keep a null time
    assert math.isclose(train.filter(pl.col("code") == "LOINC/4548-4")["numeric_value"][0], 6.1, rel_tol=1e-6)


def test_flat_layout_takes_splits_from_subject_splits(tmp_path):
    ds = read_meds_dataset(make_meds(tmp_path / "m", flat=True))
    assert ds.flat and ds.splits == ["train", "tuning", "held_out"]
    assert sorted(ds.scan("tuning").collect()["subject_id"].unique()) == [12]
    assert ds.scan("train").collect()["subject_id"].n_unique() == 3
    assert ds.scan().collect().height == 20


def test_missing_codes_file_gives_empty_frame(tmp_path):
    root = make_meds(tmp_path / "m")
    (root / "metadata" / "codes.parquet").unlink()
    ds = read_meds_dataset(root)
    assert ds.codes.height == 0 and ds.codes.columns == ["code", "description", "parent_codes"]


def test_missing_numeric_value_column_reads_as_null(tmp_path):
    root = make_meds(tmp_path / "m")
    path = root / "data" / "train" / "0.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["numeric_value"]), path)
    ds = read_meds_dataset(root)
    train = ds.scan("train").collect()
    assert train["numeric_value"].dtype == pl.Float32 and train["numeric_value"].null_count() == 12
    assert ds.scan().collect()["numeric_value"].null_count() == 20 - 2  # tuning and held_out keep theirs


# ---------------------------------------------------------------- MEDS: errors


def test_missing_dataset_json(tmp_path):
    root = make_meds(tmp_path / "m")
    (root / "metadata" / "dataset.json").unlink()
    with pytest.raises(InputError, match=r"dataset\.json is missing"):
        read_meds_dataset(root)


def test_missing_subject_splits(tmp_path):
    root = make_meds(tmp_path / "m")
    (root / "metadata" / "subject_splits.parquet").unlink()
    with pytest.raises(InputError, match=r"subject_splits\.parquet is missing"):
        read_meds_dataset(root)


def test_unknown_split_name_in_subject_splits(tmp_path):
    root = make_meds(tmp_path / "m")
    pq.write_table(pa.table({"subject_id": pa.array([1], pa.int64()), "split": ["validation"]}),
                   root / "metadata" / "subject_splits.parquet")
    with pytest.raises(InputError, match=r"unknown split name\(s\) \['validation'\]"):
        read_meds_dataset(root)


def test_unknown_split_folder(tmp_path):
    root = make_meds(tmp_path / "m")
    (root / "data" / "train").rename(root / "data" / "training")
    with pytest.raises(InputError, match=r"\['training'\] are not known split names"):
        read_meds_dataset(root)


def test_scan_of_absent_split(tmp_path):
    root = make_meds(tmp_path / "m")
    import shutil
    shutil.rmtree(root / "data" / "tuning")
    ds = read_meds_dataset(root)
    assert ds.splits == ["train", "held_out"]
    with pytest.raises(InputError, match="no split 'tuning'"):
        ds.scan("tuning")


def test_no_data_files(tmp_path):
    root = make_meds(tmp_path / "m")
    for p in (root / "data").rglob("*.parquet"):
        p.unlink()
    with pytest.raises(InputError, match="no parquet data files"):
        read_meds_dataset(root)


def test_wrong_column_type_names_column_and_type(tmp_path):
    root = make_meds(tmp_path / "m")
    path = root / "data" / "tuning" / "0.parquet"
    t = pq.read_table(path)
    t = t.set_column(0, "subject_id", pa.array([str(x) for x in t["subject_id"].to_pylist()]))
    pq.write_table(t, path)
    with pytest.raises(InputError, match=r"tuning/0\.parquet: column 'subject_id' has type string.*needs int64"):
        read_meds_dataset(root)


def test_time_as_string_is_rejected(tmp_path):
    root = make_meds(tmp_path / "m")
    path = root / "data" / "train" / "0.parquet"
    t = pq.read_table(path)
    t = t.set_column(1, "time", pa.array([None if v is None else v.isoformat() for v in t["time"].to_pylist()]))
    pq.write_table(t, path)
    with pytest.raises(InputError, match=r"column 'time' has type string.*timestamp\[us\]"):
        read_meds_dataset(root)


def test_timezone_aware_time_is_rejected(tmp_path):
    root = make_meds(tmp_path / "m")
    path = root / "data" / "train" / "0.parquet"
    t = pq.read_table(path)
    t = t.set_column(1, "time", t["time"].cast(pa.timestamp("us", tz="UTC")))
    pq.write_table(t, path)
    with pytest.raises(InputError, match="must be naive"):
        read_meds_dataset(root)


def test_missing_code_column(tmp_path):
    root = make_meds(tmp_path / "m")
    path = root / "data" / "held_out" / "0.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["code"]), path)
    with pytest.raises(InputError, match=r"held_out/0\.parquet.*missing required column\(s\) \['code'\]"):
        read_meds_dataset(root)


def test_null_code_found_from_statistics(tmp_path):
    root = make_meds(tmp_path / "m")
    path = root / "data" / "train" / "0.parquet"
    t = pq.read_table(path)
    t = t.set_column(2, "code", pa.array([None] + t["code"].to_pylist()[1:], pa.string()))
    pq.write_table(t, path)
    with pytest.raises(InputError, match=r"column 'code' has 1 null"):
        read_meds_dataset(root)


def test_corrupt_shard(tmp_path):
    root = make_meds(tmp_path / "m")
    (root / "data" / "train" / "0.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match=r"train/0\.parquet: cannot read"):
        read_meds_dataset(root)


# ---------------------------------------------------------------- PRS


def _prs_frame() -> pl.DataFrame:
    return pl.DataFrame({
        "subject_id": [1, 5, 9, 12],
        "ancestry": ["EUR", "AFR", "EAS", "EUR"],
        "PGS000002": [0.5, None, -1.25, 2.0],
        "PGS000001": [0.1, 0.2, None, float("nan")],
    })


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_prs_table_happy_path(tmp_path, suffix):
    path = tmp_path / f"prs{suffix}"
    df = _prs_frame()
    df.write_parquet(path) if suffix == ".parquet" else df.write_csv(path)
    prs = read_prs_table(path)
    assert prs.score_columns == ["PGS000002", "PGS000001"]  # file order, ancestry is not a score
    assert prs.frame.schema["subject_id"] == pl.Int64
    assert all(prs.frame.schema[c] == pl.Float32 for c in prs.score_columns)
    assert prs.frame["ancestry"].to_list() == ["EUR", "AFR", "EAS", "EUR"]
    # Nulls stay nulls (not genotyped), NaN is read as null, never filled with zero.
    assert prs.frame["PGS000002"].null_count() == 1 and prs.frame["PGS000001"].null_count() == 2
    assert prs.frame["PGS000002"].to_list()[2] == -1.25
    assert PRS_COLUMN_PATTERN.match("PGS003481") and not PRS_COLUMN_PATTERN.match("PGS1")


def test_prs_no_subject_id(tmp_path):
    path = tmp_path / "prs.parquet"
    _prs_frame().rename({"subject_id": "person_id"}).write_parquet(path)
    with pytest.raises(InputError, match="no 'subject_id' column"):
        read_prs_table(path)


def test_prs_no_score_columns(tmp_path):
    path = tmp_path / "prs.parquet"
    _prs_frame().rename({"PGS000001": "score_a", "PGS000002": "score_b"}).write_parquet(path)
    with pytest.raises(InputError, match="no score columns"):
        read_prs_table(path)


def test_prs_non_numeric_csv_names_column_and_subject(tmp_path):
    path = tmp_path / "prs.csv"
    path.write_text("subject_id,PGS000001,PGS000002\n1,0.1,0.3\n5,abc,0.2\n9,0.4,0.1\n")
    with pytest.raises(InputError, match=r"'PGS000001' is not numeric.*subject 5 has 'abc'"):
        read_prs_table(path)


def test_prs_infinite_names_column_and_subject(tmp_path):
    path = tmp_path / "prs.parquet"
    _prs_frame().with_columns(pl.when(pl.col("subject_id") == 9).then(float("inf")).otherwise(pl.col("PGS000002"))
                              .alias("PGS000002")).write_parquet(path)
    with pytest.raises(InputError, match=r"'PGS000002' is infinite.*subject 9"):
        read_prs_table(path)


def test_prs_beyond_float32_is_infinite(tmp_path):
    path = tmp_path / "prs.csv"
    path.write_text("subject_id,PGS000001\n1,0.1\n7,1e300\n")
    with pytest.raises(InputError, match=r"'PGS000001' is infinite.*subject 7"):
        read_prs_table(path)


def test_prs_duplicate_subject(tmp_path):
    path = tmp_path / "prs.parquet"
    pl.concat([_prs_frame(), _prs_frame().filter(pl.col("subject_id") == 12)]).write_parquet(path)
    with pytest.raises(InputError, match="subject 12 has more than one row"):
        read_prs_table(path)


def test_prs_empty_table(tmp_path):
    path = tmp_path / "prs.parquet"
    _prs_frame().head(0).write_parquet(path)
    with pytest.raises(InputError, match="empty"):
        read_prs_table(path)


def test_prs_unreadable_file(tmp_path):
    path = tmp_path / "prs.parquet"
    path.write_bytes(b"\x00garbage")
    with pytest.raises(InputError, match="cannot read this PRS table"):
        read_prs_table(path)
    with pytest.raises(InputError, match="must be .parquet or .csv"):
        (tmp_path / "prs.xlsx").write_bytes(b"x")
        read_prs_table(tmp_path / "prs.xlsx")


# ---------------------------------------------------------------- labels


def _labels() -> pl.DataFrame:
    return pl.DataFrame({
        "subject_id": [1, 1, 5],
        "prediction_time": [T(2010, 1, 1), T(2012, 1, 1), T(2011, 6, 1)],
        "boolean_value": [False, True, False],
    }, schema_overrides={"prediction_time": pl.Datetime("us")})


def test_labels_happy_path_keeps_extra_columns(tmp_path):
    path = tmp_path / "l.parquet"
    _labels().with_columns(pl.lit(0.3).alias("predicted_boolean_probability"),
                           pl.col("subject_id").cast(pl.Int32),
                           pl.col("prediction_time").cast(pl.Datetime("ms"))).write_parquet(path)
    df = read_labels(path)
    assert df.schema["subject_id"] == pl.Int64 and df.schema["prediction_time"] == pl.Datetime("us")
    assert df.schema["boolean_value"] == pl.Boolean
    assert df.height == 3 and df["boolean_value"].sum() == 1
    assert "predicted_boolean_probability" in df.columns


def test_labels_missing_column(tmp_path):
    path = tmp_path / "l.parquet"
    _labels().drop("prediction_time").write_parquet(path)
    with pytest.raises(InputError, match=r"missing required column\(s\) \['prediction_time'\]"):
        read_labels(path)
    _labels().drop("boolean_value").write_parquet(path)
    with pytest.raises(InputError, match="no 'boolean_value' column"):
        read_labels(path)


def test_labels_wrong_type(tmp_path):
    path = tmp_path / "l.parquet"
    _labels().with_columns(pl.col("boolean_value").cast(pl.Int8)).write_parquet(path)
    with pytest.raises(InputError, match=r"column 'boolean_value' has type int8.*needs bool"):
        read_labels(path)


def test_labels_null_prediction_time(tmp_path):
    path = tmp_path / "l.parquet"
    _labels().with_columns(pl.when(pl.col("subject_id") == 5).then(None).otherwise(pl.col("prediction_time"))
                           .alias("prediction_time")).write_parquet(path)
    with pytest.raises(InputError, match=r"'prediction_time' has 1 null.*subject 5"):
        read_labels(path)


def test_labels_duplicate_rows(tmp_path):
    path = tmp_path / "l.parquet"
    pl.concat([_labels(), _labels().head(1)]).write_parquet(path)
    with pytest.raises(InputError, match=r"subject 1 has more than one label at prediction_time 2010-01-01"):
        read_labels(path)


def test_dataset_json_with_wrong_field_type(tmp_path):
    root = make_meds(tmp_path / "m")
    (root / "metadata" / "dataset.json").write_text(json.dumps({"dataset_name": 3}))
    with pytest.raises(InputError, match=r"field\(s\) \['dataset_name'\] should be \['string'\]"):
        read_meds_dataset(root)
