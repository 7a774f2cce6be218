"""The risk engine's sampling route: sample futures from the causal LM, read the probability of target codes.

    ehr-prs risk --model runs/ehr_prefix --meds runs/cohort/meds --prs runs/cohort/prs.parquet \
        --labels runs/cohort/labels/t2d.parquet --codes 'ICD10CM/E11*' --horizon-days 730 \
        --method path --samples 16 --out runs/pred/t2d_prefix.parquet

For each label row the prompt is the subject's history up to `prediction_time` (built by
`tokenizer.inputs_at_prediction_times`, the one place that enforces no leakage). K futures are
sampled per prompt, batched across subjects, with a KV cache: the prompt is encoded once per
subject and its K paths read that one copy (ehr_prs.risk.shared_prompt). A path stops when the days
of its *generated* time tokens pass the horizon (the prompt's own time tokens never count), at
end-of-record or death, or after `max_new_tokens`. Tokens are drawn by inverse CDF from random
numbers fixed by (--seed, label row): two models scored on the same labels share them (common
random numbers), so a paired difference between them is not buried in sampling noise.

Three estimators of P(target code within the horizon), all from the raw next-token distribution
(never a top-k / top-p / temperature-warped one):

- `mc`:       sample from the raw distribution; a path scores 1 if it emits a target code.
- `path`:     the paper's: along a raw-sampled path, h_t = probability mass on the target codes
              at step t; the path scores 1 - prod_t (1 - h_t). Lower variance than `mc`, but it is
              not unbiased: the path keeps running after a target code would have happened.
- `survival`: sample with the target codes masked out and weight the path by prod_t (1 - h_t):
              an unbiased importance-sampling estimate of P(no event), so 1 - mean is unbiased
              for the risk, with far less variance than `mc` at the same K.

Control variates (on by default, any estimator): a path's value varies with what it happened to
sample, most of all with how fast its clock ran (a two-year time token ends a path with few
visits). For each token x, M_x = (times x was sampled) - (sum over steps of its sampling
probability) has mean zero along any path, whatever the model, so value - M . beta is still
unbiased for any fixed beta. beta is a ridge regression of the paths' within-row deviations on
theirs, cross-fitted: rows are split in two halves by index and each half is corrected with the
beta fitted on the other, so no row's own paths choose its correction. On the demo's T2D rows at
K = 4 this cuts the per-row variance by a third (1,200 rows) to a half (all 3,149 rows)
(`RiskScores.variance_reduction`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ehr_prs.errors import InputError
from ehr_prs.fits.at_risk import pooled_states
from ehr_prs.risk import SAMPLING_METHODS
from ehr_prs.risk.shared_prompt import share_prompts

DEATH_CODE = "MEDS_DEATH"  # a path that samples it ends (with end-of-record)


@dataclass
class RiskScores:
    """Per label row: the risk estimate, its Monte Carlo standard error and per-path values."""

    probability: np.ndarray  # (rows,)
    stderr: np.ndarray  # (rows,) standard error of the mean over the K paths
    path_values: np.ndarray  # (rows, K): each path's own estimate of the risk (control-variate corrected
    # when on: still unbiased, but a single value can leave [0, 1] by a little)
    truncated_paths: int  # paths that hit max_new_tokens before the horizon
    generated_tokens: int
    variance_reduction: float = 0.0  # 1 - (per-row path variance with control variates) / (without); 0 if off


# Control variates: token ids fold into at most this many features (id % CV_MAX_FEATURES), so the
# per-path features stay rows x K x 512 floats whatever the vocabulary; a sum of martingale
# increments is one too, so folding keeps the estimate unbiased (it only makes it less effective).
CV_MAX_FEATURES = 512
CV_RIDGE = 10.0  # ridge penalty on the (unstandardised, count-scale) features
CV_MIN_PATHS_PER_FEATURE = 2  # fewer fitting paths than this per feature: no correction


@dataclass
class SampledPaths:
    """What sampling K paths per row gives before anything couples the rows: per-path values and
    control-variate features, and the run's counts. Rows are scored independently (each from its own
    random numbers), so these can be computed in parts (ehr_prs.sharded) and stacked in row order."""

    values: np.ndarray  # (rows, K) float64: each path's uncorrected estimate of the risk
    features: np.ndarray | None  # (rows, K, F) float32 martingale increments (None: control variates off or K = 1)
    truncated_paths: int
    generated_tokens: int


@torch.no_grad()
def sample_risk(
    model,
    prompts: list[list[int]],
    target_ids: list[int],
    token_days: torch.Tensor,
    horizon_days: float,
    method: str = "path",
    samples: int = 16,
    prs: torch.Tensor | None = None,
    prs_mask: torch.Tensor | None = None,
    stop_ids: list[int] | tuple[int, ...] = (),
    pad_token_id: int = 0,
    max_new_tokens: int = 256,
    paths_per_batch: int = 256,
    seed: int = 0,
    progress: bool = True,
    control_variates: bool = True,
    incidence_refit: tuple[torch.Tensor, float] | None = None,
) -> RiskScores:
    """Risk of any `target_ids` token within `horizon_days` of generated time, for each prompt.

    prompts: token-id lists (one per label row); token_days: (vocab,) days each token advances the
    clock (0 for non-time tokens); prs (rows, n_prs) and prs_mask (rows,) when the model reads PRS.
    control_variates: correct each path by its tokens' martingale increments (module docstring);
    needs K >= 2 and enough paths to fit, else the plain average is returned.
    incidence_refit: (w (hidden_size,), b) from `ehr-prs incidence-refit`: each row's target logits are
    shifted by b + w . (mean final hidden state of its prompt) at every step (ehr_prs.fits.incidence).
    The two steps, sample_paths (row by row) then risk_scores (across rows), are public so that the
    rows can be sampled in parts by several processes and finished once (`ehr-prs risk` does).
    """
    paths = sample_paths(model, prompts, target_ids, token_days, horizon_days, method, samples, prs, prs_mask,
                         stop_ids, pad_token_id, max_new_tokens, paths_per_batch, seed, progress, control_variates,
                         incidence_refit)
    return risk_scores(paths)


@torch.no_grad()
def sample_paths(
    model,
    prompts: list[list[int]],
    target_ids: list[int],
    token_days: torch.Tensor,
    horizon_days: float,
    method: str = "path",
    samples: int = 16,
    prs: torch.Tensor | None = None,
    prs_mask: torch.Tensor | None = None,
    stop_ids: list[int] | tuple[int, ...] = (),
    pad_token_id: int = 0,
    max_new_tokens: int = 256,
    paths_per_batch: int = 256,
    seed: int = 0,
    progress: bool = True,
    control_variates: bool = True,
    incidence_refit: tuple[torch.Tensor, float] | None = None,
    row_ids: np.ndarray | None = None,
    on_rows=None,
) -> SampledPaths:
    """K sampled paths per prompt, uncorrected (sample_risk's arguments; see there), in prompt order.

    row_ids (rows,): the label-row index whose random numbers (seed, row) each prompt uses; default
    0..rows-1. A part of the rows scored on its own with their row ids gives exactly the values the
    whole run gives them, when its batches are the whole run's batches (same prompts together).
    on_rows(n): called after each batch with its row count (a progress bar outside).
    """
    if method not in SAMPLING_METHODS:
        hazard = " (hazard is not sampled: ehr_prs.risk.hazard.hazard_risk)" if method == "hazard" else ""
        raise InputError(f"--method {method!r}: choose one of {', '.join(SAMPLING_METHODS)}{hazard}")
    if horizon_days <= 0:
        raise InputError(f"--horizon-days must be > 0, got {horizon_days}")
    if not target_ids:
        raise InputError("no target token ids to score")
    device = next(model.parameters()).device
    rows, k = len(prompts), samples
    row_ids = np.arange(rows) if row_ids is None else np.asarray(row_ids, dtype=np.int64)
    values = np.zeros((rows, k), dtype=np.float64)
    vocab = int(token_days.shape[0])
    n_features = min(vocab, CV_MAX_FEATURES)
    features = np.zeros((rows, k, n_features), dtype=np.float32) if control_variates and k > 1 else None
    truncated = generated = 0
    target = torch.tensor(sorted(set(target_ids)), device=device)
    stops = torch.tensor(sorted(set(stop_ids)), device=device, dtype=torch.long)
    token_days = token_days.to(device=device, dtype=torch.float32)

    # Similar lengths together keep left padding small; results go back to the input order.
    order = np.argsort([len(p) for p in prompts], kind="stable")
    per_batch = max(1, paths_per_batch // k)
    bar = tqdm(total=rows, desc=f"risk ({method}, K={k})", unit="row", disable=not progress)
    for start in range(0, rows, per_batch):
        idx = order[start : start + per_batch]
        # (b * k, steps, 2): each row's own stream, by its label-row index
        uniforms = torch.from_numpy(path_uniforms(seed, row_ids[idx], k, max_new_tokens)).to(device)
        batch_values, batch_features, batch_truncated, batch_generated = _sample_batch(
            model, [prompts[i] for i in idx], target, stops, token_days, horizon_days, method, k,
            None if prs is None else prs[idx].to(device), None if prs_mask is None else prs_mask[idx].to(device),
            pad_token_id, max_new_tokens, uniforms, device, n_features if features is not None else 0,
            incidence_refit,
        )
        values[idx] = batch_values
        if features is not None:
            features[idx] = batch_features
        truncated += batch_truncated
        generated += batch_generated
        bar.update(len(idx))
        if on_rows is not None:
            on_rows(len(idx))
    bar.close()
    return SampledPaths(values, features, truncated, generated)


def risk_scores(paths: SampledPaths) -> RiskScores:
    """Per-row risk and standard error from all rows' paths: the control-variate correction (fitted
    across rows, cross-fitted by row index) when features are there, then the mean over the K paths."""
    values, k = paths.values, paths.values.shape[1]
    reduction = 0.0
    if paths.features is not None:
        values, reduction = control_variate_correction(values, paths.features)
    # A corrected row mean can leave [0, 1] by a hair; a probability may not.
    probability = values.mean(axis=1).clip(0.0, 1.0)
    stderr = values.std(axis=1, ddof=1) / math.sqrt(k) if k > 1 else np.full(values.shape[0], np.nan)
    return RiskScores(probability, stderr, values, paths.truncated_paths, paths.generated_tokens, reduction)


def control_variate_correction(values: np.ndarray, features: np.ndarray, ridge: float = CV_RIDGE,
                               min_paths_per_feature: float = CV_MIN_PATHS_PER_FEATURE) -> tuple[np.ndarray, float]:
    """Path values (rows, K) minus features (rows, K, F) @ beta, beta cross-fitted on the other half of the rows.

    The features are zero-mean martingales under the sampling distribution, so any beta that does not
    depend on a row's own paths leaves that row's mean unbiased. Returns the corrected values and the
    fraction of within-row variance removed (0 with the values unchanged when there is too little to fit).
    """
    rows, k, n_features = features.shape
    half = np.arange(rows) % 2  # which half a row is in: its index, nothing the paths drew
    if k < 2 or min((half == h).sum() for h in (0, 1)) * k < min_paths_per_feature * n_features:
        return values, 0.0
    centred_v = values - values.mean(axis=1, keepdims=True)  # (rows, K): per-row means differ; beta must not see them
    centred_f = (features - features.mean(axis=1, keepdims=True)).astype(np.float64)  # (rows, K, F)
    corrected = values.copy()
    for h in (0, 1):
        fit, apply = half != h, half == h
        x = centred_f[fit].reshape(-1, n_features)  # (paths, F)
        t = centred_v[fit].reshape(-1)
        beta = np.linalg.solve(x.T @ x + ridge * np.eye(n_features), x.T @ t)  # (F,)
        corrected[apply] = values[apply] - features[apply].astype(np.float64) @ beta
    before = values.var(axis=1, ddof=1).mean()
    after = corrected.var(axis=1, ddof=1).mean()
    return corrected, float(1.0 - after / before) if before > 0 else 0.0


def path_uniforms(seed: int, rows: np.ndarray, k: int, steps: int) -> np.ndarray:
    """(len(rows) * k, steps, 2) uniforms in (0, 1]: [r * k + j, t] drives step t of path j of row rows[r].

    Each label row draws from its own stream, seeded by (seed, row index), so its paths do not
    depend on batching, and two models scored on the same labels with the same --seed use the
    same numbers: common random numbers, which keep their sampled paths together wherever the
    two next-token distributions agree and take most of the sampling noise out of a paired
    comparison (ΔAUROC of an EHR+PRS model against its EHR-only base). Two numbers per step:
    see coupled_sample.
    """
    out = np.empty((len(rows) * k, steps, 2), dtype=np.float64)
    for r, row in enumerate(rows):
        out[r * k:(r + 1) * k] = 1.0 - np.random.default_rng([seed, int(row)]).random((k, steps, 2))
    return out


def inverse_cdf_sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token ids (rows,) from probs (rows, vocab) by inverse CDF at u (rows,) in (0, 1].

    The same u picks the same token under two close distributions, which is what couples the
    paths of two models (see path_uniforms); zero-probability tokens are never picked.
    """
    cdf = probs.double().cumsum(dim=-1)  # (rows, vocab)
    x = (u * cdf[:, -1]).unsqueeze(1)  # (rows, 1): in (0, total]
    return torch.searchsorted(cdf, x).squeeze(1).clamp(max=probs.shape[-1] - 1)


