"""Compare prediction files for one binary task: `ehr-prs evaluate`.

    ehr-prs evaluate --predictions ehr=runs/ehr.parquet ehr+prs=runs/prs.parquet gbm=runs/gbm.parquet \
        --reference ehr --truth runs/cohort/truth/t2d.parquet --prs runs/cohort/prs.parquet \
        --meds runs/cohort/meds --out runs/eval/t2d

Every model is scored on the same rows: files are joined on (subject_id, prediction_time) and
must agree on the label and cover the same rows. AUROC and AUPRC get percentile 95% CIs from
1,000 bootstrap resamples drawn once (as per-row multiplicities) and shared by all models, so
differences against `--reference` are paired; the bootstrap metrics are computed for all
resamples at once from one sort of each model's scores (tie-aware, equal to scikit-learn's
on each resample). Brier score and expected calibration error (10 equal-count bins) come with
a reliability diagram. Subgroups (age band, sex, race from the MEDS static codes; ancestry and
genotyped from the PRS table) get the same point metrics; a cell with fewer than `--min-cell`
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

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
import meds  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    average_precision_score,
    brier_score_loss,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)
from tqdm.auto import tqdm  # noqa: E402

from modeling_ehr_prs.errors import InputError, atomic_output_dir  # noqa: E402
from modeling_ehr_prs.readers import read_labels, read_meds_dataset, read_prs_table  # noqa: E402

KEY = ["subject_id", "prediction_time"]
PROB = "predicted_boolean_probability"
AGE_BANDS = (40, 55, 65, 75)  # band edges in years: <40, 40-54, 55-64, 65-74, 75+
AGE_LABELS = [f"<{AGE_BANDS[0]}"] + [f"{a}-{b - 1}" for a, b in zip(AGE_BANDS[:-1], AGE_BANDS[1:])] + [f"{AGE_BANDS[-1]}+"]
TRUTH_NAME = "true risk"
# The simulator's truth knows everyone's genetic liability, also of people without a PRS, which no
# model of the recorded data can know: this oracle uses it only where a PRS was measured.
TRUTH_RECORDED_NAME = "true risk, genetics if genotyped"


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


def load_predictions(files: dict[str, str | Path]) -> pl.DataFrame:
    """Join prediction files on (subject_id, prediction_time): KEY, boolean_value, one probability column per model.

    InputError if a file lacks predicted_boolean_probability, has probabilities outside [0, 1],
    lacks rows another file has, or disagrees on a label.
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
    for name, f in frames.items():
        missing = keys.join(f.select(KEY), on=KEY, how="anti")
        if missing.height:
            raise InputError(
                f"{files[name]} (model {name!r}) lacks {missing.height} of the {keys.height} (subject_id, prediction_time) "
                f"rows the other prediction files have (first: subject {missing['subject_id'][0]}); every model must "
                f"score the same label rows."
            )
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
    order = np.argsort(score, kind="stable")
    s = score[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first index of each distinct score
    yo = y[order].astype(np.float64)
    w = weights[:, order].astype(np.float64)  # (B, n)
    pos = np.add.reduceat(w * yo, starts, axis=1)  # (B, G) positive weight per distinct score, ascending
    neg = np.add.reduceat(w * (1.0 - yo), starts, axis=1)
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


def bootstrap_metrics(y: np.ndarray, scores: dict[str, np.ndarray], n_boot: int = 1000, seed: int = 0,
                      chunk: int | None = None) -> dict[str, dict[str, np.ndarray]]:
    """AUROC and AUPRC of every model on the same `n_boot` resamples: {model: {"auroc": (B,), "auprc": (B,)}}.

    Resamples are drawn once per chunk (multinomial row multiplicities, seeded) and applied to every
    model, so differences between models are paired. Chunks bound memory at ~20M weights.
    """
    n = y.size
    chunk = chunk or max(1, min(n_boot, 20_000_000 // max(n, 1)))
    rng = np.random.default_rng(seed)
    out = {m: {"auroc": [], "auprc": []} for m in scores}
    for start in tqdm(range(0, n_boot, chunk), desc="evaluate: bootstrap", unit="chunk", leave=False):
        b = min(chunk, n_boot - start)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=b)  # (b, n) resample counts
        for m, s in scores.items():
            auroc, ap = weighted_auroc_auprc(s, y, weights)
            out[m]["auroc"].append(auroc)
            out[m]["auprc"].append(ap)
    return {m: {k: np.concatenate(v) for k, v in d.items()} for m, d in out.items()}


def percentile_ci(values: np.ndarray, level: float = 0.95) -> list[float]:
    """Percentile interval of the finite bootstrap values."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return [math.nan, math.nan]
    a = (1 - level) / 2
    return [float(np.quantile(v, a)), float(np.quantile(v, 1 - a))]


def paired_p_value(diffs: np.ndarray) -> float:
    """Two-sided bootstrap p-value for a difference of 0: 2 * min(P(d <= 0), P(d >= 0)), at most 1."""
    d = diffs[np.isfinite(diffs)]
    if d.size == 0:
        return math.nan
    return float(min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0))))


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
    """KEY + age_band, sex, race from MEDS static codes (Gender/*, Race/*) and MEDS_BIRTH."""
    ds = read_meds_dataset(meds_dir)
    ids = rows.select("subject_id").unique()
    ev = (ds.scan().join(ids.lazy(), on="subject_id", how="semi")
          .filter(pl.col("code").str.starts_with("Gender/") | pl.col("code").str.starts_with("Race/")
                  | (pl.col("code") == meds.birth_code))
          .collect())
    per_subject = ev.group_by("subject_id").agg(
        pl.col("code").filter(pl.col("code").str.starts_with("Gender/")).sort().first().str.strip_prefix("Gender/").alias("sex"),
        pl.col("code").filter(pl.col("code").str.starts_with("Race/")).sort().first().str.strip_prefix("Race/").alias("race"),
        pl.col("time").filter(pl.col("code") == meds.birth_code).min().alias("birth"),
    )
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


def subgroup_metrics(table: pl.DataFrame, models: list[str], variables: list[str], min_cell: int = 20) -> dict:
    """{variable: {level: {"n", "n_positive", "suppressed", "models": {model: point metrics}}}}; small cells suppressed."""
    out: dict[str, dict] = {}
    for var in variables:
        out[var] = {}
        for (level,), g in sorted(table.group_by([var]), key=lambda kv: _level_key(str(kv[0][0]))):
            n = g.height
            y = g["boolean_value"].to_numpy().astype(np.int8)
            cell: dict = {"n": small(n, min_cell), "n_positive": small(int(y.sum()), min_cell), "suppressed": n < min_cell}
            if n >= min_cell:
                cell["models"] = {m: point_metrics(y, g[m].to_numpy()) for m in models}
            out[var][str(level)] = cell
        for key in ("n", "n_positive"):
            complementary_suppression(out[var], key, min_cell)
    return out


def paired_deltas_by_level(table: pl.DataFrame, var: str, models: list[str], reference: str, n_boot: int,
                           seed: int, min_cell: int = 20) -> dict:
    """{level: {model: ΔAUROC/ΔAUPRC vs reference, paired bootstrap CI and p}} within each level of `var`.

    By genotyped-or-not this tells a PRS effect (a gain in genotyped rows only: the others get the
    adapter's "no genotype" tokens) from any other change an adapter makes. Levels with fewer than
    `min_cell` rows, or without both classes, are left out.
    """
    out: dict[str, dict] = {}
    for (level,), g in sorted(table.group_by([var]), key=lambda kv: _level_key(str(kv[0][0]))):
        y = g["boolean_value"].to_numpy().astype(np.int8)
        if g.height < min_cell or not 0 < y.sum() < y.size or min(y.sum(), y.size - y.sum()) < min_cell:
            continue
        scores = {m: g[m].to_numpy() for m in models}
        points = {m: point_metrics(y, scores[m]) for m in models}
        cell = paired_deltas(points, bootstrap_metrics(y, scores, n_boot, seed), reference)
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
            comp[f"delta_{k}_ci"] = percentile_ci(d)
            comp[f"p_{k}"] = paired_p_value(d)
        out[m] = comp
    return out


def complementary_suppression(cells: dict[str, dict], key: str, min_cell: int = 20) -> None:
    """Hide a second count when exactly one level of a variable is suppressed.

    The levels' counts add up to a published total, so a single "<20" could be recovered by
    subtraction; hiding the next smallest count ("hidden") closes that hole.
    """
    suppressed = [lv for lv, c in cells.items() if isinstance(c.get(key), str)]
    shown = [(c[key], lv) for lv, c in cells.items() if isinstance(c.get(key), int) and c[key] > 0]
    if len(suppressed) == 1 and shown:
        _, level = min(shown)
        cells[level][key] = "hidden"


def _level_key(level: str) -> tuple:
    """Age bands in age order, other levels alphabetically, unknown / not genotyped last."""
    if level in AGE_LABELS:
        return (0, AGE_LABELS.index(level), "")
    return (2 if level in ("unknown", "not genotyped") else 1, 0, level)


def small(count: int, min_cell: int = 20) -> int | str:
    """A count to publish: the number, or "<20" (with min_cell 20) when 0 < count < min_cell."""
    return f"<{min_cell}" if 0 < count < min_cell else int(count)


# ----------------------------------------------------------------------------------------
# PRS alignment
# ----------------------------------------------------------------------------------------

def prs_deciles(table: pl.DataFrame, prs_path: str | Path, column: str | None, models: list[str],
                min_cell: int = 20, within: str | None = "auto") -> dict:
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

def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(y: np.ndarray, scores: dict[str, np.ndarray], metrics: dict, out: Path) -> list[str]:
    """roc.png and pr.png: one curve per model, the AUROC/AUPRC in the legend."""
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
    min_cell: int = 20


def compute_metrics(inputs: EvaluationInputs) -> tuple[dict, pl.DataFrame]:
    """All numbers of the report as a JSON-able dict, plus the aligned table (KEY, label, one column per model)."""
    table = load_predictions(inputs.predictions)
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
    boot = bootstrap_metrics(y, scores, inputs.n_bootstrap, inputs.seed)
    res: dict = {"n": int(y.size), "n_positive": small(int(y.sum()), inputs.min_cell), "prevalence": float(y.mean()),
                 "n_bootstrap": inputs.n_bootstrap, "seed": inputs.seed, "reference": reference,
                 "min_cell": inputs.min_cell, "models": {}, "comparisons": {}}
    for m in models:
        r = point_metrics(y, scores[m])
        r["auroc_ci"], r["auprc_ci"] = percentile_ci(boot[m]["auroc"]), percentile_ci(boot[m]["auprc"])
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
    if "genotyped" in groups.columns:
        res["comparisons_by_genotyped"] = paired_deltas_by_level(
            table.join(groups, on=KEY), "genotyped", models, reference, inputs.n_bootstrap, inputs.seed, inputs.min_cell)
    if inputs.prs is not None:
        res["prs_deciles"] = prs_deciles(table, inputs.prs, inputs.prs_column, models, inputs.min_cell)
    return res, table


def _f(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ci(v: float, ci: list[float]) -> str:
    return f"{_f(v)} [{_f(ci[0])}, {_f(ci[1])}]"


def _p(p: float) -> str:
    if p is None or math.isnan(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def render_report(res: dict, figures: list[str]) -> str:
    """report.md: the main table with paired deltas, subgroup tables, PRS deciles, figure links."""
    ref = res["reference"]
    lines = ["# Evaluation", "",
             f"{res['n']} prediction rows, {res['n_positive']} positive (prevalence {res['prevalence']:.3f}); "
             f"95% CIs from {res['n_bootstrap']} paired bootstrap resamples (seed {res['seed']}); "
             f"deltas are against **{ref}**.", "",
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


def run_evaluation(inputs: EvaluationInputs, out: str | Path) -> dict:
    """Compute every metric and write metrics.json, report.md and the PNG figures to `out` (atomically)."""
    if inputs.n_bootstrap < 1:
        raise InputError(f"--n-bootstrap must be >= 1 (got {inputs.n_bootstrap}).")
    res, table = compute_metrics(inputs)
    y = table["boolean_value"].to_numpy().astype(np.int8)
    models = list(res["models"])
    with atomic_output_dir(out) as tmp:
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
    parser.add_argument("--reference", default=None, help="model the others are compared with (default: the first)")
    parser.add_argument("--truth", default=None,
                        help=f"simulator truth file; adds {TRUTH_NAME!r} as a model (the ceiling), and with --prs also "
                             f"{TRUTH_RECORDED_NAME!r} (the genetic term only where a PRS was measured)")
    parser.add_argument("--prs", default=None, help="PRS table: ancestry/genotyped subgroups and PRS deciles")
    parser.add_argument("--prs-column", default=None, help="PRS column for the decile plot (default: the first)")
    parser.add_argument("--meds", default=None, help="MEDS dataset: age band, sex and race subgroups")
    parser.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--min-cell", type=int, default=20, help="suppress cells with fewer subjects (default 20)")


def run(args: argparse.Namespace) -> None:
    if args.min_cell < 1:
        raise InputError(f"--min-cell must be >= 1 (got {args.min_cell}).")
    inputs = EvaluationInputs(
        predictions=parse_prediction_specs(args.predictions), reference=args.reference,
        truth=Path(args.truth) if args.truth else None, prs=Path(args.prs) if args.prs else None,
        prs_column=args.prs_column, meds=Path(args.meds) if args.meds else None,
        n_bootstrap=args.n_bootstrap, seed=args.seed, min_cell=args.min_cell,
    )
    res = run_evaluation(inputs, args.out)
    ref = res["reference"]
    for m, r in res["models"].items():
        c = res["comparisons"][m]
        extra = "" if m == ref else f"  ΔAUROC {c['delta_auroc']:+.3f} (p {_p(c['p_auroc'])})"
        print(f"  {m:<20} AUROC {_ci(r['auroc'], r['auroc_ci'])}  AUPRC {_ci(r['auprc'], r['auprc_ci'])}{extra}")
    out = Path(args.out)
    print(f"wrote {out / 'metrics.json'}, {out / 'report.md'} and {', '.join(res['figures'])} in {out}")
