"""`ehr-prs fit-logit-bias`: the logit-bias adapter fitted in closed form on a frozen model, as a model folder.

    ehr-prs fit-logit-bias --model runs/ehr_only --data runs/tok --output-dir runs/ehr_logit_bias

The fit is ehr_prs/fits/logit_bias.py; the model is extended and its folder written by the
pretraining recipe's own helpers (ehr_prs.recipes.train: prepare, write_logit_bias_fit), so the
folder is the one `ehr-prs pretrain --init-from M --freeze-backbone --prs-fusion logit_bias` (now
its deprecated alias) writes. Light to import: torch and the recipe load inside `run`, so
`ehr-prs fit-logit-bias --help` does not pay for them.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `ehr-prs fit-logit-bias`."""
    parser.add_argument("--model", required=True,
                        help="the frozen EHR-only (or time-to-event) model folder written by `ehr-prs pretrain`")
    parser.add_argument("--data", required=True,
                        help="`ehr-prs tokenize` output, tokenized with --prs: fits on train/, chooses the penalty on "
                             "tuning/ (the tokenizer the model was trained with)")
    parser.add_argument("--output-dir", required=True,
                        help="the new model folder: the --model's weights plus the fitted adapter, tokenizer, PRS "
                             "standardiser and training_summary.json (the fit's report under logit_bias_fit)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what --output-dir holds (never --data or --model)")
    parser.add_argument("--rank", type=int,
                        help="rank of the adapter (a few genetic liabilities shared by all code families); default "
                             "the model config's prs_logit_bias_rank")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    parser.add_argument("--max-seq-length", type=int,
                        help="tokens per sequence (the most recent kept); default as `ehr-prs pretrain`: 1024")
    parser.add_argument("--max-eval-samples", type=int, default=2000,
                        help="tuning-split sequences whose loss the summary reports (the penalty is chosen on all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fit's starting point (and of any Trainer steps)")
    parser.add_argument("--max-steps", type=int, default=0,
                        help="a --model with a time-to-event head: gradient steps on its PRS hazard shift alone, "
                             "after the fit (0: the shift is left as --model has it)")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="with --max-steps: peak AdamW learning rate")
    parser.add_argument("--warmup-steps", type=int, default=100, help="with --max-steps: linear warm-up steps")


def run(args: argparse.Namespace) -> None:
    from ehr_prs.checkpoints import check_model_folder
    from ehr_prs.errors import InputError
    from ehr_prs.recipes.train import PretrainArguments, load_tokenized, n_prs_of, prepare, write_logit_bias_fit

    check_model_folder(args.model, "--model")
    if args.rank is not None and args.rank < 1:
        raise InputError(f"--rank must be >= 1, got {args.rank}")
    if args.max_steps < 0:
        raise InputError(f"--max-steps must be >= 0, got {args.max_steps}")
    _, train_rows, _ = load_tokenized(Path(args.data))
    if n_prs_of(train_rows) == 0:
        raise InputError(f"--data {args.data} was tokenized without --prs: the adapter is fitted on polygenic scores. "
                         f"Tokenize with them (`ehr-prs tokenize --meds DIR --prs PRS_TABLE --out NEW_DIR`) and pass "
                         f"--data NEW_DIR")
    # The pretraining recipe's own arguments, so the folder (and its summary's `args`) is the alias's.
    recipe_args = PretrainArguments(
        data=args.data, output_dir=args.output_dir, init_from=args.model, prs_fusion="logit_bias",
        freeze_backbone=True, overwrite=args.overwrite, batch_size=args.batch_size,
        max_seq_length=args.max_seq_length, max_eval_samples=args.max_eval_samples, seed=args.seed,
        max_steps=args.max_steps, learning_rate=args.learning_rate, warmup_steps=args.warmup_steps,
        config_overrides=None if args.rank is None else f"prs_logit_bias_rank={args.rank}")
    try:
        write_logit_bias_fit(prepare(recipe_args))
    except InputError as err:  # the recipe names the model --init-from; here it is --model
        err.args = tuple(a.replace("--init-from", "--model") if isinstance(a, str) else a for a in err.args)
        raise