def coupled_sample(probs: torch.Tensor, is_target: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token ids (rows,) from probs (rows, vocab) in two draws: a target token or not (u[:, 0] against
    the target mass h), then which token of that group (inverse CDF at u[:, 1]).

    Same distribution as one inverse-CDF draw, but a better coupling for the question asked: two
    models that differ in how likely the target is (a genetic effect on T2D codes) then differ in a
    path only when u[:, 0] falls between their two h, and otherwise pick the same non-target token.
    With one draw over the whole vocabulary, moving the target's mass moves the CDF boundary of
    every token after it, and the paths part within a few steps.
    """
    p = probs.double()  # (rows, vocab)
    p_target, p_other = p * is_target, p * ~is_target
    h = p_target.sum(-1) / p.sum(-1)  # (rows,)
    hit = u[:, 0] <= h  # P(hit) = h for u in (0, 1]
    return torch.where(hit, inverse_cdf_sample(p_target, u[:, 1]), inverse_cdf_sample(p_other, u[:, 1]))


def _left_pad(prompts: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)  # (b, s)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (b, s)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _sample_batch(model, prompts, target, stops, token_days, horizon, method, k, prs, prs_mask,
                  pad_token_id, max_new_tokens, uniforms, device, n_features=0, incidence_refit=None):
    """Sample k paths for each of b prompts; returns (b, k) path values, (b, k, n_features) control-variate
    features (None if n_features is 0), truncated and generated counts."""
    ids, mask = _left_pad(prompts, pad_token_id, device)  # (b, s)
    b = ids.shape[0]
    out = model(input_ids=ids, attention_mask=mask, prs=prs, prs_mask=prs_mask, use_cache=True, logits_to_keep=1,
                output_hidden_states=incidence_refit is not None)
    cache = out.cache
    shift = None  # (b * k,) per path: the incidence refit's log rate ratio of the targets, from its prompt
    if incidence_refit is not None:
        w, bias = incidence_refit
        summary = pooled_states(out.hidden_states[-1].float(), mask)[:, -1]  # (b, d): left padded, last = whole prompt
        shift = (bias + summary @ w.to(device=device, dtype=torch.float32)).repeat_interleave(k)
    # Encode each prompt once; its K paths share that one copy (prefix positions are always valid).
    prefix = cache.get_seq_length() - ids.shape[1]
    key_valid = torch.cat([mask.new_ones(b, prefix), mask], dim=1).bool()  # (b, prefix + s)
    # Most paths end long before max_new_tokens (47 tokens on average for 2 years in the demo):
    # start the generated-token buffers small; they double when full.
    share_prompts(cache, model.config.num_hidden_layers, key_valid, k, min(max_new_tokens + 1, 64))
    logits = out.logits[:, -1].float().repeat_interleave(k, dim=0)  # (n, vocab), n = b * k
    # Event position of each row's next token (positions count real tokens only, as the model does);
    # passing them spares the model a padding mask over the whole history at every step.
    position = mask.sum(dim=1).repeat_interleave(k)  # (n,)
    n = b * k
    live = torch.arange(n, device=device)  # global path index of each row in the cache
    alive = torch.ones(n, dtype=torch.bool, device=device)  # row still sampling (finished rows wait for compaction)
    elapsed = torch.zeros(n, device=device)  # generated days so far, per cache row
    log_survival = torch.zeros(n, dtype=torch.float64, device=device)  # sum log(1 - h_t), per path
    event = torch.zeros(n, dtype=torch.bool, device=device)
    is_target = torch.zeros(logits.shape[-1], dtype=torch.bool, device=device)
    is_target[target] = True
    if n_features:  # per path, per token bucket: times sampled - sum of sampling probabilities
        increments = torch.zeros(n, n_features, dtype=torch.float64, device=device)
        bucket = torch.arange(logits.shape[-1], device=device) % n_features  # (vocab,)
    generated = 0
    for step in range(max_new_tokens):
        if shift is not None:
            logits[:, target] += shift[live][:, None]
        logp = torch.log_softmax(logits, dim=-1)  # raw next-token distribution, (rows, vocab)
        if method in ("path", "survival"):
            h = torch.logsumexp(logp[:, target], dim=-1).exp().clamp(max=1 - 1e-12)  # (rows,)
            log_survival[live[alive]] += torch.log1p(-h[alive].double())
        if method == "survival":
            logp = logp.index_fill(1, target, float("-inf"))  # sample the no-event world
        probs = logp.exp()  # what the path samples from (targets masked for survival), (rows, vocab)
        next_ids = coupled_sample(probs, is_target, uniforms[live, step])  # (rows,)
        if n_features:
            q = probs.double()
            q = q / q.sum(dim=-1, keepdim=True)  # (rows, vocab): the sampling distribution
            if n_features < q.shape[-1]:
                q = q.new_zeros(q.shape[0], n_features).index_add_(1, bucket, q)
            step_increment = -q  # (rows, n_features)
            step_increment[torch.arange(q.shape[0], device=device), bucket[next_ids]] += 1.0
            increments[live[alive]] += step_increment[alive]
        generated += int(alive.sum())
        elapsed = elapsed + token_days[next_ids]
        finished = elapsed > horizon
        if stops.numel():
            finished |= torch.isin(next_ids, stops)
        if method == "mc":
            hit = torch.isin(next_ids, target) & alive
            event[live[hit]] = True
            finished |= hit
        alive &= ~finished
        n_alive = int(alive.sum())
        if n_alive == 0:
            break
        # Copying the generated cache costs about a step: compact only once a quarter of the rows are done.
        if n_alive <= 0.75 * live.numel():
            keep = alive.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            live, alive, elapsed, position, next_ids = (live[keep], alive[keep], elapsed[keep], position[keep],
                                                        next_ids[keep])
        out = model(input_ids=next_ids[:, None], position_ids=position[:, None], cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[:, -1].float()
        position = position + 1
    truncated = int(alive.sum())
    # mc: the event indicator. path and survival: 1 - prod(1 - h_t); for survival (sampled with the
    # targets masked) that is each path's unbiased importance-weighted estimate of the risk.
    values = event.double() if method == "mc" else 1.0 - log_survival.exp()
    features = increments.view(b, k, n_features).float().cpu().numpy() if n_features else None
    return values.view(b, k).cpu().numpy(), features, truncated, generated
