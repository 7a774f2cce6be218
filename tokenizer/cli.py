"""`ehr-prs tokenize --meds DIR [--prs FILE] --out DIR [--min-subjects 20] [--max-length 2048]`."""

from __future__ import annotations

import argparse
import json

from ehr_prs.privacy import MIN_SUBJECTS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--meds", required=True, help="root of a MEDS 0.4 dataset (data/, metadata/)")
    parser.add_argument("--prs", default=None, help="wide PRS table (parquet/CSV); omit for an EHR-only dataset")
    parser.add_argument("--out", required=True, help="output folder: tokenizer/, train/, tuning/, held_out/")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out folder (never one that is, holds or lies inside --meds/--prs)")
    parser.add_argument("--min-subjects", type=int, default=MIN_SUBJECTS,
                        help=f"a code enters the vocabulary only if seen in this many train subjects (default {MIN_SUBJECTS})")
    parser.add_argument("--max-length", type=int, default=2048,
                        help="longest sequence; longer histories keep the static prefix and the most recent events")
    parser.add_argument("--value-bins", type=int, default=10, help="quantile bins per numeric code (default 10)")
    parser.add_argument("--min-values", type=int, default=100,
                        help="a code gets value bins only with this many train values (default 100)")
    parser.add_argument("--prs-group-column", default="auto",
                        help="standardise PRS within groups of this column; 'auto' = ancestry if present, 'none' = pooled")
    parser.add_argument("--rows-per-chunk", type=int, default=2_000_000,
                        help="events per processing chunk (memory use follows this, not the cohort size)")


def run(args: argparse.Namespace) -> None:
    from ehr_prs.tokenizer.build import SUMMARY_FILE, build

    group = None if str(args.prs_group_column).lower() == "none" else args.prs_group_column
    summary = build(
        args.meds, args.out, prs_path=args.prs, min_subjects=args.min_subjects, max_length=args.max_length,
        n_bins=args.value_bins, min_values=args.min_values, prs_group_column=group, rows_per_chunk=args.rows_per_chunk,
        overwrite=args.overwrite,
    )
    brief = {k: summary[k] for k in ("codes_in_vocab", "codes_dropped_min_subjects", "vocab_size", "n_prs")}
    brief["tokens"] = {s: v["tokens"] for s, v in summary["splits"].items()}
    brief["events_per_second"] = summary["events_per_second"]
    print(json.dumps(brief))
    print(f"wrote {args.out}/tokenizer/ (tokenizer + prs_standardizer.json), {args.out}/train/, {args.out}/tuning/, "
          f"{args.out}/held_out/ (HF datasets) and {args.out}/{SUMMARY_FILE}")
