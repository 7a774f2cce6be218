"""Refit the time-to-event head's hazard of one outcome on a frozen model: `ehr-prs hazard-refit`.

    ehr-prs hazard-refit --model runs/tte --data runs/tok --codes 'ICD10CM/E11*' \
        --out runs/tte/hazard_t2d.safetensors
    ehr-prs risk --model runs/tte ... --codes 'ICD10CM/E11*' --method hazard \
        --hazard-refit runs/tte/hazard_t2d.safetensors

Why: a head pretrained jointly with the language model uses less of what the backbone knows than a
direct fit of the same features does. On the demo cohort the pretrained head's T2D AUROC is 0.626
(EHR-only) and 0.648 (EHR+PRS); refitted here, 0.667 and 0.695, with half the calibration error
(docs/experiments/2026-12-06-tte-head-refit.md). The fit uses no task labels: the targets are the
pretraining ones, read from the training split's records.

1. One forward pass of the frozen model over the training split: at each position the head reads
   (the ends of days, config.tte_max_positions per record) where the outcome has not yet occurred,
   x = what the head reads there ([state ; mean state of the history] or the state), and the time to
   the outcome's first later code (an event) or to the record's end (censored).
2. A piecewise-exponential model over the head's own time bins, log h[bin] = a[bin] + w . x
   (+ b . z for a genotyped person's standardised scores z, when the model reads scores): ridge
   penalties on w and b chosen on the tuning split's likelihood, solved by L-BFGS in float64.
3. `ehr-prs risk --method hazard --hazard-refit FILE` uses these hazards for the outcome instead of
   the head's: risk within D days = 1 - exp(-sum over bins of hazard x overlap).

The file (safetensors) holds a, w, the features' training mean and SD, b, and as metadata the
outcome's families and the fit report; it stores no subject id.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ehr_prs.errors import InputError
from ehr_prs.fits.incidence import check_incidence_output
from ehr_prs.privacy import MIN_SUBJECTS

if TYPE_CHECKING:
    import torch

FORMAT = "ehr-prs hazard refit 1"
LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1)  # ridge on w (per at-risk pair, standardised features)
LAMBDAS_PRS = (1e-3, 1e-2, 1e-1)  # ridge on b


@dataclass
class HazardRefit:
    """log h[bin] = a[bin] + w . (x - mean) / sd + b . z (genotyped persons only), per year."""

    a: torch.Tensor  # (bins,)
    w: torch.Tensor  # (d',)
    mean: torch.Tensor  # (d',)
    sd: torch.Tensor  # (d',)
    b: torch.Tensor | None  # (n_prs,) or None: the fit did not read scores
    families: list[str]
    report: dict

    def log_hazard(self, x: torch.Tensor, prs: torch.Tensor | None = None,
                   prs_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (n, d') head inputs, prs (n, n_prs), prs_mask (n,) -> log-hazards per year (n, bins), float64."""
        import torch

        lin = ((x.double() - self.mean.double()) / self.sd.double()) @ self.w.double()  # (n,)
        if self.b is not None and prs is not None:
            genotyped = prs_mask.bool() if prs_mask is not None else torch.ones(len(x), dtype=torch.bool)
            lin = lin + torch.where(genotyped.to(lin.device), prs.double() @ self.b.double(), 0.0)
        return self.a.double()[None] + lin[:, None]


def at_risk_pairs(model, tokenizer, rows, family_idx: list[int], *, batch_size: int = 16, desc: str = "hazard refit"):
    """(x (n, d'), z (n, n_prs) or None, genotyped (n,) or None, time in years (n,), event (n,)) over the
    positions at risk for the union of `family_idx`, and the number of records where it occurs."""
    import torch
    from tqdm.auto import tqdm

    from ehr_prs.collator import EhrPrsCollator
    from ehr_prs.recipes.train import tte_collator_fields
    from modeling_ehr_prs.modeling_ehr_prs import DAYS_PER_YEAR, tte_pairs

    collate = EhrPrsCollator(pad_token_id=tokenizer.pad_token_id, with_labels=False,
                             **tte_collator_fields(model.config, tokenizer))
    fam = torch.as_tensor(list(family_idx))
    device = next(model.parameters()).device
    xs, zs, gs, ts, es, occurs = [], [], [], [], [], 0
    model.eval()
    with torch.no_grad():
        for lo in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch"):
            batch = collate(list(rows.select(range(lo, min(lo + batch_size, len(rows))))))
            mask = batch["attention_mask"]
            out = model.model(input_ids=batch["input_ids"].to(device), attention_mask=mask.to(device),
                              prs=batch["prs"].to(device) if "prs" in batch else None,
                              prs_mask=batch["prs_mask"].to(device) if "prs" in batch else None, use_cache=False)
            h = model._head_input(out.last_hidden_state, mask.to(device)).float().cpu()  # (b, s, d')
            first = batch["tte_first_index"][:, fam].min(-1, keepdim=True).values  # (b, 1) the families' union
            occurs += int((first[:, 0] < mask.shape[1]).sum())
            t, e, r = tte_pairs(batch["tte_positions"], first, batch["tte_days"].float(), mask.sum(-1) - 1)  # (b, P, 1)
            pos = batch["tte_positions"].clamp(min=0)
            keep = r[..., 0]  # (b, P)
            xs.append(h[torch.arange(len(h))[:, None], pos][keep])
            ts.append(t[..., 0][keep].double() / DAYS_PER_YEAR)
            es.append(e[..., 0][keep])
            if "prs" in batch:
                zs.append(batch["prs"][:, None, :].expand(-1, pos.shape[1], -1)[keep].double())
                gs.append(batch["prs_mask"][:, None].expand(-1, pos.shape[1])[keep])
    z, g = (torch.cat(zs), torch.cat(gs)) if zs else (None, None)
    return (torch.cat(xs), z, g, torch.cat(ts), torch.cat(es)), occurs


