"""Batches of tokenized subjects for the causal LM: pad, mask, and carry the PRS through.

Rows come from `ehr-prs tokenize` datasets: `input_ids` (list of int), `prs` (list of float,
standardised; length n_prs, may be empty for EHR-only data) and `prs_mask` (bool: genotyped).
Padding is on the right for training (positions then start at 0 for every row) and the loss
ignores pads through `labels == -100`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ehr_prs.time_to_event import tte_targets


@dataclass
class EhrPrsCollator:
    """Pad `input_ids` to the longest row (or `max_length`), build labels and stack the PRS.

    Rows longer than `max_length` keep their *last* `max_length` tokens: the most recent
    history predicts best, and the tokenizer already cut histories at its own max length.
    """

    pad_token_id: int
    max_length: int | None = None
    pad_to_multiple_of: int | None = 8
    with_labels: bool = True
    # For classification: take `labels` from this row column (e.g. "boolean_value") instead
    # of the next-token targets.
    label_column: str | None = None
    # Time-to-event targets (a model with a TTE head): days each token id stands for (time tokens
    # > 0), each token id's index in config.tte_families (-1 = none), positions read per row.
    token_days: Any = None
    tte_family_of_token: Any = None
    tte_max_positions: int = 32

    def __post_init__(self) -> None:
        if (self.token_days is None) != (self.tte_family_of_token is None):
            raise ValueError("time-to-event targets need both token_days and tte_family_of_token")
        if self.token_days is not None:
            self.token_days = np.asarray(self.token_days, dtype=np.float64)
            self.tte_family_of_token = np.asarray(self.tte_family_of_token, dtype=np.int64)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [list(r["input_ids"]) for r in rows]
        if self.max_length is not None:
            ids = [x[-self.max_length :] for x in ids]
        width = max(len(x) for x in ids)
        if self.pad_to_multiple_of:  # rounded up for kernel-friendly shapes, never past max_length
            m = self.pad_to_multiple_of
            width = min(-(-width // m) * m, self.max_length or float("inf"))
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)  # (batch, seq)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)  # (batch, seq)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            attention_mask[i, : len(x)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.label_column is not None:
            batch["labels"] = torch.tensor([float(r[self.label_column]) for r in rows])  # (batch,)
        elif self.with_labels:
            batch["labels"] = input_ids.masked_fill(attention_mask == 0, -100)
        if self.tte_family_of_token is not None:
            n_families = int(self.tte_family_of_token.max()) + 1 if self.tte_family_of_token.size else 0
            targets = [tte_targets(np.asarray(x), self.token_days, self.tte_family_of_token, n_families, width,
                                   self.tte_max_positions) for x in ids]
            batch["tte_positions"] = torch.from_numpy(np.stack([t[0] for t in targets]))  # (batch, P)
            batch["tte_first_index"] = torch.from_numpy(np.stack([t[1] for t in targets]))  # (batch, families)
            batch["tte_days"] = torch.from_numpy(np.stack([t[2] for t in targets]))  # (batch, seq)
        if "prs" in rows[0]:
            prs = torch.from_numpy(np.asarray([r["prs"] for r in rows], dtype=np.float32))  # (batch, n_prs)
            prs_mask = torch.tensor([bool(r["prs_mask"]) for r in rows], dtype=torch.bool)  # (batch,)
            # A row that is not genotyped carries no score values at all: zero them so nothing
            # downstream can read a stale vector; the model uses prs_mask, not these zeros.
            prs[~prs_mask] = 0.0
            batch["prs"], batch["prs_mask"] = prs, prs_mask
        return batch
