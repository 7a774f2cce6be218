"""The one pass over the positions at risk that both frozen-backbone fits use (ehr_prs/fits/at_risk.py):
its probabilities against a float64 softmax, a probability that a float32 softmax loses, and its
positions and events against a direct count, as the incidence refit reads them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from datasets import Dataset

from ehr_prs.fits.at_risk import at_risk_pass, group_log_probs
from ehr_prs.fits.incidence import onset_statistics
from modeling_ehr_prs.configuration_ehr_prs import EhrPrsConfig
from modeling_ehr_prs.modeling_ehr_prs import EhrPrsForCausalLM

START = 20  # the age token that ends the static prefix
SEQS = [[1, 13, 20, 40, 11, 41, 10, 12, 42],  # group 0 first at 4 (token 11), group 1 at 7
        [1, 13, 20, 40, 41, 42],  # nothing after the prefix
        [1, 13, 20, 12, 43, 10, 44, 45, 46, 47, 48],  # group 1 at 3, group 0 at 5
        [1, 13, 10, 40, 11, 42, 12],  # no start token: the prefix is taken to end at position 1 (13 there counts)
        [1, 20, 10]]  # group 0 first at the last token


def _model(dtype=torch.float32) -> EhrPrsForCausalLM:
    torch.manual_seed(0)
    return EhrPrsForCausalLM(EhrPrsConfig.from_preset("tiny", prs_fusion="none")).eval().to(dtype)


def _groups(vocab: int) -> tuple[np.ndarray, np.ndarray]:
    group = np.full(vocab, -1)
    group[[10, 11]] = 0  # one code family of two codes (like ICD10CM/E11.9 and E11.65)
    group[12] = 1
    group[13] = 2  # a static code: only ever in the prefix, never at risk's end
    start = np.zeros(vocab, dtype=bool)
    start[START] = True
    return group, start


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-9), (torch.float32, 2e-6)])
def test_log_probabilities_equal_a_float64_softmax(dtype, rtol):
    """exp(log_p) of each group = the float64 softmax of the row's logits summed over the group's tokens,
    to 1e-9 for a float64 model (the log-sum-exp is exact) and to float32 rounding for a float32 one,
    though the rows are padded in batches and the reference sees each row alone."""
    model = _model(dtype)
    group, start = _groups(model.config.vocab_size)
    rows = Dataset.from_dict({"input_ids": SEQS})
    seen = []
    for batch in at_risk_pass(model, rows, group, 3, start, batch_size=2, desc="test"):
        assert batch.log_p.shape == (len(batch.index), batch.input_ids.shape[1], 3)
        for j, i in enumerate(batch.index):
            seq = SEQS[i]
            with torch.no_grad():
                p = torch.softmax(model(torch.tensor([seq])).logits[0].double(), -1)  # (len, vocab)
            ref = torch.stack([p[:, torch.as_tensor(group == g)].sum(-1) for g in range(3)], -1)  # (len, 3)
            got = batch.log_p[j, :len(seq)].double().exp()
            np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=rtol, atol=0)
            seen.append(int(i))
    assert sorted(seen) == list(range(len(SEQS)))


def test_a_probability_a_float32_softmax_loses_stays_finite_and_positive():
    logits = torch.zeros(1, 2, 8)  # (b, w, vocab): six tokens at logit 0
    logits[0, :, 3], logits[0, :, 4] = -120.0, -130.0  # e^-120 ~ 8e-53: below float32's smallest, 1.4e-45
    logits[0, 1, 5] = 30.0
    assert float(torch.softmax(logits, -1)[0, 0, 3]) == 0.0  # what the old float32 softmax gave
    log_p = group_log_probs(logits, torch.tensor([3, 4, 5]), torch.tensor([0, 0, 1]), 2)  # (1, 2, 2)
    assert torch.isfinite(log_p).all() and log_p.dtype == torch.float32
    rare = math.log(math.exp(-120) + math.exp(-130))
    exact = [[rare - math.log(6), -math.log(6)],
             [rare - math.log(5 + math.exp(30)), 30 - math.log(5 + math.exp(30))]]
    np.testing.assert_allclose(log_p[0].double().numpy(), exact, rtol=1e-6, atol=1e-6)
    assert float(log_p[0, 0, 0].double().exp()) == pytest.approx(math.exp(exact[0][0]), rel=1e-5)  # > 0 in float64
    # a group with no token in the vocabulary has probability 0, not NaN
    assert float(group_log_probs(logits, torch.tensor([3]), torch.tensor([0]), 2)[0, 0, 1]) == -math.inf


def _direct(seq: list[int], group: np.ndarray, g: int) -> tuple[list[int], int | None]:
    """Positions at risk of group g in one row, and the position that predicts its first occurrence."""
    s0 = seq.index(START) if START in seq else 1
    firsts = [t for t in range(s0, len(seq)) if group[seq[t]] == g]
    first = firsts[0] if firsts else len(seq)
    return [t for t in range(max(s0 - 1, 0), len(seq) - 1) if t < first], (first - 1 if firsts else None)


def test_positions_at_risk_and_events_match_a_direct_count():
    """From the position before the prefix ends to the one before the group's first occurrence (or the
    row's last but one); the event is that last position; a static code before the prefix's end never counts."""
    model = _model()
    group, start = _groups(model.config.vocab_size)
    rows = Dataset.from_dict({"input_ids": SEQS})
    for batch in at_risk_pass(model, rows, group, 3, start, batch_size=3, desc="test"):
        at_risk, events = batch.at_risk().numpy(), batch.events().numpy()  # (b, w, 3)
        for j, i in enumerate(batch.index):
            seq = SEQS[i]
            for g in range(3):
                positions, event = _direct(seq, group, g)
                assert np.flatnonzero(at_risk[j, :, g]).tolist() == positions, (i, g)
                assert np.flatnonzero(events[j, :, g]).tolist() == ([] if event is None else [event]), (i, g)
                assert bool(batch.occurs[j, g]) == (event is not None)

    # The incidence refit reads the same positions for one outcome (all of them kept: fraction 1).
    stats = onset_statistics(model, rows, [10, 11], start, negative_fraction=1.0, desc="test")
    y, p = [], []
    for i in np.argsort([len(s) for s in SEQS], kind="stable"):  # the pass's order: by length
        seq = SEQS[i]
        positions, event = _direct(seq, group, 0)
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor([seq])).logits[0].double(), -1)[:, [10, 11]].sum(-1)
        y += [1.0 if t == event else 0.0 for t in positions]
        p += [float(probs[t]) for t in positions]
    assert stats["y"].tolist() == y and stats["subjects"] == 4 and stats["s"].shape == (len(y), model.config.hidden_size)
    np.testing.assert_allclose(stats["p"], p, rtol=2e-6)
