"""`ehr-prs risk`: zero-shot risk of target codes within a horizon, for each label row of a split.

    ehr-prs risk --model runs/ehr_prefix --meds runs/cohort/meds --prs runs/cohort/prs.parquet \
        --labels runs/cohort/labels/t2d.parquet --codes 'ICD10CM/E11*' --horizon-days 730 \
        --method survival --samples 16 --out runs/pred/t2d_prefix.parquet

Reads the model, the MEDS histories, the labels (and PRS), builds each row's prompt at its
prediction time, and writes MEDS predictions from the sampling engine (ehr_prs.risk.sampling:
--method survival, path or mc) or from the time-to-event head (ehr_prs.risk.hazard: --method
hazard, with an optional --horizons curve). Light to import: torch, transformers and datasets
are imported inside `run`, so `ehr-prs risk --help` does not pay for them.

Under `torchrun --nproc_per_node N -m ehr_prs.cli risk ...` (or `accelerate launch -m ehr_prs.cli
risk ...`) the label rows are split across the processes, each on its own device, and merged into
one --out equal to a one-process run's; every run writes its rows in chunks to OUT.parts/ as it
goes, so `--resume` continues a crashed run (ehr_prs.sharded).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ehr_prs import sharded
from ehr_prs.data.readers import STRICT_LABELS_HELP
from ehr_prs.errors import InputError, check_output
from ehr_prs.risk import METHODS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `ehr-prs risk` (the command-line contract of docs/design.md, and more)."""
    parser.add_argument("--model", required=True, help="folder written by `ehr-prs pretrain`")
    parser.add_argument("--meds", required=True, help="MEDS dataset root (the prompts' histories)")
    parser.add_argument("--prs", help="PRS table (parquet/CSV); without it every subject counts as not genotyped")
    parser.add_argument("--labels", required=True, help="MEDS labels (subject_id, prediction_time, boolean_value)")
    parser.add_argument("--codes", nargs="+", required=True,
                        help="target codes; a code ending in * is a prefix (ICD10CM/E11*)")
    parser.add_argument("--horizon-days", type=float, required=True, help="risk window after prediction_time")
    parser.add_argument("--out", required=True, help="output parquet in the MEDS prediction schema")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out file (never an input, nor a file inside --model/--meds)")
    parser.add_argument("--split", default="held_out", help="which split's labels to score (default held_out)")
    parser.add_argument("--method", default="survival", choices=METHODS,
                        help="estimator (default survival: unbiased and calibrated, the one the README recommends; "
                             "path is the paper's, whose risks run high; mc the plain fraction of paths)")
    parser.add_argument("--samples", type=int, default=16, help="sampled futures per label row (K)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="cap on generated tokens per path")
    parser.add_argument("--paths-per-batch", type=int, default=256, help="paths sampled together (rows x K)")
    parser.add_argument("--seed", type=int, default=0,
                        help="sampling seed; label row i always gets the random numbers of (seed, i), so models "
                             "scored on the same labels with the same seed share them (paired comparisons)")
    parser.add_argument("--control-variates", action=argparse.BooleanOptionalAction, default=True,
                        help="correct each path by its tokens' zero-mean sampling increments (unbiased; about a "
                             "third less per-row variance on the demo's T2D rows at K=4); needs --samples >= 2")
    parser.add_argument("--limit", type=int, help="score only the first N label rows of the split")
    parser.add_argument("--strict-labels", action="store_true", help=STRICT_LABELS_HELP)
    parser.add_argument("--horizons", type=float, nargs="+", metavar="D",
                        help="--method hazard: also write the risk curve at these horizons (days) to OUT's "
                             "sibling OUT_STEM.curve.parquet (subject_id, prediction_time, horizon_days, probability)")
    parser.add_argument("--incidence-refit", metavar="FILE",
                        help="a refit of the target codes' onset rate on the history summary, written by "
                             "`ehr-prs incidence-refit` with the same --codes, for this model or the frozen "
                             "backbone its adapter continues (make demo shares one refit among four models)")
    parser.add_argument("--hazard-refit", metavar="FILE",
                        help="--method hazard: the outcome's hazard refitted on this model without labels, written by "
                             "`ehr-prs hazard-refit` with the same --codes; used instead of the head's hazard")
    sharded.add_arguments(parser, default_chunk_rows=256)


HAZARD_BATCH = 64  # hazard_risk's batch size: the sharded run's chunks are whole batches of it


def curve_path_of(out: str | Path) -> Path:
    """Where --horizons writes the risk curve: OUT_STEM.curve.parquet beside --out."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".parquet") + ".curve.parquet")


def run(args: argparse.Namespace) -> None:
    """Score the label rows of --split and write --out (MEDS predictions; see the module docstring)."""
    import numpy as np
    import polars as pl
    import torch

    from ehr_prs.checkpoints import load_model_and_tokenizer
    from ehr_prs.data.predictions import write_predictions
    from ehr_prs.data.readers import read_labels, read_meds_dataset, read_prs_table, select_label_rows
    from ehr_prs.fits.incidence import load_incidence
    from ehr_prs.risk.hazard import hazard_risk, write_hazard_risk
    from ehr_prs.risk.sampling import (CV_MAX_FEATURES, CV_MIN_PATHS_PER_FEATURE, DEATH_CODE, SampledPaths,
                                       risk_scores, sample_paths)
    from ehr_prs.time_to_event import target_families
    from ehr_prs.tokenizer import inputs_at_prediction_times
    from ehr_prs.tokenizer.prediction_inputs import warn_if_prs_not_given

    inputs = {"--model": args.model, "--meds": args.meds, "--prs": args.prs, "--labels": args.labels,
              "--incidence-refit": args.incidence_refit, "--hazard-refit": args.hazard_refit}
    check_output(args.out, inputs, args.overwrite, kind="file")
    if args.horizons:  # the curve file beside --out obeys the same rule, checked before any work
        check_output(curve_path_of(args.out), {"--model": args.model, "--meds": args.meds, "--prs": args.prs,
                                               "--labels": args.labels}, args.overwrite, flag="--horizons curve",
                     kind="file")
    if args.horizon_days <= 0:
        raise InputError(f"--horizon-days must be > 0, got {args.horizon_days}")
    if args.samples < 1:
        raise InputError(f"--samples must be >= 1, got {args.samples}")
    # The parts folder's rules (--resume / --overwrite) are checked here too, before any heavy work.
    scoring = sharded.ShardedScoring(args.out, inputs, args.resume, args.overwrite, args.chunk_rows, "risk",
                                     sharded.run_settings(args))
    model, tokenizer, standardizer = load_model_and_tokenizer(args.model)
    model.to(scoring.device)  # cpu, or this process's own GPU
    target_ids = tokenizer.code_token_ids(args.codes)
    refit = None
    if args.incidence_refit:
        w, bias, tokens, _ = load_incidence(args.incidence_refit)
        wanted = tokenizer.convert_ids_to_tokens(sorted(target_ids))
        if set(tokens) != set(wanted):
            raise InputError(f"--incidence-refit {args.incidence_refit} was fitted for {len(tokens)} tokens "
                             f"({', '.join(tokens[:4])}{', ...' if len(tokens) > 4 else ''}) but --codes {args.codes} "
                             f"name {len(wanted)} ({', '.join(wanted[:4])}{', ...' if len(wanted) > 4 else ''}): "
                             "refit with the same --codes")
        if w.numel() != model.config.hidden_size:
            raise InputError(f"--incidence-refit {args.incidence_refit}: {w.numel()} weights, but {args.model} has "
                             f"hidden size {model.config.hidden_size}: it was fitted for another model")
        refit = (w, bias)
    meds = read_meds_dataset(args.meds)
    prs = read_prs_table(args.prs) if args.prs else None
    if prs is not None and standardizer is None:
        raise InputError(
            f"--prs was given but {args.model} has no prs_standardizer.json: the model was trained without "
            "PRS (drop --prs) or its folder is incomplete (copy the tokenizer's prs_standardizer.json into it)"
        )
    if model.config.n_prs and standardizer is not None and standardizer.n_prs != model.config.n_prs:
        raise InputError(f"{args.model}: PRS standardiser has {standardizer.n_prs} columns, model expects {model.config.n_prs}")
    if args.split not in meds.splits:
        raise InputError(f"--split {args.split!r}: {args.meds} has splits {meds.splits}")
    # The shared label policy: unscorable rows dropped with one warning (or refused with --strict-labels).
    selection = select_label_rows(meds, read_labels(args.labels), [args.split], args.labels, args.strict_labels)
    if scoring.is_main:
        print(selection.summary())
    labels = selection.rows
    if args.limit:
        labels = labels.head(args.limit)
    warn_if_prs_not_given(model.config.n_prs if model.config.reads_prs else 0, prs, args.model)
    if args.method == "hazard" and not model.config.has_tte_head:
        raise InputError(f"--method hazard needs a model with a time-to-event head, and {args.model} has none: "
                         "pretrain with --tte-families N, or use --method survival")
    if args.horizons and args.method != "hazard":
        raise InputError("--horizons needs --method hazard (the sampling methods score one horizon per run)")
    family_idx = hazard_refit = None
    if args.hazard_refit and args.method != "hazard":
        raise InputError("--hazard-refit needs --method hazard (for the sampling methods, see --incidence-refit)")
    if args.method == "hazard":
        family_idx = target_families(tokenizer, model.config.tte_families, args.codes)
        if args.hazard_refit:
            from ehr_prs.fits.hazard_refit import load_hazard_refit

            hazard_refit = load_hazard_refit(args.hazard_refit)
            wanted = [model.config.tte_families[i] for i in family_idx]
            if hazard_refit.families != wanted:
                raise InputError(f"--hazard-refit {args.hazard_refit} was fitted for the families "
                                 f"{', '.join(hazard_refit.families)} but --codes {' '.join(args.codes)} name "
                                 f"{', '.join(wanted)}: refit with the same --codes")
            if hazard_refit.w.numel() != model.tte_head.time_proj.in_features:
                raise InputError(f"--hazard-refit {args.hazard_refit}: {hazard_refit.w.numel()} weights, but the head of "
                                 f"{args.model} reads {model.tte_head.time_proj.in_features}: it was fitted for another model")
    prefix = model.config.num_prefix_tokens
    room = 0 if args.method == "hazard" else args.max_new_tokens  # hazard generates nothing
    max_prompt = max(16, model.config.max_position_embeddings - prefix - room)
    data = inputs_at_prediction_times(meds, labels, tokenizer, standardizer if prs is not None else None, prs,
                                      split=args.split, max_length=max_prompt)
    prompts = [list(x) for x in data["input_ids"]]
    lengths = [len(p) for p in prompts]  # the engines' sort key: chunks follow their order and batches
    keys = {"subject_id": np.asarray(data["subject_id"], dtype=np.int64),
            "prediction_time": data.with_format("arrow")["prediction_time"].to_numpy()}
    prs_t = prs_mask_t = None
    if model.config.n_prs and prs is not None:  # widths were checked against the standardiser above
        prs_t = torch.tensor(np.asarray(data["prs"], dtype=np.float32))  # (rows, n_prs)
        prs_mask_t = torch.tensor(np.asarray(data["prs_mask"], dtype=bool))  # (rows,)
    # Without --prs (or for a model without an adapter) prs stays None: every row gets the
    # model's learned "no genotype" tokens.
    if args.method == "hazard":
        def sharded_hazard_risk(model, input_ids, family_idx, horizons_days, prs=None, prs_mask=None, pad_token_id=0,
                                batch_size=HAZARD_BATCH, **kwargs):
            """hazard_risk over the processes (ehr_prs.sharded): the merged (rows, H) on the main process, else None."""
            def score_chunk(rows, on_rows):
                risk = hazard_risk(model, [input_ids[i] for i in rows], family_idx, horizons_days,
                                   None if prs is None else prs[rows], None if prs_mask is None else prs_mask[rows],
                                   pad_token_id, batch_size, **{**kwargs, "progress": False})
                on_rows(len(rows))
                return {"risk": risk}

            merged = scoring.score(keys, lengths, batch_size, score_chunk, desc="hazard risk",
                                   derived={"horizons_days": list(horizons_days)})
            return None if merged is None else merged["risk"]

        write_hazard_risk(args, model, tokenizer, data, prompts, family_idx, prs_t, prs_mask_t,
                          curve_path_of(args.out) if args.horizons else None, score=sharded_hazard_risk,
                          refit=hazard_refit)
        scoring.finish()
        return
    stop_ids = [tokenizer.eos_token_id]
    if DEATH_CODE in tokenizer.get_vocab():
        stop_ids.append(tokenizer.get_vocab()[DEATH_CODE])
    token_days = torch.tensor(tokenizer.token_days)

    def score_chunk(rows: np.ndarray, on_rows) -> dict[str, np.ndarray]:
        # rows come in the engine's (length) order and in whole batches, seeded by their label-row index:
        # each row's paths are exactly those of a one-process run
        paths = sample_paths(
            model, [prompts[i] for i in rows], target_ids, token_days, args.horizon_days, args.method, args.samples,
            None if prs_t is None else prs_t[rows], None if prs_mask_t is None else prs_mask_t[rows], stop_ids,
            tokenizer.pad_token_id, args.max_new_tokens, args.paths_per_batch, args.seed, progress=False,
            control_variates=args.control_variates, incidence_refit=refit, row_ids=rows, on_rows=on_rows)
        out = {"values": paths.values, "truncated_paths": np.asarray(paths.truncated_paths),
               "generated_tokens": np.asarray(paths.generated_tokens)}
        if paths.features is not None:
            out["features"] = paths.features
        return out

    # A row costs its prompt plus K generated paths (~48 tokens each on the demo) when chunks are dealt.
    merged = scoring.score(keys, lengths, max(1, args.paths_per_batch // args.samples), score_chunk,
                           row_cost=args.samples * min(args.max_new_tokens, 48),
                           desc=f"risk ({args.method}, K={args.samples})")
    if merged is None:  # another process merges and writes --out
        return
    # The control variates are fitted across all rows: only now, on the merged paths.
    scores = risk_scores(SampledPaths(merged["values"], merged.get("features"), int(merged["truncated_paths"]),
                                      int(merged["generated_tokens"])))
    frame = pl.DataFrame({
        "subject_id": np.asarray(data["subject_id"], dtype=np.int64),
        "prediction_time": data.with_format("arrow")["prediction_time"],
        "boolean_value": np.asarray(data["boolean_value"], dtype=bool),
        "predicted_boolean_probability": scores.probability,
    })
    # the one MEDS prediction schema every stage writes (a NaN probability is refused there)
    write_predictions(frame, args.out, args.overwrite, source=f"--model {args.model}")
    scoring.finish()
    if scores.truncated_paths:
        print(f"note: {scores.truncated_paths} of {len(prompts) * args.samples} paths reached --max-new-tokens "
              f"{args.max_new_tokens} before the horizon (their risk counts only what they generated)", file=sys.stderr)
    cv = ""
    if args.control_variates:
        cv = (f", control variates removed {scores.variance_reduction:.0%} of the per-row variance"
              if scores.variance_reduction > 0 else
              ", control variates not applied (they need --samples >= 2 and about "
              f"{CV_MIN_PATHS_PER_FEATURE * min(len(tokenizer.token_days), CV_MAX_FEATURES) * 2} paths in all)")
    refit_note = f", incidence refit {args.incidence_refit}" if args.incidence_refit else ""
    # One path per row (K = 1) has no spread to estimate: say so rather than average nothing.
    finite = scores.stderr[np.isfinite(scores.stderr)]
    mc_stderr = f"{finite.mean():.4f}" if finite.size else "n/a (K = 1)"
    print(f"wrote {args.out}: {frame.height} rows, method {args.method}, K={args.samples}, "
          f"mean risk {frame['predicted_boolean_probability'].mean():.4f}, "
          f"mean MC standard error {mc_stderr}{cv}{refit_note}")
