"""Time-to-event (TTE) pretraining and risk: code families, label-free targets, hazard risk curves.

The model's TTE head (EhrPrsTimeToEventHead in modeling_ehr_prs.py) gives, at a position of a
record, piecewise-constant hazards of the first later occurrence of each code family. This stage
owns what lies around it:

- `code_family` / `choose_families`: a family is a MEDS code up to its first '.'
  (`ICD10CM/E11.9` -> `ICD10CM/E11`); pretraining predicts the families first seen in at least
  20 training subjects (the dissemination rule), the most common first, up to a cap.
- `tte_targets`: the targets of one tokenized record, from its token ids and time tokens alone
  (no labels): the positions where the loss is read (ends of days: a time token follows), each
  family's first occurrence in the record, and the days elapsed at every token. The model
  derives at-risk pairs, event times and censoring from these (EhrPrsForCausalLM.time_to_event_loss).
- `hazard_risk`: risk curves of a set of families from one forward pass per prompt,
  1 - exp(-cumulative hazard) at every horizon.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from ehr_prs.errors import InputError

MIN_SUBJECTS = 20  # All of Us: no code seen in fewer than 20 subjects enters a vocabulary or a report
DAYS_PER_YEAR = 365.25


def code_family(code: str) -> str:
    """The family of a MEDS code: the code up to its first '.' (`ICD10CM/E11.9` -> `ICD10CM/E11`)."""
    return code.split(".", 1)[0]


def code_tokens(tokenizer) -> list[tuple[int, str]]:
    """(id, token) of the tokenizer's MEDS code tokens (not time, age, value-bin, unknown or special)."""
    return [(i, t) for t, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]) if tokenizer._is_code(t)]


def family_of_token(tokenizer, families: Sequence[str]) -> np.ndarray:
    """(vocab,) int32: index into `families` of each token's family, -1 for tokens in no listed family."""
    index = {f: i for i, f in enumerate(families)}
    out = np.full(len(tokenizer), -1, dtype=np.int32)
    for tid, tok in code_tokens(tokenizer):
        out[tid] = index.get(code_family(tok), -1)
    return out


def choose_families(tokenizer, input_ids: Iterable[Sequence[int]], min_subjects: int = MIN_SUBJECTS,
                    max_families: int | None = None) -> list[str]:
    """Families present in at least `min_subjects` records (one record per training subject), most common first.

    Ties are broken by name, so the choice is deterministic for a given training split.
    """
    families = sorted({code_family(t) for _, t in code_tokens(tokenizer)})
    fam_of = family_of_token(tokenizer, families)
    counts = np.zeros(len(families), dtype=np.int64)
    for ids in input_ids:
        fam = fam_of[np.asarray(ids, dtype=np.int64)]
        counts[np.unique(fam[fam >= 0])] += 1
    order = sorted((i for i in range(len(families)) if counts[i] >= min_subjects), key=lambda i: (-counts[i], families[i]))
    if max_families is not None:
        order = order[:max_families]
    return [families[i] for i in order]


def tte_targets(ids: np.ndarray, token_days: np.ndarray, fam_of: np.ndarray, n_families: int, width: int,
                max_positions: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Targets of one record (token ids `ids`, length L <= width), padded to `width`.

    Returns positions (max_positions,) int64 (-1 = unused): the ends of days (a time token follows),
    evenly spread over the record when there are more; first_index (n_families,) int64: each
    family's first token index in the record, `width` when it never occurs; days (width,) float32:
    days elapsed at each token (time tokens summed; pads repeat the last value).
    """
    ids = np.asarray(ids, dtype=np.int64)
    days = np.cumsum(token_days[ids], dtype=np.float64)
    padded_days = np.full(width, days[-1] if len(days) else 0.0, dtype=np.float32)
    padded_days[: len(days)] = days
    candidates = np.nonzero(token_days[ids[1:]] > 0)[0]  # i such that token i + 1 is a time token
    if len(candidates) > max_positions:
        candidates = candidates[np.unique(np.linspace(0, len(candidates) - 1, max_positions).round().astype(np.int64))]
    positions = np.full(max_positions, -1, dtype=np.int64)
    positions[: len(candidates)] = candidates
    first = np.full(n_families, width, dtype=np.int64)
    fam = fam_of[ids]
    where = np.nonzero(fam >= 0)[0]
    np.minimum.at(first, fam[where], where)
    return positions, first, padded_days


def target_families(tokenizer, families: Sequence[str], codes: Sequence[str]) -> list[int]:
    """Indices into the head's `families` of the families that `--codes` name (exact codes or `PREFIX*`).

    InputError when a code names a family the head does not predict (it was seen in too few
    training subjects, or the cap left it out), so a risk query never silently scores nothing.
    """
    ids = tokenizer.code_token_ids(list(codes))  # InputError with close matches for a typo
    tokens = tokenizer.convert_ids_to_tokens(ids)
    index = {f: i for i, f in enumerate(families)}
    wanted = sorted({code_family(t) for t in tokens})
    missing = [f for f in wanted if f not in index]
    if missing:
        raise InputError(
            f"--codes {' '.join(codes)} name code family {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f", which the model's time-to-event head does not predict (it has {len(families)} families, those first "
            f"seen in at least {MIN_SUBJECTS} training subjects): use a sampling method (--method survival), or "
            "pretrain with a larger --tte-families cap")
    return [index[f] for f in wanted]


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
                batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """Risk of a first occurrence of any of `family_idx` within each horizon: (rows, H), in [0, 1].

    One forward pass per prompt (batched through the training collator, sorted by length so that a
    batch pads little); risk = 1 - exp(-sum over the families of their cumulative hazards), i.e. the
    families' first occurrences treated as independent given the history. Deterministic.
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
        log_h = model.tte_log_hazards(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                      prs=p, prs_mask=pm)  # (b, bins, F)
        cum = cumulative_hazard(log_h[:, :, fam.to(log_h.device)], model.tte_head.bin_starts, 0.0,
                                horizons_days)  # (b, H, |fam|)
        out[idx] = (-torch.expm1(-cum.sum(-1))).cpu().numpy()
    return out
