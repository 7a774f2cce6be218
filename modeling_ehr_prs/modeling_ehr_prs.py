"""EhrPrs: a Llama-style decoder over EHR event tokens that can also read polygenic risk scores.

One flat file in the style of transformers' modeling_llama.py (small modules composed top-down,
tensor shapes in comments). It imports only torch and transformers, so a saved folder carries it
as hub remote code. Shapes: b = batch, s = new event tokens, k = config.prs_tokens, d = hidden,
h / g = query / key-value heads, hd = head dim, t = keys (cached + new, prefix included).

The genomic adapter (config.prs_fusion):
  * "none": EHR-only; no adapter weights at all.
  * "prefix": adapter(prs) -> k embeddings placed before the event tokens. They take rotary
    positions 0..k-1 (events start at k), are always attended to, live in the KV cache, and are
    cut from the outputs: logits/hidden states are aligned with input_ids.
  * "cross_attention": adapter(prs) -> k memory tokens; the layers in
    config.prs_cross_attention_layers add tanh(gate) * CrossAttention(h, memory); its output
    projection starts at 0 (gate open), so an extended EHR-only checkpoint starts unchanged.
    With config.prs_centered the memory is 2k tokens (the subject's, then those of all-zero PRS)
    and each block adds the difference of the two attentions: only deviations from the mean
    genome move the prediction.
  * "logit_bias": no adapter in the decoder; EhrPrsForCausalLM adds down(prs) @ up.T (b, vocab) to
    every position's logits, a log-linear genetic effect on each token's odds (`up` starts at 0).
A subject without genotype (prs_mask False, prs None, or a prs row with NaN when prs_mask is not
given) gets the learned `prs_adapter.no_genotype` tokens, never an MLP of zeros; when centred,
the all-zero PRS reference instead, which adds exactly nothing.

Padding: left or right padding both work for scoring and training; positions are counted from the
attention mask (the first real event token has event position 0), so a padded row gives the same
logits as the row alone. Use left padding for batched generation / cached decoding. An explicit
`position_ids` holds these event positions too (what `generate` computes); the model adds the
prefix length itself in prefix mode (prefix at rotary positions 0..k-1, events from k).

Cached decoding contract (what `generate` does and what a hand-written sampling loop must do):
  1. First call: the whole prompt, `attention_mask` (b, s) over the prompt's event tokens only
     (1 = real, 0 = pad; the PRS prefix is never in it), `prs`/`prs_mask`, `use_cache=True`.
     It returns `outputs.cache` (a DynamicCache; `past_key_values` is the old name) holding the
     prefix (prefix mode) or the projected PRS memory (cross-attention mode) too.
  2. Later calls: only the new `input_ids` (b, n), `past_key_values=cache` (or `cache=cache`) and
     `attention_mask` (b, events_so_far + n) over ALL event tokens so far (prompt + generated, no
     prefix). `prs` may be omitted in every mode: the prefix, the cross-attention memory and the
     logit shift are taken from the cache (a `prs` passed on such a call is ignored). Without a
     cache every call is a fresh forward and needs `prs` again.
  The cross-attention memory K/V (or the logit shift) are stored as extra cache layers after the
  decoder's layers, so `cache.reorder_cache`, `batch_select_indices` and `batch_repeat_interleave`
  keep them in step.

PEFT LoRA: the decoder's linear layers are q_proj, k_proj, v_proj, o_proj (self-attention) and
gate_proj, up_proj, down_proj (MLP): name them in `target_modules`. The PRS modules have their own
names (prs_adapter.fc_in / fc_out, layers.N.prs_cross_attn.query / key / value / out), so those
lists never touch them; `target_modules="all-linear"` does wrap them too. The classifier head is
`score`, which PEFT saves for task_type SEQ_CLS; put prs_adapter in `modules_to_save` to train it.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_utils import PreTrainedModel

from .configuration_ehr_prs import EhrPrsConfig

# Every Auto class a saved folder answers to with trust_remote_code=True (register_for_auto_class
# writes only the saved class; save_pretrained below writes them all).
AUTO_MAP = {
    "AutoConfig": "configuration_ehr_prs.EhrPrsConfig",
    "AutoModel": "modeling_ehr_prs.EhrPrsModel",
    "AutoModelForCausalLM": "modeling_ehr_prs.EhrPrsForCausalLM",
    "AutoModelForSequenceClassification": "modeling_ehr_prs.EhrPrsForSequenceClassification",
}


class EhrPrsRMSNorm(nn.Module):
    """RMSNorm computed in float32 (as Llama's), scaled by a learned weight."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.float()
        hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class EhrPrsRotaryEmbedding(nn.Module):
    """Default RoPE: cos/sin tables for the given positions."""

    def __init__(self, config: EhrPrsConfig) -> None:
        super().__init__()
        self.config = config
        self.inv_freq = nn.Buffer(self.compute_inv_freq(config), persistent=False)

    @staticmethod
    def compute_inv_freq(config: EhrPrsConfig) -> torch.Tensor:
        dim = config.head_dim
        base = config.rope_parameters["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))  # (hd/2,)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)  # (b, q, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (b, q, hd)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """q: (b, h, q, hd), k: (b, g, q, hd), cos/sin: (b, q, hd)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(b, g, t, hd) -> (b, g * n_rep, t, hd)."""
    if n_rep == 1:
        return x
    b, g, t, hd = x.shape
    return x[:, :, None].expand(b, g, n_rep, t, hd).reshape(b, g * n_rep, t, hd)


_SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


def sdpa(query, key, value, attn_mask, is_causal: bool) -> torch.Tensor:
    """torch SDPA (flash / memory-efficient kernels on GPU); GQA without copies when no mask is given."""
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1 and attn_mask is None and _SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(query, key, value, is_causal=is_causal, enable_gqa=True)
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal)


class AttendingCacheLayer(DynamicLayer):
    """A KV-cache layer that computes the decoder's self-attention over the keys and values it holds.

    The interface through which a cache may store keys/values in its own layout: EhrPrsAttention,
    finding an instance of this class at its layer index, stores the new keys/values with
    `update` (its return value is ignored) and returns `attend(query)` instead of running SDPA.
    ehr_prs.risk.shared_prompt implements it: the K sampled paths of a prompt share one copy of
    the prompt's keys/values. Subclasses define:
      update(key_states (n, g, q, hd), value_states (n, g, q, hd)): store the new tokens;
      attend(query (n, h, q, hd)) -> (n, h, q, hd): causal softmax(query . keys / sqrt(hd)) . values
        over all stored tokens, the new ones included. No attention mask is passed: the layer
        knows which of its keys are padding.
    """

    @abstractmethod
    def attend(self, query: torch.Tensor) -> torch.Tensor:
        """Attention output (n, h, q, hd) of rotated queries (n, h, q, hd) over this layer's keys and values."""

    @classmethod
    def __subclasshook__(cls, other: type):
        # A hub remote-code copy of this file is another module with its own AttendingCacheLayer:
        # a layer built on the installed copy implements the same interface, so either copy counts.
        if cls is AttendingCacheLayer:
            name = __name__.rsplit(".", 1)[-1]
            if any(base.__qualname__ == cls.__qualname__ and base.__module__.rsplit(".", 1)[-1] == name
                   for base in other.__mro__):
                return True
        return NotImplemented


class EhrPrsAttention(nn.Module):
    """Causal self-attention with rotary positions, grouped-query heads and a KV cache.

    A cache layer that is an AttendingCacheLayer computes the attention itself (`attend`) over
    keys/values it stores in its own layout; any other cache layer returns keys/values for SDPA.
    """

    def __init__(self, config: EhrPrsConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        d, h, g = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.q_proj = nn.Linear(d, h * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, g * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, g * self.head_dim, bias=False)
        self.o_proj = nn.Linear(h * self.head_dim, d, bias=False)

    def forward(self, hidden_states, position_embeddings, attention_mask, is_causal, cache):
        b, q_len, _ = hidden_states.shape
        shape = (b, q_len, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)  # (b, h, q, hd)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)  # (b, g, q, hd)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)  # (b, g, q, hd)
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)  # (b, g, t, hd)
            layer = cache.layers[self.layer_idx]
            if isinstance(layer, AttendingCacheLayer):  # e.g. the risk sampler's shared-prompt layer
                return self.o_proj(layer.attend(query).transpose(1, 2).reshape(b, q_len, -1))  # (b, q, d)
        out = sdpa(query, key, value, attention_mask, is_causal)  # (b, h, q, hd)
        return self.o_proj(out.transpose(1, 2).reshape(b, q_len, -1))  # (b, q, d)


class EhrPrsMLP(nn.Module):
    """SwiGLU feed-forward block."""

    def __init__(self, config: EhrPrsConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def genotyped_rows(prs: torch.Tensor | None, prs_mask: torch.Tensor | None, batch_size: int, n_prs: int,
                   prs_dropout: float, device: torch.device) -> torch.Tensor:
    """Which rows use their PRS (b,) bool, after checking shapes; prs_dropout > 0 hides a random share."""
    if prs is None:
        if prs_mask is not None and bool(prs_mask.any()):
            raise ValueError("prs_mask marks genotyped subjects but prs is None: pass prs (batch, n_prs)")
        return torch.zeros(batch_size, dtype=torch.bool, device=device)
    if prs.dim() != 2 or prs.shape[-1] != n_prs:
        width = prs.shape[-1] if prs.dim() > 0 else 0
        raise ValueError(f"prs has {width} columns (shape {tuple(prs.shape)}) but config.n_prs is {n_prs}: "
                         f"pass prs of shape (batch, {n_prs})")
    if prs.shape[0] != batch_size:
        raise ValueError(f"prs has {prs.shape[0]} rows but the batch has {batch_size} sequences")
    if prs_mask is None:  # rows with a missing score count as not genotyped
        genotyped = torch.isfinite(prs).all(dim=-1)
    else:
        if prs_mask.shape != (batch_size,):
            raise ValueError(f"prs_mask must have shape ({batch_size},), got {tuple(prs_mask.shape)}")
        genotyped = prs_mask.to(device=prs.device, dtype=torch.bool)
        if bool((~torch.isfinite(prs) & genotyped[:, None]).any()):
            raise ValueError("prs has NaN/inf in rows marked genotyped (prs_mask True): standardise/impute "
                             "them or set prs_mask False for those subjects")
    if prs_dropout > 0:
        genotyped = genotyped & (torch.rand(batch_size, device=prs.device) >= prs_dropout)
    return genotyped


class EhrPrsGenomicAdapter(nn.Module):
    """Standardised PRS (b, n_prs) -> k embedding vectors (b, k, d); learned tokens when not genotyped."""

    def __init__(self, config: EhrPrsConfig) -> None:
        super().__init__()
        self.n_prs, self.k, self.d = config.n_prs, config.prs_tokens, config.hidden_size
        self.prs_dropout = config.prs_dropout
        self.centered = config.prs_centered
        if self.n_prs > 0:
            self.fc_in = nn.Linear(self.n_prs, config.prs_adapter_hidden_size)
            self.fc_out = nn.Linear(config.prs_adapter_hidden_size, self.k * self.d)
        self.no_genotype = nn.Parameter(torch.zeros(self.k, self.d))  # the "no genotype" tokens
        self.norm = EhrPrsRMSNorm(self.d, config.rms_norm_eps)  # same scale for both kinds of tokens

    def genotyped_rows(self, prs: torch.Tensor | None, prs_mask: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """Which rows use their PRS (b,) bool, after checking shapes and applying prs_dropout."""
        return genotyped_rows(prs, prs_mask, batch_size, self.n_prs, self.prs_dropout if self.training else 0.0,
                              self.no_genotype.device)

    def forward(self, prs, prs_mask, batch_size: int) -> torch.Tensor:
        """(b, k, d) tokens; centred: (b, 2k, d), the subject's tokens then those of all-zero PRS."""
        device = self.no_genotype.device
        prs = prs.to(device) if prs is not None else None
        prs_mask = prs_mask.to(device) if prs_mask is not None else None
        genotyped = self.genotyped_rows(prs, prs_mask, batch_size)  # (b,)
        # Who is not genotyped gets the "no genotype" tokens; when centred, the all-zero PRS's own
        # tokens instead, so the two halves of their memory are equal and cancel.
        fill = self.no_genotype[None]  # (1, k, d)
        if self.centered and self.n_prs > 0:
            zero = self.fc_in.weight.new_zeros(1, self.n_prs)
            fill = self.fc_out(F.silu(self.fc_in(zero))).view(1, self.k, self.d)
        tokens = fill.expand(batch_size, self.k, self.d)  # (b, k, d)
        if self.n_prs > 0 and prs is not None:
            # Zero the hidden rows before the MLP: their values (NaN included) must not reach anything.
            x = torch.where(genotyped[:, None], prs, 0.0).to(self.fc_in.weight.dtype)  # (b, n_prs)
            mlp = self.fc_out(F.silu(self.fc_in(x))).view(batch_size, self.k, self.d)  # (b, k, d)
            tokens = torch.where(genotyped[:, None, None], mlp, tokens)
        if self.centered:
            tokens = torch.cat([tokens, fill.expand(batch_size, self.k, self.d)], dim=1)  # (b, 2k, d)
        return self.norm(tokens)


def low_rank_prs_shift(adapter: nn.Module, prs, prs_mask, batch_size: int) -> torch.Tensor:
    """down(prs) @ up.T (b, outputs) of a low-rank PRS adapter (`down`, `up`, `n_prs`, `prs_dropout`).

    Rows without genotype (or hidden by prs_dropout in training) get exactly 0; their scores, NaN
    included, never reach `down`. Shared by the logit-bias adapter and the TTE head's hazard shift.
    """
    device = adapter.up.device
    prs = prs.to(device) if prs is not None else None
    prs_mask = prs_mask.to(device) if prs_mask is not None else None
    genotyped = genotyped_rows(prs, prs_mask, batch_size, adapter.n_prs,
                               adapter.prs_dropout if adapter.training else 0.0, device)  # (b,)
    shift = adapter.up.new_zeros(batch_size, adapter.up.shape[0])  # (b, outputs)
    if prs is not None and adapter.n_prs > 0:
        x = torch.where(genotyped[:, None], prs, 0.0).to(adapter.down.weight.dtype)  # (b, n_prs)
        shift = torch.where(genotyped[:, None], adapter.down(x) @ adapter.up.T, shift)
    return shift


class EhrPrsLogitBias(nn.Module):
    """Standardised PRS (b, n_prs) -> a shift of every next-token logit (b, vocab): down(prs) @ up.T.

    The whole genetic effect is log-linear: a subject's odds of each next token are multiplied by
    exp(w_token . prs), as a proportional-hazards model would, and the decoder is left alone.
    Rows without genotype (or hidden by prs_dropout) get exactly 0. In cached decoding the shift
    is computed once and kept in the cache (the layer slot after the decoder's), so later calls
    need no `prs` and the batch operations on the cache keep it in step.
    """

    def __init__(self, config: EhrPrsConfig) -> None:
        super().__init__()
        self.n_prs, self.prs_dropout = config.n_prs, config.prs_dropout
        self.cache_idx = config.num_hidden_layers
        rank = config.prs_logit_bias_rank
        self.down = nn.Linear(config.n_prs, rank, bias=False)  # scores -> r genetic liabilities
        # liabilities -> log-odds shift per token (vocab, r); a bare parameter so that initialisation
        # (zeros, in _init_weights) is not overwritten by the generic nn.Linear one.
        self.up = nn.Parameter(torch.zeros(config.vocab_size, rank))

    def forward(self, prs, prs_mask, batch_size: int, cache: Cache | None = None) -> torch.Tensor:
        """(b, vocab) logit shift; zero rows for subjects without genotype."""
        if _has_memory(cache, self.cache_idx):
            shift = cache.layers[self.cache_idx].keys[:, 0, 0]  # (b, vocab)
            return shift
        shift = low_rank_prs_shift(self, prs, prs_mask, batch_size)  # (b, vocab)
        if cache is not None:
            while len(cache.layers) <= self.cache_idx:
                cache.layers.append(DynamicLayer())
            cache.layers[self.cache_idx].update(shift[:, None, None], shift[:, None, None])  # (b, 1, 1, vocab)
        return shift


DAYS_PER_YEAR = 365.25
TTE_INITIAL_LOG_HAZARD = -3.9  # log(1 / 50 years)


class EhrPrsHazardShift(nn.Module):
    """Standardised PRS (b, n_prs) -> a shift of every code family's log-hazard (b, families).

    The genomic adapter of the time-to-event head: proportional hazards, so each family's hazard is
    multiplied by exp(up_f . down(prs)) at every time; `down` maps the scores to `tte_prs_rank`
    genetic liabilities (a few thousand scores, of which few carry any one disease, share a small
    basis; weight decay keeps the rest near 0). Rows without genotype (or hidden by prs_dropout
    in training) get exactly 0; `up` starts at 0, so a model gains it without changing its outputs.
    """

    def __init__(self, config: EhrPrsConfig) -> None:
        super().__init__()
        self.n_prs, self.prs_dropout = config.n_prs, config.prs_dropout
        self.down = nn.Linear(config.n_prs, config.tte_prs_rank, bias=False)  # scores -> r liabilities
        self.up = nn.Parameter(torch.zeros(len(config.tte_families), config.tte_prs_rank))  # (families, r)

    def forward(self, prs, prs_mask, batch_size: int) -> torch.Tensor:
        """(b, families) log-hazard shift; zero rows for subjects without genotype."""
        return low_rank_prs_shift(self, prs, prs_mask, batch_size)


class EhrPrsTimeToEventHead(nn.Module):
    """Hidden states (n, d) -> piecewise-constant log-hazards (n, bins, families), per year.

    For each position, the hazard of the *first later occurrence* of each code family in each
    time bin after it (config.tte_time_bins, days; the last bin open-ended). MOTOR's low-rank
    factorisation: log h[bin, family] = time_proj(x)[bin] . family_embed[family] + bias[family, bin],
    so the head costs d x bins x rank + families x (rank + bins) weights instead of d x bins x families.
    Risk of a first occurrence within (a, b] days = 1 - exp(-sum over bins of hazard x overlap).
    """

    def __init__(self, config: EhrPrsConfig) -> None:
        super().__init__()
        self.n_bins, self.n_families, self.rank = len(config.tte_time_bins), len(config.tte_families), config.tte_rank
        width = config.hidden_size * (2 if config.tte_history_summary else 1)  # [state ; history mean]
        self.time_proj = nn.Linear(width, self.n_bins * self.rank, bias=False)
        self.family_embed = nn.Parameter(torch.zeros(self.n_families, self.rank))  # (families, r)
        self.family_bias = nn.Parameter(torch.zeros(self.n_families, self.n_bins))  # (families, bins)
        starts = torch.tensor(config.tte_time_bins, dtype=torch.float) / DAYS_PER_YEAR  # (bins,) years
        self.bin_starts = nn.Buffer(starts, persistent=False)
        self.hazard_shift = EhrPrsHazardShift(config) if config.tte_hazard_shift else None

    def forward(self, hidden_states: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states (n, d), shift (n, families) or None -> log-hazards per year (n, bins, families)."""
        n = hidden_states.shape[0]
        z = self.time_proj(hidden_states.to(self.time_proj.weight.dtype)).view(n, self.n_bins, self.rank)
        log_hazard = z.float() @ self.family_embed.float().T + self.family_bias.float().T  # (n, bins, families)
        if shift is not None:
            log_hazard = log_hazard + shift.float()[:, None, :]
        return log_hazard

    def exposure(self, start_years: torch.Tensor, end_years: torch.Tensor) -> torch.Tensor:
        """Years of (start, end] inside each bin: (...,) x 2 -> (..., bins)."""
        starts = self.bin_starts.to(start_years.device)  # (bins,)
        ends = torch.cat([starts[1:], starts.new_full((1,), float("inf"))])  # (bins,)
        lo = torch.maximum(start_years[..., None], starts)
        hi = torch.minimum(end_years[..., None], ends)
        return (hi - lo).clamp(min=0.0)

    def negative_log_likelihood(self, log_hazard: torch.Tensor, time_years: torch.Tensor, event: torch.Tensor,
                                at_risk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Piecewise-exponential NLL summed over at-risk pairs, and the number of pairs.

        log_hazard (n, bins, families); time_years, event, at_risk (n, families): the time to the
        family's first occurrence (event) or to the end of the record (censored), in years.
        """
        time_years = time_years.clamp(min=0.0)
        exposure = self.exposure(torch.zeros_like(time_years), time_years).transpose(1, 2)  # (n, bins, families)
        cumulative = (log_hazard.exp() * exposure).sum(1)  # (n, families)
        starts = self.bin_starts.to(time_years.device)
        bin_of_time = (torch.searchsorted(starts, time_years.contiguous(), right=True) - 1).clamp(min=0)  # (n, F)
        log_h_at_event = log_hazard.gather(1, bin_of_time[:, None, :]).squeeze(1)  # (n, families)
        ll = torch.where(event, log_h_at_event, 0.0) - cumulative
        return -(ll * at_risk).sum(), at_risk.sum()


class EhrPrsGatedCrossAttention(nn.Module):
    """h + tanh(gate) * CrossAttention(norm(h), PRS memory); output projection 0 at init, gate 1.

    The memory is only k tokens, so the per-head projections are re-associated onto the memory
    side: q.k = x.(Wq_h^T k) and Wo_h v are precomputed per memory token as (b, h, k, d) tables,
    and each event token pays 2 * h * k * d multiply-adds instead of two d x d projections. Same
    function, same parameters (query, key, value, out). When `query`/`out` are not plain nn.Linear
    (e.g. wrapped by PEFT LoRA) the textbook path runs instead, so adapters on them take effect.
    """

    def __init__(self, config: EhrPrsConfig, cache_idx: int) -> None:
        super().__init__()
        self.cache_idx = cache_idx  # where its memory tables live in the KV cache (after the decoder layers)
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        d, h, g = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.norm = EhrPrsRMSNorm(d, config.rms_norm_eps)
        self.query = nn.Linear(d, h * self.head_dim, bias=False)
        self.key = nn.Linear(d, g * self.head_dim, bias=False)
        self.value = nn.Linear(d, g * self.head_dim, bias=False)
        self.out = nn.Linear(h * self.head_dim, d, bias=False)
        self.gate = nn.Parameter(torch.zeros(1))
        self.centered = config.prs_centered  # memory = [subject's k tokens, all-zero PRS's k tokens]

    def reassociated(self) -> bool:
        return type(self.query) is nn.Linear and type(self.out) is nn.Linear

    def memory_tables(self, memory: torch.Tensor | None, cache: Cache | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-memory-token tables, computed once per cache: (b, h, k, d) x 2, or key/value (b, g, k, hd) x 2."""
        if _has_memory(cache, self.cache_idx):
            layer = cache.layers[self.cache_idx]
            return layer.keys, layer.values
        b, k, d = memory.shape
        key = self.key(memory).view(b, k, -1, self.head_dim).transpose(1, 2)  # (b, g, k, hd)
        value = self.value(memory).view(b, k, -1, self.head_dim).transpose(1, 2)
        if self.reassociated():
            n_rep = self.num_heads // key.shape[1]
            key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)  # (b, h, k, hd)
            w_q = self.query.weight.view(self.num_heads, self.head_dim, d)  # (h, hd, d)
            w_o = self.out.weight.view(d, self.num_heads, self.head_dim)  # (d, h, hd)
            key = torch.einsum("bhkc,hcd->bhkd", key, w_q) * self.head_dim ** -0.5  # (b, h, k, d): Wq_h^T k / sqrt(hd)
            value = torch.einsum("bhkc,dhc->bhkd", value, w_o)  # (b, h, k, d): Wo_h v
        if cache is not None:
            while len(cache.layers) <= self.cache_idx:
                cache.layers.append(DynamicLayer())
            key, value = cache.layers[self.cache_idx].update(key, value)
        return key, value

    def attend(self, x: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Attention of normed x (b, q, d) over one set of memory tables; before `out` unless reassociated."""
        b, q_len, d = x.shape
        if self.reassociated():
            h, k = key.shape[1], key.shape[2]
            scores = x @ key.reshape(b, h * k, d).transpose(1, 2)  # (b, q, h * k)
            probs = torch.softmax(scores.view(b, q_len, h, k).float(), dim=-1).to(x.dtype)  # over memory tokens
            return probs.view(b, q_len, h * k) @ value.reshape(b, h * k, d)  # (b, q, d): sum over heads and tokens
        query = self.query(x).view(b, q_len, -1, self.head_dim).transpose(1, 2)  # (b, h, q, hd)
        return sdpa(query, key, value, None, False).transpose(1, 2).reshape(b, q_len, -1)  # (b, q, h * hd)

    def forward(self, hidden_states: torch.Tensor, memory: torch.Tensor | None, cache: Cache | None) -> torch.Tensor:
        key, value = self.memory_tables(memory, cache)
        x = self.norm(hidden_states)  # (b, q, d)
        if self.centered:  # subject's memory minus the all-zero PRS memory: exactly 0 where they are equal
            k = key.shape[2] // 2
            out = self.attend(x, key[:, :, :k], value[:, :, :k]) - self.attend(x, key[:, :, k:], value[:, :, k:])
        else:
            out = self.attend(x, key, value)
        if not self.reassociated():
            out = self.out(out)
        return hidden_states + torch.tanh(self.gate) * out


class EhrPrsDecoderLayer(GradientCheckpointingLayer):
    """[gated PRS cross-attention] -> pre-norm self-attention -> pre-norm SwiGLU MLP, each residual."""

    def __init__(self, config: EhrPrsConfig, layer_idx: int) -> None:
        super().__init__()
        self.prs_cross_attn = None
        if config.has_cross_attention and layer_idx in config.prs_cross_attention_layers:
            slot = sorted(config.prs_cross_attention_layers).index(layer_idx)
            self.prs_cross_attn = EhrPrsGatedCrossAttention(config, cache_idx=config.num_hidden_layers + slot)
        self.input_layernorm = EhrPrsRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = EhrPrsAttention(config, layer_idx)
        self.post_attention_layernorm = EhrPrsRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = EhrPrsMLP(config)

    def forward(self, hidden_states, memory=None, *, position_embeddings, attention_mask, is_causal, cache=None):
        # hidden_states and memory are positional so reentrant gradient checkpointing sees their gradients.
        if self.prs_cross_attn is not None:
            hidden_states = self.prs_cross_attn(hidden_states, memory, cache)
        hidden_states = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, is_causal, cache)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))  # (b, q, d)


class EhrPrsPreTrainedModel(PreTrainedModel):
    """Weight init, checkpoint and Auto-class plumbing shared by all heads."""

    config_class = EhrPrsConfig
    config: EhrPrsConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["EhrPrsDecoderLayer"]
    _supports_sdpa = True

    def __init__(self, config: EhrPrsConfig, *args, **kwargs) -> None:
        config.validate()  # from_pretrained(..., key=value) sets fields after __init__: re-check the rules between them
        super().__init__(config, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # normal(initializer_range) linears/embeddings, ones for RMSNorm
        if isinstance(module, EhrPrsRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq(self.config))
        elif isinstance(module, EhrPrsGenomicAdapter):
            init.normal_(module.no_genotype, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, (EhrPrsLogitBias, EhrPrsHazardShift)):
            init.zeros_(module.up)  # an extended EHR-only checkpoint starts unchanged; `down` gets gradient
        elif isinstance(module, EhrPrsTimeToEventHead):
            init.normal_(module.family_embed, mean=0.0, std=self.config.initializer_range)
            # Start every family at about one first occurrence per 50 person-years (log hazard per year).
            init.constant_(module.family_bias, TTE_INITIAL_LOG_HAZARD)
            init.copy_(module.bin_starts, torch.tensor(self.config.tte_time_bins, dtype=torch.float) / DAYS_PER_YEAR)
        elif isinstance(module, EhrPrsGatedCrossAttention):
            # An extended EHR-only checkpoint must start with unchanged outputs. A zero output
            # projection does that while the gate is open, so the projection gets a gradient from
            # the first step; a closed gate (Flamingo) starves every weight behind it, and with
            # weight decay on a frozen backbone the gate stayed at ~0 after 300 steps (measured).
            init.zeros_(module.out.weight)
            init.constant_(module.gate, 1.0)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save safetensors weights; a registered (remote-code) model lists every head in auto_map."""
        if self.is_remote_code():
            self.config.auto_map = dict(AUTO_MAP)
        return super().save_pretrained(save_directory, *args, **kwargs)


class EhrPrsModel(EhrPrsPreTrainedModel):
    """Token embeddings + genomic adapter + decoder layers + final norm; returns event hidden states."""

    def __init__(self, config: EhrPrsConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.prs_adapter = EhrPrsGenomicAdapter(config) if config.has_prs_adapter else None
        self.layers = nn.ModuleList(EhrPrsDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = EhrPrsRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = EhrPrsRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def prefix_length(self) -> int:
        """Number of PRS prefix positions in front of the events (0 unless prefix mode)."""
        return self.config.num_prefix_tokens

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        prs: torch.Tensor | None = None,
        prs_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """See the module docstring for what attention_mask/position_ids cover (event tokens only)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("pass the KV cache once, as cache= or past_key_values=")
        cache = cache if cache is not None else past_key_values
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (b, s, d)
        b, s, _ = inputs_embeds.shape
        device = inputs_embeds.device
        if use_cache is None:  # a cache passed in is always used and extended
            use_cache = cache is not None or (self.config.use_cache and not self.training)
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None

        k_prefix = self.prefix_length()
        past = cache.get_seq_length() if cache is not None else 0  # prefix included
        starting = past == 0
        past_events = past - (0 if starting else k_prefix)
        new_prefix = k_prefix if starting else 0  # prefix positions computed in this call

        # The PRS are read when a cache starts (or on every call without one).
        memory = None
        needs_memory = self.prs_adapter is not None and (starting or self.config.has_cross_attention)
        if needs_memory and (starting or not _has_memory(cache, self.config.num_hidden_layers)):
            memory = self.prs_adapter(prs, prs_mask, b).to(inputs_embeds.dtype)  # (b, k, d)
        hidden_states = torch.cat([memory, inputs_embeds], dim=1) if new_prefix else inputs_embeds  # (b, k? + s, d)

        if attention_mask is not None:
            if attention_mask.shape != (b, past_events + s):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)} but must be (batch={b}, "
                    f"{past_events + s}): it covers every event token so far ({past_events} cached + {s} new), "
                    "never the PRS prefix")
            attention_mask = attention_mask.to(device=device, dtype=torch.bool)
            if bool(attention_mask.all()):
                attention_mask = None  # no padding: plain causal attention (flash kernels on GPU)
        if position_ids is None:  # event positions, counted over real tokens only
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -s:]  # (b, s)
            else:
                position_ids = torch.arange(past_events, past_events + s, device=device).expand(b, s)
        position_ids = position_ids.to(device) + k_prefix
        if new_prefix:
            position_ids = torch.cat([torch.arange(k_prefix, device=device).expand(b, k_prefix), position_ids], dim=1)

        key_valid = None
        right_padded_only = (attention_mask is not None and past == 0
                             and not bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()))
        if attention_mask is not None and not right_padded_only:  # (b, t): prefix always visible, pads never
            key_valid = torch.cat([attention_mask.new_ones(b, k_prefix), attention_mask], dim=1)
        # Right padding needs no key mask: causality already hides the trailing pads from every real
        # token, and keeping the plain causal path keeps training batches on the fast kernels.
        q_len = new_prefix + s
        mask, is_causal = self_attention_mask(key_valid, q_len, past + q_len, device)
        position_embeddings = self.rotary_emb(hidden_states, position_ids)

        all_hidden = [] if output_hidden_states else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states[:, new_prefix:])
            hidden_states = layer(hidden_states, memory, position_embeddings=position_embeddings,
                                  attention_mask=mask, is_causal=is_causal, cache=cache)
        hidden_states = self.norm(hidden_states)[:, new_prefix:]  # (b, s, d): aligned with input_ids
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache,
                                       hidden_states=tuple(all_hidden) if all_hidden is not None else None)


