"""`ehr-prs evaluate` on small and clustered data (issue 19, item 6) and `ehr-prs risk`'s default estimator (item 7).

The bootstrap resamples subjects when a subject has several rows, warns when positives or negatives
are too few, and counts resamples where a metric is undefined against every interval and p-value.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ehr_prs.evaluation import metrics as E

PT = datetime(2020, 1, 1)


def _write(path: Path, ids, y, p, times=None) -> Path:
    """A MEDS prediction file; every row at PT unless `times` is given."""
    times = [PT + timedelta(days=int(d)) for d in (times if times is not None else np.zeros(len(ids)))]
    pl.DataFrame({"subject_id": np.asarray(ids, dtype=np.int64), "prediction_time": times,
                  "boolean_value": np.asarray(y, dtype=bool), "predicted_boolean_probability": np.asarray(p, float)}
                 ).with_columns(pl.col("prediction_time").cast(pl.Datetime("us"))).write_parquet(path)
    return path


def _issue_case(tmp_path: Path) -> tuple[Path, Path]:
    """The issue's case: 20 rows, both positives from subject 1 (two prediction times), 18 other subjects
    with one negative row each; `ref` ranks both positives first (AUROC 1), `b` puts them above 8 and
    9 negatives (17 of 36 pairs: AUROC 0.472), so ΔAUROC = -19/36 = -0.528."""
    ids = np.r_[1, 1, np.arange(2, 20)]
    times = np.r_[0, 365, np.zeros(18)]
    y = np.r_[1, 1, np.zeros(18)]
    neg = np.linspace(0.05, 0.6, 18)
    ref = _write(tmp_path / "ref.parquet", ids, y, np.r_[0.9, 0.95, neg], times)
    b = _write(tmp_path / "b.parquet", ids, y, np.r_[neg[7] + 0.001, neg[8] + 0.001, neg], times)
    return ref, b


def test_issue_case_is_not_significant_and_warns(tmp_path, capsys):
    from ehr_prs.cli import main

    ref, b = _issue_case(tmp_path)
    # What the issue saw: a row bootstrap that drops the resamples without a positive calls it significant.
    table = E.load_predictions({"ref": ref, "b": b})
    y = table["boolean_value"].to_numpy().astype(np.int8)
    scores = {m: table[m].to_numpy() for m in ("ref", "b")}
    old = E.bootstrap_metrics(y, scores, n_boot=1000, seed=0)
    d = old["b"]["auroc"] - old["ref"]["auroc"]
    assert np.mean(d[np.isfinite(d)] >= 0) < 0.005  # the old p-value: 2 * this, "<0.001" or 0.004

    out = tmp_path / "eval"
    assert main(["evaluate", "--predictions", f"ref={ref}", f"b={b}", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "ΔAUROC -0.528 (p " in captured.out and "subjects, not rows" in captured.out
    res = json.loads((out / "metrics.json").read_text())
    c = res["comparisons"]["b"]
    assert c["delta_auroc"] == pytest.approx(-19 / 36)
    assert c["p_auroc"] >= 0.5 and c["delta_auroc_ci"][0] < 0 < c["delta_auroc_ci"][1]
    assert res["bootstrap_unit"] == "subject" and res["n_positive_subjects"] == "<20"
    # One positive subject among 19: (18/19)^19 = 36% of resamples miss it, each counting toward both tails.
    assert c["p_auroc"] == pytest.approx(2 * (18 / 19) ** 19, abs=0.1)
    small = "fewer than 10 subjects have a positive label"
    assert small in res["warnings"][0] and "bootstrap resamples drew no positive" in res["warnings"][1]
    assert f"warning: {small}" in captured.err
    report = (out / "report.md").read_text()
    assert f"> **Warning:** {small}" in report and "resamples of subjects, not rows" in report


def test_cluster_bootstrap_of_duplicated_rows_equals_the_deduplicated_data():
    """Each subject's row repeated 3 times: the row bootstrap counts the copies as evidence and its
    interval shrinks by ~1/sqrt(3); resampling subjects gives the interval of the de-duplicated data."""
    rng = np.random.default_rng(0)
    n = 300
    y = (rng.random(n) < 0.3).astype(np.int8)
    s = np.round(1 / (1 + np.exp(-(y + rng.normal(size=n) - 1))), 2)
    ids = np.arange(n)
    y3, s3, ids3 = np.repeat(y, 3), np.repeat(s, 3), np.repeat(ids, 3)
    assert E.subject_clusters(ids) is None  # one row per subject: rows are the units
    clusters = E.subject_clusters(ids3)
    assert clusters is not None and clusters.max() == n - 1
    dedup = E.bootstrap_metrics(y, {"m": s}, n_boot=1000, seed=0)["m"]["auroc"]
    by_subject = E.bootstrap_metrics(y3, {"m": s3}, n_boot=1000, seed=0, clusters=clusters)["m"]["auroc"]
    by_row = E.bootstrap_metrics(y3, {"m": s3}, n_boot=1000, seed=0)["m"]["auroc"]
    ci_dedup, ci_subject, ci_row = (E.percentile_ci(v) for v in (dedup, by_subject, by_row))
    np.testing.assert_allclose(ci_subject, ci_dedup, atol=1e-9)  # same draws, every row of a subject weighted alike
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert 0.45 < width(ci_row) / width(ci_subject) < 0.72  # ~0.577


def _cohort(tmp_path: Path, n_pos_subjects: int, n_neg_subjects: int, rows_per_positive: int = 2) -> Path:
    """Positive subjects with `rows_per_positive` rows each (so subjects are the units), negatives one row each."""
    rng = np.random.default_rng(1)
    ids = np.r_[np.repeat(np.arange(n_pos_subjects), rows_per_positive), 1000 + np.arange(n_neg_subjects)]
    y = np.r_[np.ones(n_pos_subjects * rows_per_positive), np.zeros(n_neg_subjects)]
    times = np.r_[np.tile(np.arange(rows_per_positive) * 100, n_pos_subjects), np.zeros(n_neg_subjects)]
    return _write(tmp_path / f"p{n_pos_subjects}_{n_neg_subjects}.parquet", ids, y, 0.3 * y + 0.7 * rng.random(y.size),
                  times)


@pytest.mark.parametrize("n_pos, n_neg, expected", [
    (9, 300, "fewer than 10 subjects have a positive label"),  # 18 positive rows, but 9 subjects
    (10, 300, None),
    (200, 9, "fewer than 10 subjects have a negative label"),
    (200, 10, None),
])
def test_small_sample_warning_at_the_threshold(tmp_path, n_pos, n_neg, expected):
    res, _ = E.compute_metrics(E.EvaluationInputs({"m": _cohort(tmp_path, n_pos, n_neg)}, n_bootstrap=300))
    assert res["bootstrap_unit"] == "subject"
    if expected is None:
        assert res["warnings"] == []
    else:
        assert len([w for w in res["warnings"] if w.startswith(expected)]) == 1
    # With cells published down to 1 the count itself is said.
    res, _ = E.compute_metrics(E.EvaluationInputs({"m": _cohort(tmp_path, 9, 300)}, n_bootstrap=300, min_cell=1))
    assert res["warnings"][0].startswith("only 9 subjects have a positive label") and res["n_positive_subjects"] == 9


def test_undefined_resamples_widen_intervals_and_p_values():
    values = np.r_[np.full(5, np.nan), np.linspace(0.6, 0.8, 95)]
    assert E.percentile_ci(values, bounds=(0.0, 1.0)) == [0.0, 1.0]  # 5% undefined > 2.5% on each side
    assert E.percentile_ci(values) == pytest.approx([0.605, 0.795], abs=1e-3)  # finite values only
    one = np.r_[np.nan, np.linspace(0.6, 0.8, 99)]  # 1% undefined: a bounded interval, a little wider
    lo, hi = E.percentile_ci(one, bounds=(0.0, 1.0))
    assert 0.6 <= lo < E.percentile_ci(one)[0] and hi > E.percentile_ci(one)[1]
    plain = np.linspace(0.6, 0.8, 100)
    assert E.percentile_ci(plain, bounds=(0.0, 1.0)) == E.percentile_ci(plain)
    assert E.paired_p_value(np.r_[np.nan, np.nan, np.full(8, 0.1)]) == pytest.approx(0.4)  # 2 * 2/10
    assert E.paired_p_value(np.full(8, 0.1)) == 0.0
    assert np.isnan(E.paired_p_value(np.full(4, np.nan)))


def test_subgroup_whose_auroc_cannot_be_computed_is_named():
    rng = np.random.default_rng(0)
    table = pl.DataFrame({"boolean_value": np.r_[[False] * 30, [True, False] * 20], "m": rng.random(70),
                          "sex": ["F"] * 30 + ["M"] * 40})
    sub = E.subgroup_metrics(table, ["m"], ["sex"], min_cell=20)
    assert np.isnan(sub["sex"]["F"]["models"]["m"]["auroc"]) and not np.isnan(sub["sex"]["M"]["models"]["m"]["auroc"])
    warnings = E.undefined_subgroup_warnings(sub, "m")
    assert warnings == ["AUROC and AUPRC cannot be computed for sex=F: all rows of the cell have the same label "
                        "(shown as n/a)"]


def test_risk_defaults_to_the_survival_estimator():
    from ehr_prs.risk import command as risk

    parser = argparse.ArgumentParser()
    risk.add_arguments(parser)
    args = parser.parse_args(["--model", "m", "--meds", "d", "--labels", "l.parquet", "--codes", "ICD10CM/E11*",
                              "--horizon-days", "730", "--out", "p.parquet"])
    assert args.method == "survival"
    assert "default survival" in parser.format_help().replace("\n", " ").replace("  ", " ")
