"""Compare prediction files for one binary task: `ehr-prs evaluate`.

    ehr-prs evaluate --predictions ehr=runs/ehr.parquet ehr+prs=runs/prs.parquet gbm=runs/gbm.parquet \
        --reference ehr --truth runs/cohort/truth/t2d.parquet --prs runs/cohort/prs.parquet \
        --meds runs/cohort/meds --out runs/eval/t2d

Every model is scored on the same rows: files are joined on (subject_id, prediction_time) and
must agree on the label and cover the same rows. AUROC and AUPRC get percentile 95% CIs from
1,000 bootstrap resamples drawn once (as per-row or per-subject multiplicities) and shared by all models, so
differences against `--reference` are paired; the bootstrap metrics are computed for all
resamples at once from one sort of each model's scores (tie-aware, equal to scikit-learn's
on each resample). When some subject has several rows, the bootstrap resamples subjects (all
rows of a drawn subject together), since a subject's rows are not independent; otherwise rows.
A resample on which a metric is undefined (it drew no positive or no negative) counts against
every claim: it extends the interval to the metric's range and counts toward both tails of the
p-value. With fewer than 10 subjects with a positive label (or with a negative one) the report
warns that the intervals mean little (`MIN_SUBJECTS_PER_CLASS`). Brier score and expected
calibration error (10 equal-count bins) come with a reliability diagram. Subgroups (age band,
sex, race from the MEDS static codes; ancestry and genotyped from the PRS table) get the same
point metrics; a cell with fewer than `--min-cell`
(20) subjects is suppressed and printed as "<20", as is any count below 20 (All of Us rule).
PRS alignment shows the mean predicted risk per decile of one PRS column.

Writes DIR/metrics.json, DIR/report.md and DIR/{roc,pr,calibration,prs_deciles}.png.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from ehr_prs.errors import InputError, atomic_output_dir, check_output
from ehr_prs.privacy import MIN_SUBJECTS, small, suppress_cells
from ehr_prs.data.readers import (
    read_labels, read_meds_dataset, read_prs_table, sex_from_code, subject_sex, warn,
)

# matplotlib, scipy, scikit-learn and meds are imported inside the functions that use them (~1 s
# together): `ehr-prs evaluate --help`, and the commands that import this module, need none of them.
if TYPE_CHECKING:
    from scipy import sparse

KEY = ["subject_id", "prediction_time"]
PROB = "predicted_boolean_probability"
AGE_BANDS = (40, 55, 65, 75)  # band edges in years: <40, 40-54, 55-64, 65-74, 75+
AGE_LABELS = [f"<{AGE_BANDS[0]}"] + [f"{a}-{b - 1}" for a, b in zip(AGE_BANDS[:-1], AGE_BANDS[1:])] + [f"{AGE_BANDS[-1]}+"]
TRUTH_NAME = "true risk"
# The simulator's truth knows everyone's genetic liability, also of people without a PRS, which no
# model of the recorded data can know: this oracle uses it only where a PRS was measured.
TRUTH_RECORDED_NAME = "true risk, genetics if genotyped"
# Fewer independent units (subjects) than this with a positive label, or with a negative one, and
# the bootstrap's intervals and p-values are flagged as meaningless. The AUROC's sampling spread is
# set by the smaller class; a bootstrap over m positive subjects underestimates the variance by the
# factor (m - 1) / m (zero spread from that class at m = 1, half at m = 2) and can produce only a
# few distinct resampled sets, so below ~10 events its percentile intervals are far too narrow:
# the same floor as the 10-events rule of thumb of clinical prediction modelling (Peduzzi et al.
# 1996). Precise validation needs far more (~100 events, Collins et al. 2016); 10 is where the
# intervals stop meaning anything, not where they become good.
MIN_SUBJECTS_PER_CLASS = 10


# ----------------------------------------------------------------------------------------
# Loading and aligning prediction files
# ----------------------------------------------------------------------------------------

def parse_prediction_specs(specs: list[str]) -> dict[str, Path]:
    """NAME=FILE strings -> {name: path}, in order; InputError on a bad or repeated name."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--predictions {spec!r}: expected NAME=FILE (for example ehr=runs/ehr.parquet).")
        if name in out:
            raise InputError(f"--predictions: the name {name!r} is given twice; each model needs its own name.")
        out[name] = Path(path)
    return out


