"""The record-ceiling reference (`ehr-prs record-ceiling`): features read only the past, the
genetic liability is the simulator's own, and bad input names what is wrong."""

from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from ehr_prs.evaluation import record_ceiling as R
from ehr_prs.cli import main as cli_main
from ehr_prs.errors import InputError
from ehr_prs.data.simulate import MEASUREMENT_CODES

A1C, GLU = MEASUREMENT_CODES["hba1c"], MEASUREMENT_CODES["glucose"]
T = datetime(2020, 1, 1)


def _events(extra=()):
    rows = [(1, None, "Gender/F", None), (1, datetime(1970, 1, 1), "MEDS_BIRTH", None),
            (1, T - timedelta(days=400), A1C, 5.5), (1, T - timedelta(days=100), A1C, 6.1),
            (1, T - timedelta(days=10), A1C, 6.4), (1, T - timedelta(days=10), "ICD10CM/R73.03", None),
            (1, T - timedelta(days=5), "ICD10CM/R73.03", None),
            (2, None, "Gender/M", None), (2, datetime(1980, 6, 1), "MEDS_BIRTH", None),
            (2, T - timedelta(days=30), GLU, 99.0), *extra]
    return pl.DataFrame(rows, schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String,
                                      "numeric_value": pl.Float32}, orient="row")


ROWS = pl.DataFrame({"subject_id": [1, 2], "prediction_time": [T, T]}, schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us")})


def test_features_read_only_the_past():
    f = R.risk_factor_features(_events(), ROWS, "t2d").sort("subject_id")
    s1, s2 = f.row(0, named=True), f.row(1, named=True)
    # m0 = HbA1c, m1 = glucose, c0 = prediabetes (R73.03)
    assert s1["m0_last"] == pytest.approx(6.4) and s1["m0_n"] == 3 and s1["m0_max"] == pytest.approx(6.4)
    assert s1["m0_mean3"] == pytest.approx((5.5 + 6.1 + 6.4) / 3) and s1["m0_days_since"] == 10
    assert s1["c0"] == 2 and s1["female"] == 1.0 and s1["age"] == pytest.approx(50.0, abs=0.01)
    assert s2["m0_last"] is None and s2["m0_n"] == 0 and s2["m1_last"] == pytest.approx(99.0)
    assert s2["c0"] == 0 and s2["female"] == 0.0
    # events after the prediction time (a diagnostic HbA1c, a prediabetes code) change nothing
    later = [(1, T + timedelta(days=1), A1C, 9.9), (1, T + timedelta(minutes=1), "ICD10CM/R73.03", None),
             (2, T + timedelta(days=3), A1C, 12.0)]
    assert R.risk_factor_features(_events(later), ROWS, "t2d").sort("subject_id").equals(f)


def test_genetic_liability_is_the_simulators(tiny_data):
    import json

    cohort = tiny_data / "cohort"
    traits = json.loads((cohort / "truth" / "prs_traits.json").read_text())
    prs = pl.read_parquet(cohort / "prs.parquet")
    subj = pl.read_parquet(cohort / "truth" / "subjects.parquet")
    for task in ("t2d", "copd"):
        mult = traits["traits"][task]["effect_multiplier_by_ancestry"]
        g = R.genetic_liability(prs, traits, task).join(subj, on="subject_id")
        assert g.height == prs.height > 100
        expected = g["g_" + task].to_numpy() * np.array([mult[a] for a in g["ancestry"]])
        # raw scores are float32 in the table: equal to float32 precision
        np.testing.assert_allclose(g["g"].to_numpy(), expected, rtol=0, atol=2e-4)


def test_dense_rows_are_new_onsets_with_the_horizon_inside_the_record(tiny_data):
    events = pl.concat([pl.read_parquet(p, columns=["subject_id", "time", "code", "numeric_value"])
                        for p in sorted((tiny_data / "cohort" / "meds" / "data").rglob("*.parquet"))])
    rows = R.dense_train_rows(events, "t2d", per_subject=3, horizon_days=730, seed=0)
    assert rows.height > 300 and rows.group_by("subject_id").len()["len"].max() <= 3
    span = events.filter(pl.col("time").is_not_null() & (pl.col("code") != "MEDS_BIRTH")).group_by("subject_id").agg(
        pl.col("time").min().alias("start"), pl.col("time").max().alias("end"))
    e11 = events.filter(pl.col("code").str.starts_with("ICD10CM/E11")).group_by("subject_id").agg(pl.col("time").min().alias("onset"))
    j = rows.join(span, on="subject_id").join(e11, on="subject_id", how="left")
    assert (j["prediction_time"] + timedelta(days=730) <= j["end"]).all()
    assert (j["prediction_time"] >= j["start"] + timedelta(days=180)).all()
    assert j.filter(pl.col("onset") <= pl.col("prediction_time")).height == 0
    pos = j.filter(pl.col("boolean_value"))
    assert pos.height > 0 and (pos["onset"] <= pos["prediction_time"] + timedelta(days=730)).all()
    assert R.dense_train_rows(events, "t2d", 3, 730, seed=0).equals(rows)  # seeded


def test_bad_input_names_the_file(tmp_path, capsys):
    (tmp_path / "meds" / "data").mkdir(parents=True)
    with pytest.raises(InputError, match="prs_traits.json does not exist.*ehr-prs simulate"):
        R.record_ceiling(tmp_path, "t2d")
    with pytest.raises(InputError, match="not a simulated task"):
        R.record_ceiling(tmp_path, "asthma")
    assert cli_main(["record-ceiling", "--cohort", str(tmp_path), "--task", "t2d", "--out", str(tmp_path / "p.parquet"),
                     "--train-rows-per-subject", "-1"]) == 2
    assert "--train-rows-per-subject must be >= 0" in capsys.readouterr().err
