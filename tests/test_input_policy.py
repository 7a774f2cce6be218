"""One input policy for every command (issue 19, item 4).

Label rows that cannot be scored (subject without events, prediction_time before the subject's
first event) are dropped with one warning line and counted, identically in risk, baseline,
finetune and predict (and evaluate for rows the prediction files disagree on); --strict-labels
refuses them. A subject in two splits is an error. PRS columns are matched by name; missing
scores and uninformative columns are reported. A model that reads PRS run without --prs, and
data whose codes the tokenizer mostly does not know, each give one warning. A --min-subjects
that empties the vocabulary is an error that says what would work.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tokenizer_cohort import write_cohort, write_prs  # noqa: E402

from ehr_prs import cli  # noqa: E402
from ehr_prs.errors import InputError  # noqa: E402
from ehr_prs.data.readers import read_labels, read_meds_dataset, read_prs_table, select_label_rows  # noqa: E402
from ehr_prs.tokenizer.build import build  # noqa: E402
from ehr_prs.tokenizer.prediction_inputs import inputs_at_prediction_times, warn_if_prs_not_given  # noqa: E402
from ehr_prs.tokenizer.prs_standardizer import PrsStandardizer  # noqa: E402
from modeling_ehr_prs.tokenization_ehr import EhrTokenizer  # noqa: E402

KEY = ["subject_id", "prediction_time"]
T = dt.datetime
GHOST = 10**9  # a subject with no events anywhere


def _labels(rows: list[tuple]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"),
                                      "boolean_value": pl.Boolean}, orient="row")


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: ")]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """The 60-subject hand-made cohort of the tokenizer tests (train 1-40, tuning 41-50, held_out 51-60).

    Each subject's first non-birth event is at 2010-01-01 + 3 * subject_id days.
    """
    root = tmp_path_factory.mktemp("policy")
    write_cohort(root / "meds")
    write_prs(root / "prs.parquet")
    build(root / "meds", root / "tok", prs_path=root / "prs.parquet", min_subjects=5, min_values=20, max_length=256,
          progress=False)
    return root


# ----------------------------------------------------------------------------- the shared label policy


def test_select_label_rows_drops_unscorable_rows_with_one_counted_warning(small, capsys):
    ds = read_meds_dataset(small / "meds")
    first_53 = T(2010, 1, 1) + dt.timedelta(days=3 * 53)
    labels = _labels([
        (51, T(2020, 1, 1), True),    # kept
        (52, T(2010, 1, 1), False),   # before 52's first event (2010-06-06; birth does not count): empty history
        (53, first_53, False),        # exactly at 53's first event: kept (time <= prediction_time)
        (GHOST, T(2020, 1, 1), True),  # no events in the data
        (41, T(2020, 1, 1), True),    # tuning: another split, counted but not a problem
    ])
    sel = select_label_rows(ds, labels, ["held_out"], "labels.parquet")
    assert sel.rows.select(KEY).rows() == [(51, T(2020, 1, 1)), (53, first_53)]
    assert sel.rows["split"].to_list() == ["held_out", "held_out"]
    assert sel.counts() == {"label_rows": 5, "used": 2, "other_splits": 1, "dropped_no_events": 1,
                            "dropped_before_first_event": 1}
    assert sel.summary() == ("label rows: 2 of 5 used (split held_out), 1 belong to other splits; "
                             "dropped 2 (no events: 1, before first event: 1)")
    (line,) = _warnings(capsys.readouterr().err)
    assert line.startswith("warning: labels.parquet: dropped 2 of 5 label row(s) that cannot be scored: "
                           f"1 whose subject has no events in {small / 'meds'} (1 subject(s), e.g. {GHOST}); "
                           "1 whose prediction_time is before the subject's first event")
    assert "e.g. subject 52 at 2010-01-01 00:00:00" in line and line.endswith("--strict-labels makes this an error.")

    with pytest.raises(InputError, match=r"labels.parquet: 2 of 5 label row\(s\) cannot be scored: .*drop --strict-labels"):
        select_label_rows(ds, labels, ["held_out"], "labels.parquet", strict=True)
    # nothing left to score is an error even without --strict-labels, and says why
    with pytest.raises(InputError, match=r"no label row can be scored in split held_out .*1 whose subject has no "
                                         r"events.*other rows are in split\(s\) \['tuning'\]"):
        select_label_rows(ds, labels.filter(pl.col("subject_id").is_in([52, GHOST, 41])), ["held_out"], "l")
    # without drops: no warning at all
    capsys.readouterr()
    assert select_label_rows(ds, labels.head(1), None, "l").rows.height == 1
    assert capsys.readouterr().err == ""


@pytest.fixture(scope="module")
def policy_labels(tiny_data, tmp_path_factory) -> tuple[Path, pl.DataFrame, dict]:
    """The tiny cohort's T2D labels plus 3 unscorable rows: a ghost subject, and a held_out and a train
    row dated 1900 (before any event). Returns (file, the held_out rows every command must keep, splits)."""
    cohort = tiny_data / "cohort"
    labels = read_labels(cohort / "labels" / "t2d.parquet")
    splits = dict(read_meds_dataset(cohort / "meds").subject_splits.iter_rows())
    in_split = {s: labels.filter(pl.col("subject_id").replace_strict(splits, default=None) == s) for s in
                ("train", "held_out")}
    early = [(int(in_split[s]["subject_id"][0]), T(1900, 1, 1), False) for s in ("held_out", "train")]
    extra = _labels([(GHOST, T(2020, 1, 1), True), *early])
    path = tmp_path_factory.mktemp("labels") / "t2d_plus.parquet"
    pl.concat([labels, extra]).write_parquet(path)
    return path, in_split["held_out"].select(KEY).sort(KEY), {"n": labels.height + 3}


def test_same_label_file_same_rows_in_risk_baseline_finetune_and_predict(tiny_data, tiny_lm, policy_labels,
                                                                         tmp_path, capsys):
    path, held_keys, info = policy_labels
    cohort = tiny_data / "cohort"
    common = ["--meds", cohort / "meds", "--prs", cohort / "prs.parquet", "--labels", path]
    n = info["n"]

    def run(*argv) -> tuple[int, str, str]:
        rc = cli.main([str(a) for a in argv])
        out = capsys.readouterr()
        return rc, out.out, out.err

    # the shared function itself: 2 rows of held_out dropped (ghost + early), the train early row is another split's
    sel = select_label_rows(read_meds_dataset(cohort / "meds"), read_labels(path), ["held_out"], str(path))
    assert sel.rows.select(KEY).sort(KEY).equals(held_keys)
    assert (sel.absent.height, sel.early.height) == (1, 1)
    capsys.readouterr()

    rc, out, err = run("risk", "--model", tiny_lm, *common, "--codes", "ICD10CM/E11*", "--horizon-days", 365,
                       "--method", "path", "--samples", 1, "--max-new-tokens", 4, "--out", tmp_path / "risk.parquet")
    assert rc == 0, err
    (line,) = _warnings(err)
    assert f"dropped 2 of {n} label row(s)" in line and f"e.g. {GHOST}" in line
    assert f"label rows: {held_keys.height} of {n} used (split held_out)" in out
    assert pl.read_parquet(tmp_path / "risk.parquet").select(KEY).sort(KEY).equals(held_keys)

    rc, out, err = run("baseline", "--kind", "counts-gbm", *common, "--min-subjects", 5, "--threads", 1,
                       "--out", tmp_path / "gbm.parquet")
    assert rc == 0, err
    (line,) = _warnings(err)
    assert f"dropped 3 of {n} label row(s)" in line  # train's early row too: baseline reads train and tuning
    assert "no events: 1, before first event: 2" in out
    assert pl.read_parquet(tmp_path / "gbm.parquet").select(KEY).sort(KEY).equals(held_keys)

    rc, out, err = run("finetune", "--model", tiny_lm, *common, "--output-dir", tmp_path / "probe", "--method", "probe")
    assert rc == 0, err
    assert f"dropped 2 of {n} label row(s)" in _warnings(err)[0]  # train + tuning: the ghost and train's early row
    summary = json.loads((tmp_path / "probe" / "finetune_summary.json").read_text())
    assert summary["label_rows"]["dropped_no_events"] == 1 and summary["label_rows"]["dropped_before_first_event"] == 1

    rc, out, err = run("predict", "--model", tmp_path / "probe", *common, "--out", tmp_path / "pred.parquet")
    assert rc == 0, err
    assert f"dropped 2 of {n} label row(s)" in _warnings(err)[0]
    assert pl.read_parquet(tmp_path / "pred.parquet").select(KEY).sort(KEY).equals(held_keys)

    # --strict-labels: the same rows refused, exit 2, nothing written
    rc, out, err = run("baseline", "--kind", "counts-gbm", *common, "--strict-labels", "--out", tmp_path / "s.parquet")
    assert rc == 2 and f"3 of {n} label row(s) cannot be scored" in err and not (tmp_path / "s.parquet").exists()

    # evaluate: files that disagree on rows are compared on the rows they share, with the counts said
    short = pl.read_parquet(tmp_path / "gbm.parquet").sort(KEY).head(held_keys.height - 2)
    short.write_parquet(tmp_path / "short.parquet")
    rc, out, err = run("evaluate", "--predictions", f"risk={tmp_path / 'risk.parquet'}",
                       f"gbm={tmp_path / 'short.parquet'}", "--out", tmp_path / "eval", "--n-bootstrap", 50)
    assert rc == 0, err
    line = next(x for x in _warnings(err) if "--predictions" in x)
    assert "(model 'gbm') lacks 2" in line and f"comparing the models on the {held_keys.height - 2} rows" in line
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n"] == held_keys.height - 2


# ----------------------------------------------------------------------------- splits


def test_a_subject_in_two_splits_is_an_error(small, tmp_path):
    meds = tmp_path / "meds"
    shutil.copytree(small / "meds", meds)
    train, held = meds / "data" / "train" / "0.parquet", meds / "data" / "held_out" / "0.parquet"
    t, h = pl.read_parquet(train), pl.read_parquet(held)
    pl.concat([h, t.filter(pl.col("subject_id") == 5)]).sort("subject_id", "time", nulls_last=False).write_parquet(held)
    with pytest.raises(InputError, match=r"subject 5 has events in more than one split \(train, held_out\).*"
                                         r"trained on subjects it is later tested on"):
        read_meds_dataset(meds)
    # events in one split folder, listed under another in subject_splits.parquet
    h.write_parquet(held)
    pl.concat([t, h.filter(pl.col("subject_id") == 51)]).sort("subject_id", "time", nulls_last=False).write_parquet(train)
    h.filter(pl.col("subject_id") != 51).write_parquet(held)
    with pytest.raises(InputError, match=r"subject 51 is listed under split 'held_out' in "
                                         r"metadata/subject_splits.parquet but its events are in data/train/"):
        read_meds_dataset(meds)


# ----------------------------------------------------------------------------- PRS


def _prs_frame() -> pl.DataFrame:
    """Subjects 1-5 genotyped (PGS000002 constant, PGS000003 never measured, one hole in PGS000004), 6 not."""
    return pl.DataFrame({
        "subject_id": [1, 2, 3, 4, 5, 6],
        "PGS000001": [0.0, 1.0, 2.0, 3.0, 4.0, None],
        "PGS000002": [5.0, 5.0, 5.0, 5.0, 5.0, None],
        "PGS000003": [None] * 6,
        "PGS000004": [1.0, None, 3.0, 5.0, 7.0, None],
    }, schema_overrides={c: pl.Float32 for c in ("PGS000001", "PGS000002", "PGS000003", "PGS000004")})


def test_prs_missing_cells_and_uninformative_columns_are_reported_at_fit_and_apply(capsys, tmp_path):
    cols = ["PGS000001", "PGS000002", "PGS000003", "PGS000004"]
    st = PrsStandardizer.fit(_prs_frame(), cols, source="prs.parquet")
    (line,) = _warnings(capsys.readouterr().err)
    assert line == ("warning: prs.parquet: 1 score cell(s) of 1 genotyped train subject(s) are missing (5.00% of cells) "
                    "and take the training mean (z = 0); 2 of 4 score column(s) carry no information on the 5 "
                    "genotyped train subjects (all missing: PGS000003; constant: PGS000002) and are 0 for everyone; "
                    "subjects with no score at all count as not genotyped.")
    assert st.uninformative == ["PGS000002", "PGS000003"]
    st.save(tmp_path)
    assert PrsStandardizer.load(tmp_path).uninformative == ["PGS000002", "PGS000003"]

    new = pl.DataFrame({"subject_id": [7, 8, 9], "PGS000001": [3.0, None, None], "PGS000002": [9.0, 1.0, None],
                        "PGS000003": [4.0, None, None], "PGS000004": [None, 6.0, None]})
    stats: dict = {}
    z, mask = st.transform(new, [7, 8, 9], stats)
    assert mask.tolist() == [True, True, False]
    # constant and never-measured columns are 0 whatever the value; a missing score takes the mean (z = 0)
    z1, z4 = (3.0 - 2.0) / np.std([0, 1, 2, 3, 4], ddof=1), (6.0 - 4.0) / np.std([1, 3, 5, 7], ddof=1)
    np.testing.assert_allclose(z.astype(np.float64), [[z1, 0, 0, 0], [0, 0, 0, z4], [0, 0, 0, 0]], rtol=1e-3)
    assert stats == {"rows": 3, "genotyped": 2, "imputed_cells": 3, "imputed_rows": 2, "empty_columns": [],
                     "example": (7, "PGS000004")}
    assert st.missing_note(stats, "new.parquet") == (
        "new.parquet: 3 missing score(s) in 2 of the 2 genotyped subject row(s) (e.g. subject 7, PGS000004) take the "
        "training mean (z = 0); 1 of 3 row(s) have no score at all and count as not genotyped.")
    assert st.missing_note({"imputed_cells": 0}) is None
    # a score absent for every genotyped subject of the new table is named
    stats = {}
    st.transform(new.with_columns(pl.lit(None, dtype=pl.Float64).alias("PGS000001")), [7, 8, 9], stats)
    assert stats["empty_columns"] == ["PGS000001"] and stats["imputed_cells"] == 4
    assert "; 1 column(s) have no value for any genotyped subject here (PGS000001);" in st.missing_note(stats)


def test_prs_columns_are_matched_by_name_and_missing_ones_named(small, tmp_path, capsys):
    tok = EhrTokenizer.from_pretrained(str(small / "tok" / "tokenizer"))
    std = PrsStandardizer.load(small / "tok" / "tokenizer")
    ds = read_meds_dataset(small / "meds")
    labels = _labels([(s, T(2020, 1, 1), False) for s in range(51, 61)])
    prs = pl.read_parquet(small / "prs.parquet")
    capsys.readouterr()
    base = inputs_at_prediction_times(ds, labels, tok, std, read_prs_table(small / "prs.parquet"), split="held_out")

    # reversed column order plus an extra score: the same vectors, one note naming the extra column
    other = prs.with_columns((pl.col("PGS000001") * 2).alias("PGS000777")).select(
        "subject_id", "ancestry", "PGS000777", "PGS000004", "PGS000003", "PGS000002", "PGS000001")
    other.write_parquet(tmp_path / "reordered.parquet")
    got = inputs_at_prediction_times(ds, labels, tok, std, read_prs_table(tmp_path / "reordered.parquet"),
                                     split="held_out")
    assert got["prs"] == base["prs"] and got["prs_mask"] == base["prs_mask"] and any(base["prs_mask"])
    (line,) = _warnings(capsys.readouterr().err)
    assert "ignoring 1 score column(s) the model was not trained on (PGS000777); using its 4 columns" in line

    prs.drop("PGS000002", "PGS000004").write_parquet(tmp_path / "fewer.parquet")
    with pytest.raises(InputError) as err:
        inputs_at_prediction_times(ds, labels, tok, std, read_prs_table(tmp_path / "fewer.parquet"), split="held_out")
    assert "lacks 2 of the 4 score columns the model's PRS standardiser was fitted on: PGS000002, PGS000004" in str(err.value)
    assert "another order" not in str(err.value)
    # standardised within ancestry at training: a table without that column is refused, not a polars traceback
    assert std.group_column == "ancestry" and set(std.groups) == {"AFR", "EUR"}
    prs.drop("ancestry").write_parquet(tmp_path / "no_ancestry.parquet")
    with pytest.raises(InputError, match=r"no_ancestry.parquet: has no column 'ancestry', but the model's PRS "
                                         r"standardiser standardises within ancestry groups \(AFR, EUR\)"):
        inputs_at_prediction_times(ds, labels, tok, std, read_prs_table(tmp_path / "no_ancestry.parquet"),
                                   split="held_out")


def test_a_prs_model_run_without_prs_says_everyone_counts_as_not_genotyped(tiny_data, tiny_lm, tmp_path, capsys):
    cohort = tiny_data / "cohort"
    rc = cli.main([str(a) for a in ("risk", "--model", tiny_lm, "--meds", cohort / "meds", "--labels",
                                    cohort / "labels" / "t2d.parquet", "--codes", "ICD10CM/E11*", "--horizon-days",
                                    365, "--method", "path", "--samples", 1, "--max-new-tokens", 4, "--limit", 3,
                                    "--out", tmp_path / "p.parquet")])
    err = capsys.readouterr().err
    assert rc == 0, err
    lines = [x for x in _warnings(err) if "no --prs was given" in x]
    assert lines == [f"warning: --model {tiny_lm} was trained with 64 PRS columns but no --prs was given: every "
                     "subject counts as not genotyped (the model's learned 'no genotype' input); pass --prs FILE to "
                     "use the scores."]
    warn_if_prs_not_given(0, None, "m")  # an EHR-only model: nothing to say
    warn_if_prs_not_given(64, object(), "m")  # scores given: nothing to say
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- codes and vocabulary


def test_data_with_mostly_unknown_codes_warns_with_the_fraction(small, tmp_path, capsys):
    tok = EhrTokenizer.from_pretrained(str(small / "tok" / "tokenizer"))
    meds = tmp_path / "meds"
    shutil.copytree(small / "meds", meds)
    held = meds / "data" / "held_out" / "0.parquet"
    # another site's coding: every code but birth and visits renamed
    renamed = pl.col("code").str.starts_with("Visit/") | (pl.col("code") == "MEDS_BIRTH")
    pl.read_parquet(held).with_columns(pl.when(renamed).then(pl.col("code")).otherwise("SITE2/" + pl.col("code"))
                                       .alias("code")).write_parquet(held)
    labels = _labels([(s, T(2020, 1, 1), False) for s in range(51, 61)])
    capsys.readouterr()
    stats: dict = {}
    inputs_at_prediction_times(read_meds_dataset(meds), labels, tok, split="held_out", stats=stats)
    frac = stats["unknown_events"] / stats["events"]
    assert 0.5 < frac < 1
    (line,) = _warnings(capsys.readouterr().err)
    assert line.startswith(f"warning: {meds}: {frac:.0%} of the {stats['events']} events in these histories have codes "
                           "the model's tokenizer does not know (e.g. SITE2/")
    # the original data: every code known, no warning
    inputs_at_prediction_times(read_meds_dataset(small / "meds"), labels, tok, split="held_out", stats=stats)
    assert stats["unknown_events"] == 0 and capsys.readouterr().err == ""


def test_min_subjects_above_every_code_is_an_error_naming_the_largest_that_works(small, tmp_path, capsys):
    # 40 train subjects; LOINC/4548-4, RxNorm/860975, Visit/END and Visit/OP are in all 40 (first by name: LOINC)
    with pytest.raises(InputError, match=r"^--min-subjects 41: no code is seen in that many of the 40 train subjects, "
                                         r"so the vocabulary would be empty; the most widespread code \(LOINC/4548-4\) "
                                         r"is in 40. Use --min-subjects 40 or lower.$"):
        build(small / "meds", tmp_path / "o", min_subjects=41, progress=False)
    assert not (tmp_path / "o").exists()
    summary = build(small / "meds", tmp_path / "o40", min_subjects=40, progress=False)
    assert summary["codes_in_vocab"] == 4
    rc = cli.main(["tokenize", "--meds", str(small / "meds"), "--out", str(tmp_path / "cli"), "--min-subjects", "500"])
    assert rc == 2 and "Use --min-subjects 40 or lower" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()
