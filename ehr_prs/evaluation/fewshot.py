"""Few-shot transfer curves (EHRSHOT protocol): `ehr-prs fewshot`.

    ehr-prs fewshot --model runs/ehr_prefix --meds runs/cohort/meds --prs runs/cohort/prs.parquet \
        --labels runs/cohort/labels/stroke.parquet --out runs/fewshot/stroke \
        --shots 8 16 32 64 128 all --seeds 3 --methods lora probe gbm

For every (method, K, seed): K positive + K negative train label rows (and at most K + K tuning
rows for model selection) are drawn with `finetune.sample_shots` (the same draw for every
method), the model is fitted on them and the whole held-out split is predicted. `all` uses
every train row (and the tuning split capped as in finetune.py).

- `lora`, `probe`, `full`: `finetune.finetune` on inputs built once for the sweep.
- `gbm`: the count-feature GBM + PRS baseline (ehr_prs.evaluation.baselines). The count-feature
  vocabulary is label-free and comes from the histories of all train label rows (as the
  pretrained model saw all train histories); everything that reads labels -- the top PRS columns
  by |correlation| and the trees -- sees only the K-shot rows. With K-shot data the trees'
  min_samples_leaf shrinks to max(2, min(50, n // 10)) (50, the baseline's value, would forbid
  any split on 16 rows); `all` runs the baseline's own `fit_gbm`.

Each run gets AUROC with a 95% bootstrap CI over held-out rows; per (method, K) the mean and
standard deviation over seeds, and a CI of the seed-mean from the same (paired) resamples.
Writes DIR/fewshot.json, DIR/fewshot.csv, DIR/fewshot.png (AUROC vs K, log x, a band per method)
and DIR/predictions/{method}_k{K}_seed{S}.parquet (MEDS prediction schema, for `ehr-prs evaluate`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from ehr_prs.errors import InputError, atomic_output_dir, check_output

NN_METHODS = ("lora", "probe", "full")
METHODS = (*NN_METHODS, "gbm")
KEY = ["subject_id", "prediction_time"]
LEGEND = {"lora": "LoRA", "probe": "linear probe", "full": "full fine-tune", "gbm": "GBM counts + PRS"}


# ----------------------------------------------------------------------------- GBM + PRS on K shots


class GbmFeatures:
    """Count features (+ standardised PRS) of every train/tuning/held_out label row, built once.

    Rows of each split are sorted by (subject_id, prediction_time): the order finetune.py uses,
    so one K-shot index array selects the same label rows for every method.
    """

    def __init__(self, meds_dir: str, labels_path: str, prs_path: str | None, splits=("train", "tuning", "held_out")):
        from ehr_prs.evaluation import baselines as bl
        from ehr_prs.data.readers import read_labels, read_meds_dataset, read_prs_table

        ds = read_meds_dataset(meds_dir)
        labels = bl.attach_splits(read_labels(labels_path), ds, labels_path)
        self.rows = {s: labels.filter(pl.col("split") == s).sort(KEY) for s in splits}
        self.y = {s: r["boolean_value"].to_numpy().astype(bool) for s, r in self.rows.items()}
        hist = {s: bl.collect_history(ds, s, labels) for s in splits if self.rows[s].height}
        spec = bl.fit_count_features(hist["train"])  # label-free: which codes are common in train histories
        self.X = {s: bl.count_matrix(spec, hist[s], self.rows[s]) if s in hist
                  else np.zeros((0, len(spec.names)), np.float32) for s in splits}
        self.prs = None
        if prs_path:
            prs = bl.fit_prs_standardizer(read_prs_table(prs_path), self.rows["train"]["subject_id"].unique())
            table = read_prs_table(prs_path)
            self.prs = {s: bl.prs_features(table, prs, self.rows[s]) for s in splits}

    def matrix(self, split: str, idx: np.ndarray | None, keep: np.ndarray | None) -> np.ndarray:
        """Count features plus the kept PRS columns (NaN when not genotyped) and a genotyped flag."""
        sel = slice(None) if idx is None else idx
        blocks = [self.X[split][sel]]
        if self.prs is not None and keep is not None:
            z, geno = self.prs[split][0][sel], self.prs[split][1][sel]
            zk = z[:, keep].copy()
            zk[~geno] = np.nan  # trees route missing genotypes themselves
            blocks += [zk, geno.astype(np.float32)[:, None]]
        return np.concatenate(blocks, axis=1)

    def fit_predict(self, train_idx: np.ndarray | None, tuning_idx: np.ndarray | None, seed: int,
                    prs_top_n: int = 64, threads: int | None = 1) -> np.ndarray:
        """Fit on the given train (and tuning) rows (None = all), return held-out probabilities."""
        from sklearn.ensemble import HistGradientBoostingClassifier
        from threadpoolctl import threadpool_limits

        from ehr_prs.evaluation import baselines as bl

        y_tr = self.y["train"] if train_idx is None else self.y["train"][train_idx]
        keep = None
        if self.prs is not None:
            z, geno = self.prs["train"]
            sel = slice(None) if train_idx is None else train_idx
            keep = bl.top_prs_columns(z[sel], geno[sel], y_tr.astype(np.int8), prs_top_n)  # K-shot labels only
        X_tr = self.matrix("train", train_idx, keep)
        X_tu = self.matrix("tuning", tuning_idx, keep) if self.rows["tuning"].height else None
        y_tu = None
        if X_tu is not None:
            y_tu = (self.y["tuning"] if tuning_idx is None else self.y["tuning"][tuning_idx]).astype(np.int8)
        # A column with no value among a few shots (a PRS column when no shot is genotyped, a rare lab's
        # last value) carries nothing, and the GBM's binning cannot handle it: leave it out.
        cols = ~np.isnan(X_tr).all(axis=0)
        X_tr, X_tu = X_tr[:, cols], (X_tu[:, cols] if X_tu is not None else None)
        with threadpool_limits(limits=threads):
            if train_idx is None:
                model = bl.fit_gbm(X_tr, y_tr.astype(np.int8), X_tu, y_tu, seed=seed)
            else:
                model = HistGradientBoostingClassifier(
                    learning_rate=0.05, max_iter=1000, max_leaf_nodes=15,
                    min_samples_leaf=max(2, min(50, len(y_tr) // 10)), max_features=0.5, l2_regularization=1.0,
                    early_stopping=True, n_iter_no_change=50, random_state=seed,
                )
                if y_tu is not None and 0 < y_tu.sum() < y_tu.size:
                    model.fit(X_tr, y_tr.astype(np.int8), X_val=X_tu, y_val=y_tu)
                else:
                    model.fit(X_tr, y_tr.astype(np.int8))
            return model.predict_proba(self.matrix("held_out", None, keep)[:, cols])[:, 1]


# ----------------------------------------------------------------------------- the sweep


def parse_shots(values: list[str]) -> list[int | None]:
    """['8', '16', 'all'] -> [8, 16, None] (None = every train row)."""
    out: list[int | None] = []
    for v in values:
        if str(v).lower() == "all":
            out.append(None)
        elif str(v).isdigit() and int(v) > 0:
            out.append(int(v))
        else:
            raise InputError(f"--shots {v!r}: give positive integers or 'all'")
    return out


def shot_label(k: int | None) -> str:
    return "all" if k is None else str(k)


def run_sweep(args: argparse.Namespace) -> dict:
    """Fit and score every (method, K, seed); returns the fewshot.json content and writes DIR."""
    import torch

    import ehr_prs.recipes.finetune as ft

    from ehr_prs.data.predictions import write_predictions
    from ehr_prs.evaluation.metrics import bootstrap_metrics, percentile_ci
    from ehr_prs.predict import predict_proba, prediction_frame, score_head

    overwrite = getattr(args, "overwrite", False)
    # before the inputs are built (minutes): a wrong --out fails at once, and never replaces an input
    check_output(args.out, {"--model": args.model, "--meds": args.meds, "--prs": args.prs, "--labels": args.labels},
                 overwrite)
    methods = list(dict.fromkeys(args.methods))
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise InputError(f"--methods {bad}: choose from {list(METHODS)}")
    shots = parse_shots(args.shots)
    if args.seeds < 1:
        raise InputError(f"--seeds must be >= 1, got {args.seeds}")
    if "gbm" in methods and not args.prs:
        raise InputError("--methods gbm is the count-GBM + PRS baseline and needs --prs FILE (or drop gbm)")

    print("few-shot: building inputs at prediction times (train, tuning, held_out) ...")
    data = ft.load_task_data(args.model, args.meds, args.labels, args.prs, ("train", "tuning", "held_out"),
                             args.max_length)
    if "held_out" not in data.splits:
        raise InputError(f"{args.labels}: no label rows in the held_out split to score")
    y_train, y_held = data.y("train"), data.y("held_out")
    ft.check_two_classes(y_train, args.labels, "train")
    ft.check_two_classes(y_held, args.labels, "held_out")
    n_pos = int(y_train.sum())
    too_many = [k for k in shots if k is not None and k > min(n_pos, y_train.size - n_pos)]
    if too_many:
        raise InputError(f"--shots {too_many}: the train split has only {n_pos} positive and {y_train.size - n_pos} "
                         f"negative label rows; use K <= {min(n_pos, y_train.size - n_pos)} (or 'all')")
    y_tuning = data.y("tuning") if "tuning" in data.splits else np.zeros(0, bool)
    gbm = GbmFeatures(args.meds, args.labels, args.prs) if "gbm" in methods else None

    runs, scores = [], {}
    # K = all uses every train row, so its seeds differ only in the fit's own randomness:
    # --seeds-all (default --seeds) lets a time-boxed run fit it once. LoRA fits cost minutes each
    # on a CPU, so --lora-shots / --lora-seeds can give it a smaller grid than the other methods.
    seeds_all = args.seeds if getattr(args, "seeds_all", None) is None else args.seeds_all
    lora_seeds = args.seeds if getattr(args, "lora_seeds", None) is None else args.lora_seeds
    for flag, value in (("--seeds-all", seeds_all), ("--lora-seeds", lora_seeds)):
        if value < 1:
            raise InputError(f"{flag} must be >= 1, got {value}")
    lora_shots = shots if getattr(args, "lora_shots", None) is None else parse_shots(args.lora_shots)
    if not set(lora_shots) <= set(shots):
        raise InputError(f"--lora-shots {args.lora_shots}: each must also be in --shots {args.shots}")

    def n_seeds(method: str, k: int | None) -> int:
        n = lora_seeds if method == "lora" else args.seeds
        return min(n, seeds_all) if k is None else n

    plan = [(m, k, s) for k in shots for s in range(max(n_seeds(m, k) for m in methods)) for m in methods
            if s < n_seeds(m, k) and (m != "lora" or k in lora_shots)]
    out = Path(args.out)
    with atomic_output_dir(out, overwrite) as tmp:
        (tmp / "predictions").mkdir()
        bar = tqdm(plan, desc="few-shot", unit="run")
        for method, k, seed in bar:
            bar.set_postfix_str(f"{method} K={shot_label(k)} seed={seed}")
            t0 = time.perf_counter()
            train_idx = ft.sample_shots(y_train, k, seed) if k else None
            if method == "gbm":
                tu_idx = ft.sample_shots(y_tuning, k, seed, "tuning split", strict=False) if k and y_tuning.size \
                    else None
                prob = gbm.fit_predict(train_idx, tu_idx, seed, threads=args.threads)
                extra = {}
            else:
                fargs = ft.FinetuneArguments(
                    model=args.model, meds=args.meds, labels=args.labels, output_dir=str(tmp / "unused"),
                    prs=args.prs, method=method, shots=k, seed=seed, epochs=args.epochs, min_steps=args.min_steps,
                    learning_rate=args.learning_rate, batch_size=args.batch_size, max_length=args.max_length,
                )
                result = ft.finetune(fargs, data=data, save=False, quiet=True)
                if method == "probe":  # frozen base: its held-out states are computed once for the sweep
                    feats = ft.frozen_features(result.model, data, "held_out", result.summary["base_fingerprint"])
                    with torch.no_grad():
                        prob = torch.sigmoid(score_head(result.model)(torch.from_numpy(feats))[:, 0]).double().numpy()
                else:
                    prob = predict_proba(result.model, data.splits["held_out"], data.tokenizer.pad_token_id,
                                         max_length=data.max_length, desc=f"predict {method}")
                extra = {k2: result.summary.get(k2)
                         for k2 in ("best_epoch", "best_C", "tuning_auroc", "trainable_parameters")}
            name = f"{method}_k{shot_label(k)}_seed{seed}"
            write_predictions(prediction_frame(data.splits["held_out"], prob), tmp / "predictions" / f"{name}.parquet")
            scores[name] = prob
            runs.append({"method": method, "shots": shot_label(k), "seed": seed,
                         "train_rows": int(y_train.size if k is None else 2 * k),
                         "seconds": round(time.perf_counter() - t0, 1), **extra})
        boot = bootstrap_metrics(y_held.astype(np.int8), scores, n_boot=args.n_boot, seed=0)
        result = summarise(runs, scores, boot, y_held, methods, shots, percentile_ci)
        result.update(task=str(args.labels), model=str(args.model), held_out_rows=int(y_held.size),
                      held_out_positives=int(y_held.sum()), train_positives=n_pos, n_boot=args.n_boot)
        (tmp / "fewshot.json").write_text(json.dumps(result, indent=2))
        pl.DataFrame(result["runs"]).drop("auroc_ci").write_csv(tmp / "fewshot.csv")
        plot(result, tmp / "fewshot.png", n_pos)
    return result


def summarise(runs, scores, boot, y_held, methods, shots, percentile_ci) -> dict:
    """Per run: AUROC + CI; per (method, K): mean and sd over seeds and a CI of the seed-mean."""
    from sklearn.metrics import roc_auc_score

    for r in runs:
        name = f"{r['method']}_k{r['shots']}_seed{r['seed']}"
        r["auroc"] = float(roc_auc_score(y_held, scores[name]))
        r["auroc_ci"] = percentile_ci(boot[name]["auroc"])
    curves = []
    for method in methods:
        for k in shots:
            names = [f"{method}_k{shot_label(k)}_seed{r['seed']}" for r in runs
                     if r["method"] == method and r["shots"] == shot_label(k)]
            if not names:  # not in this method's grid (--lora-shots)
                continue
            values = np.array([next(r["auroc"] for r in runs if f"{r['method']}_k{r['shots']}_seed{r['seed']}" == n)
                               for n in names])
            mean_boot = np.mean([boot[n]["auroc"] for n in names], axis=0)  # (B,): seed-mean on each resample
            curves.append({"method": method, "shots": shot_label(k), "seeds": len(names),
                           "auroc_mean": float(values.mean()),
                           "auroc_sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                           "auroc_ci": percentile_ci(mean_boot)})
    return {"runs": [{**r, "auroc_ci_low": r["auroc_ci"][0], "auroc_ci_high": r["auroc_ci"][1]} for r in runs],
            "curves": curves}


def plot(result: dict, path: Path, n_pos_train: int) -> None:
    """AUROC vs K (log x; 'all' drawn at the number of train positives), a line and CI band per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ticks = {}
    for method in dict.fromkeys(c["method"] for c in result["curves"]):
        pts = [c for c in result["curves"] if c["method"] == method]
        x = np.array([n_pos_train if c["shots"] == "all" else int(c["shots"]) for c in pts], dtype=float)
        order = np.argsort(x)
        mean = np.array([c["auroc_mean"] for c in pts])[order]
        lo = np.array([c["auroc_ci"][0] for c in pts])[order]
        hi = np.array([c["auroc_ci"][1] for c in pts])[order]
        line, = ax.plot(x[order], mean, marker="o", label=LEGEND.get(method, method))
        ax.fill_between(x[order], lo, hi, color=line.get_color(), alpha=0.18, linewidth=0)
        for c, xv in zip(pts, x):
            ticks[xv] = f"all\n({n_pos_train} pos.)" if c["shots"] == "all" else c["shots"]
    ax.set_xscale("log")
    ax.set_xticks(sorted(ticks), [ticks[t] for t in sorted(ticks)])
    ax.minorticks_off()
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("K (positive and negative training examples each)")
    ax.set_ylabel("held-out AUROC")
    seeds = max(c["seeds"] for c in result["curves"])
    ax.set_title(f"Few-shot transfer: {Path(result['task']).stem} (mean of up to {seeds} seed(s), 95% CI)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="pretrained model folder written by `ehr-prs pretrain`")
    parser.add_argument("--meds", required=True, help="MEDS dataset root")
    parser.add_argument("--prs", help="PRS table (parquet/CSV); needed for the gbm method")
    parser.add_argument("--labels", required=True, help="MEDS labels of the task (all splits)")
    parser.add_argument("--out", required=True,
                        help="output folder: fewshot.json, fewshot.csv, fewshot.png, predictions/")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out folder (never one that is, holds or lies inside an input)")
    parser.add_argument("--shots", nargs="+", default=["8", "16", "32", "64", "128", "all"],
                        help="K values (positives and negatives each), 'all' = every train row")
    parser.add_argument("--seeds", type=int, default=3, help="draws per K (seeds 0..N-1)")
    parser.add_argument("--seeds-all", type=int,
                        help="seeds for K = all (default --seeds): every train row is used, so only the fit's "
                             "own randomness varies; 1 saves time")
    parser.add_argument("--lora-shots", nargs="+",
                        help="K values for the lora method (default --shots; each must be in --shots): LoRA fits "
                             "take minutes each on a CPU, and 'all' trains on every train row")
    parser.add_argument("--lora-seeds", type=int, help="draws per K for the lora method (default --seeds)")
    parser.add_argument("--methods", nargs="+", default=["lora", "probe", "gbm"], help=f"from {list(METHODS)}")
    parser.add_argument("--epochs", type=int, default=5, help="finetune epochs (raised to reach --min-steps)")
    parser.add_argument("--min-steps", type=int, default=50, help="finetune: at least this many optimizer steps")
    parser.add_argument("--learning-rate", type=float, help="finetune learning rate (default per method)")
    parser.add_argument("--batch-size", type=int, default=16, help="finetune batch size")
    parser.add_argument("--max-length", type=int, help="cap on event tokens per input")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the held-out split")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the GBM (default 1)")


def run(args: argparse.Namespace) -> None:
    result = run_sweep(args)
    for c in result["curves"]:
        lo, hi = c["auroc_ci"]
        print(f"  {c['method']:6s} K={c['shots']:>4s}  AUROC {c['auroc_mean']:.3f} (sd {c['auroc_sd']:.3f} over "
              f"{c['seeds']} seeds; 95% CI {lo:.3f}-{hi:.3f})")
    print(f"wrote {args.out}/fewshot.json, fewshot.csv, fewshot.png and {len(result['runs'])} prediction files "
          f"in {args.out}/predictions")
