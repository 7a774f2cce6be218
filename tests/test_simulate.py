"""The simulator: deterministic, valid MEDS, label rules, PRS structure, and truth that carries signal."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import meds
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from ehr_prs import cli
from ehr_prs.data.simulate import (
    ANCESTRIES,
    TASK_CODE_PREFIXES,
    TASKS,
    VISIT_END_CODE,
    VISIT_START_CODES,
    simulate_cohort,
)

HORIZON = 730


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """5,000 subjects with a small PRS panel: big enough for AUROC, a few seconds to make."""
    out = tmp_path_factory.mktemp("sim") / "cohort"
    simulate_cohort(out, n_subjects=5000, seed=11, n_prs=120, horizon_days=HORIZON, progress=False)
    return out


@pytest.fixture(scope="module")
def events(cohort) -> pl.DataFrame:
    return pl.read_parquet(cohort / "meds" / "data" / "*" / "*.parquet")


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        simulate_cohort(tmp_path / name, n_subjects=400, seed=seed, n_prs=60, progress=False)
    a, b, c = (_hashes(tmp_path / n) for n in "abc")
    assert len(a) >= 3 * 4 + 3 + 1 + 3 + 5  # shards x splits, metadata, prs, labels, truth
    assert a == b
    assert a["prs.parquet"] != c["prs.parquet"]
    assert a["meds/data/train/0.parquet"] != c["meds/data/train/0.parquet"]


def test_meds_files_validate_against_the_meds_schemas(cohort):
    files = sorted((cohort / "meds" / "data").glob("*/*.parquet"))
    assert {f.parent.name for f in files} == {"train", "tuning", "held_out"}
    assert all(len(list((cohort / "meds" / "data" / s).glob("*.parquet"))) >= 2 for s in ("train", "tuning", "held_out"))
    for f in files:
        table = pq.read_table(f)
        meds.DataSchema.validate(table)  # raises on a missing or mistyped column
        assert str(table.schema.field("numeric_value").type) == "float"
    meds.CodeMetadataSchema.validate(pq.read_table(cohort / "meds" / meds.code_metadata_filepath))
    meds.SubjectSplitSchema.validate(pq.read_table(cohort / "meds" / meds.subject_splits_filepath))
    meta = json.loads((cohort / "meds" / meds.dataset_metadata_filepath).read_text())
    meds.DatasetMetadataSchema.validate(meta)
    assert meta["meds_version"].startswith("0.4")
    for task in TASKS:
        meds.LabelSchema.validate(pq.read_table(cohort / "labels" / f"{task}.parquet"))


def test_events_sorted_static_first_subjects_in_one_file_and_codes_described(cohort, events):
    seen: set[int] = set()
    for f in sorted((cohort / "meds" / "data").glob("*/*.parquet")):
        df = pl.read_parquet(f)
        ids = set(df["subject_id"].unique().to_list())
        assert not ids & seen, f"a subject appears in two shards ({f})"
        seen |= ids
        key = df.with_columns(pl.col("time").fill_null(pl.datetime(1, 1, 1)).alias("t")).select("subject_id", "t")
        assert key.equals(key.sort("subject_id", "t", maintain_order=True)), f"{f} not sorted by subject then time"
    codes = set(pl.read_parquet(cohort / "meds" / "metadata" / "codes.parquet")["code"].to_list())
    assert set(events["code"].unique().to_list()) <= codes
    desc = pl.read_parquet(cohort / "meds" / "metadata" / "codes.parquet")
    assert desc["description"].null_count() == 0
    # vocabulary shape: every vocabulary present, several hundred codes, long-tailed counts
    used = events["code"].value_counts().sort("count", descending=True)
    assert used.height >= 300
    assert used["count"][0] > 100 * used["count"][used.height // 2]
    for prefix in ("ICD10CM/", "RxNorm/", "LOINC/", "CPT4/", "SNOMED/", "Gender/", "Race/", *VISIT_START_CODES.values(),
                   VISIT_END_CODE, meds.birth_code, meds.death_code):
        assert events.filter(pl.col("code").str.starts_with(prefix)).height > 0, prefix
    static = events.filter(pl.col("time").is_null())
    assert set(static["code"].str.split("/").list.first().unique().to_list()) == {"Gender", "Race", "Ethnicity"}
    # measurements carry values, visits do not
    assert events.filter(pl.col("code") == "LOINC/4548-4")["numeric_value"].null_count() == 0
    assert events.filter(pl.col("code") == "Visit/OP")["numeric_value"].null_count() == events.filter(pl.col("code") == "Visit/OP").height


def test_splits_and_subject_ids(cohort, events):
    splits = pl.read_parquet(cohort / "meds" / "metadata" / "subject_splits.parquet")
    assert splits.height == 5000 and splits["subject_id"].n_unique() == 5000
    frac = splits["split"].value_counts().to_dict(as_series=False)
    frac = dict(zip(frac["split"], frac["count"]))
    assert 0.77 < frac["train"] / 5000 < 0.83 and 0.08 < frac["held_out"] / 5000 < 0.12
    ids = np.sort(splits["subject_id"].to_numpy())
    assert ids.min() > 10**9 and np.median(np.diff(ids)) > 1000  # not 0..n-1, not contiguous
    assert set(events["subject_id"].unique().to_list()) == set(ids.tolist())
    # each shard file holds only subjects of its split
    for split in ("train", "tuning", "held_out"):
        in_files = pl.read_parquet(cohort / "meds" / "data" / split / "*.parquet")["subject_id"].unique()
        assert set(in_files.to_list()) == set(splits.filter(pl.col("split") == split)["subject_id"].to_list())


@pytest.mark.parametrize("task", TASKS)
def test_labels_follow_the_new_onset_rules(cohort, events, task):
    labels = pl.read_parquet(cohort / "labels" / f"{task}.parquet")
    assert labels["subject_id"].n_unique() == labels.height  # one label per subject
    horizon = pl.duration(days=HORIZON)
    first = (events.filter(pl.col("code").str.starts_with(TASK_CODE_PREFIXES[task]))
             .group_by("subject_id").agg(pl.col("time").min().alias("first_code")))
    last = events.group_by("subject_id").agg(pl.col("time").max().alias("last_event"))
    ends = events.filter(pl.col("code") == VISIT_END_CODE).select("subject_id", pl.col("time").alias("prediction_time"))
    df = labels.join(first, on="subject_id", how="left").join(last, on="subject_id")
    # new onset: no code of the condition at or before the prediction time
    assert df.filter(pl.col("first_code") <= pl.col("prediction_time")).height == 0
    # positive iff a code of the condition falls inside (t, t + horizon]
    inside = pl.col("first_code").is_not_null() & (pl.col("first_code") <= pl.col("prediction_time") + horizon)
    assert df.filter(pl.col("boolean_value") != inside).height == 0
    # every horizon is fully observed: the subject's data runs at least to its end
    assert df.filter(pl.col("prediction_time") + horizon > pl.col("last_event")).height == 0
    # the prediction time is the end of one of the subject's visits
    assert labels.join(ends, on=["subject_id", "prediction_time"], how="semi").height == labels.height
    y = labels["boolean_value"].to_numpy()
    assert labels.height > 1500 and 0.01 < y.mean() < 0.2


def test_truth_is_calibrated_and_t2d_truth_auroc_gains_from_genetics(cohort):
    for task in TASKS:
        labels = pl.read_parquet(cohort / "labels" / f"{task}.parquet")
        truth = pl.read_parquet(cohort / "truth" / f"{task}.parquet")
        assert truth.select("subject_id", "prediction_time").equals(labels.select("subject_id", "prediction_time"))
        p = truth["true_probability"].to_numpy()
        assert np.all((p > 0) & (p < 1))
        y = labels["boolean_value"].to_numpy()
        se = np.sqrt(np.sum(p * (1 - p))) / len(p)
        assert abs(y.mean() - p.mean()) < 4 * se, (task, y.mean(), p.mean())
    labels = pl.read_parquet(cohort / "labels" / "t2d.parquet")
    truth = pl.read_parquet(cohort / "truth" / "t2d.parquet")
    y = labels["boolean_value"].to_numpy()
    auc = roc_auc_score(y, truth["true_probability"].to_numpy())
    auc0 = roc_auc_score(y, truth["true_probability_no_genetic"].to_numpy())
    assert auc >= 0.75
    assert auc - auc0 >= 0.02, (auc, auc0)


def test_prs_table_structure(cohort):
    prs = pl.read_parquet(cohort / "prs.parquet")
    subjects = pl.read_parquet(cohort / "truth" / "subjects.parquet")
    traits = json.loads((cohort / "truth" / "prs_traits.json").read_text())["traits"]
    score_cols = [c for c in prs.columns if c.startswith("PGS")]
    assert score_cols == [f"PGS{j:06d}" for j in range(1, 121)]
    assert all(prs.schema[c] == pl.Float32 for c in score_cols)
    assert set(prs["ancestry"].unique().to_list()) <= set(ANCESTRIES)
    # genotyped subjects only, about 60 %
    geno = subjects.filter(pl.col("genotyped"))["subject_id"]
    assert set(prs["subject_id"].to_list()) == set(geno.to_list())
    assert 0.56 < prs.height / subjects.height < 0.64
    # means differ by ancestry (in units of the within-ancestry sd)
    eur, afr = prs.filter(pl.col("ancestry") == "eur"), prs.filter(pl.col("ancestry") == "afr")
    shift = np.abs(afr[score_cols].mean().to_numpy() - eur[score_cols].mean().to_numpy()) / eur[score_cols].std().to_numpy()
    assert np.median(shift) > 0.3
    # block correlation: a trait's scores correlate within ancestry; scores of different traits do not
    z = eur[score_cols].to_numpy().astype(np.float64)
    corr = np.corrcoef((z - z.mean(0)) / z.std(0), rowvar=False)
    col = {c: i for i, c in enumerate(score_cols)}
    t2d = [col[c] for c in traits["t2d"]["block_columns"]]
    copd = [col[c] for c in traits["copd"]["block_columns"]]
    within = corr[np.ix_(t2d, t2d)][np.triu_indices(len(t2d), 1)]
    between = corr[np.ix_(t2d, copd)]
    assert within.mean() > 0.2 and np.abs(between).mean() < 0.05
    # the liability recomputed from the PRS table with prs_traits.json is the generator's own
    t = traits["t2d"]
    anc = eur["ancestry"].to_numpy()
    zs = [(eur[c].to_numpy() - np.array([t["raw_mean_by_ancestry"][a][k] for a in anc]))
          / np.array([t["raw_scale_by_ancestry"][a][k] for a in anc]) for k, c in enumerate(t["columns"])]
    g = np.sum(zs, axis=0) / t["sum_sd"]
    g_true = eur.select("subject_id").join(subjects, on="subject_id", how="left")["g_t2d"].to_numpy()
    np.testing.assert_allclose(g, g_true, atol=1e-3)
    assert t["effect_multiplier_by_ancestry"]["eur"] == 1.0 and t["effect_multiplier_by_ancestry"]["afr"] < 0.8


def test_cli_writes_a_cohort_and_rejects_a_bad_flag(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli.main(["simulate", "--out", str(out), "--subjects", "60", "--n-prs", "60", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "60 subjects" in printed and "labels/t2d.parquet" in printed
    assert pl.read_parquet(out / "meds" / "metadata" / "subject_splits.parquet").height == 60
    bad = tmp_path / "bad"
    assert cli.main(["simulate", "--out", str(bad), "--subjects", "60", "--n-prs", "10"]) == 2
    assert "--n-prs" in capsys.readouterr().err
    assert not bad.exists() and not list(tmp_path.glob(".bad*"))
