"""Classical baselines for a binary MEDS task: `ehr-prs baseline`.

    ehr-prs baseline --kind counts-gbm --meds runs/cohort/meds --labels runs/cohort/labels/t2d.parquet \
        --out runs/preds/gbm.parquet

Three kinds, each fitted on the labels of train-split subjects, tuned on the tuning split and
scored on `--split` (held_out by default):

- `prs-lr`: L2 logistic regression on every PRS column, standardised with the same
  `PrsStandardizer` the model uses (train statistics, within ancestry when the table has an
  `ancestry` column). A subject without a genotype (absent from the PRS table, or all scores
  null) gets 0 for every score (the train mean after standardising) *and* `not_genotyped = 1`,
  so the model learns a shift for missing genotypes rather than treating them as an average
  person; a single null score of a genotyped subject is also 0. C is chosen on the tuning
  split's log loss (stratified 5-fold CV on train when tuning has no usable labels).
- `counts-gbm`: scikit-learn HistGradientBoostingClassifier on count features of the history
  at or before each prediction time (EHRSHOT style): per code, counts in look-back windows of
  30, 365, 1095 days and all time; the last value of frequent numeric codes; static codes
  (race, ethnicity) as indicators; total event counts per window; age at prediction time; sex.
  Early stopping on the tuning split.
- `counts-gbm-prs`: the same plus the `--prs-top-n` PRS columns most associated with the label
  on train (|correlation| among genotyped train rows; thousands of columns would mostly add
  noise to the trees), standardised as above, NaN for the non-genotyped (trees route missing
  values themselves), plus a `genotyped` indicator.

Features are built with polars joins and group-bys, one MEDS shard at a time; only events with
`time <= prediction_time` (and static, timeless facts) are read into a feature. A code enters
the feature vocabulary only if it occurs, before a train prediction time, in >= `--min-subjects`
(20) distinct train subjects. The vocabulary holds codes, never subject ids.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from ehr_prs.errors import InputError, check_output
from ehr_prs.privacy import MIN_SUBJECTS
from ehr_prs.data.readers import (
    KNOWN_SPLITS, STRICT_LABELS_HELP, LabelSelection, MedsDataset, PrsTable, read_labels, read_meds_dataset,
    read_prs_table, select_label_rows, subject_sex, warn,
)
from ehr_prs.tokenizer.prs_standardizer import PrsStandardizer

KINDS = ("prs-lr", "counts-gbm", "counts-gbm-prs")
WINDOWS_DAYS = (30, 365, 1095)  # plus "all time"
DAY_US = 86_400 * 1_000_000
KEY = ["subject_id", "prediction_time"]


# ----------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------

def attach_splits(labels: pl.DataFrame, ds: MedsDataset, labels_path: str | Path, strict: bool = False) -> pl.DataFrame:
    """Each scorable label row with its split: the shared label policy (`readers.select_label_rows`)."""
    return select_label_rows(ds, labels, None, labels_path, strict).rows


def check_two_classes(y: np.ndarray, where: str) -> None:
    """A classifier cannot be fitted on one class; say so with the counts."""
    n_pos = int(y.sum())
    if y.size == 0 or n_pos == 0 or n_pos == y.size:
        raise InputError(
            f"{where}: needs both positive and negative labels to fit a baseline; found {n_pos} positive "
            f"and {y.size - n_pos} negative row(s)."
        )


# ----------------------------------------------------------------------------------------
# History aggregation (long format), one shard at a time
# ----------------------------------------------------------------------------------------

@dataclass
class History:
    """Per label row, the aggregated history at or before its prediction time (long format).

    timed:  subject_id, prediction_time, code, n_30, n_365, n_1095, n_all, last_time, last_value
    static: subject_id, prediction_time, code          (timeless facts: sex, race, ethnicity)
    birth:  subject_id, prediction_time, birth         (first MEDS_BIRTH time)
    """

    timed: pl.DataFrame
    static: pl.DataFrame
    birth: pl.DataFrame


def _aggregate_shard(events: pl.LazyFrame, keys: pl.LazyFrame) -> tuple[pl.LazyFrame, pl.LazyFrame, pl.LazyFrame]:
    """Join one shard's events to the label keys and reduce them to per-(row, code) aggregates."""
    import meds

    ev = events.join(keys, on="subject_id", how="inner")
    # The leakage rule: a timed event reaches a feature only if time <= prediction_time.
    timed = ev.filter(pl.col("time").is_not_null() & (pl.col("time") <= pl.col("prediction_time")))
    age_us = (pl.col("prediction_time") - pl.col("time")).dt.total_microseconds()
    has_value = pl.col("numeric_value").is_not_null() & pl.col("numeric_value").is_not_nan()
    aggs = [(age_us <= w * DAY_US).sum().cast(pl.UInt32).alias(f"n_{w}") for w in WINDOWS_DAYS]
    aggs += [
        pl.len().cast(pl.UInt32).alias("n_all"),
        pl.col("time").filter(has_value).max().alias("last_time"),
        pl.col("numeric_value").filter(has_value).sort_by(pl.col("time").filter(has_value)).last().alias("last_value"),
    ]
    timed_agg = timed.group_by([*KEY, "code"]).agg(aggs)
    static = ev.filter(pl.col("time").is_null()).select(*KEY, "code").unique()
    birth = timed.filter(pl.col("code") == meds.birth_code).group_by(KEY).agg(pl.col("time").min().alias("birth"))
    return timed_agg, static, birth


