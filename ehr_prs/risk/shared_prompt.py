"""The shared-prompt KV cache: the K sampled paths of a prompt read one copy of its keys and values.

The risk sampler (ehr_prs.risk.sampling) draws K futures per prompt. With an ordinary
DynamicCache each path holds its own copy of the prompt's keys/values, so every decoding step
reads each prompt K times over; on a CPU that memory traffic, not arithmetic, bounds the step.
Here each decoder layer's cache keeps

    prompt keys    (p, g, hd, s)   one copy per prompt, stored transposed for the per-step product
    prompt values  (p, g, s, hd)
    prompt bias    (p, 1, 1, s)    0 for a real key, -inf for left padding
    path keys      (n, g, t, hd)   generated tokens only, one row per path, in a buffer written in
    path values    (n, g, t, hd)   place that doubles when full (no concatenation per step)

(p prompts, n = p * K paths until some finish, g key-value heads, h = g * rep query heads,
s prompt length with any PRS prefix, t generated tokens, hd head dimension). Path row i
samples prompt `row_prompt[i]`; finished paths are dropped with `batch_select_indices`, and a
prompt none of whose paths is left is dropped with them.

Attention of one new token per path is computed in two parts and merged exactly: the K queries
of a prompt meet its keys in one matrix product, each path's query meets its own generated keys
in another, and the two softmax parts are combined through their log-sum-exp (as in
flash-decoding / cascade attention). The result equals attention over a cache that holds the
prompt repeated K times (tests/test_shared_prompt.py).

Interface: `SharedPromptLayer` is a `modeling_ehr_prs.modeling_ehr_prs.AttendingCacheLayer`, the
model's documented contract for a cache layer that computes attention over its own keys and
values: the model's attention calls `update(keys, values)` to store a step's keys/values and
`attend(query)` for its output. `share_prompts` turns the cache of a batched prompt forward into
one for K paths per prompt.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from modeling_ehr_prs.modeling_ehr_prs import AttendingCacheLayer


class SharedPromptLayer(AttendingCacheLayer):
    """One decoder layer's cache for K sampled paths per prompt that stores each prompt only once.

    keys, values: (p, g, s, hd), the prompts' keys/values from a batched forward; key_valid
    (p, s) bool: False at left padding; k: paths per prompt; room: generated tokens the path
    buffers hold before they first double.
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
        """Store the generated tokens' keys/values (rows, g, q, hd); the model reads them through attend()."""
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


def share_prompts(cache: DynamicCache, n_decoder_layers: int, key_valid: torch.Tensor, k: int, room: int) -> None:
    """Turn a cache filled by encoding p prompts into one for p * k paths (row i samples prompt i // k), in place.

    key_valid (p, s) bool: which of the cached prompt positions are real (PRS prefix included),
    False at left padding. Decoder layers become SharedPromptLayers; the layers after them (the
    cross-attention PRS memory or the logit shift, a few vectors per row) are simply repeated k times.
    """
    for i, layer in enumerate(cache.layers):
        if i < n_decoder_layers:
            cache.layers[i] = SharedPromptLayer(layer.keys, layer.values, key_valid, k, room)
        else:
            layer.batch_repeat_interleave(k)
