"""Refit a frozen causal LM's onset rate of one outcome on its summary of the history: `ehr-prs incidence-refit`.

    ehr-prs incidence-refit --model runs/ehr_only --data runs/tok --codes 'ICD10CM/E11*' \
        --out runs/ehr_only/incidence_t2d.safetensors
    ehr-prs risk --model runs/ehr_only ... --codes 'ICD10CM/E11*' --method survival \
        --incidence-refit runs/ehr_only/incidence_t2d.safetensors

Why: the model knows more about a person than its next-token probability of a rare onset shows.
On the demo cohort the EHR-only model predicts the *value* of a future HbA1c well (its expected
bin ranks T2D onset at 0.68 AUROC) yet its zero-shot T2D risk ranks at 0.64: the onset of a
disease is one token among hundreds per record, and language-model gradients barely shape how
its probability moves with the history (the logit-bias adapter's argument, for the record
instead of the genome). The fix is a regression solved directly, from one forward pass over the
training split, with no task labels (only the corpus the model was pretrained on):

1. For every training sequence, each position t at risk (from the end of the static prefix to
   the outcome's first occurrence) gives y_t (1 if token t + 1 is one of the outcome's codes),
   p_t (the model's probability of those codes) and s_t, the mean of the model's final hidden
   states over tokens 0..t: a summary of the history so far. Non-events are subsampled
   (`--negative-fraction`, reweighted) to keep the fit small.
   Rows the tokenizer cut to its max length are left out: their first outcome code in the window
   may repeat a diagnosis made before it.
2. Poisson regression y_t ~ p_t exp(b + w . s_t) (offset log p_t), ridge penalty chosen on the
   tuning split's log-likelihood gain over b = w = 0; then b alone is refitted on the tuning split
   (the model was pretrained on the training split, so its p_t there runs optimistic). With no
   gain the refit stays at 0 (the model unchanged) and says so.
3. `ehr-prs risk --incidence-refit FILE` adds delta = b + w . s(prompt) to the outcome's logits
   at every sampled step of that row's paths, so each step's hazard becomes h e^delta /
   (1 - h + h e^delta): the model's rate, rescaled by what the history summary adds. The summary
   is the prompt's, held fixed along the path (the fit saw it updated token by token): an
   approximation that is exact at the first step and drifts as a path grows (~47 generated tokens
   for two years on the demo, against prompts of ~180).

The file (safetensors) holds w (hidden_size,) and b, and as metadata the outcome's vocabulary
tokens and the fit report; it stores no subject id.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from ehr_prs.errors import InputError, atomic_output_file, check_output
from ehr_prs.privacy import MIN_SUBJECTS  # first occurrences a refit needs in the training split

# torch (and the at-risk pass, which needs it) are imported inside the functions that use them:
# `ehr-prs incidence-refit --help` and `load_incidence`'s callers do not pay for it at import.
if TYPE_CHECKING:
    import torch

FORMAT = "ehr-prs incidence refit 1"
ALPHAS = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4)  # ridge penalties tried (sklearn PoissonRegressor units)


def onset_statistics(model, rows, target_ids: list[int], start_token: np.ndarray, *, batch_size: int = 16,
                     negative_fraction: float = 0.05, seed: int = 0, max_length: int | None = None,
                     desc: str = "incidence") -> dict[str, np.ndarray]:
    """Positions at risk of a tokenized split: s (n, d) history summaries, p (n,) model probability of
    the outcome, y (n,) 1 where it occurs next, weight (n,) 1 / sampling fraction; and `subjects`,
    the number of sequences in which the outcome first occurs after the static prefix, `sequences`, and
    `cut`, the rows left out because the tokenizer cut them to `max_length` (within 3 tokens of it:
    it drops whole events of up to 3 tokens)."""
    import torch

    from ehr_prs.fits.at_risk import at_risk_pass

    rng = np.random.default_rng(seed)
    lengths = np.asarray(rows["length"]) if "length" in rows.column_names else np.array([len(x) for x in rows["input_ids"]])
    keep_rows = lengths <= max_length - 3 if max_length else np.ones(len(lengths), dtype=bool)
    outcome = np.full(model.config.vocab_size, -1)  # (vocab,) one group: the outcome's codes
    outcome[sorted(set(target_ids))] = 0
    parts, subjects = [], 0
    # The model reads the scores when the rows carry them (zeroed for anyone not genotyped): the
    # offset is the model's own onset probability for this person.
    for batch in at_risk_pass(model, rows.select(np.flatnonzero(keep_rows)), outcome, 1, start_token,
                              batch_size=batch_size, with_summary=True, desc=desc):
        # clamped: a Poisson offset log p must stay finite (the log-sum-exp gives p > 0, float32 may round it to 0)
        p = batch.log_p[..., 0].exp().clamp(min=1e-12)  # (b, w)
        at_risk, y = batch.at_risk()[..., 0], batch.events()[..., 0]  # (b, w): y only where at risk
        subjects += int(batch.occurs.sum())
        # draws over the real width only (not the collator's rounding-up), so a seed picks the same positions
        b, width = at_risk.shape
        draw = np.ones((b, width))
        real = int(batch.length.max())
        draw[:, :real] = rng.random((b, real))
        keep = at_risk & (y | torch.from_numpy(draw < negative_fraction).to(at_risk.device))
        parts.append((batch.summary[keep].cpu(), p[keep].double().cpu(), y[keep].double().cpu()))
    s, p, y = (torch.cat([q[i] for q in parts]).numpy() if parts else np.zeros(0) for i in range(3))
    weight = np.where(y > 0, 1.0, 1.0 / negative_fraction)
    return {"s": s, "p": p, "y": y, "weight": weight, "subjects": subjects, "sequences": int(keep_rows.sum()),
            "cut": int((~keep_rows).sum())}


def poisson_gain(stats: dict, weight: np.ndarray, bias: float) -> float:
    """Log-likelihood (nats, weighted) of rates p exp(bias + s . weight) minus that of the rates p alone."""
    eta = bias + stats["s"] @ weight
    w = stats["weight"]
    return float((w * (stats["y"] * eta - stats["p"] * np.expm1(eta))).sum())


def fit_incidence(train: dict, tuning: dict | None, alphas: tuple[float, ...] = ALPHAS) -> tuple[np.ndarray, float, dict]:
    """(w (d,), b, report): the Poisson refit of train's onsets, penalty chosen on tuning's gain."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import PoissonRegressor

    d = train["s"].shape[1]
    mean, scale = train["s"].mean(0), train["s"].std(0) + 1e-6
    z = (train["s"] - mean) / scale
    if tuning is None:  # nothing to choose with: the middle of the path, said in the report
        alphas = (alphas[len(alphas) // 2],)
    path, best = [], None
    for alpha in tqdm(alphas, desc="incidence: penalty path", unit="fit"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            # offset log p: fit the rate y / p with weights p (the same likelihood up to a constant)
            reg = PoissonRegressor(alpha=alpha, max_iter=1000).fit(z, train["y"] / train["p"],
                                                                  sample_weight=train["p"] * train["weight"])
        w = reg.coef_ / scale
        b = float(reg.intercept_ - (reg.coef_ * mean / scale).sum())
        step = {"alpha": alpha, "train_gain_nats": round(poisson_gain(train, w, b), 2)}
        if tuning is not None:
            step["tuning_gain_nats"] = round(poisson_gain(tuning, w, b), 2)
        path.append(step)
        key = step.get("tuning_gain_nats", 0.0)
        if best is None or key > best[0]:
            best = (key, alpha, w, b)
    key, alpha, w, b = best
    report = {"penalty_path": path, "chosen_alpha": alpha, "train_onsets": int(train["y"].sum()),
              "train_positions_at_risk_sampled": int(train["y"].size)}
    if tuning is None:
        report["note"] = "no tuning split: penalty not chosen on held-out data (middle of the path)"
    elif key <= 0:
        report["chosen_alpha"] = None
        report["note"] = "the refit gains nothing on the tuning split: left at 0 (model unchanged)"
        w, b = np.zeros(d), 0.0
    else:
        # The level b again, on the tuning split (w fixed): the closed-form Poisson intercept there.
        rate = tuning["weight"] * tuning["p"] * np.exp(tuning["s"] @ w)
        report["train_bias"] = b
        b = float(np.log(max((tuning["weight"] * tuning["y"]).sum(), 0.5) / rate.sum()))
        report["tuning_onsets"] = int(tuning["y"].sum())
        report["tuning_gain_nats"] = float(key)
        report["tuning_gain_nats_after_bias_refit"] = round(poisson_gain(tuning, w, b), 2)
    return w, b, report


def save_incidence(path: str | Path, weight: np.ndarray, bias: float, tokens: list[str], report: dict,
                   overwrite: bool = False) -> None:
    """Write w and b as safetensors, the outcome tokens and the report as its metadata."""
    import torch
    from safetensors.torch import save_file

    tensors = {"weight": torch.tensor(weight, dtype=torch.float32), "bias": torch.tensor([bias], dtype=torch.float32)}
    # written whole or not at all: `make demo` starts risk jobs as soon as this file exists
    with atomic_output_file(path, overwrite) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "tokens": json.dumps(tokens), "report": json.dumps(report)})


def is_incidence_file(path: str | Path, fmt: str = FORMAT) -> bool:
    """Whether `path` is a file written by `save_incidence` (or of another refit's `fmt`: its safetensors metadata says so)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == fmt
    except Exception:  # not a safetensors file at all
        return False


def check_incidence_output(out: str | Path, model: str | Path, data: str | Path, overwrite: bool,
                           fmt: str = FORMAT) -> None:
    """The output rules of `incidence-refit`: those of every command (errors.check_output), except that
    the refit may be written into the --model folder it belongs to (README: MODEL/incidence_t2d.safetensors);
    there, even --overwrite replaces only an earlier refit, never one of the model's own files."""
    check_output(out, {"--model": model, "--data": data}, overwrite, kind="file", inside_ok=("--model",))
    target, model_dir = Path(out).expanduser().resolve(), Path(model).expanduser().resolve()
    if model_dir in target.parents and Path(out).exists() and not is_incidence_file(out, fmt):
        raise InputError(f"--out {out} is a file of the --model folder {model}, not an earlier refit of this kind; "
                         f"it is never replaced (even with --overwrite). Choose a new file name.")


def load_incidence(path: str | Path) -> tuple[torch.Tensor, float, list[str], dict]:
    """(w, b, outcome tokens, report) from a file written by `save_incidence`; clear errors otherwise."""
    from ehr_prs.checkpoints import read_fit_file

    meta, tensors = read_fit_file(path, "--incidence-refit", "ehr-prs incidence-refit", FORMAT)
    return tensors["weight"], float(tensors["bias"][0]), json.loads(meta["tokens"]), json.loads(meta.get("report", "{}"))


# ----------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="folder written by `ehr-prs pretrain` (kept frozen)")
    parser.add_argument("--data", required=True, help="`ehr-prs tokenize` output: fits on train/, chooses the penalty on tuning/")
    parser.add_argument("--codes", nargs="+", required=True,
                        help="the outcome's codes, as `ehr-prs risk --codes` will name them (ICD10CM/E11*)")
    parser.add_argument("--out", required=True,
                        help="output .safetensors file (may lie inside --model, e.g. MODEL/incidence_t2d.safetensors)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out file (inside --model: only an earlier refit)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    parser.add_argument("--negative-fraction", type=float, default=0.05,
                        help="share of non-onset positions kept (reweighted); every onset is kept")
    parser.add_argument("--max-sequences", type=int,
                        help="fit on a random sample of this many training sequences (the forward pass over the "
                             "split is most of the cost: 1 min 46 s for 6,000 demo sequences on one CPU thread); "
                             "default all")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subsampling")


def run(args: argparse.Namespace) -> None:
    import datasets

    from ehr_prs.checkpoints import load_model_and_tokenizer
    from ehr_prs.fits.at_risk import start_tokens

    check_incidence_output(args.out, args.model, args.data, args.overwrite)
    if not 0 < args.negative_fraction <= 1:
        raise InputError(f"--negative-fraction must be in (0, 1], got {args.negative_fraction}")
    if args.max_sequences is not None and args.max_sequences < 1:
        raise InputError(f"--max-sequences must be >= 1, got {args.max_sequences}")
    model, tokenizer, _ = load_model_and_tokenizer(args.model)
    target = tokenizer.code_token_ids(args.codes)
    data = Path(args.data)
    if not (data / "train").is_dir():
        raise InputError(f"--data {data}: no train/ split (expected the output folder of `ehr-prs tokenize`)")
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    start_token = start_tokens(tokens)  # (vocab,) the age and time tokens that end the static prefix
    stats = {}
    for split in ("train", "tuning"):
        if (data / split).is_dir():
            rows = datasets.load_from_disk(str(data / split))
            if split == "train" and args.max_sequences and args.max_sequences < len(rows):
                pick = np.random.default_rng(args.seed).choice(len(rows), args.max_sequences, replace=False)
                rows = rows.select(np.sort(pick))
            stats[split] = onset_statistics(model, rows, target, start_token, batch_size=args.batch_size,
                                            negative_fraction=args.negative_fraction, seed=args.seed,
                                            max_length=tokenizer.model_max_length, desc=f"incidence: {split} split")
    if "tuning" in stats and stats["tuning"]["y"].size == 0:
        del stats["tuning"]  # nothing at risk there: no penalty choice, said in the report
    if stats["train"]["subjects"] < MIN_SUBJECTS:
        raise InputError(f"{data / 'train'}: {args.codes} first occur in {stats['train']['subjects']} sequences; "
                         f"a refit needs at least {MIN_SUBJECTS} (the dissemination rule)")
    weight, bias, report = fit_incidence(stats["train"], stats.get("tuning"))
    report.update({"codes": args.codes, "train_subjects_with_onset": stats["train"]["subjects"],
                   "train_sequences": stats["train"]["sequences"], "train_sequences_cut_left_out": stats["train"]["cut"],
                   "negative_fraction": args.negative_fraction})
    save_incidence(args.out, weight, bias, [tokens[i] for i in target], report, overwrite=args.overwrite)
    gain = report.get("tuning_gain_nats")
    print(f"wrote {args.out}: {report['train_onsets']} training onsets of {args.codes}, "
          + (f"tuning gain {gain:.1f} nats over {report['tuning_onsets']} onsets (alpha {report['chosen_alpha']})"
             if gain is not None else report.get("note", "")))
