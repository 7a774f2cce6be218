"""Zero-shot risk from the generative model: sample futures, read the probability of target codes.

    ehr-prs risk --model runs/ehr_prefix --meds runs/cohort/meds --prs runs/cohort/prs.parquet \
        --labels runs/cohort/labels/t2d.parquet --codes 'ICD10CM/E11*' --horizon-days 730 \
        --method path --samples 16 --out runs/pred/t2d_prefix.parquet

For each label row the prompt is the subject's history up to `prediction_time` (built by
`tokenizer.inputs_at_prediction_times`, the one place that enforces no leakage). K futures are
sampled per prompt, batched across subjects, with a KV cache: the prompt is encoded once per
subject and its K paths read that one copy (`_SharedPromptLayer`). A path stops when the days
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

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ehr_prs.errors import InputError, check_output
from ehr_prs.fits.incidence import load_incidence, pooled_states
from ehr_prs.data.readers import STRICT_LABELS_HELP

try:  # the cache layer class of transformers 5 (DynamicCache.layers)
    from transformers.cache_utils import DynamicLayer
except ImportError:  # pragma: no cover
    DynamicLayer = object

METHODS = ("path", "mc", "survival", "hazard")  # hazard: the TTE head, one forward pass (time_to_event.py)
DEATH_CODE = "MEDS_DEATH"


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
    """
    if method not in METHODS:
        raise InputError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if horizon_days <= 0:
        raise InputError(f"--horizon-days must be > 0, got {horizon_days}")
    if not target_ids:
        raise InputError("no target token ids to score")
    device = next(model.parameters()).device
    rows, k = len(prompts), samples
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
        uniforms = torch.from_numpy(path_uniforms(seed, idx, k, max_new_tokens)).to(device)  # (b * k, steps, 2)
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
    bar.close()
    reduction = 0.0
    if features is not None:
        values, reduction = control_variate_correction(values, features)
    # A corrected row mean can leave [0, 1] by a hair; a probability may not.
    probability = values.mean(axis=1).clip(0.0, 1.0)
    stderr = values.std(axis=1, ddof=1) / math.sqrt(k) if k > 1 else np.full(rows, np.nan)
    return RiskScores(probability, stderr, values, truncated, generated, reduction)


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


