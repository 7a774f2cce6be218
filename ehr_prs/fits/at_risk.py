"""One pass over the positions at risk of a tokenized split, through a frozen causal LM.

Both frozen-backbone fits regress first occurrences on what the model expected: the logit-bias
fit (ehr_prs/fits/logit_bias.py) for every code family at once, the incidence refit
(ehr_prs/fits/incidence.py) for one outcome. They share everything up to their statistics, so it
lives here once:

- batches through the training collator (`EhrPrsCollator`: right padding, the most recent
  `max_length` tokens, the scores carried when the rows have them);
- a group of tokens (a code family, an outcome's codes) is *at risk* at position t (which predicts
  token t + 1) from the end of the static prefix (the first AGE/ or TIME/ token: static facts are
  never events) until the group's first occurrence after it, or the row's last token;
- P(token t + 1 is in the group) from log-sum-exps of the logits: a float32 softmax underflows to
  0 for a token below ~1e-45, and a probability of 0 is an infinite surprise to a Poisson fit.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ehr_prs.collator import EhrPrsCollator

START_PREFIXES = ("AGE/", "TIME/")  # the tokens that end the static prefix


def start_tokens(tokens: list[str]) -> np.ndarray:
    """(vocab,) bool: the tokens that end the static prefix (age and time tokens)."""
    return np.array([t.startswith(START_PREFIXES) for t in tokens])


def pooled_states(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(b, s, d) running mean of the final hidden states over the real tokens up to each position.

    hidden: (b, s, d) final (normed) states; mask: (b, s) 1 for real tokens. Padded positions
    repeat the mean so far (a left-padded row's pads give 0 until its first token).
    """
    m = mask.to(hidden.dtype)[..., None]  # (b, s, 1)
    return torch.cumsum(hidden * m, dim=1) / torch.cumsum(m, dim=1).clamp(min=1.0)


def group_log_probs(logits: torch.Tensor, columns: torch.Tensor, column_group: torch.Tensor,
                    n_groups: int) -> torch.Tensor:
    """(b, w, G) log of the next-token probability mass on each group of tokens.

    logits: (b, w, vocab); columns: (C,) the token ids that belong to a group; column_group: (C,)
    their group. A log-sum-exp per group minus the log-sum-exp over the vocabulary, each shifted by
    its maximum, so nothing underflows however small a group's probability (a group with no token
    gets -inf).
    """
    b, w, _ = logits.shape
    logits = logits if logits.dtype == torch.float64 else logits.float()  # bf16 logits: summed in float32
    total = torch.logsumexp(logits, dim=-1, keepdim=True)  # (b, w, 1)
    x = logits[..., columns]  # (b, w, C)
    top = x.new_full((b, w, n_groups), -torch.inf).scatter_reduce_(2, column_group.expand(b, w, -1), x, reduce="amax")
    shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # (b, w, G): an empty group stays -inf
    mass = x.new_zeros(b, w, n_groups).index_add_(2, column_group, (x - shift[..., column_group]).exp())
    return shift + mass.log() - total


@dataclass
class AtRiskBatch:
    """One batch of the pass: which rows, and for each group what the frozen model expected and what came."""

    index: np.ndarray  # (b,) positions of the batch's rows in the split that was passed
    input_ids: torch.Tensor  # (b, w) right padded
    length: torch.Tensor  # (b,) real tokens per row
    start: torch.Tensor  # (b,) position of the row's first AGE/ or TIME/ token (the static prefix ends there); 1: none
    first: torch.Tensor  # (b, G) position of each group's first token from `start` on; `length` if none
    log_p: torch.Tensor  # (b, w, G) log P(token t + 1 is in group g | tokens 0..t); float32 (a float64 model: float64)
    summary: torch.Tensor | None = None  # (b, w, d) mean final hidden state over tokens 0..t

    @property
    def occurs(self) -> torch.Tensor:
        """(b, G) bool: the group first occurs after the static prefix."""
        return self.first < self.length[:, None]

    def at_risk(self) -> torch.Tensor:
        """(b, w, G) bool: position t predicts a token from `start` on, and g has not occurred up to t.

        From t = start - 1 up to the position before g's first occurrence, or to the row's last token - 1.
        """
        pos = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)[None, :, None]  # (1, w, 1)
        return ((pos >= self.start[:, None, None] - 1) & (pos < self.first[:, None, :])
                & (pos < self.length[:, None, None] - 1))

    def events(self) -> torch.Tensor:
        """(b, w, G) bool: position t predicts g's first occurrence (always a position at risk)."""
        pos = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)[None, :, None]  # (1, w, 1)
        return (pos + 1 == self.first[:, None, :]) & self.occurs[:, None, :]


