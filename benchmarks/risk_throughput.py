"""Zero-shot risk throughput: our batched sampler against transformers' `generate`, same model.

Baseline (named "generate"): the paper code's way of scoring. For each subject,
`model.generate(prompt, do_sample=True, num_return_sequences=K, max_new_tokens=N,
output_logits=True, return_dict_in_generate=True)`, then the path estimator computed from the
returned raw logits, with the horizon applied afterwards from the generated time tokens. Ours
("engine"): `ehr_prs.risk.sampling.sample_risk`, prompts batched across subjects, each prompt
encoded once and its KV cache shared by its K paths, every path dropped from the batch as soon
as its generated time passes the horizon. Both use the same model, prompts, K and estimator;
the report gives subjects/s for each, the ratio, and the AUROC of each against the labels
(they should agree within sampling noise).

    python -m benchmarks.risk_throughput --model demo_out/models/prefix --meds demo_out/cohort/meds \
        --prs demo_out/cohort/prs.parquet --labels demo_out/cohort/labels/t2d.parquet --subjects 64

Goal: engine >= 5x the subjects/s of generate, with equal AUROC.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import polars as pl
import torch
from sklearn.metrics import roc_auc_score


def generate_path_risk(model, prompt, prs, prs_mask, target, token_days, horizon, k, max_new_tokens, seed, stop_ids):
    """One subject the paper-code way: generate K continuations, then score them from raw logits.

    Returns the path estimate (mean over the K paths) and its Monte Carlo standard error."""
    torch.manual_seed(seed)
    ids = torch.tensor([prompt])
    kwargs = {}
    if prs is not None:
        kwargs = {"prs": prs[None].expand(1, -1), "prs_mask": prs_mask[None]}
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, num_return_sequences=k,
        max_new_tokens=max_new_tokens, output_logits=True, return_dict_in_generate=True, top_k=0, top_p=1.0,
        eos_token_id=stop_ids, pad_token_id=stop_ids[0], **kwargs,
    )
    new = out.sequences[:, ids.shape[1] :]  # (k, steps)
    logits = torch.stack(out.logits, dim=1).float()  # (k, steps, vocab): raw, before warping
    h = torch.logsumexp(torch.log_softmax(logits, -1)[..., target], -1).exp()  # (k, steps)
    days_before = torch.cumsum(token_days[new], dim=1) - token_days[new]  # generated days before step t
    alive = days_before <= horizon
    finished = torch.isin(new, torch.tensor(stop_ids))
    alive &= torch.cumsum(finished.long(), 1) - finished.long() == 0  # nothing after a stop token
    log_surv = (torch.log1p(-h.clamp(max=1 - 1e-12)) * alive).sum(1)
    values = (1 - log_surv.exp()).double()  # (k,) one path estimate each
    return float(values.mean()), float(values.std() / math.sqrt(k)) if k > 1 else math.nan


def add_row_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every risk benchmark shares: model, data, target codes, horizon, threads."""
    parser.add_argument("--model", required=True)
    parser.add_argument("--meds", required=True)
    parser.add_argument("--prs")
    parser.add_argument("--labels", required=True)
    parser.add_argument("--codes", nargs="+", default=["ICD10CM/E11*"])
    parser.add_argument("--horizon-days", type=float, default=730)
    parser.add_argument("--threads", type=int, default=2)


def parse_and_load(parser: argparse.ArgumentParser, balanced: bool):
    """Parse the flags (add_row_arguments plus --subjects and --max-new-tokens), set the threads, load the rows."""
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok, rows = load_rows(args.model, args.meds, args.prs, args.labels, args.codes, args.subjects,
                                 args.max_new_tokens, balanced)
    return args, model, tok, rows


