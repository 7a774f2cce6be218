"""Tests for `ehr-prs evaluate`: metrics against scikit-learn, bootstrap behaviour, pairing, suppression, errors, files."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from ehr_prs.evaluation import metrics as E
from ehr_prs.errors import InputError

PT = datetime(2020, 1, 1)


def _data(n: int, seed: int = 0, signal: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels (prevalence ~0.3) and a noisy score rounded to 2 decimals, so there are many ties."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(np.int8)
    s = 1 / (1 + np.exp(-(signal * y + rng.normal(size=n) - 1)))
    return y, np.round(s, 2)


def _write_preds(path: Path, y: np.ndarray, p: np.ndarray, ids: np.ndarray | None = None) -> Path:
    ids = np.arange(1, len(y) + 1) if ids is None else ids
    pq.write_table(pa.table({
        "subject_id": pa.array(ids, pa.int64()),
        "prediction_time": pa.array([PT] * len(y), pa.timestamp("us")),
        "boolean_value": pa.array(y.astype(bool)),
        "predicted_boolean_probability": pa.array(p, pa.float64()),
    }), path)
    return path


# ---------------------------------------------------------------- metrics

def test_vectorised_metrics_equal_sklearn_with_ties_and_weights():
    y, s = _data(300)
    ones = np.ones((1, y.size), dtype=np.int64)
    auroc, ap = E.weighted_auroc_auprc(s, y, ones)
    assert auroc[0] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert ap[0] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    # Multiplicities = a resample: equal to sklearn on the repeated rows.
    w = np.random.default_rng(1).multinomial(y.size, np.full(y.size, 1 / y.size), size=5)
    auroc, ap = E.weighted_auroc_auprc(s, y, w)
    for b in range(5):
        idx = np.repeat(np.arange(y.size), w[b])
        assert auroc[b] == pytest.approx(roc_auc_score(y[idx], s[idx]), abs=1e-12)
        assert ap[b] == pytest.approx(average_precision_score(y[idx], s[idx]), abs=1e-12)


def test_point_metrics_brier_and_ece_by_hand():
    y = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1] * 2)
    p = np.array([0.1] * 5 + [0.9] * 5 + [0.2] * 5 + [0.6] * 5)
    m = E.point_metrics(y, p)
    assert m["brier"] == pytest.approx(np.mean((p - y) ** 2))
    # 10 equal-count bins over sorted p: each bin of 2 rows has a single label, so ECE = mean |y - p| here.
    assert m["ece"] == pytest.approx(np.mean(np.abs(y - p)))
    # A constant predictor is one bin (ties never straddle bins): here perfectly calibrated in the mean.
    assert E.point_metrics(y, np.full(20, 0.5))["ece"] == pytest.approx(0.0)
    assert E.point_metrics(y, np.full(20, 0.3))["ece"] == pytest.approx(0.2)
    c = E.calibration_bins(y, p)
    assert c["n"] == [5, 5, 5, 5] and c["observed"] == [0.0, 0.0, 1.0, 1.0]


def test_perfect_predictor():
    y = np.array([0] * 30 + [1] * 10)
    p = np.where(y == 1, 0.9, 0.1)
    m = E.point_metrics(y, p)
    assert m["auroc"] == 1.0 and m["auprc"] == 1.0
    boot = E.bootstrap_metrics(y, {"perfect": p}, n_boot=200, seed=0)
    assert E.percentile_ci(boot["perfect"]["auroc"]) == [1.0, 1.0]


def test_bootstrap_ci_contains_estimate_and_shrinks_with_n():
    widths = []
    for n in (200, 3200):
        y, s = _data(n, seed=n)
        boot = E.bootstrap_metrics(y, {"m": s}, n_boot=1000, seed=0)
        for k, point in (("auroc", roc_auc_score(y, s)), ("auprc", average_precision_score(y, s))):
            lo, hi = E.percentile_ci(boot["m"][k])
            assert lo < point < hi
        lo, hi = E.percentile_ci(boot["m"]["auroc"])
        widths.append(hi - lo)
    # 16x the rows -> about a quarter of the width; allow generous slack.
    assert 0.15 < widths[1] / widths[0] < 0.4


def test_bootstrap_is_seeded_and_chunking_does_not_change_it():
    y, s = _data(150)
    a = E.bootstrap_metrics(y, {"m": s}, n_boot=100, seed=7, chunk=100)["m"]["auroc"]
    b = E.bootstrap_metrics(y, {"m": s}, n_boot=100, seed=7, chunk=100)["m"]["auroc"]
    np.testing.assert_array_equal(a, b)
    c = E.bootstrap_metrics(y, {"m": s}, n_boot=100, seed=8, chunk=100)["m"]["auroc"]
    assert not np.array_equal(a, c)


def test_paired_difference_against_itself_is_zero_with_p_one(tmp_path):
    y, s = _data(400)
    f = _write_preds(tmp_path / "a.parquet", y, s)
    _, s2 = _data(400, seed=0, signal=3.0)
    g = _write_preds(tmp_path / "b.parquet", y, s2)
    res, _ = E.compute_metrics(E.EvaluationInputs({"a": f, "a-again": f, "better": g}, reference="a", n_bootstrap=300))
    c = res["comparisons"]["a-again"]
    assert c["delta_auroc"] == 0.0 and c["delta_auroc_ci"] == [0.0, 0.0] and c["p_auroc"] == 1.0
    assert c["delta_auprc"] == 0.0 and c["p_auprc"] == 1.0
    better = res["comparisons"]["better"]
    assert better["delta_auroc"] > 0.1 and better["delta_auroc_ci"][0] > 0 and better["p_auroc"] < 0.01
    assert res["models"]["a"]["auroc"] == pytest.approx(roc_auc_score(y, s))


def test_paired_deltas_by_level_find_a_gain_where_it_is():
    """A score that improves only in one group shows a paired gain there and none in the other."""
    n = 4000
    y, s = _data(n, seed=5)
    group = np.where(np.arange(n) % 2 == 0, "genotyped", "not genotyped")
    better = np.where(group == "genotyped", np.clip(s + 0.15 * y, 0, 1), s)
    table = pl.DataFrame({"boolean_value": y.astype(bool), "ref": s, "new": better, "genotyped": group})
    out = E.paired_deltas_by_level(table, "genotyped", ["ref", "new"], "ref", n_boot=300, seed=0)
    g, ng = out["genotyped"]["models"]["new"], out["not genotyped"]["models"]["new"]
    assert g["delta_auroc_ci"][0] > 0.01 and g["p_auroc"] < 0.01
    assert ng["delta_auroc"] == 0 and ng["delta_auroc_ci"] == [0, 0]
    tiny = table.head(30)  # under 20 rows of a class: the level is left out
    assert E.paired_deltas_by_level(tiny, "genotyped", ["ref", "new"], "ref", n_boot=50, seed=0) == {}


def test_paired_p_value():
    assert E.paired_p_value(np.zeros(10)) == 1.0
    assert E.paired_p_value(np.full(10, 0.1)) == 0.0
    assert E.paired_p_value(np.array([-1.0, 1, 1, 1])) == 0.5


# ---------------------------------------------------------------- subgroups and suppression

def test_subgroup_cells_under_20_are_suppressed():
    rng = np.random.default_rng(0)
    n = 19 + 45
    table = pl.DataFrame({
        "boolean_value": np.r_[[True] * 5 + [False] * 14, [True] * 25 + [False] * 20],
        "m": rng.random(n), "group": ["small"] * 19 + ["big"] * 45,
    })
    out = E.subgroup_metrics(table, ["m"], ["group"], min_cell=20)["group"]
    assert out["small"] == {"n": "<20", "n_positive": "<20", "suppressed": True}
    # The only other level's counts would reveal the small one by subtraction from the total.
    assert out["big"]["n"] == "hidden" and out["big"]["n_positive"] == "hidden" and not out["big"]["suppressed"]
    y = table["boolean_value"].to_numpy()[19:]
    assert out["big"]["models"]["m"]["auroc"] == pytest.approx(roc_auc_score(y, table["m"].to_numpy()[19:]))
    assert E.small(0) == 0 and E.small(19) == "<20" and E.small(20) == 20


def _tiny_meds(root: Path, subjects: dict[int, tuple[str, str, datetime]]) -> Path:
    (root / "metadata").mkdir(parents=True)
    (root / "data" / "held_out").mkdir(parents=True)
    (root / "metadata" / "dataset.json").write_text(json.dumps({"dataset_name": "t", "meds_version": "0.4.1"}))
    pq.write_table(pa.table({"subject_id": pa.array(list(subjects), pa.int64()), "split": ["held_out"] * len(subjects)}),
                   root / "metadata" / "subject_splits.parquet")
    rows = []
    for s, (sex, race, birth) in subjects.items():
        rows += [(s, None, f"Gender/{sex}"), (s, None, f"Race/{race}"), (s, birth, "MEDS_BIRTH"),
                 (s, PT - timedelta(days=3), "ICD10CM/I10")]
    c = list(zip(*rows))
    pq.write_table(pa.table({"subject_id": pa.array(c[0], pa.int64()), "time": pa.array(c[1], pa.timestamp("us")),
                             "code": c[2], "numeric_value": pa.array([None] * len(rows), pa.float32())}),
                   root / "data" / "held_out" / "0.parquet")
    return root


def test_meds_subgroups_from_static_codes_and_birth(tmp_path):
    root = _tiny_meds(tmp_path / "meds", {1: ("F", "Asian", datetime(1985, 6, 1)), 2: ("M", "White", datetime(1940, 1, 2)),
                                           3: ("F", "White", datetime(1964, 6, 1))})
    rows = pl.DataFrame({"subject_id": [1, 2, 3], "prediction_time": [PT] * 3}).with_columns(
        pl.col("prediction_time").cast(pl.Datetime("us")))
    g = E.meds_subgroups(root, rows).sort("subject_id")
    assert g["sex"].to_list() == ["F", "M", "F"]
    assert g["race"].to_list() == ["Asian", "White", "White"]
    assert g["age_band"].to_list() == ["<40", "75+", "55-64"]  # ages 34.6, 80.0, 55.6


# ---------------------------------------------------------------- errors

def test_mismatched_labels_between_files(tmp_path):
    y, s = _data(50)
    a = _write_preds(tmp_path / "a.parquet", y, s)
    y2 = y.copy()
    y2[[3, 7]] = 1 - y2[[3, 7]]
    b = _write_preds(tmp_path / "b.parquet", y2, s)
    with pytest.raises(InputError, match=r"boolean_value disagrees .* on 2 row"):
        E.load_predictions({"a": a, "b": b})


def test_model_lacking_rows(tmp_path):
    y, s = _data(50)
    a = _write_preds(tmp_path / "a.parquet", y, s)
    b = _write_preds(tmp_path / "b.parquet", y[:45], s[:45])
    # the shared label policy (tests/test_input_policy.py): refused under --strict-labels, else the common rows
    with pytest.raises(InputError, match=r"of the 50 .* rows in the prediction files, .*\(model 'b'\) lacks 5"):
        E.load_predictions({"a": a, "b": b}, strict=True)
    assert E.load_predictions({"a": a, "b": b}).height == 45


def test_bad_specs_and_probabilities(tmp_path):
    with pytest.raises(InputError, match="NAME=FILE"):
        E.parse_prediction_specs(["justafile.parquet"])
    with pytest.raises(InputError, match="given twice"):
        E.parse_prediction_specs(["a=x.parquet", "a=y.parquet"])
    y, s = _data(30)
    s[4] = 1.5
    with pytest.raises(InputError, match=r"1 row\(s\) have predicted_boolean_probability missing or outside"):
        E.load_predictions({"a": _write_preds(tmp_path / "a.parquet", y, s)})


# ---------------------------------------------------------------- files

def test_cli_writes_metrics_report_and_figures(tmp_path, capsys):
    from ehr_prs.cli import main

    n = 300
    y, s = _data(n, seed=3)
    ids = np.arange(1, n + 1)
    a = _write_preds(tmp_path / "a.parquet", y, s, ids)
    b = _write_preds(tmp_path / "b.parquet", y, np.clip(s + 0.05 * y, 0, 1), ids)
    rng = np.random.default_rng(0)
    geno = ids[ids % 3 != 0]
    pl.DataFrame({"subject_id": geno, "ancestry": np.where(geno % 2 == 0, "eur", "afr"),
                  "PGS000001": rng.normal(size=geno.size) + y[geno - 1], "PGS000002": rng.normal(size=geno.size)}).write_parquet(
        tmp_path / "prs.parquet")
    pl.DataFrame({"subject_id": ids, "prediction_time": [PT] * n, "true_probability": np.clip(s + 0.1 * y, 0, 1),
                  "true_probability_no_genetic": np.full(n, 0.3)}).with_columns(
        pl.col("prediction_time").cast(pl.Datetime("us"))).write_parquet(tmp_path / "truth.parquet")
    out = tmp_path / "eval"
    rc = main(["evaluate", "--predictions", f"a={a}", f"b={b}", "--reference", "a", "--truth", str(tmp_path / "truth.parquet"),
               "--prs", str(tmp_path / "prs.parquet"), "--n-bootstrap", "200", "--out", str(out)])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["calibration.png", "metrics.json", "pr.png", "prs_deciles.png",
                                                       "report.md", "roc.png"]
    res = json.loads((out / "metrics.json").read_text())
    assert list(res["models"]) == ["a", "b", E.TRUTH_NAME, E.TRUTH_RECORDED_NAME] and res["n"] == n
    # the recorded-genetics oracle: the truth in genotyped rows, the no-genetic truth (0.3 here) elsewhere
    sub = res["subgroups"]["genotyped"]
    assert sub["genotyped"]["models"][E.TRUTH_RECORDED_NAME]["auroc"] == sub["genotyped"]["models"][E.TRUTH_NAME]["auroc"]
    assert sub["not genotyped"]["models"][E.TRUTH_RECORDED_NAME]["auroc"] == 0.5  # a constant ranks nothing
    assert res["models"][E.TRUTH_RECORDED_NAME]["auroc"] < res["models"][E.TRUTH_NAME]["auroc"]
    assert res["comparisons"]["b"]["delta_auroc"] > 0
    assert set(res["subgroups"]) == {"ancestry", "genotyped"}
    by_g = res["comparisons_by_genotyped"]  # b = a + 0.05 * y in every row: it gains in both groups
    assert set(by_g) == {"genotyped", "not genotyped"} and by_g["genotyped"]["n"] == geno.size
    for level in by_g.values():
        assert level["models"]["b"]["delta_auroc_ci"][0] > 0 and "a" not in level["models"]
    assert "genotyped or not" in (out / "report.md").read_text()
    assert res["subgroups"]["genotyped"]["genotyped"]["n"] == geno.size
    dec = res["prs_deciles"]
    assert dec["column"] == "PGS000001" and dec["within"] == "ancestry" and len(dec["deciles"]) == 10
    observed = [d["observed"] for d in dec["deciles"]]
    assert observed[-1] > observed[0]  # PGS000001 carries the label here
    report = (out / "report.md").read_text()
    assert "| model | AUROC [95% CI]" in report and "| b |" in report and "![roc](roc.png)" in report
    for png in ("roc.png", "pr.png", "calibration.png", "prs_deciles.png"):
        img = mpimg.imread(out / png)
        assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 300
    rc = main(["evaluate", "--predictions", f"a={a}", "--reference", "zzz", "--out", str(tmp_path / "bad")])
    assert rc == 2 and not (tmp_path / "bad").exists()
