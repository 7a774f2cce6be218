"""How much of the simulator's true risk the record reveals: `ehr-prs record-ceiling`.

    ehr-prs record-ceiling --cohort demo_out/cohort --task t2d --out demo_out/predictions/t2d_oracle-lr.parquet

The simulator's `truth/` is the risk given the latent state (exact HbA1c trajectory, genetic
liability of every subject). A model sees only the record: HbA1c measured now and then with
noise, glucose noisier still, PRS for the genotyped 60 %. So no model reaches the true risk's
AUROC, and "how close to the truth" needs a second yardstick: what a well-specified model reads
from the record when it is told where to look.

This stage fits that model, for simulated cohorts only. It uses what no real analysis has: the
simulator's own list of each task's risk factors (the codes and measurements its hazard is a
function of) and which PRS columns carry the task's genetic liability, with the simulator's
ancestry means, scales and effect multipliers (truth/prs_traits.json). Features per label row,
from events at or before its prediction time only:
- each risk-factor measurement: last value, mean of the last three, maximum, count, days since last;
- each risk-factor code: count;
- age at the prediction time, sex;
- the genetic liability g (ancestry-standardised sum of the carrier columns, times the
  ancestry's effect multiplier; 0 when not genotyped) and a genotyped indicator.
A logistic regression (the hazard is log-linear in these) is fitted on train labels with C
chosen on the tuning split's log loss and scores the held-out labels; missing measurements get the train median and an
indicator. `--train-rows-per-subject K` replaces the one train label per subject with up to K
prediction times per train subject, drawn from the record itself (what a self-supervised model
learns from).

It is a reference row for a report, not a model to ship: its predictions follow the MEDS
prediction schema so `ehr-prs evaluate` puts it beside the others.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import polars as pl

from ehr_prs.evaluation.baselines import KEY, check_two_classes
from ehr_prs.errors import InputError, check_output
from ehr_prs.data.readers import sex_from_code, subject_sex
from ehr_prs.data.simulate import (COMORBIDITIES, MEASUREMENT_CODES, MIN_HISTORY_DAYS, SMOKING_CODES,
                                       TASK_CODE_PREFIXES, TASKS)

# The record's readouts of what each task's hazard depends on (simulate._log_hazard): measurements
# whose values enter, and codes whose presence does (prodromes, comorbidities, smoking).
RISK_FACTORS: dict[str, tuple[list[str], list[str]]] = {
    "t2d": ([MEASUREMENT_CODES[m] for m in ("hba1c", "glucose", "bmi")], ["ICD10CM/R73.03"]),
    "stroke": ([MEASUREMENT_CODES[m] for m in ("sbp", "hba1c")],
               COMORBIDITIES["af"][0] + COMORBIDITIES["cad"][0] + ["ICD10CM/G45.9", "ICD10CM/F17.210", SMOKING_CODES["current"]]),
    "copd": ([MEASUREMENT_CODES["pack_years"]],
             list(SMOKING_CODES.values()) + ["ICD10CM/F17.210", "ICD10CM/Z87.891", "ICD10CM/R06.02", "ICD10CM/R05.9", "ICD10CM/J20.9"]),
}
SEX_CODE = "Gender/F"  # the simulator's spelling; any other (MIMIC's GENDER//F, ...) is read by sex_from_code
C_GRID = (0.01, 0.1, 1.0, 10.0)


def risk_factor_features(events: pl.DataFrame, rows: pl.DataFrame, task: str) -> pl.DataFrame:
    """One row per (subject_id, prediction_time) of `rows`, with the task's record features.

    `events` is MEDS (subject_id, time, code, numeric_value); only events with time <= the row's
    prediction time (and timeless ones, for sex) are read. Absent measurements are null.
    """
    import meds

    values, counted = RISK_FACTORS[task]
    keys = rows.select(KEY).unique()
    e = (events.filter(pl.col("code").is_in(values + counted + [meds.birth_code]) | sex_from_code().is_not_null())
         .join(keys, on="subject_id")
         .filter(pl.col("time").is_null() | (pl.col("time") <= pl.col("prediction_time"))))
    out = keys
    for i, code in enumerate(values):
        m = f"m{i}"
        agg = (e.filter(pl.col("code") == code).sort("time").group_by(KEY).agg(
            pl.col("numeric_value").last().alias(f"{m}_last"),
            pl.col("numeric_value").tail(3).mean().alias(f"{m}_mean3"),
            pl.col("numeric_value").max().alias(f"{m}_max"),
            pl.len().alias(f"{m}_n"),
            (pl.col("prediction_time").first() - pl.col("time").last()).dt.total_days().alias(f"{m}_days_since")))
        out = out.join(agg, on=KEY, how="left").with_columns(pl.col(f"{m}_n").fill_null(0))
    counts = (e.filter(pl.col("code").is_in(counted)).group_by(KEY + ["code"]).len()
              .with_columns(pl.col("code").replace_strict({c: f"c{j}" for j, c in enumerate(counted)}))
              .pivot(on="code", index=KEY, values="len"))
    out = out.join(counts, on=KEY, how="left")
    birth = e.filter(pl.col("code") == meds.birth_code).group_by(KEY).agg(pl.col("time").min().alias("birth"))
    female = (subject_sex(e, by=KEY).filter(pl.col("sex") == "F").select(KEY)
              .with_columns(pl.lit(1.0).alias("female")))
    out = (out.join(birth, on=KEY, how="left").join(female, on=KEY, how="left")
           .with_columns(((pl.col("prediction_time") - pl.col("birth")).dt.total_days() / 365.25).alias("age"),
                         pl.col("female").fill_null(0.0))
           .drop("birth"))
    for j in range(len(counted)):  # a code never seen before the prediction time: count 0
        c = f"c{j}"
        out = out.with_columns((pl.col(c) if c in out.columns else pl.lit(None)).fill_null(0).cast(pl.Float64).alias(c))
    return rows.select(KEY).join(out, on=KEY, how="left")


def genetic_liability(prs: pl.DataFrame, traits: dict, task: str) -> pl.DataFrame:
    """subject_id, g (the task's liability as the simulator defines it, times the ancestry's effect
    multiplier) for the genotyped subjects of the PRS table."""
    t = traits["traits"][task]
    z = []
    for j, col in enumerate(t["columns"]):
        mean = {a: v[j] for a, v in t["raw_mean_by_ancestry"].items()}
        scale = {a: v[j] for a, v in t["raw_scale_by_ancestry"].items()}
        z.append((pl.col(col) - pl.col("ancestry").replace_strict(mean, return_dtype=pl.Float64))
                 / pl.col("ancestry").replace_strict(scale, return_dtype=pl.Float64))
    mult = pl.col("ancestry").replace_strict(t["effect_multiplier_by_ancestry"], return_dtype=pl.Float64)
    return prs.select("subject_id", (pl.sum_horizontal(z) / t["sum_sd"] * mult).alias("g"))


def dense_train_rows(events: pl.DataFrame, task: str, per_subject: int, horizon_days: int, seed: int) -> pl.DataFrame:
    """Up to `per_subject` labelled prediction times per subject, from the record itself: visit ends
    with MIN_HISTORY_DAYS of record before, the whole horizon inside the record, and no task code
    at or before them; label = a task code within the horizon."""
    import meds

    timed = events.filter(pl.col("time").is_not_null() & (pl.col("code") != meds.birth_code))
    span = timed.group_by("subject_id").agg(pl.col("time").min().alias("start"), pl.col("time").max().alias("end"))
    onset = (timed.filter(pl.col("code").str.starts_with(TASK_CODE_PREFIXES[task])).group_by("subject_id")
             .agg(pl.col("time").min().alias("onset")))
    horizon = pl.duration(days=horizon_days)
    cand = (timed.filter(pl.col("code") == "Visit/END").select("subject_id", pl.col("time").alias("prediction_time"))
            .unique().join(span, on="subject_id").join(onset, on="subject_id", how="left")
            .filter((pl.col("prediction_time") >= pl.col("start") + pl.duration(days=MIN_HISTORY_DAYS))
                    & (pl.col("prediction_time") + horizon <= pl.col("end"))
                    & (pl.col("onset").is_null() | (pl.col("onset") > pl.col("prediction_time")))))
    cand = cand.sort(KEY).with_columns(pl.Series("u", np.random.default_rng(seed).random(cand.height)))
    cand = cand.sort(["subject_id", "u"]).group_by("subject_id", maintain_order=True).head(per_subject)
    return cand.select(*KEY, (pl.col("onset").is_not_null() & (pl.col("onset") <= pl.col("prediction_time") + horizon))
                       .alias("boolean_value")).sort(KEY)


def _design(frame: pl.DataFrame, cols: list[str], medians: np.ndarray | None = None):
    """Matrix with missing values set to the train median, plus a missing indicator per column
    (constant 0 for the columns that are never missing)."""
    X = frame.select(cols).to_numpy().astype(np.float64)
    miss = np.isnan(X)
    if medians is None:
        medians = np.nan_to_num(np.nanmedian(np.where(miss.all(axis=0), 0.0, X), axis=0))
    return np.hstack([np.where(miss, medians, X), miss.astype(np.float64)]), medians


def fit_predict(train: pl.DataFrame, tuning: pl.DataFrame, target: pl.DataFrame, cols: list[str]):
    """L2 logistic regression on train, C by tuning log loss; returns (probabilities on target, C)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X_tr, med = _design(train, cols)
    y_tr = train["boolean_value"].to_numpy()
    check_two_classes(y_tr, "record-ceiling train labels")
    y_tu = tuning["boolean_value"].to_numpy()
    tunable = 0 < y_tu.sum() < len(y_tu)  # otherwise C = 1, the scikit-learn default
    best = None
    for C in C_GRID if tunable else (1.0,):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000)).fit(X_tr, y_tr)
        loss = log_loss(y_tu, model.predict_proba(_design(tuning, cols, med)[0])[:, 1]) if tunable else 0.0
        if best is None or loss < best[0]:
            best = (loss, C, model)
    return best[2].predict_proba(_design(target, cols, med)[0])[:, 1], best[1]