def load_rows(model_dir, meds_dir, prs_path, labels_path, codes, n_rows, max_new_tokens, balanced):
    """The model, its tokenizer and the first n_rows held-out label rows as sample_risk inputs.

    balanced: a quarter positive (so that AUROC is measurable on few rows); else the first rows as they come.
    """
    from ehr_prs.data.readers import read_labels, read_meds_dataset, read_prs_table
    from ehr_prs.checkpoints import load_model_and_tokenizer
    from ehr_prs.risk.sampling import DEATH_CODE
    from ehr_prs.tokenizer import inputs_at_prediction_times

    model, tok, std = load_model_and_tokenizer(model_dir)
    meds = read_meds_dataset(meds_dir)
    prs = read_prs_table(prs_path) if prs_path and std is not None else None
    held = meds.subject_splits.filter(pl.col("split") == "held_out").get_column("subject_id")
    labels = read_labels(labels_path).filter(pl.col("subject_id").is_in(held.implode()))
    if balanced:
        pos = labels.filter(pl.col("boolean_value")).head(n_rows // 4)
        labels = pl.concat([pos, labels.filter(~pl.col("boolean_value")).head(n_rows - pos.height)])
    else:
        labels = labels.head(n_rows)
    prefix = model.config.num_prefix_tokens
    data = inputs_at_prediction_times(meds, labels, tok, std if prs else None, prs, split="held_out",
                                      max_length=model.config.max_position_embeddings - prefix - max_new_tokens)
    rows = {"prompts": [list(x) for x in data["input_ids"]], "y": np.asarray(data["boolean_value"], dtype=bool),
            "prs": None, "prs_mask": None, "target": tok.code_token_ids(codes),
            "token_days": torch.tensor(tok.token_days, dtype=torch.float32),
            "stops": [tok.eos_token_id] + ([tok.get_vocab()[DEATH_CODE]] if DEATH_CODE in tok.get_vocab() else [])}
    if model.config.n_prs and prs is not None:
        rows["prs"] = torch.tensor(np.asarray(data["prs"], dtype=np.float32))
        rows["prs_mask"] = torch.tensor(np.asarray(data["prs_mask"], dtype=bool))
    return model, tok, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_row_arguments(parser)
    parser.add_argument("--subjects", type=int, default=64, help="held-out label rows scored by both")
    parser.add_argument("--samples", type=int, default=16, help="K")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--agreement-seeds", type=int, default=10,
                        help="score the rows again with this many engine seeds, to show its AUROC's Monte Carlo spread")
    args, model, tok, rows = parse_and_load(parser, balanced=True)
    from ehr_prs.risk.sampling import sample_risk

    prompts, y, prs_t, mask_t, target, days, stops = (rows[k] for k in ("prompts", "y", "prs", "prs_mask", "target",
                                                                        "token_days", "stops"))

    print(f"{len(prompts)} subjects ({int(y.sum())} positive), K={args.samples}, horizon {args.horizon_days} days, "
          f"model {args.model} ({model.config.prs_fusion}), {args.threads} threads")
    t0 = time.perf_counter()
    ours = sample_risk(model, prompts, target, days, args.horizon_days, "path", args.samples, prs_t, mask_t, stops,
                       tok.pad_token_id, args.max_new_tokens, 256, seed=0, progress=False,
                       control_variates=False)  # the same estimator as the generate() side: a like-for-like speed
    t_ours = time.perf_counter() - t0

    t0 = time.perf_counter()
    theirs, theirs_se = np.array([
        generate_path_risk(model, p, None if prs_t is None else prs_t[i], None if mask_t is None else mask_t[i],
                           target, days, args.horizon_days, args.samples, args.max_new_tokens, i, stops)
        for i, p in enumerate(prompts)
    ]).T
    t_theirs = time.perf_counter() - t0

    r_ours, r_theirs = len(prompts) / t_ours, len(prompts) / t_theirs
    print(f"generate (baseline): {r_theirs:8.2f} subjects/s   AUROC {roc_auc_score(y, theirs):.3f}")
    print(f"engine            : {r_ours:8.2f} subjects/s   AUROC {roc_auc_score(y, ours.probability):.3f}")
    print(f"ratio engine / generate: {r_ours / r_theirs:.1f}x   (goal >= 5x); "
          f"Pearson r of the two risk vectors {np.corrcoef(theirs, ours.probability)[0, 1]:.3f}")
    report_agreement(y, ours.probability, ours.stderr, theirs, theirs_se)
    if args.agreement_seeds:
        # The AUROC of a few rows moves with the Monte Carlo draw itself, which a bootstrap over rows
        # does not see: show the engine's own spread over seeds, and where generate's AUROC falls in it.
        aurocs = np.array([roc_auc_score(y, sample_risk(
            model, prompts, target, days, args.horizon_days, "path", args.samples, prs_t, mask_t, stops,
            tok.pad_token_id, args.max_new_tokens, 256, seed=seed, progress=False, control_variates=False).probability)
            for seed in range(1, args.agreement_seeds + 1)])
        print(f"engine AUROC over {len(aurocs)} more seeds: mean {aurocs.mean():.3f}, range [{aurocs.min():.3f}, "
              f"{aurocs.max():.3f}]; generate's {roc_auc_score(y, theirs):.3f} is above "
              f"{np.mean(aurocs < roc_auc_score(y, theirs)):.0%} of them")


def report_agreement(y: np.ndarray, ours: np.ndarray, ours_se: np.ndarray, theirs: np.ndarray,
                     theirs_se: np.ndarray) -> None:
    """Whether the two sides estimate the same risks, beyond the AUROC of a few rows.

    Both are unbiased Monte Carlo estimates of each row's risk from independent paths, so per row
    z = (ours - theirs) / sqrt(se_ours^2 + se_theirs^2) should be about standard normal: mean z near
    0 (a bias in either would shift it) and |z| > 1.96 in about 5 % of rows (fewer when heavy-tailed
    path values inflate the standard errors of K paths).
    """
    z = (ours - theirs) / np.sqrt(ours_se**2 + theirs_se**2)
    z = z[np.isfinite(z)]
    print(f"per-row agreement: mean risk {ours.mean():.4f} (engine) vs {theirs.mean():.4f} (generate); "
          f"z = difference / joint standard error over {z.size} rows: mean {z.mean():+.2f} "
          f"(SE {1 / math.sqrt(max(z.size, 1)):.2f}), |z| > 1.96 in {np.mean(np.abs(z) > 1.96):.0%} (expect <= ~5 %)")


if __name__ == "__main__":
    main()
