"""Does an EHR+PRS model use a score? Teacher-forced gain at each person's first outcome code.

    python scripts/prs_uptake.py --data demo_out/tok --base demo_out/models/none \
        --model demo_out/models/prefix demo_out/models/cross_attention \
        --codes 'ICD10CM/E11*' --score demo_out/cohort/truth/subjects.parquet:g_t2d

For every genotyped sequence of --split that contains an outcome code, the log-probability each
model gives the first such code at its real position, minus --base's (the EHR-only model the
adapter was trained on). A model that reads the score should gain where the score is high: the
slope of the gain on the standardised score, in nats per SD, is comparable with the score's log
hazard ratio (0.9 per SD for the simulator's T2D liability `g_t2d`; any PRS column works too,
e.g. `cohort/prs.parquet:PGS000066`). This is sharper than the PRS-decile table of
`ehr-prs evaluate`, which sees the effect only through sampled futures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import polars as pl
import torch
from datasets import load_from_disk
from tqdm.auto import tqdm

from ehr_prs.collator import EhrPrsCollator
from ehr_prs.errors import InputError
from ehr_prs.checkpoints import load_model_and_tokenizer


def first_code_logprobs(model_dir: str, rows, codes: list[str], batch_size: int) -> np.ndarray:
    """(n,) log p(first outcome code | history) per row; NaN where the row has none after position 0."""
    model, tokenizer, _ = load_model_and_tokenizer(model_dir)
    collate = EhrPrsCollator(pad_token_id=tokenizer.pad_token_id, with_labels=False, pad_to_multiple_of=None)
    target = torch.tensor(tokenizer.code_token_ids(codes))
    out = np.full(len(rows), np.nan)
    with torch.no_grad():
        for start in tqdm(range(0, len(rows), batch_size), desc=Path(model_dir).name, leave=False):
            batch = collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
            input_ids, mask = batch["input_ids"], batch["attention_mask"]  # (b, s) right-padded
            logp = torch.log_softmax(model(**batch).logits.float(), -1)  # an EHR-only model ignores prs
            hit = torch.isin(input_ids, target) & mask.bool()  # (b, s)
            hit[:, 0] = False  # the first token has no history to predict it from
            has = hit.any(dim=1)
            first = hit.float().argmax(dim=1)  # (b,) position of the first outcome code
            rows_b = torch.arange(len(input_ids))
            lp = logp[rows_b, (first - 1).clamp(min=0), input_ids[rows_b, first]]
            out[start:start + len(input_ids)] = torch.where(has, lp, torch.nan).numpy()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="folder written by `ehr-prs tokenize`")
    p.add_argument("--base", required=True, help="the EHR-only model the adapters were trained on")
    p.add_argument("--model", nargs="+", required=True, help="EHR+PRS model folders to compare with --base")
    p.add_argument("--codes", nargs="+", required=True, help="outcome codes, prefixes ending in * allowed")
    p.add_argument("--score", required=True, help="FILE:COLUMN, a parquet with subject_id and the score")
    p.add_argument("--split", default="held_out")
    p.add_argument("--max-rows", type=int, default=2000, help="first N sequences of the split (0 = all)")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    path, _, column = args.score.rpartition(":")
    if not path or not Path(path).exists():
        raise InputError(f"--score {args.score!r}: expected FILE:COLUMN with an existing parquet file")
    scores = pl.read_parquet(path)
    if "subject_id" not in scores.columns or column not in scores.columns:
        raise InputError(f"--score {path} needs columns subject_id and {column!r}; it has {scores.columns[:8]}")
    split_dir = Path(args.data) / args.split
    if not split_dir.exists():
        raise InputError(f"--data {args.data} has no {args.split}/ split (run `ehr-prs tokenize` first)")
    rows = load_from_disk(str(split_dir))
    if args.max_rows:
        rows = rows.select(range(min(args.max_rows, len(rows))))
    s = (pl.DataFrame({"subject_id": np.asarray(rows["subject_id"])})
         .join(scores.select("subject_id", pl.col(column).cast(pl.Float64)), on="subject_id", how="left")
         .get_column(column).to_numpy())
    genotyped = np.asarray(rows["prs_mask"], bool) & np.isfinite(s)
    base = first_code_logprobs(args.base, rows, args.codes, args.batch_size)
    ok = genotyped & np.isfinite(base)
    if ok.sum() < 20:
        raise InputError(f"only {ok.sum()} genotyped sequences with a {args.codes} code in {split_dir}: too few")
    z = (s - s[ok].mean()) / s[ok].std()
    print(f"{ok.sum()} genotyped sequences of {len(rows)} with a first {' '.join(args.codes)} code; score {column}")
    for model_dir in args.model:
        gain = first_code_logprobs(model_dir, rows, args.codes, args.batch_size) - base
        slope = np.polyfit(z[ok], gain[ok], 1)[0]
        corr = np.corrcoef(z[ok], gain[ok])[0, 1]
        print(f"{model_dir}: mean gain {gain[ok].mean():+.4f} nats, slope {slope:+.4f} nats per SD of {column}, "
              f"correlation {corr:+.3f}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