class _SharedPromptLayer(DynamicLayer):
    """A decoder cache layer for K sampled paths per prompt that stores each prompt only once.

    Repeating a prompt's keys/values for each of its K paths makes every decoding step read the
    prompt K times over: on a CPU that memory traffic, not arithmetic, bounds the step. Here the
    prompts' keys/values stay (p, g, s, hd), one copy each, and only generated tokens are stored
    per path, in a preallocated buffer written in place (no concatenation per step). The model
    asks the layer to `attend` (see EhrPrsAttention): the K queries of a prompt meet its keys in
    one matrix product, the path's own generated keys in another, and the two softmax parts are
    merged exactly through their log-sum-exp (as in flash-decoding / cascade attention).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, key_valid: torch.Tensor, k: int, room: int):
        super().__init__()
        p, g, s, hd = keys.shape
        # Keys stored transposed and contiguous: the per-step product reads them in this layout
        # (a quarter faster than through a transposed view on a CPU).
        self.prompt_keys_t, self.prompt_values = keys.transpose(-1, -2).contiguous(), values  # (p, g, hd, s), (p, g, s, hd)
        self.prompt_bias = torch.zeros(p, 1, 1, s, dtype=keys.dtype, device=keys.device)  # (p, 1, 1, s)
        self.prompt_bias.masked_fill_(~key_valid[:, None, None, :], float("-inf"))  # left padding
        self.k = k
        n = p * k
        self._k = keys.new_empty((n, g, room, hd))  # (rows, g, capacity, hd): generated tokens only
        self._v = values.new_empty((n, g, room, values.shape[-1]))
        self._len, self._prompt_len = 0, s
        self.row_prompt = torch.arange(n, device=keys.device) // k  # (rows,) which prompt a row samples from
        self.row_path = torch.arange(n, device=keys.device) % k  # (rows,) which of its K paths
        self._grid_rows = None  # (rows,) slot of each row in the (prompt, path) grid; None while identity
        self.device, self.is_initialized = keys.device, True
        self.keys = self.values = None  # nothing outside attend() reads them

    def update(self, key_states, value_states, *args, **kwargs):
        n = key_states.shape[-2]
        if self._len + n > self._k.shape[-2]:  # out of room: double the buffer
            self._k = torch.cat([self._k, torch.empty_like(self._k)], dim=-2)
            self._v = torch.cat([self._v, torch.empty_like(self._v)], dim=-2)
        self._k[:, :, self._len : self._len + n] = key_states
        self._v[:, :, self._len : self._len + n] = value_states
        self._len += n
        return None, None

    def attend(self, query: torch.Tensor) -> torch.Tensor:
        """Causal attention of one new token per row over prompt + generated keys: (n, h, 1, hd)."""
        n, h, q_len, hd = query.shape
        if q_len != 1:
            raise ValueError("the shared-prompt cache decodes one token per row at a time")
        p, g = self.prompt_keys_t.shape[:2]
        rep, k = h // g, self.k
        scale = hd ** -0.5
        q = query.view(n, g, rep, hd) * scale  # (n, g, rep, hd)
        # Prompt part: lay the rows out on a (prompt, path) grid, so each prompt's K paths (and the
        # query heads sharing a key head) form one (K * rep, hd) @ (hd, s) product.
        if self._grid_rows is None:  # rows are still the full grid, in order
            grid = q
        else:
            grid = q.new_zeros(p * k, g, rep, hd).index_copy_(0, self._grid_rows, q)
        grid = grid.view(p, k, g, rep, hd).transpose(1, 2).reshape(p, g, k * rep, hd)  # (p, g, K * rep, hd)
        s1 = grid @ self.prompt_keys_t + self.prompt_bias  # (p, g, K * rep, s)
        m1 = s1.amax(dim=-1, keepdim=True)  # (p, g, K * rep, 1)
        e1 = torch.exp(s1 - m1)
        part = torch.cat([e1 @ self.prompt_values, e1.sum(dim=-1, keepdim=True), m1], dim=-1)  # (p, g, K*rep, hd+2)
        part = part.view(p, g, k, rep, hd + 2).transpose(1, 2).reshape(p * k, g, rep, hd + 2)
        if self._grid_rows is not None:
            part = part.index_select(0, self._grid_rows)  # (n, g, rep, hd + 2): each row's own slot
        o1, l1, m1 = part[..., :hd], part[..., hd : hd + 1], part[..., hd + 1 :]
        # Generated part: each row's own tokens (all real: no padding after the prompt).
        gk, gv = self._k[:, :, : self._len], self._v[:, :, : self._len]  # (n, g, t, hd)
        s2 = q @ gk.transpose(-1, -2)  # (n, g, rep, t)
        m2 = s2.amax(dim=-1, keepdim=True)
        e2 = torch.exp(s2 - m2)
        l2 = e2.sum(dim=-1, keepdim=True)
        o2 = e2 @ gv  # (n, g, rep, hd)
        m = torch.maximum(m1, m2)
        a1, a2 = torch.exp(m1 - m), torch.exp(m2 - m)
        out = (o1 * a1 + o2 * a2) / (l1 * a1 + l2 * a2)  # (n, g, rep, hd)
        return out.reshape(n, h, 1, hd)

    def get_seq_length(self) -> int:
        return self._prompt_len + self._len

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("the shared-prompt layer is built for K paths already")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows `indices`; prompts none of whose paths are left are dropped too."""
        # Copy only the filled part (plus as much room again): the buffers were sized for the
        # longest path, and copying their empty tail made compaction a fifth of the sampling time.
        cap = min(self._k.shape[-2], 2 * self._len + 16)
        self._k = self._k[:, :, :cap].index_select(0, indices)
        self._v = self._v[:, :, :cap].index_select(0, indices)
        self.row_prompt, self.row_path = self.row_prompt[indices], self.row_path[indices]
        used = torch.unique(self.row_prompt)  # sorted
        if used.numel() < self.prompt_keys_t.shape[0]:
            self.prompt_keys_t, self.prompt_values = self.prompt_keys_t[used], self.prompt_values[used]
            self.prompt_bias = self.prompt_bias[used]
            self.row_prompt = torch.searchsorted(used, self.row_prompt)
        self._grid_rows = self.row_prompt * self.k + self.row_path

    reorder_cache = batch_select_indices