def collect_history(ds: MedsDataset, split: str, labels: pl.DataFrame) -> History:
    """Aggregate the history of every label row of `split`, shard by shard (never the whole cohort).

    Per-shard aggregates are merged again at the end, so a subject split across shards still
    gets correct counts and last values.
    """
    keys = labels.filter(pl.col("split") == split).select(KEY).unique()
    parts: list[tuple[pl.DataFrame, ...]] = []
    for path in tqdm(ds.shards.get(split, []), desc=f"baseline: {split} history", unit="shard"):
        lazy = _aggregate_shard(ds.scan_file(path, split), keys.lazy())
        parts.append(tuple(pl.collect_all(list(lazy))))
    if not parts:
        raise InputError(f"{ds.root}: no data shards for split {split!r}; it has {ds.splits}.")
    timed = pl.concat([p[0] for p in parts])
    timed = timed.group_by([*KEY, "code"]).agg(
        *[pl.col(f"n_{w}").sum() for w in WINDOWS_DAYS], pl.col("n_all").sum(),
        pl.col("last_value").sort_by("last_time").last(), pl.col("last_time").max(),
    )
    static = pl.concat([p[1] for p in parts]).unique()
    birth = pl.concat([p[2] for p in parts]).group_by(KEY).agg(pl.col("birth").min())
    return History(timed, static, birth)


# ----------------------------------------------------------------------------------------
# Count features
# ----------------------------------------------------------------------------------------

@dataclass
class CountFeatureSpec:
    """The count-feature vocabulary fitted on train: codes, numeric codes, static codes.

    Holds code strings only (no subject ids), so it can be saved next to a model.
    """

    codes: list[str]
    value_codes: list[str]
    static_codes: list[str]
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        windows = [*(f"{w}d" for w in WINDOWS_DAYS), "all"]
        self.names = (
            [f"count_{w}/{c}" for c in self.codes for w in windows]
            + [f"last_value/{c}" for c in self.value_codes]
            + [f"static/{c}" for c in self.static_codes]
            + [f"total_{w}" for w in windows]
            + ["age_years", "sex_female"]
        )


def _frequent(frame: pl.DataFrame, min_subjects: int, limit: int) -> list[str]:
    """Codes seen in >= min_subjects distinct subjects, most common first (ties by name), at most `limit`."""
    counts = frame.group_by("code").agg(pl.col("subject_id").n_unique().alias("n"))
    counts = counts.filter(pl.col("n") >= min_subjects).sort(["n", "code"], descending=[True, False])
    return counts["code"].head(limit).to_list()


def fit_count_features(train: History, min_subjects: int = MIN_SUBJECTS, max_codes: int = 1000,
                       max_value_codes: int = 50) -> CountFeatureSpec:
    """Choose the feature vocabulary from train histories (events at or before prediction times).

    `max_codes` caps the dense matrix width (4 windows per code); the cap keeps the most common codes.
    """
    codes = _frequent(train.timed, min_subjects, max_codes)
    value_codes = _frequent(train.timed.filter(pl.col("last_value").is_not_null()), min_subjects, max_value_codes)
    static_codes = _frequent(train.static, min_subjects, max_codes)
    return CountFeatureSpec(sorted(codes), sorted(value_codes), sorted(static_codes))


