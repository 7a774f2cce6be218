"""The shared-prompt KV cache (ehr_prs.risk.shared_prompt) against the ordinary cache it replaces.

The risk sampler keeps one copy of each prompt's keys/values for the prompt's K paths, behind the
model's documented interface for a cache layer that attends itself (AttendingCacheLayer). These
tests hold it to attention over a cache that repeats each prompt K times: in the kernel alone,
in the model's next-token logits, and for a model whose classes come from a hub remote-code copy
of the model file.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer

import modeling_ehr_prs
from ehr_prs.risk.sampling import sample_risk
from ehr_prs.risk.shared_prompt import SharedPromptLayer, share_prompts
from modeling_ehr_prs.configuration_ehr_prs import EhrPrsConfig
from modeling_ehr_prs.modeling_ehr_prs import AttendingCacheLayer, EhrPrsForCausalLM

VOCAB = 24


def random_model(fusion: str) -> EhrPrsForCausalLM:
    """A tiny model (4 query / 2 key-value heads) whose PRS parts, zero at initialisation, are drawn so they count."""
    torch.manual_seed(0)
    model = EhrPrsForCausalLM(EhrPrsConfig.from_preset("tiny", vocab_size=VOCAB, n_prs=8, prs_fusion=fusion)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.prs_cross_attn is not None:
                layer.prs_cross_attn.out.weight.normal_(0.0, 0.02)
        if model.prs_logit_bias is not None:
            model.prs_logit_bias.up.normal_(0.0, 0.5)
    return model


def test_attend_equals_attention_over_the_prompt_repeated_k_times():
    """The kernel alone, in float64: left padding, grouped-query heads, a buffer that doubles, and a
    compaction that drops one whole prompt and one path of another."""
    torch.manual_seed(1)
    p, k, g, rep, s, hd = 3, 4, 2, 3, 5, 8
    keys, values = torch.randn(p, g, s, hd, dtype=torch.float64), torch.randn(p, g, s, hd, dtype=torch.float64)
    valid = torch.ones(p, s, dtype=torch.bool)
    valid[0, :2] = valid[2, :1] = False  # left padding
    layer = SharedPromptLayer(keys, values, valid, k, room=1)
    assert isinstance(layer, AttendingCacheLayer)
    # The reference: every path its own copy of its prompt, then its own generated tokens.
    ref_k, ref_v = keys.repeat_interleave(k, 0), values.repeat_interleave(k, 0)  # (p * k, g, s, hd)
    ref_valid = valid.repeat_interleave(k, 0)  # (p * k, s)
    rows = torch.arange(p * k)
    for step in range(6):
        if step == 3:  # prompt 1's paths and path 0 of prompt 2 are done
            keep = torch.tensor([0, 1, 2, 3, 9, 10, 11])
            layer.batch_select_indices(keep)
            ref_k, ref_v, ref_valid, rows = ref_k[keep], ref_v[keep], ref_valid[keep], rows[keep]
        n = rows.numel()
        new_k, new_v = torch.randn(n, g, 1, hd, dtype=torch.float64), torch.randn(n, g, 1, hd, dtype=torch.float64)
        query = torch.randn(n, g * rep, 1, hd, dtype=torch.float64)
        assert layer.update(new_k, new_v) == (None, None)  # the model ignores what update returns
        ref_k, ref_v = torch.cat([ref_k, new_k], dim=2), torch.cat([ref_v, new_v], dim=2)
        ref_valid = torch.cat([ref_valid, torch.ones(n, 1, dtype=torch.bool)], dim=1)
        expected = F.scaled_dot_product_attention(
            query, ref_k.repeat_interleave(rep, 1), ref_v.repeat_interleave(rep, 1),
            attn_mask=ref_valid[:, None, None, :])  # (n, h, 1, hd)
        torch.testing.assert_close(layer.attend(query), expected, rtol=0, atol=1e-12)
        assert layer.get_seq_length() == s + step + 1
    assert layer._k.shape[-2] >= 6  # grew from room 1


@pytest.mark.parametrize("fusion", ["none", "prefix", "cross_attention", "logit_bias"])
def test_next_token_logits_equal_an_ordinary_cache_with_each_prompt_repeated(fusion, monkeypatch):
    """The model through the interface: every decoder layer of the shared cache is an AttendingCacheLayer,
    the model's attention calls its `attend` at every step, and the logits of K = 3 paths per prompt
    are those of a DynamicCache holding each prompt three times."""
    model, k, steps = random_model(fusion), 3, 8
    ids = torch.randint(3, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded prompt
    prs, prs_mask = torch.randn(2, 8), torch.tensor([True, False])
    calls = []
    attend = SharedPromptLayer.attend
    monkeypatch.setattr(SharedPromptLayer, "attend", lambda self, q: calls.append(1) or attend(self, q))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, prs=prs, prs_mask=prs_mask, use_cache=True)
        shared = model(input_ids=ids, attention_mask=mask, prs=prs, prs_mask=prs_mask, use_cache=True)
        ref.cache.batch_repeat_interleave(k)
        prefix = shared.cache.get_seq_length() - ids.shape[1]  # the PRS prefix (prefix mode) is always valid
        key_valid = torch.cat([torch.ones(2, prefix, dtype=torch.long), mask], dim=1).bool()
        share_prompts(shared.cache, model.config.num_hidden_layers, key_valid, k, room=4)
        layers = shared.cache.layers[: model.config.num_hidden_layers]
        assert all(isinstance(layer, AttendingCacheLayer) for layer in layers)
        assert not isinstance(ref.cache.layers[0], AttendingCacheLayer)
        m = mask.repeat_interleave(k, 0)  # (6, s): the reference's padding mask over all event tokens
        position = m.sum(dim=1)  # (6,) event position of each path's next token
        cache_a, cache_b = ref.cache, shared.cache
        for _ in range(steps):
            new = torch.randint(3, VOCAB, (2 * k, 1))  # each path its own token
            m = torch.cat([m, torch.ones(2 * k, 1, dtype=m.dtype)], dim=1)
            a = model(input_ids=new, attention_mask=m, cache=cache_a, use_cache=True)
            b = model(input_ids=new, position_ids=position[:, None], cache=cache_b, use_cache=True)
            torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=1e-5)
            cache_a, cache_b, position = a.cache, b.cache, position + 1
    assert len(calls) == steps * model.config.num_hidden_layers
    assert cache_b.get_seq_length() == cache_a.get_seq_length() == prefix + ids.shape[1] + steps


def test_a_hub_remote_code_copy_of_the_model_takes_the_shared_prompt_cache(tmp_path, monkeypatch):
    """trust_remote_code loads the model file as another module with its own AttendingCacheLayer: the
    installed shared-prompt layer must count as one there too, and sample the same risks."""
    copy = tmp_path / "hub_copy_of_ehr_prs"  # what a hub folder carries: the model files, no package __init__
    copy.mkdir()
    for name in ("configuration_ehr_prs.py", "modeling_ehr_prs.py"):
        shutil.copy(Path(modeling_ehr_prs.__file__).parent / name, copy / name)
    monkeypatch.syspath_prepend(str(tmp_path))
    from hub_copy_of_ehr_prs import modeling_ehr_prs as remote

    assert remote.AttendingCacheLayer is not AttendingCacheLayer
    assert isinstance(SharedPromptLayer(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4),
                                        torch.ones(1, 3, dtype=torch.bool), 2, 1), remote.AttendingCacheLayer)
    assert not isinstance(DynamicLayer(), remote.AttendingCacheLayer)
    local = random_model("prefix")
    twin = remote.EhrPrsForCausalLM(remote.EhrPrsConfig.from_dict(local.config.to_dict())).eval()
    twin.load_state_dict(local.state_dict())
    days = torch.zeros(VOCAB)
    days[3], days[4] = 1.0, 7.0
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    a, b = (sample_risk(m, prompts, [20, 21], days, 30.0, "survival", 4, max_new_tokens=24, seed=2, progress=False,
                        control_variates=False) for m in (local, twin))
    assert a.generated_tokens > 3 * 4
    assert a.probability.tolist() == b.probability.tolist()


def test_the_risk_command_imports_no_torch_until_it_runs():
    """`ehr-prs risk --help` (the command's flags) must not pay for torch, transformers or datasets."""
    code = ("import argparse, sys\n"
            "from ehr_prs.risk import command\n"
            "command.add_arguments(argparse.ArgumentParser())\n"
            "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