def _has_memory(cache: Cache | None, cache_idx: int) -> bool:
    """Whether the cache already holds cross-attention memory tables at layer slot cache_idx."""
    return cache is not None and len(cache.layers) > cache_idx and cache.layers[cache_idx].get_seq_length() > 0


def self_attention_mask(key_valid: torch.Tensor | None, q_len: int, kv_len: int,
                        device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """(mask, is_causal) for SDPA: None + is_causal when no padding (fast kernels), else bool (b, 1, q, t).

    Queries are the last q_len of kv_len positions. A query may always see itself, so a padded
    query row is never fully masked (which would give NaN); its output is never used.
    """
    if key_valid is None:
        if q_len == kv_len:
            return None, True
        if q_len == 1:
            return None, False
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]  # (q, 1)
    k_pos = torch.arange(kv_len, device=device)[None, :]  # (1, t)
    allowed = k_pos <= q_pos  # (q, t)
    if key_valid is None:
        return allowed[None, None], False
    allowed = (allowed[None] & key_valid[:, None, :]) | (k_pos == q_pos)[None]  # (b, q, t)
    return allowed[:, None], False


def tte_pairs(positions: torch.Tensor, first_index: torch.Tensor, days: torch.Tensor,
              last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Time-to-event pairs of a batch: (time in days, event, at risk), each (b, P, F).

    positions (b, P) token indices (-1 = padding); first_index (b, F) each family's first index in
    the row (>= s: never); days (b, s) days elapsed at each token; last (b,) the last real index.
    A family is at risk at a position when it has not occurred at or before it; its time runs to
    its first occurrence (event) or to the last real token (censored).
    """
    s = days.shape[1]
    valid = positions >= 0  # (b, P)
    pos = positions.clamp(min=0)
    pos_day = days.gather(1, pos)  # (b, P)
    end_day = days.gather(1, last[:, None])  # (b, 1)
    occurs = first_index < s  # (b, F)
    event_day = days.gather(1, first_index.clamp(max=s - 1))  # (b, F)
    at_risk = valid[:, :, None] & (first_index[:, None, :] > pos[:, :, None])  # (b, P, F)
    event = at_risk & occurs[:, None, :]
    time_days = torch.where(event, event_day[:, None, :], end_day[:, :, None]) - pos_day[:, :, None]
    return time_days, event, at_risk


@dataclass
class EhrPrsCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus the two parts of the pretraining loss (when computed)."""

    lm_loss: torch.FloatTensor | None = None
    tte_loss: torch.FloatTensor | None = None


class EhrPrsForCausalLM(EhrPrsPreTrainedModel, GenerationMixin):
    """The generative EHR model: next-token logits over event tokens, optionally conditioned on PRS."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    accepts_loss_kwargs = True  # the loss divides by Trainer's num_items_in_batch (gradient accumulation)

    def __init__(self, config: EhrPrsConfig) -> None:
        super().__init__(config)
        self.model = EhrPrsModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.prs_logit_bias = EhrPrsLogitBias(config) if config.has_logit_bias else None
        self.tte_head = EhrPrsTimeToEventHead(config) if config.has_tte_head else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        prs: torch.Tensor | None = None,
        prs_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        tte_positions: torch.LongTensor | None = None,
        tte_first_index: torch.LongTensor | None = None,
        tte_days: torch.Tensor | None = None,
        **kwargs,
    ) -> "EhrPrsCausalLMOutput":
        """input_ids/attention_mask (b, s); prs (b, n_prs) float, standardised; prs_mask (b,) bool (True =
        genotyped). Returns logits (b, s, vocab) aligned with input_ids (no prefix positions) and, with
        labels, the mean next-token cross-entropy over event tokens (labels -100, pads and masked
        positions ignored). `num_items_in_batch` (from Trainer) is honoured.

        Time-to-event targets (from EhrPrsCollator when the model has a TTE head): tte_positions
        (b, P) token indices where the TTE loss is read (-1 = none), tte_first_index (b, families) the
        index of each family's first occurrence in the row (>= s when it never occurs), tte_days
        (b, s) days elapsed from the row's start at each token (the sum of its time tokens). The loss
        is then LM loss + tte_loss_weight x the mean piecewise-exponential NLL per at-risk pair.
        """
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, prs=prs, prs_mask=prs_mask,
                             position_ids=position_ids, past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                             use_cache=use_cache, output_hidden_states=output_hidden_states, cache=cache)
        hidden_states = outputs.last_hidden_state  # (b, s, d)
        if labels is not None and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError("labels need logits for every position: leave logits_to_keep=0 when passing labels")
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep > 0 else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)  # (b, s, vocab)
        if self.prs_logit_bias is not None:
            shift = self.prs_logit_bias(prs, prs_mask, logits.shape[0], outputs.cache)  # (b, vocab)
            logits = logits + shift[:, None, :].to(logits.dtype)

        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            if attention_mask is not None and attention_mask.shape == labels.shape:
                labels = labels.masked_fill(attention_mask.to(logits.device) == 0, -100)
            if self.config.pad_token_id is not None:
                labels = labels.masked_fill(labels == self.config.pad_token_id, -100)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                                      num_items_in_batch=kwargs.get("num_items_in_batch"))
        lm_loss, tte_loss = loss, None
        if tte_positions is not None and self.tte_head is not None:
            tte_loss = self.time_to_event_loss(outputs.last_hidden_state, attention_mask, prs, prs_mask,
                                               tte_positions, tte_first_index, tte_days)
            if loss is not None:
                # The LM loss is a sum over tokens / num_items_in_batch (all micro-batches of a
                # gradient-accumulation step); scale this micro-batch's TTE mean alike so that
                # accumulation adds up to one mean (the factor is 1 without accumulation).
                num_items = kwargs.get("num_items_in_batch")
                if num_items is not None:
                    own = (labels[:, 1:] != -100).sum()
                    tte_scale = own.to(tte_loss.dtype) / torch.as_tensor(num_items, device=tte_loss.device).to(tte_loss.dtype)
                else:
                    tte_scale = 1.0
                loss = loss + self.config.tte_loss_weight * tte_scale * tte_loss
            else:
                loss = self.config.tte_loss_weight * tte_loss
        output = EhrPrsCausalLMOutput(loss=loss, logits=logits, cache=outputs.cache,
                                      hidden_states=outputs.hidden_states, lm_loss=lm_loss, tte_loss=tte_loss)
        return output.to_tuple() if return_dict is False else output

    def time_to_event_loss(self, hidden_states, attention_mask, prs, prs_mask, positions, first_index, days):
        """Mean piecewise-exponential NLL over the at-risk (position, family) pairs of a batch.

        hidden_states (b, s, d); positions (b, P) (-1 = padding); first_index (b, F); days (b, s).
        A family is at risk at a position when it has not occurred at or before it in the row; its
        time is the days to its first occurrence (event) or to the row's last real token (censored).
        """
        b, s, _ = hidden_states.shape
        device = hidden_states.device
        positions, first_index, days = positions.to(device), first_index.to(device), days.to(device).float()
        if attention_mask is not None:
            last = attention_mask.to(device).long().sum(-1).clamp(min=1) - 1  # (b,) right padding
        else:
            last = torch.full((b,), s - 1, device=device, dtype=torch.long)
        time_days, event, at_risk = tte_pairs(positions, first_index, days, last)  # (b, P, F) each
        pos = positions.clamp(min=0)
        h = self._head_input(hidden_states, attention_mask)[torch.arange(b, device=device)[:, None], pos]  # (b, P, d')
        shift = None
        if self.tte_head.hazard_shift is not None:
            shift = self.tte_head.hazard_shift(prs, prs_mask, b)  # (b, F)
            shift = shift[:, None, :].expand(b, pos.shape[1], -1).reshape(b * pos.shape[1], -1)
        log_hazard = self.tte_head(h.reshape(b * pos.shape[1], -1), shift)  # (b * P, bins, F)
        nll, pairs = self.tte_head.negative_log_likelihood(
            log_hazard, time_days.reshape(b * pos.shape[1], -1) / DAYS_PER_YEAR,
            event.reshape(b * pos.shape[1], -1), at_risk.reshape(b * pos.shape[1], -1))
        return nll / pairs.clamp(min=1)

    def _head_input(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(b, s, d) -> what the TTE head reads at each position: the state, or [state ; mean of states so far]."""
        if not self.config.tte_history_summary:
            return hidden_states
        real = (attention_mask.to(hidden_states.device, hidden_states.dtype) if attention_mask is not None
                else hidden_states.new_ones(hidden_states.shape[:2]))  # (b, s)
        total = torch.cumsum(hidden_states * real[..., None], dim=1)  # (b, s, d) pads add nothing
        count = torch.cumsum(real, dim=1).clamp(min=1.0)[..., None]  # (b, s, 1)
        return torch.cat([hidden_states, total / count], dim=-1)  # (b, s, 2d)

    @torch.no_grad()
    def tte_head_inputs(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                        prs: torch.Tensor | None = None, prs_mask: torch.Tensor | None = None) -> torch.Tensor:
        """What the TTE head reads at each row's last real token (left or right padding): (b, d').

        One forward pass of the decoder; `tte_log_hazards` applies the head to it, and a refitted
        hazard (`ehr-prs hazard-refit`) its own weights.
        """
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, prs=prs, prs_mask=prs_mask,
                             use_cache=False)
        hidden_states = outputs.last_hidden_state  # (b, s, d)
        b, s, _ = hidden_states.shape
        if attention_mask is None:
            last = torch.full((b,), s - 1, device=hidden_states.device, dtype=torch.long)
        else:
            real = attention_mask.to(hidden_states.device).bool()
            last = s - 1 - real.flip(-1).int().argmax(-1)  # (b,) the last real token
        return self._head_input(hidden_states, attention_mask)[torch.arange(b, device=hidden_states.device), last]

    @torch.no_grad()
    def tte_log_hazards(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                        prs: torch.Tensor | None = None, prs_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Log-hazards per year (b, bins, families) at each row's last real token (left or right padding).

        One forward pass; what `ehr-prs risk --method hazard` turns into risk curves.
        """
        if self.tte_head is None:
            raise ValueError("this model has no time-to-event head (config.tte_families is empty): pretrain one "
                             "with `ehr-prs pretrain --tte-families N`, or use a sampling method")
        h = self.tte_head_inputs(input_ids, attention_mask, prs, prs_mask)  # (b, d')
        shift = self.tte_head.hazard_shift(prs, prs_mask, len(h)) if self.tte_head.hazard_shift is not None else None
        return self.tte_head(h, shift)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        prs: torch.Tensor | None = None,
        prs_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        use_cache: bool = True,
        **kwargs,
    ) -> dict:
        """Feed only the tokens the cache has not seen; the cache's length includes the PRS prefix."""
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        past = cache.get_seq_length() if cache is not None else 0
        inputs = {"cache": cache, "attention_mask": attention_mask, "prs": prs, "prs_mask": prs_mask,
                  "use_cache": use_cache}
        if past == 0:
            if inputs_embeds is not None:
                inputs["inputs_embeds"] = inputs_embeds
            else:
                inputs["input_ids"] = input_ids
            n_new = (inputs_embeds if inputs_embeds is not None else input_ids).shape[1]
        else:
            past_events = past - self.model.prefix_length()
            total = attention_mask.shape[1] if attention_mask is not None else input_ids.shape[1]
            n_new = total - past_events
            inputs["input_ids"] = input_ids[:, -n_new:]
        if position_ids is not None:
            inputs["position_ids"] = position_ids[:, -n_new:]
        skip = ("labels", "next_sequence_length", "is_first_iteration", "cache_position")
        for key, value in kwargs.items():  # e.g. logits_to_keep, output_hidden_states
            if key not in skip and key not in inputs:
                inputs[key] = value
        return inputs


class EhrPrsForSequenceClassification(EhrPrsPreTrainedModel):
    """Backbone + adapter, the last real (non-pad) token's hidden state -> `score` (num_labels logits).

    Loss with `labels`: num_labels == 1 -> BCE-with-logits on a float 0/1 label (binary task, one
    logit); num_labels >= 2 -> cross-entropy on integer class ids; problem_type "regression" -> MSE,
    "multi_label_classification" -> BCE-with-logits on (b, num_labels) targets.
    """

    accepts_loss_kwargs = False  # a per-batch mean: let Trainer scale it for gradient accumulation

    def __init__(self, config: EhrPrsConfig) -> None:
        if config.has_logit_bias:
            raise ValueError("prs_fusion='logit_bias' acts on next-token logits only, so a classifier on it would "
                             "never read the scores: fine-tune a prefix or cross_attention model (or the "
                             "EHR-only one), or use the linear probe / GBM with PRS features")
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = EhrPrsModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=True)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        prs: torch.Tensor | None = None,
        prs_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, prs=prs, prs_mask=prs_mask,
                             position_ids=position_ids, inputs_embeds=inputs_embeds, use_cache=False,
                             output_hidden_states=output_hidden_states)
        hidden_states = outputs.last_hidden_state  # (b, s, d)
        b, s, _ = hidden_states.shape
        if attention_mask is not None:
            real = attention_mask.to(hidden_states.device).bool()
        elif input_ids is not None and self.config.pad_token_id is not None:
            real = input_ids != self.config.pad_token_id
        else:
            real = torch.ones(b, s, dtype=torch.bool, device=hidden_states.device)
        last = s - 1 - real.flip(-1).int().argmax(-1)  # (b,) index of the last real token (left or right padding)
        pooled = hidden_states[torch.arange(b, device=hidden_states.device), last]  # (b, d)
        logits = self.score(pooled)  # (b, num_labels)

        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            if self.config.problem_type == "regression":
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float().view(-1)) if self.num_labels == 1 \
                    else F.mse_loss(logits.float(), labels.float())
            elif self.config.problem_type == "multi_label_classification":
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
            elif self.num_labels == 1:
                loss = F.binary_cross_entropy_with_logits(logits.squeeze(-1).float(), labels.float().view(-1))
            else:
                loss = F.cross_entropy(logits.float(), labels.long().view(-1))
        output = SequenceClassifierOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states)
        return output.to_tuple() if return_dict is False else output


__all__ = [
    "EhrPrsPreTrainedModel",
    "EhrPrsModel",
    "EhrPrsForCausalLM",
    "EhrPrsForSequenceClassification",
    "AUTO_MAP",
    "AttendingCacheLayer",
]