def count_matrix(spec: CountFeatureSpec, history: History, rows: pl.DataFrame) -> np.ndarray:
    """Dense float32 matrix (len(rows), len(spec.names)) of count features, in the order of `rows`.

    Missing numeric values are NaN (the GBM routes them); absent codes count 0; sex is 1 for
    female, 0 for male in any spelling `readers.sex_from_code` knows (Gender/F, MIMIC's GENDER//F,
    Gender/FEMALE, ...), NaN otherwise; age is NaN without a MEDS_BIRTH.
    """
    index = rows.select(KEY).with_row_index("row")
    n_codes, n_val, n_static = len(spec.codes), len(spec.value_codes), len(spec.static_codes)
    n_win = len(WINDOWS_DAYS) + 1
    X = np.zeros((rows.height, len(spec.names)), dtype=np.float32)  # (rows, features)
    off_val = n_codes * n_win
    off_static = off_val + n_val
    off_total = off_static + n_static
    X[:, off_val:off_static] = np.nan

    windows = [*(f"n_{w}" for w in WINDOWS_DAYS), "n_all"]
    timed = history.timed.join(index, on=KEY, how="inner")
    # Explicit schemas: an empty list (no numeric codes in the data, as in Synthea's OMOP sample) is typed null.
    code_idx = pl.DataFrame({"code": spec.codes, "ci": np.arange(n_codes, dtype=np.int64)},
                            schema={"code": pl.String, "ci": pl.Int64})
    t = timed.join(code_idx, on="code", how="inner")
    r, ci = t["row"].to_numpy(), t["ci"].to_numpy()
    for j, w in enumerate(windows):
        X[r, ci * n_win + j] = t[w].to_numpy()

    val_idx = pl.DataFrame({"code": spec.value_codes, "vi": np.arange(n_val, dtype=np.int64)},
                           schema={"code": pl.String, "vi": pl.Int64})
    v = timed.filter(pl.col("last_value").is_not_null()).join(val_idx, on="code", how="inner")
    X[v["row"].to_numpy(), off_val + v["vi"].to_numpy()] = v["last_value"].to_numpy()

    st_idx = pl.DataFrame({"code": spec.static_codes, "si": np.arange(n_static, dtype=np.int64)},
                          schema={"code": pl.String, "si": pl.Int64})
    s = history.static.join(index, on=KEY, how="inner").join(st_idx, on="code", how="inner")
    X[s["row"].to_numpy(), off_static + s["si"].to_numpy()] = 1.0

    # Totals count every code (also those below the vocabulary threshold): overall utilisation.
    tot = timed.group_by("row").agg(pl.col(w).sum() for w in windows)
    for j, w in enumerate(windows):
        X[tot["row"].to_numpy(), off_total + j] = tot[w].to_numpy()

    b = history.birth.join(index, on=KEY, how="inner")
    age = np.full(rows.height, np.nan, dtype=np.float32)
    age[b["row"].to_numpy()] = ((b["prediction_time"] - b["birth"]).dt.total_seconds() / (365.25 * 86400)).to_numpy()
    X[:, off_total + n_win] = age

    sex = np.full(rows.height, np.nan, dtype=np.float32)
    # Static sex codes (MEDS), or dated ones (some ETLs date them at the birth) up to the prediction time.
    coded = pl.concat([history.static.select(*KEY, "code"), history.timed.select(*KEY, "code")])
    g = subject_sex(coded.join(index, on=KEY, how="inner"), by=["row"])
    sex[g["row"].to_numpy()] = (g["sex"] == "F").cast(pl.Float32).to_numpy()
    X[:, off_total + n_win + 1] = sex
    return X


# ----------------------------------------------------------------------------------------
# PRS features
# ----------------------------------------------------------------------------------------

def fit_prs_standardizer(prs: PrsTable, train_ids: pl.Series, group_column: str | None = "auto") -> PrsStandardizer:
    """The same standardiser the model uses (tokenizer.prs_standardizer), fitted on genotyped train subjects.

    `group_column="auto"` standardises within `ancestry` when the table has it (raw scores differ
    in mean and scale by ancestry), as `ehr-prs tokenize` does; None pools everyone.
    """
    if group_column == "auto":
        group_column = "ancestry" if "ancestry" in prs.frame.columns else None
    return PrsStandardizer.fit(prs.frame, prs.score_columns, train_ids, group_column=group_column, source=str(prs.path))


