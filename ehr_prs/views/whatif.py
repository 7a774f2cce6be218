"""`ehr-prs whatif`: the cohort's genomic what-if, from one model's predictions with and without the genotype.

    ehr-prs risk --model M --prs prs.parquet --labels t2d.parquet ... --out with.parquet
    ehr-prs risk --model M               --labels t2d.parquet ... --out without.parquet   # same --seed
    ehr-prs whatif --with with.parquet --without without.parquet --prs prs.parquet \
        --prs-column PGS000017 --out runs/whatif/t2d

The second file is the same model scored without `--prs`, so every row counts as not genotyped:
what the model predicts without genetics. For the genotyped rows the two differ only by the
genome (scored with the same --seed they share their random numbers, so the difference is not
sampling noise). Writes, in --out:

- whatif.json and whatif.md: by ancestry group, the AUROC with the genotype, without it and their
  paired difference (bootstrap CI, resampling subjects where a subject has several rows), Brier
  score and calibration error with and without, mean predicted risk with and without; and the mean
  predicted risk with and without the genotype by decile of `--prs-column` within each ancestry
  group (deciles within ancestry, as raw scores differ in mean by ancestry);
- whatif_deciles.png and whatif_auroc.png.

The All of Us rule: a group or decile cell of fewer than `--min-cell` (20) rows is suppressed, counts
under 20 are printed as "<20", and where exactly one level of a variable is suppressed the next
smallest count is hidden too (complementary suppression, `ehr_prs.privacy.suppress_cells`).
An observed event rate is printed only where both the events and the non-events number at least
`--min-cell` (rate x n would give back a small count).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import polars as pl

from ehr_prs.errors import InputError, atomic_output_dir, check_output
from ehr_prs.evaluation.metrics import (
    KEY,
    _level_key,
    load_predictions,
    paired_deltas_by_level,
    point_metrics,
    prs_subgroups,
    pyplot,  # matplotlib on first use, not at import: `ehr-prs whatif --help` stays fast
)
from ehr_prs.privacy import MIN_SUBJECTS, small, suppress_cells
from ehr_prs.data.readers import read_prs_table, warn

WITH, WITHOUT = "with genotype", "genotype removed"


def _rate_shown(y: np.ndarray, min_cell: int) -> bool:
    """Whether an observed rate may be printed: events and non-events both at least min_cell."""
    pos = int(y.sum())
    return pos >= min_cell and y.size - pos >= min_cell


def by_ancestry(table: pl.DataFrame, min_cell: int, n_boot: int, seed: int) -> dict:
    """{level: cell} for each ancestry group (and "not genotyped"): metrics with and without the genotype."""
    out: dict[str, dict] = {}
    deltas = paired_deltas_by_level(table, "ancestry", [WITH, WITHOUT], WITHOUT, n_boot, seed, min_cell)
    for (level,), g in sorted(table.group_by(["ancestry"]), key=lambda kv: _level_key(str(kv[0][0]))):
        y = g["boolean_value"].to_numpy().astype(np.int8)
        # n and n_positive stay raw here: suppress_cells below applies the primary and complementary rule.
        cell: dict = {"n": g.height, "n_positive": int(y.sum()), "suppressed": g.height < min_cell}
        if not cell["suppressed"]:
            for name, key in ((WITH, "with"), (WITHOUT, "without")):
                p = g[name].to_numpy()
                m = point_metrics(y, p)
                cell[key] = {"auroc": m["auroc"], "brier": m["brier"], "ece": m["ece"], "mean_predicted": float(p.mean())}
            cell["delta_auroc"] = cell["with"]["auroc"] - cell["without"]["auroc"]
            d = deltas.get(str(level), {}).get("models", {}).get(WITH)
            cell["delta_auroc_ci"] = d["delta_auroc_ci"] if d else None
            cell["p_auroc"] = d["p_auroc"] if d else None
            cell["observed"] = float(y.mean()) if _rate_shown(y, min_cell) else None
        out[str(level)] = cell
    suppress_cells(out, ("n", "n_positive"), min_cell)
    return out


def deciles(table: pl.DataFrame, prs_frame: pl.DataFrame, column: str, min_cell: int) -> dict:
    """{ancestry: [cell per decile]}: mean predicted risk with and without the genotype by decile of `column`.

    Genotyped rows only; deciles within ancestry when the table has it. Cells under min_cell are
    suppressed, with complementary suppression of the counts within each ancestry group.
    """
    within = "ancestry" if "ancestry" in prs_frame.columns else None
    keep = ["subject_id", column] + ([within] if within else [])
    t = (table.drop("ancestry", strict=False).join(prs_frame.select(keep), on="subject_id", how="inner")
         .filter(pl.col(column).is_not_null()))
    if within is None:
        t = t.with_columns(pl.lit("all").alias("ancestry"))
    group = pl.col("ancestry")
    rank = (pl.col(column).rank("ordinal").over(group) - 1) / pl.len().over(group)
    t = t.with_columns(((rank * 10).floor().cast(pl.Int32).clip(0, 9) + 1).alias("decile"))
    out: dict[str, list] = {}
    for (level,), g in sorted(t.group_by(["ancestry"]), key=lambda kv: _level_key(str(kv[0][0]))):
        cells: dict[str, dict] = {}
        for d in range(1, 11):
            c = g.filter(pl.col("decile") == d)
            y = c["boolean_value"].to_numpy().astype(np.int8)
            cell: dict = {"decile": d, "n": c.height, "suppressed": c.height < min_cell}  # n suppressed below
            if not cell["suppressed"]:
                cell["mean_with"] = float(c[WITH].mean())
                cell["mean_without"] = float(c[WITHOUT].mean())
                cell["observed"] = float(y.mean()) if _rate_shown(y, min_cell) else None
            cells[str(d)] = cell
        suppress_cells(cells, ("n",), min_cell)
        out[str(level)] = list(cells.values())
    return out


def _f(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def render(res: dict) -> str:
    """whatif.md: the two tables."""
    cut = f"<{res['min_cell']}"
    lines = [
        "# Genomic what-if: the same model with the genotype and with it removed", "",
        f"Predictions with the genotype: `{res['with']}`; with it removed (every row scored as not genotyped): "
        f"`{res['without']}`. {res['n']} rows. Groups and cells of fewer than {res['min_cell']} rows are suppressed "
        f"({cut}); where one count of a column is suppressed the next smallest is `hidden` too; observed rates are "
        f"shown only where events and non-events both number at least {res['min_cell']}.", "",
        "## By ancestry", "",
        "| ancestry | n | positive | AUROC with | AUROC without | ΔAUROC [95% CI] | p | Brier with | Brier without "
        "| ECE with | ECE without | mean risk with | mean risk without | observed |",
        "| --- | " + " | ".join(["---"] * 13) + " |",
    ]
    for level, c in res["by_ancestry"].items():
        if c["suppressed"]:
            lines.append(f"| {level} | {c['n']} | {c['n_positive']} | " + " | ".join([cut] * 11) + " |")
            continue
        ci = c["delta_auroc_ci"]
        delta = f"{_f(c['delta_auroc'])} [{_f(ci[0])}, {_f(ci[1])}]" if ci else _f(c["delta_auroc"])
        p = "n/a" if c["p_auroc"] is None else ("<0.001" if c["p_auroc"] < 0.001 else f"{c['p_auroc']:.3f}")
        w, wo = c["with"], c["without"]
        lines.append(f"| {level} | {c['n']} | {c['n_positive']} | {_f(w['auroc'])} | {_f(wo['auroc'])} | {delta} | {p} | "
                     f"{_f(w['brier'], 4)} | {_f(wo['brier'], 4)} | {_f(w['ece'], 4)} | {_f(wo['ece'], 4)} | "
                     f"{_f(w['mean_predicted'], 4)} | {_f(wo['mean_predicted'], 4)} | {_f(c['observed'], 4)} |")
    lines += ["", "ΔAUROC: with minus without, paired bootstrap over the same resamples (n/a where the group has "
              f"fewer than {res['min_cell']} events or non-events). For rows without a genotype a centred adapter (the "
              "logit-bias one) adds exactly nothing, so the two predictions agree there, unless `ehr-prs risk` "
              "corrected them with control variates, whose coefficients each run fits on all its rows (largest change "
              f"here: {_f(res['max_abs_change_not_genotyped'], 4)}).", "",
              f"## Mean predicted risk by decile of {res['prs_column']} within ancestry (genotyped rows)", "",
              "| ancestry | decile | n | mean risk with | mean risk without | ratio | observed |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    hidden_groups = [lv for lv, cells in res["deciles"].items() if all(c["suppressed"] for c in cells)]
    for level, cells in res["deciles"].items():
        if level in hidden_groups:
            continue
        for c in cells:
            if c["suppressed"]:
                lines.append(f"| {level} | {c['decile']} | {c['n']} | {cut} | {cut} | {cut} | {cut} |")
                continue
            ratio = c["mean_with"] / c["mean_without"] if c["mean_without"] > 0 else float("nan")
            lines.append(f"| {level} | {c['decile']} | {c['n']} | {_f(c['mean_with'], 4)} | {_f(c['mean_without'], 4)} | "
                         f"{_f(ratio, 2)} | {_f(c['observed'], 4)} |")
    if hidden_groups:
        lines += ["", f"Not shown: {', '.join(hidden_groups)} (every decile has fewer than {res['min_cell']} rows)."]
    lines += ["", "Figures: `whatif_deciles.png`, `whatif_auroc.png`.", ""]
    return "\n".join(lines)


def plot_deciles(res: dict, out: Path) -> str:
    plt = pyplot()
    groups = [(lv, [c for c in cells if not c["suppressed"]]) for lv, cells in res["deciles"].items()]
    groups = [(lv, cells) for lv, cells in groups if cells]
    n = max(1, len(groups))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(6.5, 4.2 * cols), 3.6 * rows), squeeze=False, sharey=True)
    for ax, (lv, cells) in zip(axes.flat, groups):
        xs = [c["decile"] for c in cells]
        ax.plot(xs, [c["mean_with"] for c in cells], marker="o", ms=4, label=WITH)
        ax.plot(xs, [c["mean_without"] for c in cells], marker="s", ms=4, ls="--", label=WITHOUT)
        obs = [(c["decile"], c["observed"]) for c in cells if c["observed"] is not None]
        if obs:
            ax.plot(*zip(*obs), c="black", ls=":", marker="^", ms=4, label="observed")
        ax.set(title=f"ancestry {lv}", xlabel=f"decile of {res['prs_column']}", xticks=range(1, 11))
        ax.set_ylim(bottom=0)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("mean predicted risk")
    axes[0, 0].legend(fontsize=8)
    if not groups:
        axes[0, 0].text(0.5, 0.5, f"every cell has fewer than {res['min_cell']} rows", ha="center", va="center")
    fig.suptitle("Mean predicted risk by PRS decile within ancestry", fontsize=11)
    fig.tight_layout()
    fig.savefig(out / "whatif_deciles.png", dpi=110)
    plt.close(fig)
    return "whatif_deciles.png"


def plot_auroc(res: dict, out: Path) -> str:
    plt = pyplot()
    shown = [(lv, c) for lv, c in res["by_ancestry"].items() if not c["suppressed"]]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(shown) + 2), 3.8))
    for i, (lv, c) in enumerate(shown):
        ax.bar(i - 0.2, c["without"]["auroc"], 0.4, color="#999999", label=WITHOUT if i == 0 else None)
        ax.bar(i + 0.2, c["with"]["auroc"], 0.4, color="#1f5fa8", label=WITH if i == 0 else None)
        ci = c["delta_auroc_ci"]
        ax.annotate(f"Δ {c['delta_auroc']:+.3f}" + (f"\n[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""),
                    (i, max(c["with"]["auroc"], c["without"]["auroc"]) if math.isfinite(c["with"]["auroc"]) else 0.5),
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(shown)), [lv for lv, _ in shown], rotation=20)
    values = [c[k]["auroc"] for _, c in shown for k in ("with", "without") if math.isfinite(c[k]["auroc"])]
    ax.set(ylabel="AUROC", ylim=(min([0.4, *values]) - 0.05, 1.0), title="AUROC by ancestry, with and without the genotype")
    ax.axhline(0.5, c="grey", ls=":", lw=1)
    if shown:
        ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "whatif_auroc.png", dpi=110)
    plt.close(fig)
    return "whatif_auroc.png"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--with", dest="with_prs", required=True, metavar="FILE",
                        help="MEDS predictions of the model scored with --prs")
    parser.add_argument("--without", dest="without_prs", required=True, metavar="FILE",
                        help="the same model scored without --prs (every row as not genotyped), same labels and --seed")
    parser.add_argument("--prs", required=True, help="PRS table: ancestry groups and the decile column")
    parser.add_argument("--prs-column", help="score whose deciles are shown (default: the first score column)")
    parser.add_argument("--out", required=True, help="output folder: whatif.json, whatif.md, whatif_*.png")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out (never an input)")
    parser.add_argument("--min-cell", type=int, default=MIN_SUBJECTS,
                        help=f"suppress groups and cells of fewer rows (default {MIN_SUBJECTS})")
    parser.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap resamples for ΔAUROC (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--strict-labels", action="store_true",
                        help="refuse prediction files that do not score the same rows (default: the common rows, warned)")


def run(args: argparse.Namespace) -> None:
    check_output(args.out, {"--with": args.with_prs, "--without": args.without_prs, "--prs": args.prs}, args.overwrite)
    if args.min_cell < 1:
        raise InputError(f"--min-cell must be >= 1, got {args.min_cell}")
    if args.n_bootstrap < 1:
        raise InputError(f"--n-bootstrap must be >= 1, got {args.n_bootstrap}")
    if Path(args.with_prs).resolve() == Path(args.without_prs).resolve():
        raise InputError(f"--with and --without are the same file ({args.with_prs}); --without is the same model "
                         "scored without --prs")
    table = load_predictions({WITH: args.with_prs, WITHOUT: args.without_prs}, strict=args.strict_labels)
    prs = read_prs_table(args.prs)
    column = args.prs_column or prs.score_columns[0]
    if column not in prs.score_columns:
        raise InputError(f"--prs-column {column!r} is not a score column of {args.prs}; it has "
                         f"{', '.join(prs.score_columns[:5])}{', ...' if len(prs.score_columns) > 5 else ''}")
    groups = prs_subgroups(args.prs, table)
    if "ancestry" not in groups.columns:
        warn(f"--prs {args.prs} has no 'ancestry' column: one group of all genotyped rows")
        groups = groups.with_columns(pl.when(pl.col("genotyped") == "genotyped").then(pl.lit("all genotyped"))
                                     .otherwise(pl.lit("not genotyped")).alias("ancestry"))
    table = table.join(groups.select(*KEY, "ancestry"), on=KEY, how="left")
    geno = table.filter(pl.col("ancestry") != "not genotyped")
    not_geno = table.filter(pl.col("ancestry") == "not genotyped")
    if geno.height == 0:
        raise InputError(f"--prs {args.prs}: none of the {table.height} prediction rows has a genotype in it, so there "
                         "is no genetic what-if to show; score rows of genotyped subjects")
    res = {
        "with": str(args.with_prs), "without": str(args.without_prs), "prs": str(args.prs), "prs_column": column,
        "n": small(table.height, args.min_cell), "n_genotyped": small(geno.height, args.min_cell),
        "min_cell": args.min_cell, "n_bootstrap": args.n_bootstrap,
        "by_ancestry": by_ancestry(table, args.min_cell, args.n_bootstrap, args.seed),
        "deciles": deciles(table.filter(pl.col("ancestry") != "not genotyped"), prs.frame, column, args.min_cell),
        # The removed genotype changes nothing where there was none: a check of the adapter, not a result.
        "max_abs_change_not_genotyped": (float((not_geno[WITH] - not_geno[WITHOUT]).abs().max())
                                         if not_geno.height else None),
    }
    with atomic_output_dir(args.out, overwrite=args.overwrite) as tmp:
        figures = [plot_deciles(res, tmp), plot_auroc(res, tmp)]
        res["figures"] = figures
        (tmp / "whatif.json").write_text(json.dumps(res, indent=2, allow_nan=True) + "\n")
        (tmp / "whatif.md").write_text(render(res))
    for level, c in res["by_ancestry"].items():
        if c["suppressed"]:
            print(f"  {level:<14} n {c['n']}: suppressed")
        else:
            print(f"  {level:<14} n {c['n']}: AUROC {_f(c['with']['auroc'])} with, {_f(c['without']['auroc'])} without "
                  f"(Δ {_f(c['delta_auroc'])}), mean risk {_f(c['with']['mean_predicted'], 4)} vs "
                  f"{_f(c['without']['mean_predicted'], 4)}")
    out = Path(args.out)
    print(f"wrote {out / 'whatif.json'}, {out / 'whatif.md'} and {', '.join(figures)} in {out}")
