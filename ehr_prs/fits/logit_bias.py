"""Fit the `logit_bias` genomic adapter in closed form on a frozen causal LM (`ehr-prs fit-logit-bias`).

    ehr-prs fit-logit-bias --model runs/ehr_only --data runs/tok --output-dir runs/ehr_logit_bias

The command's flags are in ehr_prs/fits/logit_bias_command.py; the folder is written by the
pretraining recipe's writer (ehr_prs.recipes.train.write_logit_bias_fit). `ehr-prs pretrain
--init-from M --freeze-backbone --prs-fusion logit_bias` is its deprecated alias.

Why not gradient steps: a person's genetic liability for a disease shows in one token of their
record (the disease's first code) among hundreds, so language-model gradients carry almost none
of it: on the demo cohort, 300 adapter steps learned 1/30 to 1/100 of the simulated T2D effect
(docs/experiments/2026-11-30-demo.md). With the backbone frozen, the adapter's job is a regression that can be
solved directly from one forward pass over the training split:

1. `incidence_stats` (the at-risk pass of ehr_prs/fits/at_risk.py, which the incidence refit shares):
   for each genotyped sequence i and code family f (a MEDS code up to its first '.', so
   ICD10CM/E11.9 and ICD10CM/E11.65 are one disease, whichever subcode records it first),
   n[i, f] = 1 if the family first occurs after the static prefix, and E[i, f] = the frozen
   model's next-token probability of the family summed over the positions up to that first
   occurrence (or over the whole sequence): the expected number of first occurrences.
2. `fit_poisson_low_rank`: Poisson regression of n on the standardised scores S with offset
   log E and a per-family intercept (dropped afterwards: see the function), all families at
   once, W = A @ B (families x r, r x n_prs), penalty lam/2 (|A|^2 + |B|^2)
   (that is lam x the nuclear norm of W: a few genetic liabilities shared across codes; the
   per-family ridge alternative overfits: on the demo its tuning log-likelihood fell below
   W = 0). exp(W[f] . s) is then the rate ratio of a first f for scores s, given the history.
3. lam is chosen on the tuning split's log-likelihood gain over W = 0; with no gain anywhere the
   adapter stays at 0 (the EHR-only model) and the report says so.
3b. `refit_per_family`: the liabilities S B^T kept, each family's loadings are refitted with
   the ridge penalty that suits it best on the tuning split (0 where none gains), so a strong
   effect (T2D) is not shrunk as much as the noise of a hundred families without one needs.
4. Every token of family f gets `up[token] = A[f]`, `down = B`: the model's logit shift for
   token v is W[family(v)] . prs. Families seen first in fewer than `min_subjects` genotyped
   training subjects are not fitted (the All of Us dissemination rule) and get 0.

The per-sequence statistics are dense (sequences x families) arrays: fine for tens of thousands
of subjects and a few thousand families; beyond that fit on a sample of the training split.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from ehr_prs.fits.at_risk import at_risk_pass, start_tokens
from ehr_prs.privacy import MIN_SUBJECTS

FAMILY_SEPARATOR = "."
LAMBDA_FRACTIONS = (0.4, 0.2, 0.1, 0.05, 0.025)  # lam = fraction x genotyped training sequences
REFIT_FRACTIONS = (0.2, 0.1, 0.05, 0.02, 0.01, 0.005)  # stage 2's per-family ridge penalties, same units


def code_families(tokens: list[str], is_code) -> tuple[np.ndarray, list[str]]:
    """(vocab,) family index of each token (-1: not a MEDS code) and the family names, sorted."""
    names = sorted({t.split(FAMILY_SEPARATOR)[0] for t in tokens if is_code(t)})
    index = {name: i for i, name in enumerate(names)}
    family = np.array([index[t.split(FAMILY_SEPARATOR)[0]] if is_code(t) else -1 for t in tokens], dtype=np.int64)
    return family, names


def incidence_stats(model, rows, token_family: np.ndarray, n_families: int, start_token: np.ndarray,
                    batch_size: int = 16, max_length: int | None = None, desc: str = "stats"):
    """(S, n, E) for the genotyped rows of a tokenized split: scores (N, n_prs) and (N, F) arrays.

    `start_token` (vocab,) bool marks the tokens that end the static prefix (the age and time
    tokens): a family is at risk from the first of them on, so static facts never count as events.
    E is the backbone's: the model runs without the scores, so an adapter it already has (a refit
    of a logit-bias checkpoint) does not enter the offset it is fitted against.
    """
    rows = rows.select(np.flatnonzero(np.asarray(rows["prs_mask"], dtype=bool)))  # genotyped only
    S = np.asarray(rows["prs"], dtype=np.float32)
    n = np.zeros((len(rows), n_families), dtype=np.float32)
    E = np.zeros((len(rows), n_families), dtype=np.float32)
    for batch in at_risk_pass(model, rows, token_family, n_families, start_token, batch_size=batch_size,
                              max_length=max_length, with_prs=False, desc=desc):
        n[batch.index] = batch.occurs.float().cpu().numpy()
        # (b, F) expected first occurrences: the family's probability summed over the positions at risk
        E[batch.index] = (batch.log_p.exp() * batch.at_risk()).sum(1).cpu().numpy()
    return np.nan_to_num(S), n, E


ETA_CAP = 500.0  # exp(500) ~ 1e217: finite in float64


def poisson_nll(W: torch.Tensor, S: torch.Tensor, n: torch.Tensor, E: torch.Tensor,
                intercept: torch.Tensor | None = None) -> torch.Tensor:
    """(F,) Poisson negative log-likelihood per family of rates E * exp(intercept + S @ W.T), constants dropped."""
    eta = S @ W.T  # (N, F)
    if intercept is not None:
        eta = eta + intercept
    # An L-BFGS line search may try a step far out, where exp overflows to inf and the gradient to
    # NaN, which poisons the whole fit; capping eta far beyond any sensible log rate ratio keeps that
    # trial finite (and rejected) and changes nothing where the objective was finite before.
    eta = eta.clamp(max=ETA_CAP)
    return (E * torch.exp(eta) - n * eta).sum(0)


def fit_poisson_low_rank(S, n, E, rank: int, lam: float, init=None, seed: int = 0, max_iter: int = 2000):
    """(A (F, r), B (r, P), c (F,)) minimising the Poisson NLL of rates E exp(c + S (A B)^T) plus
    lam/2 (|A|^2 + |B|^2), by L-BFGS.

    The per-family intercept c is not penalised and not kept by the adapter: it absorbs how far the
    frozen model's expected counts are off on average, so that A B measures only how the rate
    changes with the scores (a 27 % miscalibrated offset would otherwise inflate |W|, because
    exp(W s) must then also carry the mean). Starting factors: `init` (A, B) for a warm start along
    a penalty path, else small random ones (A = B = 0 is a stationary point the fit never leaves).
    """
    S, n, E = (torch.as_tensor(x, dtype=torch.float64) for x in (S, n, E))
    gen = torch.Generator().manual_seed(seed)
    if init is not None and float((init[0] @ init[1]).abs().max()) > 1e-6:
        A, B = (torch.as_tensor(x, dtype=torch.float64).clone().contiguous() for x in init[:2])
    else:
        A = 0.01 * torch.randn(n.shape[1], rank, generator=gen, dtype=torch.float64)
        B = 0.01 * torch.randn(rank, S.shape[1], generator=gen, dtype=torch.float64)
    c = _intercept_only(n, E)
    penalty = lambda: 0.5 * lam * (A.pow(2).sum() + B.pow(2).sum())  # noqa: E731
    _minimise([A, B, c], lambda: poisson_nll(A @ B, S, n, E, c).sum() + penalty(), max_iter)
    return A.detach(), B.detach(), c.detach()


def _intercept_only(n: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
    """(F,) log of observed over expected first occurrences: the intercept-only fit, a starting point."""
    return torch.log((n.sum(0) + 0.5) / (E.sum(0) + 0.5))


def _minimise(params: list[torch.Tensor], objective, max_iter: int, restarts: int = 3) -> None:
    """Minimise objective() over params (in place) by L-BFGS with a strong-Wolfe line search.

    A line-search step can land on NaN (seen with torch 2.13 on a near-flat penalty path), which
    L-BFGS then never leaves: the parameters go back to the best finite point seen and the fit
    restarts there with a fresh curvature memory. A fit that never meets NaN runs exactly as before.
    """
    for p in params:
        p.requires_grad_(True)
    best: dict = {"loss": float("inf"), "params": [p.detach().clone() for p in params]}

    def closure():
        opt.zero_grad()
        loss = objective()
        value = float(loss.detach())
        if math.isfinite(value) and value < best["loss"] and all(bool(torch.isfinite(p).all()) for p in params):
            best["loss"], best["params"] = value, [p.detach().clone() for p in params]
        loss.backward()
        return loss

    for _ in range(restarts):
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                                history_size=50, line_search_fn="strong_wolfe")
        opt.step(closure)
        if all(bool(torch.isfinite(p).all()) for p in params):
            return
        with torch.no_grad():
            for p, b in zip(params, best["params"]):
                p.copy_(b)


def refit_per_family(S, n, E, B: torch.Tensor, tuning, fractions=REFIT_FRACTIONS, max_iter: int = 2000):
    """Stage 2: keep the liabilities Z = S B^T, refit each family's loadings with its own ridge penalty.

    One nuclear-norm penalty serves every family, so it is set by the many families without a
    genetic effect and shrinks the strong ones (on the demo: T2D's log rate ratio per SD of the
    true liability 0.36 at the chosen penalty, 0.47 here). Each family takes the penalty with the
    best tuning-split gain, or loadings 0 where none gains. Returns (A (F, r), gain (F,)).
    """
    S, n, E = (torch.as_tensor(x, dtype=torch.float64) for x in (S, n, E))
    Z, Zt = S @ B.T, tuning[0] @ B.T  # (N, r), (Nt, r)
    F, r = n.shape[1], B.shape[0]
    best_gain = torch.zeros(F, dtype=torch.float64)
    best_A = torch.zeros(F, r, dtype=torch.float64)
    for frac in fractions:
        lam = frac * len(S)
        A, c = torch.zeros(F, r, dtype=torch.float64), _intercept_only(n, E)
        _minimise([A, c], lambda: poisson_nll(A, Z, n, E, c).sum() + 0.5 * lam * A.pow(2).sum(), max_iter)
        A, c = A.detach(), c.detach()
        gain = poisson_nll(torch.zeros_like(A), Zt, *tuning[1:], c) - poisson_nll(A, Zt, *tuning[1:], c)  # (F,)
        better = gain > best_gain
        best_gain[better], best_A[better] = gain[better], A[better]
    return best_A, best_gain


def fit_logit_bias(model, tokenizer, train_rows, tuning_rows, *, min_subjects: int = MIN_SUBJECTS,
                   batch_size: int = 16, max_length: int | None = None, prs_columns: list[str] | None = None,
                   lambda_fractions: tuple[float, ...] = LAMBDA_FRACTIONS, seed: int = 0) -> dict:
    """Fit model.prs_logit_bias (in place) on the frozen decoder; returns the fit report (JSON-able)."""
    adapter = model.prs_logit_bias
    if adapter is None:
        raise ValueError("fit_logit_bias needs a model with prs_fusion='logit_bias'")
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    family, names = code_families(tokens, tokenizer._is_code)
    start_token = start_tokens(tokens)
    S, n, E = incidence_stats(model, train_rows, family, len(names), start_token, batch_size, max_length,
                              desc="logit_bias: train split")
    incident = n.sum(0)
    fitted = np.flatnonzero(incident >= min_subjects)
    report = {"method": "Poisson regression of each code family's first occurrence on the scores, offset by the "
                        "frozen model's expected count; W = A B, nuclear-norm penalty chosen on the tuning split, "
                        "then each family's loadings refitted with the ridge penalty best on that split",
              "genotyped_train_sequences": int(len(S)), "families_fitted": int(len(fitted)),
              "families_below_min_subjects": int(len(names) - len(fitted)), "min_subjects": min_subjects}
    if len(S) == 0 or len(fitted) == 0:
        report["chosen_lambda"] = None
        report["note"] = "no genotyped training sequence or no family with enough first occurrences: adapter left at 0"
        return report
    n_fit, E_fit = n[:, fitted], E[:, fitted]
    tuning = None
    if tuning_rows is not None and len(tuning_rows):
        St, nt, Et = incidence_stats(model, tuning_rows, family, len(names), start_token, batch_size, max_length,
                                     desc="logit_bias: tuning split")
        if len(St):
            tuning = tuple(torch.as_tensor(x, dtype=torch.float64) for x in (St, nt[:, fitted], Et[:, fitted]))
    rank = adapter.up.shape[1]
    path, best, init = [], None, None
    for frac in tqdm(sorted(lambda_fractions, reverse=True), desc="logit_bias: penalty path", unit="fit"):
        lam = frac * len(S)
        A, B, c = fit_poisson_low_rank(S, n_fit, E_fit, rank, lam, init=init, seed=seed)
        init = (A, B)
        W = A @ B
        step = {"lambda": round(lam, 3), "effective_rank": int((torch.linalg.svdvals(W) > 1e-3).sum())}
        if tuning is not None:  # what the scores add, both sides with the train split's intercepts
            gain = poisson_nll(torch.zeros_like(W), *tuning, c) - poisson_nll(W, *tuning, c)  # (F,)
            step["tuning_gain_nats"] = round(float(gain.sum()), 3)
            if best is None or step["tuning_gain_nats"] > best[0]["tuning_gain_nats"]:
                best = (step, A, B, gain)
        path.append(step)
    if tuning is None:  # nothing to choose with: the middle of the path, said so in the report
        step = path[len(path) // 2]
        A, B, _ = fit_poisson_low_rank(S, n_fit, E_fit, rank, step["lambda"], seed=seed)
        best = (step, A, B, None)
        report["note"] = "no tuning split: penalty not chosen on held-out data (middle of the path)"
    step, A, B, gain = best
    report["penalty_path"] = path
    if gain is not None and step["tuning_gain_nats"] <= 0:
        report["chosen_lambda"] = None
        report["note"] = ("no penalty improved the tuning split's likelihood over no genetic effect: adapter left "
                          "at 0 (the EHR-only model)")
        return report
    report["chosen_lambda"] = step["lambda"]
    if tuning is not None:
        A, gain = refit_per_family(S, n_fit, E_fit, B, tuning)
        report["families_with_an_effect"] = int((gain > 0).sum())
        report["refit_tuning_gain_nats"] = round(float(gain.sum()), 3)  # chosen on that split: optimistic
    with torch.no_grad():
        up = torch.zeros_like(adapter.up, dtype=torch.float64)  # (vocab, r)
        fam_row = np.full(len(names), -1)
        fam_row[fitted] = np.arange(len(fitted))
        tok_rows = np.where(family >= 0, fam_row[np.maximum(family, 0)], -1)
        has = torch.as_tensor(tok_rows >= 0)
        up[has] = A[torch.as_tensor(tok_rows[tok_rows >= 0])]
        adapter.up.copy_(up.to(adapter.up.dtype))
        adapter.down.weight.copy_(B.to(adapter.down.weight.dtype))
    W = (A @ B).numpy()
    columns = prs_columns or [f"prs_{j}" for j in range(S.shape[1])]
    order = [f for f in np.argsort(-gain.numpy()) if gain[f] > 0] if gain is not None else np.argsort(-np.abs(W).max(1))
    report["families"] = [
        {"family": names[fitted[f]], "incident_train_subjects": int(incident[fitted[f]]),
         "expected_by_backbone": round(float(E_fit[:, f].sum()), 1),
         "tuning_gain_nats": round(float(gain[f]), 3) if gain is not None else None,
         "rate_ratio_per_sd_of_top_scores": {columns[j]: round(math.exp(float(W[f, j])), 3)
                                             for j in np.argsort(-np.abs(W[f]))[:3]}}
        for f in order[:25]]
    return report


def describe(report: dict) -> str:
    """The fit's report in one line: what it fitted, the penalty path, the families with the largest gains."""
    gains = {p["lambda"]: p.get("tuning_gain_nats") for p in report.get("penalty_path", [])}
    top = [f"{f['family']} {f['tuning_gain_nats']}" for f in report.get("families", [])[:5]]
    return (f"logit_bias fitted in closed form on {report['genotyped_train_sequences']:,} genotyped sequences, "
            f"{report['families_fitted']} code families; tuning log-likelihood gain (nats) by penalty {gains}, "
            f"chosen {report['chosen_lambda']}; refitted per family: {report.get('families_with_an_effect')} "
            f"families with an effect, largest gains: {', '.join(top)}"
            + (f"; {report['note']}" if "note" in report else ""))


__all__ = ["code_families", "incidence_stats", "fit_poisson_low_rank", "refit_per_family", "poisson_nll",
           "fit_logit_bias", "describe"]