def _nll(a, w, b, x, z, g, t, e, starts) -> torch.Tensor:
    """Mean piecewise-exponential negative log-likelihood of standardised features x (n, d')."""
    import torch

    ends = torch.cat([starts[1:], starts.new_full((1,), float("inf"))])
    exposure = (torch.minimum(t[:, None], ends) - starts).clamp(min=0.0)  # (n, bins) years in each bin
    bin_of = (torch.searchsorted(starts, t.contiguous(), right=True) - 1).clamp(min=0)  # (n,)
    lin = x @ w
    if b is not None:
        lin = lin + torch.where(g, z @ b, 0.0)
    log_h = a[None] + lin[:, None]  # (n, bins)
    return ((log_h.exp() * exposure).sum(1) - torch.where(e, log_h.gather(1, bin_of[:, None])[:, 0], 0.0)).mean()


def fit_hazard(train, tuning, bin_starts_years, lambdas=LAMBDAS, lambdas_prs=LAMBDAS_PRS) -> tuple[dict, dict]:
    """Ridge piecewise-exponential fit over the penalty grid; the penalties with the best tuning likelihood.

    train / tuning: the tuples of `at_risk_pairs`. Returns the weights (a, w, mean, sd, b) and a report.
    """
    import torch

    x, z, g, t, e = train
    mean, sd = x.mean(0), x.std(0).clamp(min=1e-6)
    std = lambda d: ((d[0] - mean) / sd).double()  # noqa: E731
    xt, xu = std(train), std(tuning)
    starts = bin_starts_years.double()
    base = float(np.log(max(float(e.sum()), 1.0) / float(t.sum())))  # the constant hazard's MLE
    use_prs = z is not None
    best = None
    for lam in lambdas:
        for lam_prs in (lambdas_prs if use_prs else (None,)):
            a = torch.full((len(starts),), base, dtype=torch.float64, requires_grad=True)
            w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
            b = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True) if use_prs else None
            params = [a, w] + ([b] if use_prs else [])
            opt = torch.optim.LBFGS(params, max_iter=300, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

            def closure():
                opt.zero_grad()
                loss = _nll(a, w, b, xt, z, g, t, e, starts) + lam * (w ** 2).sum()
                if use_prs:
                    loss = loss + lam_prs * (b ** 2).sum()
                loss.backward()
                return loss

            opt.step(closure)
            with torch.no_grad():
                loss = float(_nll(a, w, b, xu, tuning[1], tuning[2], tuning[3], tuning[4], starts))
            if np.isfinite(loss) and (best is None or loss < best[0]):
                best = (loss, lam, lam_prs, a.detach(), w.detach(), b.detach() if use_prs else None)
    if best is None:
        raise InputError("the hazard refit did not converge for any penalty (non-finite likelihood): the model's "
                         "hidden states are broken; retrain it")
    with torch.no_grad():
        zero = torch.zeros_like(best[4])
        flat = float(_nll(torch.full_like(best[3], base), zero, None, xu, None, None, tuning[3], tuning[4], starts))
    weights = {"a": best[3], "w": best[4], "mean": mean.double(), "sd": sd.double()}
    if best[5] is not None:
        weights["b"] = best[5]
    report = {"tuning_nll": best[0], "tuning_nll_constant_hazard": flat, "lambda": best[1], "lambda_prs": best[2],
              "train_pairs": int(len(t)), "train_events": int(e.sum()), "tuning_pairs": int(len(tuning[3])),
              "tuning_events": int(tuning[4].sum()), "reads_prs": use_prs}
    return weights, report


def save_hazard_refit(path: str | Path, weights: dict, families: list[str], report: dict, overwrite: bool = False) -> None:
    """Write the weights as safetensors with the families and report as metadata, atomically."""
    import torch
    from safetensors.torch import save_file

    from ehr_prs.errors import atomic_output_file

    tensors = {k: v.to(torch.float64).contiguous() for k, v in weights.items()}
    with atomic_output_file(path, overwrite) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "families": json.dumps(families),
                                                 "report": json.dumps(report)})