def load_predictions(files: dict[str, str | Path], strict: bool = False) -> pl.DataFrame:
    """Join prediction files on (subject_id, prediction_time): KEY, boolean_value, one probability column per model.

    InputError if a file lacks predicted_boolean_probability, has probabilities outside [0, 1], or
    disagrees on a label. Rows that some file lacks follow the label policy of every command
    (readers.select_label_rows): models are compared on the rows all files have, with one warning
    giving the counts; `strict` (--strict-labels) refuses instead, and so does an empty overlap.
    """
    frames: dict[str, pl.DataFrame] = {}
    for name, path in files.items():
        df = read_labels(path)
        if PROB not in df.columns:
            raise InputError(f"{path} (model {name!r}): no {PROB!r} column; a MEDS prediction file needs one.")
        df = df.select(*KEY, "boolean_value", pl.col(PROB).cast(pl.Float64))
        bad = df.filter(pl.col(PROB).is_null() | pl.col(PROB).is_nan() | (pl.col(PROB) < 0) | (pl.col(PROB) > 1))
        if bad.height:
            raise InputError(f"{path} (model {name!r}): {bad.height} row(s) have {PROB} missing or outside [0, 1] "
                             f"(first: subject {bad['subject_id'][0]}).")
        frames[name] = df
    names = list(frames)
    keys = pl.concat([f.select(KEY) for f in frames.values()]).unique()
    lacking = []
    for name, f in frames.items():
        missing = keys.join(f.select(KEY), on=KEY, how="anti")
        if missing.height:
            lacking.append(f"{files[name]} (model {name!r}) lacks {missing.height} "
                           f"(first: subject {missing.sort(KEY)['subject_id'][0]})")
    if lacking:
        common = keys
        for f in frames.values():
            common = common.join(f.select(KEY), on=KEY, how="semi")
        detail = (f"of the {keys.height} (subject_id, prediction_time) rows in the prediction files, "
                  f"{'; '.join(lacking)}")
        if strict or common.height == 0:
            raise InputError(f"{detail}; {common.height} rows are in every file. Every model must score the same "
                             f"label rows: score them from one label file with the same --split (drop --strict-labels "
                             f"to compare on the rows every file has).")
        warn(f"--predictions: {detail}; comparing the models on the {common.height} rows every file has "
             f"(dropped {keys.height - common.height}); --strict-labels makes this an error.")
    out = frames[names[0]].rename({PROB: names[0]})
    for name in names[1:]:
        f = frames[name].rename({PROB: name, "boolean_value": "_label"})
        out = out.join(f, on=KEY, how="inner")
        bad = out.filter(pl.col("_label") != pl.col("boolean_value"))
        if bad.height:
            raise InputError(
                f"{files[name]} (model {name!r}): boolean_value disagrees with {files[names[0]]} on {bad.height} row(s) "
                f"(first: subject {bad['subject_id'][0]} at {bad['prediction_time'][0]}); all files must carry the same labels."
            )
        out = out.drop("_label")
    return out.sort(KEY)


def add_truth(preds: pl.DataFrame, truth_path: str | Path, name: str = TRUTH_NAME) -> pl.DataFrame:
    """Add the simulator's true_probability as one more model (the ceiling); it must cover every row."""
    path = Path(truth_path)
    if not path.is_file():
        raise InputError(f"{path}: --truth file not found (the simulator writes truth/<task>.parquet).")
    t = pl.read_parquet(path)
    if "true_probability" not in t.columns or not set(KEY) <= set(t.columns):
        raise InputError(f"{path}: --truth needs columns subject_id, prediction_time, true_probability; has {t.columns}.")
    t = t.select(pl.col("subject_id").cast(pl.Int64), pl.col("prediction_time").cast(pl.Datetime("us")),
                 pl.col("true_probability").cast(pl.Float64).alias(name))
    out = preds.join(t, on=KEY, how="left")
    missing = out.filter(pl.col(name).is_null()).height
    if missing:
        raise InputError(f"{path}: --truth has no true_probability for {missing} of {preds.height} prediction rows.")
    return out


# ----------------------------------------------------------------------------------------
# Metrics, vectorised over bootstrap resamples
# ----------------------------------------------------------------------------------------

