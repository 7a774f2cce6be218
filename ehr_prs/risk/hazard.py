"""The hazard route of the risk engine: risk curves from the time-to-event head, one forward pass per prompt.

    ehr-prs risk --model runs/ehr_tte --meds runs/cohort/meds --labels runs/cohort/labels/t2d.parquet \
        --codes 'ICD10CM/E11*' --horizon-days 730 --method hazard --horizons 365 730 1825 --out t2d.parquet

The model's TTE head gives, at the prompt's last position, piecewise-constant log-hazards
(bins, F) of the first later occurrence of each code family over fixed time bins. The risk
within a horizon is 1 - exp(-cumulative hazard), summed over the families that `--codes` name
(ehr_prs.time_to_event.target_families): deterministic, and the whole curve over horizons at
once. It answers the same question as the sampling estimators (ehr_prs.risk.sampling), a
probability per label row, with one forward pass instead of K sampled futures.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ehr_prs.errors import InputError
from modeling_ehr_prs.modeling_ehr_prs import DAYS_PER_YEAR  # the head's bins are in these years


def cumulative_hazard(log_hazard: torch.Tensor, bin_starts_years: torch.Tensor, start_days: float | torch.Tensor,
                      horizons_days: Sequence[float]) -> torch.Tensor:
    """Cumulative hazard over (start, start + horizon] for each horizon: (n, bins, F) -> (n, H, F).

    bin_starts_years (bins,); start_days a float or (n,) tensor (days already elapsed since the
    position, e.g. from the last event to the prediction time).
    """
    n = log_hazard.shape[0]
    starts = bin_starts_years.to(log_hazard.device, torch.float64)
    ends = torch.cat([starts[1:], starts.new_full((1,), float("inf"))])
    t0 = torch.as_tensor(start_days, dtype=torch.float64, device=log_hazard.device).expand(n) / DAYS_PER_YEAR  # (n,)
    t1 = t0[:, None] + torch.as_tensor(list(horizons_days), dtype=torch.float64, device=log_hazard.device) / DAYS_PER_YEAR
    lo = torch.maximum(t0[:, None, None], starts)  # (n, 1, bins)
    hi = torch.minimum(t1[:, :, None], ends)  # (n, H, bins)
    overlap = (hi - lo).clamp(min=0.0)  # (n, H, bins) years of each horizon inside each bin
    return overlap @ log_hazard.double().exp()  # (n, H, F)


@torch.no_grad()
def hazard_risk(model, input_ids: Sequence[Sequence[int]], family_idx: Sequence[int], horizons_days: Sequence[float],
                prs: torch.Tensor | None = None, prs_mask: torch.Tensor | None = None, pad_token_id: int = 0,
                batch_size: int = 64, progress: bool = True, refit=None) -> np.ndarray:
    """Risk of a first occurrence of any of `family_idx` within each horizon: (rows, H), in [0, 1].

    One forward pass per prompt (batched through the training collator, sorted by length so that a
    batch pads little); risk = 1 - exp(-sum over the families of their cumulative hazards), i.e. the
    families' first occurrences treated as independent given the history. Deterministic. With
    `refit` (ehr_prs.fits.hazard_refit.HazardRefit, fitted for the union of these families) its
    hazard replaces the head's.
    """
    from tqdm.auto import tqdm

    from ehr_prs.collator import EhrPrsCollator

    collate = EhrPrsCollator(pad_token_id=pad_token_id, with_labels=False, pad_to_multiple_of=None)
    device = next(model.parameters()).device
    order = np.argsort([len(x) for x in input_ids], kind="stable")
    out = np.zeros((len(input_ids), len(horizons_days)), dtype=np.float64)
    fam = torch.as_tensor(list(family_idx), dtype=torch.long)
    for lo in tqdm(range(0, len(order), batch_size), desc="hazard risk", unit="batch", disable=not progress):
        idx = order[lo: lo + batch_size]
        batch = collate([{"input_ids": input_ids[i]} for i in idx])
        p = prs[idx].to(device) if prs is not None else None
        pm = prs_mask[idx].to(device) if prs_mask is not None else None
        if refit is None:
            log_h = model.tte_log_hazards(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                          prs=p, prs_mask=pm)[:, :, fam.to(device)]  # (b, bins, |fam|)
        else:
            x = model.tte_head_inputs(batch["input_ids"].to(device), batch["attention_mask"].to(device), p, pm)
            log_h = refit.log_hazard(x.cpu(), None if p is None else p.cpu(), None if pm is None else pm.cpu())[:, :, None]
        cum = cumulative_hazard(log_h, model.tte_head.bin_starts, 0.0, horizons_days)  # (b, H, |fam| or 1)
        out[idx] = (-torch.expm1(-cum.sum(-1))).cpu().numpy()
    return out


def write_hazard_risk(args: argparse.Namespace, model, tokenizer, data, prompts: list[list[int]],
                      family_idx: list[int], prs_t: torch.Tensor | None, prs_mask_t: torch.Tensor | None,
                      curve_path: Path | None = None, score=None, refit=None) -> None:
    """`ehr-prs risk --method hazard`: write the risk at --horizon-days (and the --horizons curve) for each row.

    data: the label rows' prediction inputs (subject_id, prediction_time, boolean_value), prompts their
    token ids, family_idx the head's families that --codes name; prs_t (rows, n_prs) / prs_mask_t (rows,);
    curve_path where the --horizons curve goes (the command decides it, and checked it before any work).
    score: what computes the risk, called as hazard_risk is (default hazard_risk itself); the command
    passes its sharded version (ehr_prs.sharded), which returns None on the processes that do not write.
    refit: a `--hazard-refit` (ehr_prs.fits.hazard_refit.HazardRefit) used instead of the head's hazard.
    """
    import polars as pl

    from ehr_prs.data.predictions import write_predictions
    from ehr_prs.errors import atomic_output_file

    horizons = [args.horizon_days, *[h for h in (args.horizons or []) if h != args.horizon_days]]
    if any(h <= 0 for h in horizons):
        raise InputError(f"--horizons must all be > 0 days, got {args.horizons}")
    risk = (score or hazard_risk)(model, prompts, family_idx, horizons, prs_t, prs_mask_t,
                                  tokenizer.pad_token_id, refit=refit)  # (rows, H)
    if risk is None:  # a sharded run's other process: the main process writes
        return
    if not np.isfinite(risk).all():
        raise InputError(f"{args.model} gave non-finite hazards for {int((~np.isfinite(risk)).any(1).sum())} rows: "
                         "the model's weights are broken; retrain it")
    keys = pl.DataFrame({
        "subject_id": np.asarray(data["subject_id"], dtype=np.int64),
        "prediction_time": data.with_format("arrow")["prediction_time"],
    })
    frame = keys.with_columns(pl.Series("boolean_value", np.asarray(data["boolean_value"], dtype=bool)),
                              pl.Series("predicted_boolean_probability", risk[:, 0]))
    write_predictions(frame, args.out, args.overwrite, source=f"--model {args.model}")
    wrote = [str(args.out)]
    if args.horizons:
        order = sorted(range(len(horizons)), key=lambda j: horizons[j])
        curve = pl.concat([keys.with_columns(pl.lit(horizons[j]).alias("horizon_days"),
                                             pl.Series("probability", risk[:, j])) for j in order])
        with atomic_output_file(curve_path, overwrite=args.overwrite, flag="--horizons curve") as tmp:
            curve.write_parquet(tmp)
        wrote.append(f"{curve_path} ({len(horizons)} horizons)")
    fams = ", ".join(model.config.tte_families[i] for i in family_idx)
    print(f"wrote {' and '.join(wrote)}: {frame.height} rows, method hazard (families {fams}"
          f"{', refitted hazard' if refit is not None else ''}), "
          f"mean risk {risk[:, 0].mean():.4f} at {args.horizon_days:g} days")
