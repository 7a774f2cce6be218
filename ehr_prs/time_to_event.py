"""Time-to-event (TTE) pretraining: code families and the label-free targets of the TTE head.

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
- `target_families`: the head's families that a risk query's `--codes` name.

Risk curves from the head (1 - exp(-cumulative hazard) at every horizon) are the risk engine's
hazard route: ehr_prs.risk.hazard.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from ehr_prs.errors import InputError
from ehr_prs.privacy import MIN_SUBJECTS


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