def weighted_auroc_auprc(score: np.ndarray, y: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and average precision for each row of `weights` (B, n) (row multiplicities), shape (B,) each.

    With integer multiplicities this equals scikit-learn's roc_auc_score / average_precision_score
    on the resampled rows (ties count one half for AUROC; AP steps at each distinct score).
    NaN where a resample has no positive or no negative.
    """
    pos, neg = score_class_counts(score, y, np.arange(y.size), y.size)
    w = np.asarray(weights, dtype=np.float64)
    return auroc_auprc_from_counts(w @ pos, w @ neg)


def score_class_counts(score: np.ndarray, y: np.ndarray, units: np.ndarray, n_units: int) -> tuple[sparse.csr_array, sparse.csr_array]:
    """Positive and negative rows per (unit, distinct score), as sparse (n_units, G) matrices, scores ascending.

    A resample's class weight at each distinct score is then its unit multiplicities (B, n_units)
    times these: one sparse product per model and chunk, never a (resamples x rows) array, which
    keeps the subject bootstrap as fast as the row one (units: each row's unit, 0..n_units-1).
    """
    from scipy import sparse

    _, g = np.unique(score, return_inverse=True)
    shape = (n_units, int(g.max()) + 1)
    is_pos = y.astype(bool)
    pos = sparse.csr_array((np.ones(is_pos.sum()), (units[is_pos], g[is_pos])), shape=shape)
    neg = sparse.csr_array((np.ones((~is_pos).sum()), (units[~is_pos], g[~is_pos])), shape=shape)
    return pos, neg


def auroc_auprc_from_counts(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and average precision per row of (B, G) positive / negative weights at G ascending distinct scores."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc = (pos * (neg_below + 0.5 * neg)).sum(axis=1) / (n_pos * n_neg)
        tp = np.cumsum(pos[:, ::-1], axis=1)  # descending thresholds
        fp = np.cumsum(neg[:, ::-1], axis=1)
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-300), 0.0)
        ap = (pos[:, ::-1] * precision).sum(axis=1) / n_pos
    bad = (n_pos == 0) | (n_neg == 0)
    auroc[bad] = np.nan
    ap[bad] = np.nan
    return auroc, ap


def subject_clusters(subject_ids: np.ndarray) -> np.ndarray | None:
    """Each row's subject as a cluster index 0..S-1 when some subject has several rows; None when
    every row is its own subject (then rows are the bootstrap's units)."""
    _, index, counts = np.unique(np.asarray(subject_ids), return_inverse=True, return_counts=True)
    return index.astype(np.int64) if (counts > 1).any() else None


def bootstrap_metrics(y: np.ndarray, scores: dict[str, np.ndarray], n_boot: int = 1000, seed: int = 0,
                      chunk: int | None = None, clusters: np.ndarray | None = None) -> dict[str, dict[str, np.ndarray]]:
    """AUROC and AUPRC of every model on the same `n_boot` resamples: {model: {"auroc": (B,), "auprc": (B,)}}.

    Resamples are drawn once per chunk (multinomial multiplicities, seeded) and applied to every
    model, so differences between models are paired. clusters (n,) (`subject_clusters`): resample
    the clusters, each drawn cluster bringing all its rows, because rows of one subject are not
    independent and a row bootstrap would count them as separate evidence; None: resample rows.
    Chunks bound memory at ~20M weights.
    """
    n = y.size
    unit_of_row = np.arange(n) if clusters is None else np.asarray(clusters)
    units = int(unit_of_row.max()) + 1
    counts = {m: score_class_counts(s, y, unit_of_row, units) for m, s in scores.items()}
    chunk = chunk or max(1, min(n_boot, 20_000_000 // max(n, 1)))
    rng = np.random.default_rng(seed)
    out = {m: {"auroc": [], "auprc": []} for m in scores}
    for start in tqdm(range(0, n_boot, chunk), desc="evaluate: bootstrap", unit="chunk", leave=False):
        b = min(chunk, n_boot - start)
        # (b, units) resample counts: a unit drawn k times brings each of its rows k times
        weights = rng.multinomial(units, np.full(units, 1.0 / units), size=b).astype(np.float64)
        for m, (pos, neg) in counts.items():
            auroc, ap = auroc_auprc_from_counts(weights @ pos, weights @ neg)
            out[m]["auroc"].append(auroc)
            out[m]["auprc"].append(ap)
    return {m: {k: np.concatenate(v) for k, v in d.items()} for m, d in out.items()}


def percentile_ci(values: np.ndarray, level: float = 0.95, bounds: tuple[float, float] | None = None) -> list[float]:
    """Percentile interval of the bootstrap values.

    bounds None: of the finite values only. bounds (lo, hi), the metric's range: a resample where
    the metric is undefined (NaN: no positive or no negative drawn) could have given any value, so
    it counts as lo for the lower end and hi for the upper end; once more than (1 - level) / 2 of
    the resamples are undefined the interval reaches the range's ends, which is what they tell.
    """
    finite = np.isfinite(values)
    if not finite.any():
        return [math.nan, math.nan]
    a = (1 - level) / 2
    if bounds is None or finite.all():
        v = values[finite]
        return [float(np.quantile(v, a)), float(np.quantile(v, 1 - a))]
    return [float(np.quantile(np.where(finite, values, bounds[0]), a)),
            float(np.quantile(np.where(finite, values, bounds[1]), 1 - a))]


def paired_p_value(diffs: np.ndarray) -> float:
    """Two-sided bootstrap p-value for a difference of 0: 2 * min(P(d <= 0), P(d >= 0)), at most 1.

    A resample where the difference is undefined (NaN: it drew no positive or no negative) shows
    no sign either way, so it counts toward both tails: p >= 2 * (fraction undefined). With one
    positive subject among S, about (1 - 1/S)^S ~ 37% of resamples miss it and p >= 0.7, as it
    should be: one subject cannot show that one model ranks positives better. NaN if none is defined.
    """
    finite = np.isfinite(diffs)
    if not finite.any():
        return math.nan
    undefined = ~finite
    low = np.mean((diffs <= 0) | undefined)
    high = np.mean((diffs >= 0) | undefined)
    return float(min(1.0, 2 * min(low, high)))


def calibration_bins(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> dict[str, list[float]]:
    """Equal-count bins of predicted probability: mean predicted, observed rate and size per bin.

    A row's bin is floor(rank * n_bins / n) with tied predictions sharing their lowest rank, so
    ties never straddle two bins (a constant predictor is one bin); empty bins are dropped.
    """
    n = len(p)
    order = np.argsort(p, kind="stable")
    ranks = np.empty(n, dtype=np.int64)
    sp = p[order]
    first = np.flatnonzero(np.r_[True, sp[1:] != sp[:-1]])  # start of each tie group in sorted order
    ranks[order] = np.repeat(first, np.diff(np.r_[first, n]))
    b = ranks * n_bins // max(n, 1)
    size = np.bincount(b, minlength=n_bins)
    keep = size > 0
    mean_p = np.bincount(b, weights=p, minlength=n_bins)[keep] / size[keep]
    obs = np.bincount(b, weights=y.astype(np.float64), minlength=n_bins)[keep] / size[keep]
    return {"mean_predicted": mean_p.tolist(), "observed": obs.tolist(), "n": size[keep].astype(int).tolist()}


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> float:
    """ECE over equal-count (quantile) bins: sum_b n_b / n * |observed_b - mean predicted_b|."""
    c = calibration_bins(y, p, n_bins)
    n = np.asarray(c["n"], dtype=np.float64)
    gap = np.abs(np.asarray(c["observed"]) - np.asarray(c["mean_predicted"]))
    return float((n * gap).sum() / n.sum())


def point_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """AUROC, AUPRC (average precision), Brier and ECE; AUROC/AUPRC NaN with a single class."""
    from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

    two = 0 < y.sum() < y.size
    return {
        "auroc": float(roc_auc_score(y, p)) if two else math.nan,
        "auprc": float(average_precision_score(y, p)) if two else math.nan,
        "brier": float(brier_score_loss(y, p, labels=[0, 1])),
        "ece": expected_calibration_error(y, p),
    }


# ----------------------------------------------------------------------------------------
# Subgroups
# ----------------------------------------------------------------------------------------

def meds_subgroups(meds_dir: str | Path, rows: pl.DataFrame) -> pl.DataFrame:
    """KEY + age_band, sex, race from MEDS static codes (sex codes, Race/*) and MEDS_BIRTH.

    Sex is F or M from any spelling `readers.sex_from_code` knows (Gender/F, MIMIC's GENDER//F, ...).
    """
    import meds

    ds = read_meds_dataset(meds_dir)
    ids = rows.select("subject_id").unique()
    ev = (ds.scan().join(ids.lazy(), on="subject_id", how="semi")
          .filter(sex_from_code().is_not_null() | pl.col("code").str.starts_with("Race/")
                  | (pl.col("code") == meds.birth_code))
          .collect())
    per_subject = ev.group_by("subject_id").agg(
        pl.col("code").filter(pl.col("code").str.starts_with("Race/")).sort().first().str.strip_prefix("Race/").alias("race"),
        pl.col("time").filter(pl.col("code") == meds.birth_code).min().alias("birth"),
    )
    per_subject = per_subject.join(subject_sex(ev), on="subject_id", how="left")
    out = rows.select(KEY).join(per_subject, on="subject_id", how="left")
    age = (pl.col("prediction_time") - pl.col("birth")).dt.total_seconds() / (365.25 * 86400)
    band = pl.when(pl.col("birth").is_null()).then(pl.lit("unknown"))
    for edge, label in zip(AGE_BANDS, AGE_LABELS):  # [.., 40) -> "<40", [40, 55) -> "40-54", ...
        band = band.when(age < edge).then(pl.lit(label))
    band = band.otherwise(pl.lit(AGE_LABELS[-1]))
    return out.select(*KEY, band.alias("age_band"), pl.col("sex").fill_null("unknown"), pl.col("race").fill_null("unknown"))


def prs_subgroups(prs_path: str | Path, rows: pl.DataFrame) -> pl.DataFrame:
    """KEY + genotyped ("genotyped"/"not genotyped") and ancestry (when the PRS table has it)."""
    prs = read_prs_table(prs_path)
    geno = prs.frame.select("subject_id", pl.any_horizontal(pl.col(prs.score_columns).is_not_null()).alias("_g"),
                            *(["ancestry"] if "ancestry" in prs.frame.columns else []))
    out = rows.select(KEY).join(geno, on="subject_id", how="left")
    cols = [pl.when(pl.col("_g").fill_null(False)).then(pl.lit("genotyped")).otherwise(pl.lit("not genotyped")).alias("genotyped")]
    if "ancestry" in geno.columns:
        cols.append(pl.col("ancestry").cast(pl.String).fill_null("not genotyped"))
    return out.select(*KEY, *cols)


def subgroup_metrics(table: pl.DataFrame, models: list[str], variables: list[str],
                     min_cell: int = MIN_SUBJECTS) -> dict:
    """{variable: {level: {"n", "n_positive", "suppressed", "models": {model: point metrics}}}}; small cells suppressed."""
    out: dict[str, dict] = {}
    for var in variables:
        out[var] = {}
        for (level,), g in sorted(table.group_by([var]), key=lambda kv: _level_key(str(kv[0][0]))):
            n = g.height
            y = g["boolean_value"].to_numpy().astype(np.int8)
            cell: dict = {"n": n, "n_positive": int(y.sum()), "suppressed": n < min_cell}  # counts suppressed below
            if n >= min_cell:
                cell["models"] = {m: point_metrics(y, g[m].to_numpy()) for m in models}
            out[var][str(level)] = cell
        suppress_cells(out[var], ("n", "n_positive"), min_cell)
    return out


def paired_deltas_by_level(table: pl.DataFrame, var: str, models: list[str], reference: str, n_boot: int,
                           seed: int, min_cell: int = MIN_SUBJECTS) -> dict:
    """{level: {model: ΔAUROC/ΔAUPRC vs reference, paired bootstrap CI and p}} within each level of `var`.

    By genotyped-or-not this tells a PRS effect (a gain in genotyped rows only: the others get the
    adapter's "no genotype" tokens) from any other change an adapter makes. Levels with fewer than
    `min_cell` rows, or without both classes, are left out. Like the main table, it resamples
    subjects when the table has subject_id and some subject has several rows in the level.
    """
    out: dict[str, dict] = {}
    for (level,), g in sorted(table.group_by([var]), key=lambda kv: _level_key(str(kv[0][0]))):
        y = g["boolean_value"].to_numpy().astype(np.int8)
        if g.height < min_cell or not 0 < y.sum() < y.size or min(y.sum(), y.size - y.sum()) < min_cell:
            continue
        scores = {m: g[m].to_numpy() for m in models}
        points = {m: point_metrics(y, scores[m]) for m in models}
        clusters = subject_clusters(g["subject_id"].to_numpy()) if "subject_id" in g.columns else None
        cell = paired_deltas(points, bootstrap_metrics(y, scores, n_boot, seed, clusters=clusters), reference)
        del cell[reference]
        out[str(level)] = {"n": small(g.height, min_cell), "n_positive": small(int(y.sum()), min_cell), "models": cell}
    return out


def paired_deltas(points: dict[str, dict], boot: dict[str, dict], reference: str) -> dict[str, dict]:
    """{model: ΔAUROC/ΔAUPRC vs reference, with paired bootstrap CI and p} from point metrics and
    bootstrap values computed on the same resamples for every model."""
    out = {}
    for m in points:
        comp = {}
        for k in ("auroc", "auprc"):
            d = boot[m][k] - boot[reference][k]  # paired: same resamples
            comp[f"delta_{k}"] = points[m][k] - points[reference][k]
            comp[f"delta_{k}_ci"] = percentile_ci(d, bounds=(-1.0, 1.0))  # a difference of two [0, 1] metrics
            comp[f"p_{k}"] = paired_p_value(d)
        out[m] = comp
    return out


def _level_key(level: str) -> tuple:
    """Age bands in age order, other levels alphabetically, unknown / not genotyped last."""
    if level in AGE_LABELS:
        return (0, AGE_LABELS.index(level), "")
    return (2 if level in ("unknown", "not genotyped") else 1, 0, level)


# ----------------------------------------------------------------------------------------
# PRS alignment
# ----------------------------------------------------------------------------------------

def prs_deciles(table: pl.DataFrame, prs_path: str | Path, column: str | None, models: list[str],
                min_cell: int = MIN_SUBJECTS, within: str | None = "auto") -> dict:
    """Mean predicted risk and observed rate per decile of one PRS column (genotyped rows only).

    Deciles are taken within `ancestry` when the table has it (`within="auto"`): raw scores differ
    in mean by ancestry, so pooled deciles would mostly sort people by ancestry.
    """
    prs = read_prs_table(prs_path)
    column = column or prs.score_columns[0]
    if column not in prs.score_columns:
        raise InputError(f"--prs-column {column!r} is not a score column of {prs_path}; it has "
                         f"{prs.score_columns[:5]}{'...' if len(prs.score_columns) > 5 else ''}.")
    if within == "auto":
        within = "ancestry" if "ancestry" in prs.frame.columns else None
    keep = ["subject_id", column] + ([within] if within else [])
    t = table.join(prs.frame.select(keep), on="subject_id", how="inner").filter(pl.col(column).is_not_null())
    group = pl.col(within) if within else pl.lit(0)
    rank = (pl.col(column).rank("ordinal").over(group) - 1) / pl.len().over(group)
    t = t.with_columns((rank * 10).floor().cast(pl.Int32).clip(0, 9).alias("decile") + 1)
    rows = []
    for d in range(1, 11):
        g = t.filter(pl.col("decile") == d)
        row: dict = {"decile": d, "n": small(g.height, min_cell), "suppressed": g.height < min_cell}
        if g.height >= min_cell:
            row["observed"] = float(g["boolean_value"].cast(pl.Float64).mean())
            row["mean_predicted"] = {m: float(g[m].mean()) for m in models}
        rows.append(row)
    return {"column": column, "within": within, "n_genotyped": small(t.height, min_cell), "deciles": rows}


# ----------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------

def pyplot():
    """matplotlib.pyplot on the Agg backend (files only; never a display), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def plot_curves(y: np.ndarray, scores: dict[str, np.ndarray], metrics: dict, out: Path) -> list[str]:
    """roc.png and pr.png: one curve per model, the AUROC/AUPRC in the legend."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for m, s in scores.items():
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{m} ({metrics[m]['auroc']:.3f})")
    ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=1)
    ax.set(xlabel="False positive rate", ylabel="True positive rate", title="ROC (AUROC)", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, out / "roc.png")
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for m, s in scores.items():
        prec, rec, _ = precision_recall_curve(y, s)
        ax.step(rec, prec, where="post", label=f"{m} ({metrics[m]['auprc']:.3f})")
    ax.axhline(y.mean(), ls=":", c="grey", lw=1, label=f"prevalence ({y.mean():.3f})")
    ax.set(xlabel="Recall", ylabel="Precision", title="Precision-recall (AUPRC)", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="upper right", fontsize=8)
    _save(fig, out / "pr.png")
    return ["roc.png", "pr.png"]


def plot_calibration(metrics: dict, out: Path, min_cell: int) -> str:
    """calibration.png: reliability diagram (10 equal-count bins; bins under min_cell omitted)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    top = 0.0
    for m, r in metrics.items():
        c = r["calibration"]
        ok = [i for i, n in enumerate(c["n"]) if isinstance(n, int) and n >= min_cell]
        xs, ys = [c["mean_predicted"][i] for i in ok], [c["observed"][i] for i in ok]
        ax.plot(xs, ys, marker="o", ms=4, label=f"{m} (ECE {r['ece']:.3f})")
        top = max([top, *xs, *ys])
    top = min(1.0, top * 1.08 + 1e-3)
    ax.plot([0, top], [0, top], ls=":", c="grey", lw=1, label="perfect")
    ax.set(xlabel="Mean predicted risk", ylabel="Observed event rate", title="Reliability (10 equal-count bins)",
           xlim=(0, top), ylim=(0, top))
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, out / "calibration.png")
    return "calibration.png"


def plot_prs_deciles(dec: dict, models: list[str], out: Path) -> str:
    """prs_deciles.png: mean predicted risk per PRS decile for each model, observed rate in black."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    rows = [r for r in dec["deciles"] if not r["suppressed"]]
    xs = [r["decile"] for r in rows]
    for m in models:
        ax.plot(xs, [r["mean_predicted"][m] for r in rows], marker="o", ms=4, label=m)
    ax.plot(xs, [r["observed"] for r in rows], c="black", ls="--", marker="s", ms=4, label="observed rate")
    within = f" (within {dec['within']})" if dec["within"] else ""
    ax.set(xlabel=f"Decile of {dec['column']}{within}", ylabel="Risk", title="Predicted risk by PRS decile",
           xticks=range(1, 11))
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    _save(fig, out / "prs_deciles.png")
    return "prs_deciles.png"


def add_recorded_truth(preds: pl.DataFrame, truth_path: str | Path, prs_groups: pl.DataFrame) -> pl.DataFrame | None:
    """Add TRUTH_RECORDED_NAME: true_probability for genotyped rows, true_probability_no_genetic (the
    genetic term integrated out) for the rest (prs_groups: prs_subgroups' output). None when the
    truth file has no such column."""
    t = pl.read_parquet(truth_path)
    if "true_probability_no_genetic" not in t.columns:
        return None
    t = t.select(pl.col("subject_id").cast(pl.Int64), pl.col("prediction_time").cast(pl.Datetime("us")),
                 pl.col("true_probability_no_genetic").cast(pl.Float64).alias("_p0"))
    out = preds.join(t, on=KEY, how="left").join(prs_groups.select(*KEY, "genotyped"), on=KEY, how="left")
    out = out.with_columns(pl.when(pl.col("genotyped") == "genotyped").then(pl.col(TRUTH_NAME))
                           .otherwise(pl.col("_p0")).alias(TRUTH_RECORDED_NAME)).drop("_p0", "genotyped")
    missing = out.filter(pl.col(TRUTH_RECORDED_NAME).is_null()).height
    if missing:
        raise InputError(f"{truth_path}: --truth has no true_probability_no_genetic for {missing} of {preds.height} rows.")
    return out


# ----------------------------------------------------------------------------------------
# The whole evaluation
# ----------------------------------------------------------------------------------------

@dataclass
class EvaluationInputs:
    """What `evaluate` compares; see run_evaluation."""

    predictions: dict[str, Path]
    reference: str | None = None
    truth: Path | None = None
    prs: Path | None = None
    prs_column: str | None = None
    meds: Path | None = None
    n_bootstrap: int = 1000
    seed: int = 0
    min_cell: int = MIN_SUBJECTS
    strict_labels: bool = False  # refuse prediction files that do not score the same rows


def compute_metrics(inputs: EvaluationInputs) -> tuple[dict, pl.DataFrame]:
    """All numbers of the report as a JSON-able dict, plus the aligned table (KEY, label, one column per model)."""
    table = load_predictions(inputs.predictions, inputs.strict_labels)
    models = list(inputs.predictions)
    prs_groups = prs_subgroups(inputs.prs, table) if inputs.prs is not None else None  # read the PRS table once
    if inputs.truth is not None:
        table = add_truth(table, inputs.truth)
        models.append(TRUTH_NAME)
        recorded = add_recorded_truth(table, inputs.truth, prs_groups) if prs_groups is not None else None
        if recorded is not None:
            table = recorded
            models.append(TRUTH_RECORDED_NAME)
    reference = inputs.reference or models[0]
    if reference not in models:
        raise InputError(f"--reference {reference!r} is not one of the models {models}.")
    y = table["boolean_value"].to_numpy().astype(np.int8)
    if not 0 < y.sum() < y.size:
        raise InputError(f"prediction files: all {y.size} labels are {bool(y[0])}; AUROC needs both classes.")
    scores = {m: table[m].to_numpy() for m in models}
    subject_ids = table["subject_id"].to_numpy()
    clusters = subject_clusters(subject_ids)
    boot = bootstrap_metrics(y, scores, inputs.n_bootstrap, inputs.seed, clusters=clusters)
    n_pos_subj, n_neg_subj = (int(np.unique(subject_ids[y == v]).size) for v in (1, 0))
    res: dict = {"n": int(y.size), "n_positive": small(int(y.sum()), inputs.min_cell), "prevalence": float(y.mean()),
                 "n_bootstrap": inputs.n_bootstrap, "seed": inputs.seed, "reference": reference,
                 "bootstrap_unit": "row" if clusters is None else "subject",
                 "n_subjects": small(int(np.unique(subject_ids).size), inputs.min_cell),
                 "n_positive_subjects": small(n_pos_subj, inputs.min_cell),  # no negative count: n_subjects minus
                 # it would give the subjects with only positive rows, a count that may be under min_cell
                 "min_cell": inputs.min_cell, "warnings": [], "models": {}, "comparisons": {}}
    res["warnings"] += small_sample_warnings(n_pos_subj, n_neg_subj, boot[reference]["auroc"], inputs.min_cell)
    for m in models:
        r = point_metrics(y, scores[m])
        r["auroc_ci"] = percentile_ci(boot[m]["auroc"], bounds=(0.0, 1.0))
        r["auprc_ci"] = percentile_ci(boot[m]["auprc"], bounds=(0.0, 1.0))
        c = calibration_bins(y, scores[m])
        c["n"] = [small(n, inputs.min_cell) for n in c["n"]]
        r["calibration"] = c
        res["models"][m] = r
    res["comparisons"] = paired_deltas(res["models"], boot, reference)
    groups = table.select(KEY)
    variables: list[str] = []
    if inputs.meds is not None:
        groups = groups.join(meds_subgroups(inputs.meds, table), on=KEY)
        variables += ["age_band", "sex", "race"]
    if inputs.prs is not None:
        groups = groups.join(prs_groups, on=KEY)
        variables += [v for v in ("ancestry", "genotyped") if v in groups.columns]
    res["subgroups"] = subgroup_metrics(table.join(groups, on=KEY), models, variables, inputs.min_cell)
    res["warnings"] += undefined_subgroup_warnings(res["subgroups"], reference)
    if "genotyped" in groups.columns:
        res["comparisons_by_genotyped"] = paired_deltas_by_level(
            table.join(groups, on=KEY), "genotyped", models, reference, inputs.n_bootstrap, inputs.seed, inputs.min_cell)
    if inputs.prs is not None:
        res["prs_deciles"] = prs_deciles(table, inputs.prs, inputs.prs_column, models, inputs.min_cell)
    return res, table


def small_sample_warnings(n_pos_subjects: int, n_neg_subjects: int, boot_auroc: np.ndarray,
                          min_cell: int = MIN_SUBJECTS, threshold: int = MIN_SUBJECTS_PER_CLASS) -> list[str]:
    """Warnings for intervals that cannot mean much: fewer than `threshold` subjects with a positive
    (or a negative) label, and bootstrap resamples on which AUROC is undefined (boot_auroc NaN).

    A count under `min_cell` is not printed (All of Us rule); the message says "fewer than threshold".
    """
    out = []
    for count, label in ((n_pos_subjects, "positive"), (n_neg_subjects, "negative")):
        if count < threshold:
            who = f"only {count} subjects have" if count >= min_cell else f"fewer than {threshold} subjects have"
            out.append(f"{who} a {label} label: too few for the 95% intervals and p-values to mean much (a bootstrap "
                       f"over so few subjects understates the spread; {threshold} is the least); read the AUROC/AUPRC "
                       f"and their differences as descriptive, or evaluate on more subjects "
                       f"{'with' if label == 'positive' else 'without'} the outcome")
    undefined = int(np.sum(~np.isfinite(boot_auroc)))
    if undefined:
        out.append(f"{undefined} of {boot_auroc.size} bootstrap resamples drew no positive or no negative subject, so "
                   f"AUROC and AUPRC are undefined on them; they count against every interval (stretching it toward "
                   f"the metric's range) and every p-value (p >= {min(1.0, 2 * undefined / boot_auroc.size):.3f})")
    return out


def undefined_subgroup_warnings(subgroups: dict, reference: str) -> list[str]:
    """One warning naming the subgroup cells (shown, not suppressed) whose AUROC cannot be computed:
    all their rows have the same label."""
    cells = [f"{var}={level}" for var, levels in subgroups.items() for level, cell in levels.items()
             if not cell["suppressed"] and math.isnan(cell["models"][reference]["auroc"])]
    if not cells:
        return []
    return [f"AUROC and AUPRC cannot be computed for {', '.join(cells)}: all rows of the cell have the same label "
            f"(shown as n/a)"]


def _f(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ci(v: float, ci: list[float]) -> str:
    return f"{_f(v)} [{_f(ci[0])}, {_f(ci[1])}]"


def _p(p: float) -> str:
    if p is None or math.isnan(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _bootstrap_units(res: dict) -> str:
    """What the bootstrap resampled, in words, for the report and the command's output."""
    if res.get("bootstrap_unit") == "subject":
        return (f"subjects, not rows ({res['n_subjects']} subjects, {res['n_positive_subjects']} with a positive "
                "label; some have several rows, and a drawn subject brings all of them)")
    return "rows (one per subject)"


def render_report(res: dict, figures: list[str]) -> str:
    """report.md: the main table with paired deltas, subgroup tables, PRS deciles, figure links."""
    ref = res["reference"]
    lines = ["# Evaluation", "",
             f"{res['n']} prediction rows, {res['n_positive']} positive (prevalence {res['prevalence']:.3f}); "
             f"95% CIs from {res['n_bootstrap']} paired bootstrap resamples of {_bootstrap_units(res)} "
             f"(seed {res['seed']}); deltas are against **{ref}**.", "",
             *[f"> **Warning:** {w}.\n" for w in res.get("warnings", [])],
             "| model | AUROC [95% CI] | AUPRC [95% CI] | Brier | ECE | ΔAUROC vs ref [95% CI] | p | ΔAUPRC vs ref [95% CI] | p |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m, r in res["models"].items():
        c = res["comparisons"][m]
        delta = ("—", "—", "—", "—") if m == ref else (
            _ci(c["delta_auroc"], c["delta_auroc_ci"]), _p(c["p_auroc"]), _ci(c["delta_auprc"], c["delta_auprc_ci"]),
            _p(c["p_auprc"]))
        lines.append(f"| {m} | {_ci(r['auroc'], r['auroc_ci'])} | {_ci(r['auprc'], r['auprc_ci'])} | {_f(r['brier'], 4)} "
                     f"| {_f(r['ece'], 4)} | {' | '.join(delta)} |")
    models = list(res["models"])
    for var, levels in res["subgroups"].items():
        lines += ["", f"## By {var.replace('_', ' ')}", "", "AUROC / AUPRC per model; cells under "
                  f"{res['min_cell']} subjects are suppressed.", "",
                  "| " + " | ".join([var, "n", "positive", *models]) + " |", "|" + " --- |" * (3 + len(models))]
        for level, cell in levels.items():
            vals = [f"<{res['min_cell']}"] * len(models) if cell["suppressed"] else [
                f"{_f(cell['models'][m]['auroc'])} / {_f(cell['models'][m]['auprc'])}" for m in models]
            lines.append("| " + " | ".join([level, str(cell["n"]), str(cell["n_positive"]), *vals]) + " |")
    if res.get("comparisons_by_genotyped"):
        lines += ["", f"## ΔAUROC and ΔAUPRC vs {ref}, genotyped or not", "",
                  "Paired bootstrap within each group. A model that reads the PRS should gain in genotyped "
                  "rows only; a gain in both comes from something else.", "",
                  "| group | n | positive | model | ΔAUROC [95% CI] | p | ΔAUPRC [95% CI] | p |",
                  "|" + " --- |" * 8]
        for level, cell in res["comparisons_by_genotyped"].items():
            for m, c in cell["models"].items():
                lines.append(f"| {level} | {cell['n']} | {cell['n_positive']} | {m} | "
                             f"{_ci(c['delta_auroc'], c['delta_auroc_ci'])} | {_p(c['p_auroc'])} | "
                             f"{_ci(c['delta_auprc'], c['delta_auprc_ci'])} | {_p(c['p_auprc'])} |")
    if "prs_deciles" in res:
        dec = res["prs_deciles"]
        within = f", within {dec['within']}" if dec["within"] else ""
        lines += ["", f"## Predicted risk by decile of {dec['column']}{within}", "",
                  f"{dec['n_genotyped']} genotyped rows.", "",
                  "| decile | n | observed | " + " | ".join(models) + " |", "|" + " --- |" * (3 + len(models))]
        for r in dec["deciles"]:
            vals = [f"<{res['min_cell']}"] * (len(models) + 1) if r["suppressed"] else [
                _f(r["observed"]), *(_f(r["mean_predicted"][m]) for m in models)]
            lines.append("| " + " | ".join([str(r["decile"]), str(r["n"]), *vals]) + " |")
    lines += ["", "## Figures", ""] + [f"![{f[:-4]}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def run_evaluation(inputs: EvaluationInputs, out: str | Path, overwrite: bool = False) -> dict:
    """Compute every metric and write metrics.json, report.md and the PNG figures to `out` (atomically).

    An existing `out` is replaced only with `overwrite`, and never when it is, holds or lies inside
    an input (a prediction file's folder, the truth or PRS table, the MEDS folder).
    """
    check_output(out, {"--predictions": list(inputs.predictions.values()), "--truth": inputs.truth,
                       "--prs": inputs.prs, "--meds": inputs.meds}, overwrite)
    if inputs.n_bootstrap < 1:
        raise InputError(f"--n-bootstrap must be >= 1 (got {inputs.n_bootstrap}).")
    res, table = compute_metrics(inputs)
    y = table["boolean_value"].to_numpy().astype(np.int8)
    models = list(res["models"])
    with atomic_output_dir(out, overwrite) as tmp:
        figures = plot_curves(y, {m: table[m].to_numpy() for m in models}, res["models"], tmp)
        figures.append(plot_calibration(res["models"], tmp, inputs.min_cell))
        if "prs_deciles" in res:
            figures.append(plot_prs_deciles(res["prs_deciles"], models, tmp))
        res["figures"] = figures
        (tmp / "metrics.json").write_text(json.dumps(res, indent=2, allow_nan=True) + "\n")
        (tmp / "report.md").write_text(render_report(res, figures))
    return res


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--predictions", nargs="+", required=True, metavar="NAME=FILE",
                        help="MEDS prediction files to compare, each named (ehr=runs/ehr.parquet ...)")
    parser.add_argument("--out", required=True, help="output folder: metrics.json, report.md, *.png")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out folder (never one that is, holds or lies inside an input)")
    parser.add_argument("--reference", default=None, help="model the others are compared with (default: the first)")
    parser.add_argument("--strict-labels", action="store_true",
                        help="refuse prediction files that do not all score the same (subject_id, prediction_time) "
                             "rows, instead of comparing the models on the rows every file has, with a warning")
    parser.add_argument("--truth", default=None,
                        help=f"simulator truth file; adds {TRUTH_NAME!r} as a model (the ceiling), and with --prs also "
                             f"{TRUTH_RECORDED_NAME!r} (the genetic term only where a PRS was measured)")
    parser.add_argument("--prs", default=None, help="PRS table: ancestry/genotyped subgroups and PRS deciles")
    parser.add_argument("--prs-column", default=None, help="PRS column for the decile plot (default: the first)")
    parser.add_argument("--meds", default=None, help="MEDS dataset: age band, sex and race subgroups")
    parser.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--min-cell", type=int, default=MIN_SUBJECTS,
                        help=f"suppress cells with fewer subjects (default {MIN_SUBJECTS})")


def run(args: argparse.Namespace) -> None:
    if args.min_cell < 1:
        raise InputError(f"--min-cell must be >= 1 (got {args.min_cell}).")
    inputs = EvaluationInputs(
        predictions=parse_prediction_specs(args.predictions), reference=args.reference,
        truth=Path(args.truth) if args.truth else None, prs=Path(args.prs) if args.prs else None,
        prs_column=args.prs_column, meds=Path(args.meds) if args.meds else None,
        n_bootstrap=args.n_bootstrap, seed=args.seed, min_cell=args.min_cell,
        strict_labels=args.strict_labels,
    )
    res = run_evaluation(inputs, args.out, overwrite=args.overwrite)
    for w in res["warnings"]:
        warn(w)  # also in report.md and metrics.json
    ref = res["reference"]
    print(f"  95% CIs from {res['n_bootstrap']} paired bootstrap resamples of {_bootstrap_units(res)}")
    for m, r in res["models"].items():
        c = res["comparisons"][m]
        extra = "" if m == ref else f"  ΔAUROC {c['delta_auroc']:+.3f} (p {_p(c['p_auroc'])})"
        print(f"  {m:<20} AUROC {_ci(r['auroc'], r['auroc_ci'])}  AUPRC {_ci(r['auprc'], r['auprc_ci'])}{extra}")
    out = Path(args.out)
    print(f"wrote {out / 'metrics.json'}, {out / 'report.md'} and {', '.join(res['figures'])} in {out}")