def _read(cohort: Path) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, dict]:
    traits_path = cohort / "truth" / "prs_traits.json"
    splits_path = cohort / "meds" / "metadata" / "subject_splits.parquet"
    shards = sorted((cohort / "meds" / "data").rglob("*.parquet"))
    for path in (traits_path, splits_path):
        if not path.exists():
            raise InputError(f"{path} does not exist: --cohort must be a folder written by `ehr-prs simulate` "
                             "(the record ceiling needs the simulator's truth; real data has none).")
    if not shards:
        raise InputError(f"{cohort / 'meds' / 'data'} holds no parquet shards: --cohort must be a simulated cohort.")
    events = pl.concat([pl.read_parquet(f, columns=["subject_id", "time", "code", "numeric_value"]) for f in shards])
    prs_path = cohort / "prs.parquet"
    prs = pl.read_parquet(prs_path) if prs_path.exists() else pl.DataFrame(schema={"subject_id": pl.Int64, "ancestry": pl.String})
    return events, pl.read_parquet(splits_path), prs, json.loads(traits_path.read_text())


def record_ceiling(cohort: str | Path, task: str, split: str = "held_out", train_rows_per_subject: int = 0,
                   horizon_days: int = 730, seed: int = 0) -> tuple[pl.DataFrame, str]:
    """Predictions (MEDS prediction schema columns) for the `split` labels of `task`, and a summary.

    C is chosen on the tuning split, so `split` should be held_out (the command's only choice)."""
    import meds

    cohort = Path(cohort)
    if task not in TASKS:
        raise InputError(f"--task {task!r} is not a simulated task; choose one of {list(TASKS)}.")
    events, splits, prs, traits = _read(cohort)
    labels_path = cohort / "labels" / f"{task}.parquet"
    if not labels_path.exists():
        raise InputError(f"{labels_path} does not exist: the simulator writes labels/{task}.parquet.")
    labels = pl.read_parquet(labels_path).select(KEY + ["boolean_value"]).join(splits, on="subject_id", how="left")
    if train_rows_per_subject > 0:
        train_ids = splits.filter(pl.col("split") == meds.train_split).select("subject_id")
        dense = dense_train_rows(events.join(train_ids, on="subject_id"), task, train_rows_per_subject, horizon_days, seed)
        labels = pl.concat([labels.filter(pl.col("split") != meds.train_split),
                            dense.with_columns(pl.lit(meds.train_split).alias("split")).select(labels.columns)])
    feats = risk_factor_features(events, labels, task)
    g = genetic_liability(prs, traits, task) if prs.height else pl.DataFrame(schema={"subject_id": pl.Int64, "g": pl.Float64})
    frame = (labels.join(feats, on=KEY, how="left").join(g, on="subject_id", how="left")
             .with_columns(pl.col("g").is_not_null().cast(pl.Float64).alias("genotyped"), pl.col("g").fill_null(0.0)))
    cols = [c for c in feats.columns if c not in KEY] + ["g", "genotyped"]
    part = {s: frame.filter(pl.col("split") == s) for s in (meds.train_split, meds.tuning_split, split)}
    if part[split].height == 0:
        raise InputError(f"{labels_path}: no label rows in split {split!r}.")
    p, C = fit_predict(part[meds.train_split], part[meds.tuning_split], part[split], cols)
    preds = part[split].select(KEY + ["boolean_value"]).with_columns(pl.Series("predicted_boolean_probability", p))
    summary = (f"{len(cols)} features (+ missing indicators), {part[meds.train_split].height} train rows "
               f"({int(part[meds.train_split]['boolean_value'].sum())} positive), C={C:g}")
    return preds, summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cohort", required=True, help="folder written by `ehr-prs simulate` (meds/, prs.parquet, labels/, truth/)")
    parser.add_argument("--task", required=True, choices=TASKS, help="which simulated task's labels to predict")
    parser.add_argument("--out", required=True, help="output prediction parquet (MEDS prediction schema)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out file (never one inside --cohort)")
    parser.add_argument("--train-rows-per-subject", type=int, default=0,
                        help="0 (default): fit on labels/TASK.parquet's train rows; K > 0: up to K prediction times "
                             "per train subject drawn from the record itself")
    parser.add_argument("--horizon-days", type=int, default=730,
                        help="horizon of the drawn train rows (with --train-rows-per-subject); match the labels' (default 730)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawn train rows")


def run(args: argparse.Namespace) -> None:
    import meds
    from ehr_prs.data.predictions import write_predictions

    if args.train_rows_per_subject < 0:
        raise InputError(f"--train-rows-per-subject must be >= 0 (got {args.train_rows_per_subject}).")
    if args.horizon_days <= 0:
        raise InputError(f"--horizon-days must be > 0 (got {args.horizon_days}).")
    check_output(args.out, {"--cohort": args.cohort}, args.overwrite, kind="file")
    preds, summary = record_ceiling(args.cohort, args.task, meds.held_out_split, args.train_rows_per_subject,
                                    args.horizon_days, args.seed)
    write_predictions(preds, args.out, args.overwrite)
    print(f"record-ceiling {args.task}: {summary}")
    print(f"wrote {args.out}: {preds.height} predictions for split held_out "
          f"({int(preds['boolean_value'].sum())} positive)")