def prs_features(prs: PrsTable, st: PrsStandardizer, rows: pl.DataFrame,
                 stats: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Standardised scores (len(rows), n_prs) float32, 0 where missing, and the genotyped flag (len(rows),).

    `stats` (a dict) receives the missing-score counts of `PrsStandardizer.transform`.
    """
    z, genotyped = st.transform(prs.frame, rows["subject_id"], stats)
    return z.astype(np.float32), genotyped


def top_prs_columns(z: np.ndarray, genotyped: np.ndarray, y: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n columns with the largest |correlation| with y among genotyped rows."""
    zg, yg = z[genotyped].astype(np.float64), y[genotyped].astype(np.float64)
    yc = yg - yg.mean()
    zc = zg - zg.mean(axis=0)
    denom = np.sqrt((zc**2).sum(axis=0) * (yc**2).sum()) + 1e-12
    corr = np.abs(zc.T @ yc) / denom  # (n_prs,)
    return np.argsort(-corr, kind="stable")[: min(n, z.shape[1])]


# ----------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------

def _lr_path(X: np.ndarray, y: np.ndarray, Cs: tuple[float, ...]):
    """Fit L2 logistic regressions for increasing C, each warm-started from the last; yield (C, model)."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=Cs[0], max_iter=1000, warm_start=True)
    for C in Cs:
        model.set_params(C=C)
        model.fit(X, y)
        yield C, model


def _path_losses(X_tr, y_tr, X_val, y_val, Cs) -> np.ndarray:
    """Validation log loss of each C on the warm-started path, shape (len(Cs),)."""
    from sklearn.metrics import log_loss

    return np.array([log_loss(y_val, m.predict_proba(X_val)[:, 1], labels=[0, 1]) for _, m in _lr_path(X_tr, y_tr, Cs)])


def fit_prs_lr(X_tr: np.ndarray, y_tr: np.ndarray, X_tu: np.ndarray | None, y_tu: np.ndarray | None,
               Cs: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0), seed: int = 0):
    """L2 logistic regression fitted on train; C by tuning-split log loss, else by stratified CV on train.

    With fewer than 2 train rows of the rarer class, CV is impossible and C = 1.
    """
    from sklearn.model_selection import StratifiedKFold

    if y_tu is not None and y_tu.size > 0 and 0 < y_tu.sum() < y_tu.size:
        losses = _path_losses(X_tr, y_tr, X_tu, y_tu, Cs)
    else:
        folds = int(min(5, y_tr.sum(), y_tr.size - y_tr.sum()))
        if folds >= 2:
            cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
            losses = np.mean([_path_losses(X_tr[a], y_tr[a], X_tr[b], y_tr[b], Cs) for a, b in cv.split(X_tr, y_tr)],
                             axis=0)
        else:
            losses = np.array([0.0 if C == 1.0 else 1.0 for C in Cs]) if 1.0 in Cs else np.zeros(len(Cs))
    best_C = Cs[int(np.argmin(losses))]
    for C, model in _lr_path(X_tr, y_tr, Cs):
        if C == best_C:
            return model, best_C
    raise AssertionError("unreachable: best_C is one of Cs")


def fit_gbm(X_tr: np.ndarray, y_tr: np.ndarray, X_tu: np.ndarray | None, y_tu: np.ndarray | None, seed: int = 0):
    """HistGradientBoostingClassifier, early-stopped on the tuning split (on 10% of train without one).

    A feature with no value at all in train (NaN everywhere: e.g. sex when the data spell it in a
    way no reader knows) carries no information but makes scikit-learn's binning fail; it is
    fitted as a constant 0, which no tree can split on, so predictions ignore it.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier

    empty = np.isnan(X_tr).all(axis=0) if X_tr.shape[0] else np.zeros(X_tr.shape[1], dtype=bool)
    if empty.any():
        X_tr = np.where(empty, np.float32(0), X_tr).astype(X_tr.dtype, copy=False)
        if X_tu is not None:
            X_tu = np.where(empty, np.float32(0), X_tu).astype(X_tu.dtype, copy=False)

    model = HistGradientBoostingClassifier(
        learning_rate=0.05, max_iter=1000, max_leaf_nodes=15, min_samples_leaf=50, max_features=0.5,
        l2_regularization=1.0, early_stopping=True, n_iter_no_change=50, random_state=seed,
    )
    if y_tu is not None and y_tu.size > 0 and 0 < y_tu.sum() < y_tu.size:
        model.fit(X_tr, y_tr, X_val=X_tu, y_val=y_tu)
    else:
        model.fit(X_tr, y_tr)
    return model


# ----------------------------------------------------------------------------------------
# The whole baseline
# ----------------------------------------------------------------------------------------

@dataclass
class BaselineResult:
    """Predictions for the requested split plus what was fitted (for the report line)."""

    predictions: pl.DataFrame
    n_features: int
    detail: str
    labels: LabelSelection | None = None


def _split_rows(labels: pl.DataFrame, split: str) -> pl.DataFrame:
    return labels.filter(pl.col("split") == split).sort(KEY)


def run_baseline(kind: str, meds_dir: str | Path, labels_path: str | Path, prs_path: str | Path | None = None,
                 split: str = "held_out", min_subjects: int = MIN_SUBJECTS, max_codes: int = 1000,
                 prs_top_n: int = 64, seed: int = 0, threads: int | None = None,
                 prs_group_column: str | None = "auto", strict_labels: bool = False) -> BaselineResult:
    """Fit baseline `kind` on train labels (tuned on tuning) and predict the labels of `split`.

    `threads` caps OpenMP/BLAS threads while fitting (None: the libraries' default, all cores);
    on a machine shared with other jobs, 1 is much faster than OpenMP spinning on busy cores.
    """
    import meds
    from threadpoolctl import threadpool_limits

    if kind not in KINDS:
        raise InputError(f"--kind {kind!r} is not a baseline; choose one of {list(KINDS)}.")
    if kind in ("prs-lr", "counts-gbm-prs") and prs_path is None:
        raise InputError(f"--kind {kind} needs --prs FILE (a PRS table); use --kind counts-gbm without one.")
    ds = read_meds_dataset(meds_dir)
    fit_splits = [meds.train_split, meds.tuning_split]
    # The shared label policy: unscorable rows dropped with one warning (or refused with strict_labels).
    selection = select_label_rows(ds, read_labels(labels_path), [*fit_splits, split], labels_path, strict_labels)
    labels = selection.rows
    prs = read_prs_table(prs_path) if prs_path is not None else None

    rows = {s: _split_rows(labels, s) for s in dict.fromkeys([*fit_splits, split])}
    if rows[split].height == 0:
        raise InputError(f"{labels_path}: no label rows for subjects in split {split!r} (--split); nothing to predict.")
    y = {s: r["boolean_value"].to_numpy().astype(np.int8) for s, r in rows.items()}
    check_two_classes(y[meds.train_split], f"{labels_path} (train split)")

    blocks: dict[str, list[np.ndarray]] = {s: [] for s in rows}
    details: list[str] = []
    if kind in ("counts-gbm", "counts-gbm-prs"):
        hist = {s: collect_history(ds, s, labels) if rows[s].height else None for s in rows}
        spec = fit_count_features(hist[meds.train_split], min_subjects=min_subjects, max_codes=max_codes)
        for s in rows:
            blocks[s].append(count_matrix(spec, hist[s], rows[s]) if hist[s] is not None
                             else np.zeros((0, len(spec.names)), np.float32))
        details.append(f"{len(spec.codes)} codes x {len(WINDOWS_DAYS) + 1} windows, "
                       f"{len(spec.value_codes)} numeric codes, {len(spec.static_codes)} static codes")
    if prs is not None and kind in ("prs-lr", "counts-gbm-prs"):
        st = fit_prs_standardizer(prs, rows[meds.train_split]["subject_id"].unique(), prs_group_column)
        prs_stats = {s: {} for s in rows}
        zg = {s: prs_features(prs, st, r, prs_stats[s]) for s, r in rows.items()}
        note = st.missing_note(prs_stats[split], f"{prs.path} (split {split})")
        if note:  # train's missing cells were reported when the standardiser was fitted
            warn(note)
        group = f" within {st.group_column}" if st.group_column else " pooled"
        if kind == "prs-lr":
            for s, (z, geno) in zg.items():  # missing -> 0 (train mean) plus the indicator
                blocks[s] += [z, (~geno).astype(np.float32)[:, None]]
            details.append(f"{len(prs.score_columns)} PRS columns (standardised{group}) + not_genotyped")
        else:
            z_tr, g_tr = zg[meds.train_split]
            keep = top_prs_columns(z_tr, g_tr, y[meds.train_split], prs_top_n)
            for s, (z, geno) in zg.items():
                zk = z[:, keep]
                zk[~geno] = np.nan  # trees route missing genotypes on their own
                blocks[s] += [zk, geno.astype(np.float32)[:, None]]
            details.append(f"top {len(keep)} of {len(prs.score_columns)} PRS columns by train |corr| "
                           f"(standardised{group}) + genotyped")

    X = {s: np.concatenate(b, axis=1) for s, b in blocks.items()}  # (rows, features)
    tu = meds.tuning_split
    X_tu, y_tu = (X[tu], y[tu]) if rows[tu].height else (None, None)
    with threadpool_limits(limits=threads):
        if kind == "prs-lr":
            model, C = fit_prs_lr(X[meds.train_split], y[meds.train_split], X_tu, y_tu, seed=seed)
            details.append(f"C={C:g}")
        else:
            model = fit_gbm(X[meds.train_split], y[meds.train_split], X_tu, y_tu, seed=seed)
            details.append(f"{model.n_iter_} boosting iterations")
        p = model.predict_proba(X[split])[:, 1]
    preds = rows[split].select(KEY + ["boolean_value"]).with_columns(
        pl.Series("predicted_boolean_probability", p, dtype=pl.Float64)
    )
    return BaselineResult(preds, X[split].shape[1], "; ".join(details), selection)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", required=True, choices=KINDS, help="which baseline to fit")
    parser.add_argument("--meds", required=True, help="MEDS dataset root")
    parser.add_argument("--prs", default=None, help="PRS table (parquet/CSV); required for prs-lr and counts-gbm-prs")
    parser.add_argument("--labels", required=True, help="MEDS label parquet (all splits; fitted on train rows)")
    parser.add_argument("--out", required=True, help="output prediction parquet (MEDS prediction schema)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out file (never an input, nor a file inside --meds)")
    parser.add_argument("--split", default="held_out", choices=list(KNOWN_SPLITS),
                        help="split to predict (default held_out)")
    parser.add_argument("--min-subjects", type=int, default=MIN_SUBJECTS,
                        help=f"a code becomes a feature only if seen in this many train subjects (default {MIN_SUBJECTS})")
    parser.add_argument("--max-codes", type=int, default=1000, help="keep at most this many most common codes")
    parser.add_argument("--prs-top-n", type=int, default=64,
                        help="counts-gbm-prs: PRS columns kept, by train |corr| with the label (default 64)")
    parser.add_argument("--prs-group-column", default="auto",
                        help="standardise PRS within groups of this column; 'auto' = ancestry if present, 'none' = pooled")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for fitting (default: all); use 1 when other jobs share the cores")
    parser.add_argument("--strict-labels", action="store_true", help=STRICT_LABELS_HELP)


def run(args: argparse.Namespace) -> None:
    check_output(args.out, {"--meds": args.meds, "--prs": args.prs, "--labels": args.labels}, args.overwrite,
                 kind="file")
    if args.min_subjects < 1:
        raise InputError(f"--min-subjects must be >= 1 (got {args.min_subjects}).")
    res = run_baseline(args.kind, args.meds, args.labels, args.prs, split=args.split, min_subjects=args.min_subjects,
                       max_codes=args.max_codes, prs_top_n=args.prs_top_n, seed=args.seed,
                       threads=args.threads,
                       prs_group_column=None if str(args.prs_group_column).lower() == "none" else args.prs_group_column,
                       strict_labels=args.strict_labels)
    from ehr_prs.data.predictions import write_predictions

    write_predictions(res.predictions, args.out, args.overwrite, source=f"baseline --kind {args.kind}")
    n, pos = res.predictions.height, int(res.predictions["boolean_value"].sum())
    print(f"baseline {args.kind}: {res.n_features} features ({res.detail})")
    print(res.labels.summary())
    print(f"wrote {args.out}: {n} predictions for split {args.split} ({pos} positive)")