@torch.no_grad()
def at_risk_pass(model, rows, token_group: np.ndarray, n_groups: int, start_token: np.ndarray, *,
                 batch_size: int = 16, max_length: int | None = None, with_prs: bool = True,
                 with_summary: bool = False, desc: str = "at risk") -> Iterator[AtRiskBatch]:
    """The batches of one forward pass of the frozen `model` over a tokenized split.

    rows: a `datasets.Dataset` with `input_ids` (and `prs`/`prs_mask`, `length` when present), in
    batches of similar length (a stable sort, so a seed downstream sees the same batches every
    time); token_group: (vocab,) each token's group (-1: none); start_token: (vocab,) bool, the
    tokens that end the static prefix; max_length: keep each row's last `max_length` tokens;
    with_prs: feed the rows' scores to the model (False: the backbone's expectation, whatever
    adapter the model has); with_summary: also the running mean of the final hidden states.
    """
    device = next(model.parameters()).device
    model.eval()
    group = torch.as_tensor(np.asarray(token_group), dtype=torch.long, device=device)  # (vocab,)
    columns = (group >= 0).nonzero().squeeze(1)  # (C,)
    column_group = group[columns]  # (C,)
    starts = torch.as_tensor(np.asarray(start_token), dtype=torch.bool, device=device)  # (vocab,)
    lengths = (np.asarray(rows["length"]) if "length" in rows.column_names
               else np.array([len(x) for x in rows["input_ids"]]))
    order = np.argsort(lengths, kind="stable")  # similar lengths together: little padding
    collate = EhrPrsCollator(pad_token_id=model.config.pad_token_id or 0, max_length=max_length, with_labels=False)
    for lo in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        index = order[lo:lo + batch_size]
        batch = {k: v.to(device) for k, v in collate(list(rows.select(index))).items()}
        if not with_prs:
            for key in ("prs", "prs_mask"):
                batch.pop(key, None)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        out = model(**batch, output_hidden_states=with_summary)
        b, width = ids.shape
        pos = torch.arange(width, device=device)
        length = mask.sum(1)  # (b,)
        is_start = starts[ids] & mask.bool()
        start = torch.where(is_start.any(1), is_start.float().argmax(1), torch.ones_like(length))  # (b,)
        tok_group = group[ids]  # (b, w)
        counted = (pos[None] >= start[:, None]) & mask.bool() & (tok_group >= 0)  # group tokens after the prefix
        first = length[:, None].repeat(1, n_groups + 1)  # (b, G + 1); the last column takes every other token
        first.scatter_reduce_(1, torch.where(counted, tok_group, n_groups), pos.expand(b, width), reduce="amin")
        yield AtRiskBatch(
            index=index, input_ids=ids, length=length, start=start, first=first[:, :n_groups],
            log_p=group_log_probs(out.logits, columns, column_group, n_groups),
            summary=pooled_states(out.hidden_states[-1].float(), mask) if with_summary else None,
        )


__all__ = ["AtRiskBatch", "at_risk_pass", "group_log_probs", "pooled_states", "start_tokens", "START_PREFIXES"]