def load_hazard_refit(path: str | Path) -> HazardRefit:
    """A file written by `ehr-prs hazard-refit`; InputError naming the file otherwise."""
    from ehr_prs.checkpoints import read_fit_file

    meta, tensors = read_fit_file(path, "--hazard-refit", "ehr-prs hazard-refit", FORMAT)
    return HazardRefit(tensors["a"], tensors["w"], tensors["mean"], tensors["sd"], tensors.get("b"),
                       json.loads(meta["families"]), json.loads(meta.get("report", "{}")))


# ----------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="folder written by `ehr-prs pretrain --tte-families N` (kept frozen)")
    parser.add_argument("--data", required=True, help="`ehr-prs tokenize` output: fits on train/, chooses the penalties on tuning/")
    parser.add_argument("--codes", nargs="+", required=True,
                        help="the outcome's codes, as `ehr-prs risk --codes` will name them (ICD10CM/E11*)")
    parser.add_argument("--out", required=True,
                        help="output .safetensors file (may lie inside --model, e.g. MODEL/hazard_t2d.safetensors)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out file (inside --model: only an earlier refit)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    parser.add_argument("--max-sequences", type=int,
                        help="fit on a random sample of this many training sequences (the forward pass is most of the "
                             "cost: 14 min for 12,000 demo sequences on one CPU thread); default all")
    parser.add_argument("--seed", type=int, default=0, help="seed of that sample")


def run(args: argparse.Namespace) -> None:
    import datasets

    from ehr_prs.checkpoints import load_model_and_tokenizer
    from ehr_prs.time_to_event import target_families

    check_incidence_output(args.out, args.model, args.data, args.overwrite, FORMAT)  # the incidence refit's rules
    if args.max_sequences is not None and args.max_sequences < 1:
        raise InputError(f"--max-sequences must be >= 1, got {args.max_sequences}")
    model, tokenizer, _ = load_model_and_tokenizer(args.model)
    if not model.config.has_tte_head:
        raise InputError(f"--model {args.model} has no time-to-event head: pretrain one with `ehr-prs pretrain "
                         "--tte-families N`, or use `ehr-prs incidence-refit` for the sampling methods")
    family_idx = target_families(tokenizer, model.config.tte_families, args.codes)
    data = Path(args.data)
    for split in ("train", "tuning"):
        if not (data / split).is_dir():
            raise InputError(f"--data {data}: no {split}/ split (expected the output folder of `ehr-prs tokenize`; "
                             "the tuning split chooses the penalties)")
    train_rows = datasets.load_from_disk(str(data / "train"))
    if args.max_sequences and args.max_sequences < len(train_rows):
        pick = np.random.default_rng(args.seed).choice(len(train_rows), args.max_sequences, replace=False)
        train_rows = train_rows.select(np.sort(pick))
    train, occurs = at_risk_pairs(model, tokenizer, train_rows, family_idx, batch_size=args.batch_size,
                                  desc="hazard refit: train split")
    if occurs < MIN_SUBJECTS:
        raise InputError(f"{data / 'train'}: {args.codes} occur in {occurs} sequences; a refit needs at least "
                         f"{MIN_SUBJECTS} (the dissemination rule)")
    tuning, _ = at_risk_pairs(model, tokenizer, datasets.load_from_disk(str(data / "tuning")), family_idx,
                              batch_size=args.batch_size, desc="hazard refit: tuning split")
    weights, report = fit_hazard(train, tuning, model.tte_head.bin_starts)
    families = [model.config.tte_families[i] for i in family_idx]
    report.update({"codes": args.codes, "families": families, "train_sequences_with_outcome": occurs,
                   "train_sequences": len(train_rows)})
    save_hazard_refit(args.out, weights, families, report, overwrite=args.overwrite)
    print(f"wrote {args.out}: families {', '.join(families)}, {report['train_events']:,} events over "
          f"{report['train_pairs']:,} positions at risk; tuning NLL {report['tuning_nll']:.4f} per position "
          f"(constant hazard {report['tuning_nll_constant_hazard']:.4f}); ridge {report['lambda']:g}"
          + (f", on the scores {report['lambda_prs']:g}" if report["reads_prs"] else ""))