def _share_prompts(cache, n_decoder_layers: int, key_valid: torch.Tensor, k: int, room: int) -> None:
    """Turn a cache filled by encoding p prompts into one for p * k paths (row i samples prompt i // k).

    Decoder layers become shared-prompt layers; the layers after them (the cross-attention PRS
    memory, a few vectors per row) are simply repeated k times.
    """
    for i, layer in enumerate(cache.layers):
        if i < n_decoder_layers:
            cache.layers[i] = _SharedPromptLayer(layer.keys, layer.values, key_valid, k, room)
        else:
            layer.batch_repeat_interleave(k)


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
    _share_prompts(cache, model.config.num_hidden_layers, key_valid, k, min(max_new_tokens + 1, 64))
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


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="folder written by `ehr-prs pretrain`")
    parser.add_argument("--meds", required=True, help="MEDS dataset root (the prompts' histories)")
    parser.add_argument("--prs", help="PRS table (parquet/CSV); without it every subject counts as not genotyped")
    parser.add_argument("--labels", required=True, help="MEDS labels (subject_id, prediction_time, boolean_value)")
    parser.add_argument("--codes", nargs="+", required=True,
                        help="target codes; a code ending in * is a prefix (ICD10CM/E11*)")
    parser.add_argument("--horizon-days", type=float, required=True, help="risk window after prediction_time")
    parser.add_argument("--out", required=True, help="output parquet in the MEDS prediction schema")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out file (never an input, nor a file inside --model/--meds)")
    parser.add_argument("--split", default="held_out", help="which split's labels to score (default held_out)")
    parser.add_argument("--method", default="survival", choices=METHODS,
                        help="estimator (default survival: unbiased and calibrated, the one the README recommends; "
                             "path is the paper's, whose risks run high; mc the plain fraction of paths)")
    parser.add_argument("--samples", type=int, default=16, help="sampled futures per label row (K)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="cap on generated tokens per path")
    parser.add_argument("--paths-per-batch", type=int, default=256, help="paths sampled together (rows x K)")
    parser.add_argument("--seed", type=int, default=0,
                        help="sampling seed; label row i always gets the random numbers of (seed, i), so models "
                             "scored on the same labels with the same seed share them (paired comparisons)")
    parser.add_argument("--control-variates", action=argparse.BooleanOptionalAction, default=True,
                        help="correct each path by its tokens' zero-mean sampling increments (unbiased; about a "
                             "third less per-row variance on the demo's T2D rows at K=4); needs --samples >= 2")
    parser.add_argument("--limit", type=int, help="score only the first N label rows of the split")
    parser.add_argument("--strict-labels", action="store_true", help=STRICT_LABELS_HELP)
    parser.add_argument("--horizons", type=float, nargs="+", metavar="D",
                        help="--method hazard: also write the risk curve at these horizons (days) to OUT's "
                             "sibling OUT_STEM.curve.parquet (subject_id, prediction_time, horizon_days, probability)")
    parser.add_argument("--incidence-refit", metavar="FILE",
                        help="a refit of the target codes' onset rate on the history summary, written by "
                             "`ehr-prs incidence-refit` with the same --codes, for this model or the frozen "
                             "backbone its adapter continues (make demo shares one refit among four models)")


def curve_path_of(out: str | Path) -> Path:
    """Where --horizons writes the risk curve: OUT_STEM.curve.parquet beside --out."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".parquet") + ".curve.parquet")


def _write_hazard_risk(args, model, tokenizer, data, prompts, family_idx, prs_t, prs_mask_t) -> None:
    """--method hazard: risk at --horizon-days (and the --horizons curve) from the TTE head, one pass per row."""
    import polars as pl

    from ehr_prs.data.predictions import write_predictions
    from ehr_prs.errors import atomic_output_file
    from ehr_prs.time_to_event import hazard_risk

    horizons = [args.horizon_days, *[h for h in (args.horizons or []) if h != args.horizon_days]]
    if any(h <= 0 for h in horizons):
        raise InputError(f"--horizons must all be > 0 days, got {args.horizons}")
    risk = hazard_risk(model, prompts, family_idx, horizons, prs_t, prs_mask_t, tokenizer.pad_token_id)  # (rows, H)
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
        curve_path = curve_path_of(args.out)
        order = sorted(range(len(horizons)), key=lambda j: horizons[j])
        curve = pl.concat([keys.with_columns(pl.lit(horizons[j]).alias("horizon_days"),
                                             pl.Series("probability", risk[:, j])) for j in order])
        with atomic_output_file(curve_path, overwrite=args.overwrite, flag="--horizons curve") as tmp:
            curve.write_parquet(tmp)
        wrote.append(f"{curve_path} ({len(horizons)} horizons)")
    fams = ", ".join(model.config.tte_families[i] for i in family_idx)
    print(f"wrote {' and '.join(wrote)}: {frame.height} rows, method hazard (families {fams}), "
          f"mean risk {risk[:, 0].mean():.4f} at {args.horizon_days:g} days")


def run(args: argparse.Namespace) -> None:
    import polars as pl

    from ehr_prs.checkpoints import load_model_and_tokenizer
    from ehr_prs.data.predictions import write_predictions
    from ehr_prs.data.readers import read_labels, read_meds_dataset, read_prs_table, select_label_rows
    from ehr_prs.tokenizer import inputs_at_prediction_times
    from ehr_prs.tokenizer.prediction_inputs import warn_if_prs_not_given

    check_output(args.out, {"--model": args.model, "--meds": args.meds, "--prs": args.prs, "--labels": args.labels,
                            "--incidence-refit": args.incidence_refit}, args.overwrite, kind="file")
    if args.horizons:  # the curve file beside --out obeys the same rule, checked before any work
        check_output(curve_path_of(args.out), {"--model": args.model, "--meds": args.meds, "--prs": args.prs,
                                               "--labels": args.labels}, args.overwrite, flag="--horizons curve",
                     kind="file")
    if args.horizon_days <= 0:
        raise InputError(f"--horizon-days must be > 0, got {args.horizon_days}")
    if args.samples < 1:
        raise InputError(f"--samples must be >= 1, got {args.samples}")
    model, tokenizer, standardizer = load_model_and_tokenizer(args.model)
    target_ids = tokenizer.code_token_ids(args.codes)
    refit = None
    if args.incidence_refit:
        w, bias, tokens, _ = load_incidence(args.incidence_refit)
        wanted = tokenizer.convert_ids_to_tokens(sorted(target_ids))
        if set(tokens) != set(wanted):
            raise InputError(f"--incidence-refit {args.incidence_refit} was fitted for {len(tokens)} tokens "
                             f"({', '.join(tokens[:4])}{', ...' if len(tokens) > 4 else ''}) but --codes {args.codes} "
                             f"name {len(wanted)} ({', '.join(wanted[:4])}{', ...' if len(wanted) > 4 else ''}): "
                             "refit with the same --codes")
        if w.numel() != model.config.hidden_size:
            raise InputError(f"--incidence-refit {args.incidence_refit}: {w.numel()} weights, but {args.model} has "
                             f"hidden size {model.config.hidden_size}: it was fitted for another model")
        refit = (w, bias)
    meds = read_meds_dataset(args.meds)
    prs = read_prs_table(args.prs) if args.prs else None
    if prs is not None and standardizer is None:
        raise InputError(
            f"--prs was given but {args.model} has no prs_standardizer.json: the model was trained without "
            "PRS (drop --prs) or its folder is incomplete (copy the tokenizer's prs_standardizer.json into it)"
        )
    if model.config.n_prs and standardizer is not None and standardizer.n_prs != model.config.n_prs:
        raise InputError(f"{args.model}: PRS standardiser has {standardizer.n_prs} columns, model expects {model.config.n_prs}")
    if args.split not in meds.splits:
        raise InputError(f"--split {args.split!r}: {args.meds} has splits {meds.splits}")
    # The shared label policy: unscorable rows dropped with one warning (or refused with --strict-labels).
    selection = select_label_rows(meds, read_labels(args.labels), [args.split], args.labels, args.strict_labels)
    print(selection.summary())
    labels = selection.rows
    if args.limit:
        labels = labels.head(args.limit)
    warn_if_prs_not_given(model.config.n_prs if model.config.prs_fusion != "none" else 0, prs, args.model)
    if args.method == "hazard" and not model.config.has_tte_head:
        raise InputError(f"--method hazard needs a model with a time-to-event head, and {args.model} has none: "
                         "pretrain with --tte-families N, or use --method survival")
    if args.horizons and args.method != "hazard":
        raise InputError("--horizons needs --method hazard (the sampling methods score one horizon per run)")
    family_idx = None
    if args.method == "hazard":
        from ehr_prs.time_to_event import target_families

        family_idx = target_families(tokenizer, model.config.tte_families, args.codes)
    prefix = model.config.prs_tokens if model.config.prs_fusion == "prefix" else 0
    room = 0 if args.method == "hazard" else args.max_new_tokens  # hazard generates nothing
    max_prompt = max(16, model.config.max_position_embeddings - prefix - room)
    data = inputs_at_prediction_times(meds, labels, tokenizer, standardizer if prs is not None else None, prs,
                                      split=args.split, max_length=max_prompt)
    prompts = [list(x) for x in data["input_ids"]]
    prs_t = prs_mask_t = None
    if model.config.n_prs and prs is not None:  # widths were checked against the standardiser above
        prs_t = torch.tensor(np.asarray(data["prs"], dtype=np.float32))  # (rows, n_prs)
        prs_mask_t = torch.tensor(np.asarray(data["prs_mask"], dtype=bool))  # (rows,)
    # Without --prs (or for a model without an adapter) prs stays None: every row gets the
    # model's learned "no genotype" tokens.
    if args.method == "hazard":
        _write_hazard_risk(args, model, tokenizer, data, prompts, family_idx, prs_t, prs_mask_t)
        return
    stop_ids = [tokenizer.eos_token_id]
    if DEATH_CODE in tokenizer.get_vocab():
        stop_ids.append(tokenizer.get_vocab()[DEATH_CODE])
    scores = sample_risk(
        model, prompts, target_ids, torch.tensor(tokenizer.token_days), args.horizon_days, args.method,
        args.samples, prs_t, prs_mask_t, stop_ids, tokenizer.pad_token_id, args.max_new_tokens,
        args.paths_per_batch, args.seed, control_variates=args.control_variates, incidence_refit=refit,
    )
    frame = pl.DataFrame({
        "subject_id": np.asarray(data["subject_id"], dtype=np.int64),
        "prediction_time": data.with_format("arrow")["prediction_time"],
        "boolean_value": np.asarray(data["boolean_value"], dtype=bool),
        "predicted_boolean_probability": scores.probability,
    })
    # the one MEDS prediction schema every stage writes (a NaN probability is refused there)
    write_predictions(frame, args.out, args.overwrite, source=f"--model {args.model}")
    if scores.truncated_paths:
        print(f"note: {scores.truncated_paths} of {len(prompts) * args.samples} paths reached --max-new-tokens "
              f"{args.max_new_tokens} before the horizon (their risk counts only what they generated)", file=sys.stderr)
    cv = ""
    if args.control_variates:
        cv = (f", control variates removed {scores.variance_reduction:.0%} of the per-row variance"
              if scores.variance_reduction > 0 else
              ", control variates not applied (they need --samples >= 2 and about "
              f"{CV_MIN_PATHS_PER_FEATURE * min(len(tokenizer.token_days), CV_MAX_FEATURES) * 2} paths in all)")
    refit_note = f", incidence refit {args.incidence_refit}" if args.incidence_refit else ""
    # One path per row (K = 1) has no spread to estimate: say so rather than average nothing.
    finite = scores.stderr[np.isfinite(scores.stderr)]
    mc_stderr = f"{finite.mean():.4f}" if finite.size else "n/a (K = 1)"
    print(f"wrote {args.out}: {frame.height} rows, method {args.method}, K={args.samples}, "
          f"mean risk {frame['predicted_boolean_probability'].mean():.4f}, "
          f"mean MC standard error {mc_stderr}{cv}{refit_note}")
