"""EhrPrsConfig and the model: shapes, save/load, KV cache, padding, PRS handling, PEFT, remote code.

Tiny configs only (~0.1 M parameters): the whole file runs in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError

import modeling_ehr_prs  # noqa: F401  (registers the Auto classes)
from modeling_ehr_prs.configuration_ehr_prs import PRESETS, EhrPrsConfig
from modeling_ehr_prs.modeling_ehr_prs import EhrPrsForCausalLM, EhrPrsForSequenceClassification

FUSIONS = ["none", "prefix", "cross_attention", "logit_bias"]
N_PRS = 6
VOCAB = PRESETS["tiny"]["vocab_size"]
ATOL = 1e-5


def tiny_config(fusion: str = "prefix", **overrides) -> EhrPrsConfig:
    """fusion "centered" = cross_attention with prs_centered=True."""
    if fusion == "centered":
        fusion, overrides = "cross_attention", {"prs_centered": True, **overrides}
    return EhrPrsConfig.from_preset("tiny", **{"n_prs": N_PRS, "prs_fusion": fusion, "prs_dropout": 0.0, **overrides})


def make_model(fusion: str, seed: int = 0, open_gates: bool = True, **overrides) -> EhrPrsForCausalLM:
    """A tiny model in eval mode; cross-attention output projections (and the logit bias's `up`, 0 at
    init too) drawn so the PRS actually matter."""
    torch.manual_seed(seed)
    model = EhrPrsForCausalLM(tiny_config(fusion, **overrides)).eval()
    if open_gates:
        with torch.no_grad():
            for layer in model.model.layers:
                if layer.prs_cross_attn is not None:
                    layer.prs_cross_attn.out.weight.normal_(0.0, 0.02)  # 0 at init
                    layer.prs_cross_attn.gate.fill_(0.7)
            if model.prs_logit_bias is not None:
                model.prs_logit_bias.up.normal_(0.0, 0.5)
    return model


def batch(b: int = 3, s: int = 9, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, s), generator=g)
    prs = torch.randn(b, N_PRS, generator=g)
    prs_mask = torch.tensor([True, False, True][:b] + [True] * max(0, b - 3))
    return ids, prs, prs_mask


# --- config -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, field", [
    (dict(prs_fusion="concat"), "prs_fusion"),
    (dict(hidden_size=-8), "hidden_size"),
    (dict(hidden_size="64"), "hidden_size"),
    (dict(hidden_size=60, num_attention_heads=8), "num_attention_heads"),
    (dict(prs_cross_attention_layers=[0, 5]), "prs_cross_attention_layers"),
    (dict(n_prs=-1), "n_prs"),
    (dict(prs_dropout=1.5), "prs_dropout"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
])
def test_config_rejects_bad_values_naming_the_field(bad, field):
    # transformers 5's strict config: "Validation error for field 'x'" / "... validator 'validate_x'".
    with pytest.raises(StrictDataclassError, match=field):
        EhrPrsConfig.from_preset("tiny", **bad)


def test_config_properties_say_what_each_fusion_builds():
    expected = {  # fusion: (prefix tokens, adapter MLP, cross-attention, logit bias, reads the PRS)
        "none": (0, False, False, False, False),
        "prefix": (4, True, False, False, True),
        "cross_attention": (0, True, True, False, True),
        "logit_bias": (0, False, False, True, True),
    }
    for fusion, want in expected.items():
        c = tiny_config(fusion)
        assert (c.num_prefix_tokens, c.has_prs_adapter, c.has_cross_attention, c.has_logit_bias, c.reads_prs) == want
        model = EhrPrsForCausalLM(c)
        assert model.model.prefix_length() == c.num_prefix_tokens
        assert (model.model.prs_adapter is not None, model.prs_logit_bias is not None) == want[1:4:2]
        assert any(layer.prs_cross_attn is not None for layer in model.model.layers) == c.has_cross_attention
    # An EHR-only dataset (n_prs 0) keeps the prefix of "no genotype" tokens but reads no scores.
    no_scores = tiny_config("prefix", n_prs=0, prs_tokens=3)
    assert (no_scores.num_prefix_tokens, no_scores.reads_prs) == (3, False)


def test_config_round_trips_and_model_revalidates_overrides(tmp_path):
    config = tiny_config("cross_attention", prs_cross_attention_layers=[1])
    config.save_pretrained(tmp_path)
    loaded = EhrPrsConfig.from_pretrained(tmp_path)
    assert (loaded.prs_fusion, loaded.n_prs, loaded.prs_cross_attention_layers) == ("cross_attention", N_PRS, [1])
    assert loaded.rope_parameters["rope_theta"] == 10000.0
    # from_pretrained(..., key=value) sets fields after __init__: a field is checked as it is set,
    # and the model re-checks the rules between fields.
    with pytest.raises(StrictDataclassError, match="prs_fusion"):
        loaded.prs_fusion = "film"
    loaded.prs_cross_attention_layers = []
    with pytest.raises(StrictDataclassError, match="prs_cross_attention_layers"):
        EhrPrsForCausalLM(loaded)
    assert EhrPrsConfig(prs_cross_attention_layers=None, num_hidden_layers=5).prs_cross_attention_layers == [0, 2, 4]
    with pytest.raises(ValueError, match="unknown preset"):
        EhrPrsConfig.from_preset("huge")


def non_embedding_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)


def test_presets_have_the_documented_sizes():
    tiny = EhrPrsForCausalLM(EhrPrsConfig.from_preset("tiny"))
    assert 80_000 <= sum(p.numel() for p in tiny.parameters()) <= 150_000
    with torch.device("meta"):
        small = EhrPrsForCausalLM(EhrPrsConfig.from_preset("small"))
    assert 2_000_000 <= non_embedding_params(small) <= 3_000_000
    paper = EhrPrsConfig.from_preset("paper")
    assert (paper.hidden_size, paper.num_hidden_layers, paper.num_attention_heads,
            paper.max_position_embeddings, paper.prs_tokens, paper.n_prs) == (960, 12, 8, 2048, 10, 3481)


# --- forward ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fusion", [*FUSIONS, "centered"])
def test_shapes_and_loss_for_each_fusion(fusion):
    model = make_model(fusion)
    ids, prs, prs_mask = batch()
    out = model(ids, attention_mask=torch.ones_like(ids), prs=prs, prs_mask=prs_mask, labels=ids)
    assert out.logits.shape == (3, 9, VOCAB)  # aligned with input_ids: no prefix positions
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, manual, atol=1e-5)
    assert model(ids, prs=prs, prs_mask=prs_mask, logits_to_keep=1).logits.shape == (3, 1, VOCAB)
    adapter_names = [n for n, _ in model.named_parameters() if "prs_" in n]
    assert (len(adapter_names) > 0) == (fusion != "none")


@pytest.mark.parametrize("fusion", ["prefix", "cross_attention", "centered", "logit_bias"])
def test_ehr_only_data_with_an_adapter(fusion):
    """n_prs=0 (no PRS table): everyone gets the learned no-genotype tokens; a (b, 0) prs is accepted."""
    torch.manual_seed(0)
    model = EhrPrsForCausalLM(tiny_config(fusion, n_prs=0)).eval()
    ids, _, _ = batch()
    out = model(ids)
    assert out.logits.shape == (3, 9, VOCAB)
    assert torch.equal(model(ids, prs=torch.zeros(3, 0), prs_mask=torch.zeros(3, dtype=torch.bool)).logits, out.logits)
    with pytest.raises(ValueError, match="n_prs is 0"):
        model(ids, prs=torch.zeros(3, 2))


def test_loss_ignores_padding_and_minus_100():
    model = make_model("prefix")
    ids, prs, prs_mask = batch()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in row 0
    labels = ids.clone()
    labels[1, 5] = -100
    out = model(ids, attention_mask=mask, prs=prs, prs_mask=prs_mask, labels=labels)
    target = labels[:, 1:].clone()
    target[0, :2] = -100  # padded positions 1, 2 are not predicted
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), target.reshape(-1))
    assert torch.allclose(out.loss, manual, atol=1e-5)


def test_wrong_prs_width_names_both_numbers():
    model = make_model("prefix")
    ids, _, prs_mask = batch()
    with pytest.raises(ValueError, match=r"prs has 4 columns.*n_prs is 6"):
        model(ids, prs=torch.randn(3, 4), prs_mask=prs_mask)
    with pytest.raises(ValueError, match="prs_mask marks genotyped"):
        model(ids, prs=None, prs_mask=prs_mask)
    with pytest.raises(ValueError, match="NaN"):
        model(ids, prs=torch.full((3, N_PRS), float("nan")), prs_mask=prs_mask)


@pytest.mark.parametrize("fusion", ["prefix", "cross_attention", "logit_bias"])
def test_mixed_genotyped_batch(fusion):
    model = make_model(fusion)
    ids, prs, _ = batch()
    prs_mask = torch.tensor([True, False, True])
    base = model(ids, prs=prs, prs_mask=prs_mask).logits
    # The non-genotyped row ignores whatever sits in its prs row (NaN included).
    other = prs.clone()
    other[1] = float("nan")
    assert torch.equal(model(ids, prs=other, prs_mask=prs_mask).logits[1], base[1])
    assert torch.equal(model(ids, prs=None).logits[1], base[1])  # prs=None == not genotyped
    # Genotyped rows do depend on their PRS, and only on their own.
    other = prs.clone()
    other[0] += 1.0
    changed = model(ids, prs=other, prs_mask=prs_mask).logits
    assert (changed[0] - base[0]).abs().max() > 1e-4
    assert torch.equal(changed[2], base[2])
    # "No genotype" is not an all-zeros PRS (which would look like an average person), except for
    # the logit bias, which is centred by construction: average scores shift nothing.
    zeros_genotyped = model(ids, prs=torch.zeros_like(prs), prs_mask=torch.ones(3, dtype=torch.bool)).logits
    if fusion == "logit_bias":
        assert torch.equal(zeros_genotyped[1], base[1])
    else:
        assert (zeros_genotyped[1] - base[1]).abs().max() > 1e-4
    # Without prs_mask, a row with a NaN counts as not genotyped.
    other = prs.clone()
    other[1, 0] = float("nan")
    assert torch.equal(model(ids, prs=other).logits[1], base[1])


def test_centered_cross_attention_moves_only_with_the_scores():
    """prs_centered: a row without genotype, or with all-zero (average) scores, gets exactly the
    decoder's own logits, even with trained (non-zero) cross-attention weights; other rows move,
    and the effect of +x and -x is not the same shift twice (it is not a constant offset)."""
    model = make_model("centered")
    ehr_only = EhrPrsForCausalLM(tiny_config("none")).eval()
    missing = ehr_only.load_state_dict(model.state_dict(), strict=False)
    assert not missing.missing_keys
    ids, prs, prs_mask = batch()
    mask = torch.ones_like(ids)
    mask[2, :3] = 0
    base = ehr_only(ids, attention_mask=mask).logits
    out = model(ids, attention_mask=mask, prs=prs, prs_mask=prs_mask).logits
    assert torch.equal(out[1], base[1])  # not genotyped
    assert (out[0] - base[0]).abs().max() > 1e-4 and (out[2] - base[2]).abs().max() > 1e-4
    zeros = model(ids, attention_mask=mask, prs=torch.zeros_like(prs), prs_mask=torch.ones(3, dtype=torch.bool)).logits
    assert torch.equal(zeros, base)  # the average genome
    assert torch.equal(model(ids, attention_mask=mask).logits, base)  # prs=None
    minus = model(ids, attention_mask=mask, prs=-prs, prs_mask=prs_mask).logits
    assert (out[0] - base[0] + minus[0] - base[0]).abs().max() > 1e-6
    # the same holds through the KV cache, and in training mode for rows hidden by prs_dropout
    cached = model(ids[:, :5], prs=prs, prs_mask=prs_mask, use_cache=True)
    step = model(ids[:, 5:6], attention_mask=torch.ones(3, 6, dtype=torch.long), past_key_values=cached.cache).logits
    assert torch.allclose(step[1], ehr_only(ids[1:2, :6]).logits[0, 5:6], atol=ATOL)  # cached vs full: float order
    hidden = make_model("centered", prs_dropout=1.0).train()
    ehr_only.train()
    torch.testing.assert_close(hidden(ids, prs=prs, prs_mask=prs_mask).logits, ehr_only(ids).logits, rtol=0, atol=0)
    with pytest.raises(StrictDataclassError, match="prs_centered"):
        tiny_config("prefix", prs_centered=True)


def test_prs_dropout_hides_prs_only_in_training():
    model = make_model("prefix", prs_dropout=1.0)
    ids, prs, _ = batch()
    genotyped = torch.ones(3, dtype=torch.bool)
    missing = model(ids, prs=None).logits
    assert (model(ids, prs=prs, prs_mask=genotyped).logits - missing).abs().max() > 1e-4  # eval: PRS used
    model.train()
    assert torch.allclose(model(ids, prs=prs, prs_mask=genotyped).logits, missing, atol=1e-6)  # train: all hidden


def test_gradients_reach_the_adapter():
    model = make_model("prefix").train()
    ids, prs, prs_mask = batch()
    model(ids, prs=prs, prs_mask=prs_mask, labels=ids).loss.backward()
    adapter = model.model.prs_adapter
    for p in (adapter.fc_in.weight, adapter.fc_out.weight, adapter.no_genotype):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # Cross-attention starts with a zero output projection behind an open gate: the projection
    # gets a gradient at the first step, the adapter behind it once the projection has moved.
    closed = make_model("cross_attention", open_gates=False).train()
    closed(ids, prs=prs, prs_mask=prs_mask, labels=ids).loss.backward()
    xattn = closed.model.layers[0].prs_cross_attn
    assert torch.tanh(xattn.gate).item() > 0.5 and xattn.out.weight.abs().sum() == 0
    assert xattn.out.weight.grad.abs().sum() > 0
    assert closed.model.prs_adapter.fc_in.weight.grad.abs().sum() == 0
    opened = make_model("cross_attention").train()
    nan_row = prs.clone()
    nan_row[1] = float("nan")  # row 1 is not genotyped: its NaNs must not poison the gradients
    opened(ids, prs=nan_row, prs_mask=prs_mask, labels=ids).loss.backward()
    assert opened.model.prs_adapter.fc_in.weight.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in opened.parameters() if p.grad is not None)


class _Wrapped(torch.nn.Module):
    """Stands in for a PEFT-wrapped linear: not an nn.Linear, same function."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def test_reassociated_cross_attention_equals_the_textbook_form():
    model = make_model("cross_attention")
    ids, prs, prs_mask = batch()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    fast = model(ids, attention_mask=mask, prs=prs, prs_mask=prs_mask).logits
    for layer in model.model.layers:
        if layer.prs_cross_attn is not None:
            layer.prs_cross_attn.query = _Wrapped(layer.prs_cross_attn.query)
            layer.prs_cross_attn.out = _Wrapped(layer.prs_cross_attn.out)
            assert not layer.prs_cross_attn.reassociated()
    textbook = model(ids, attention_mask=mask, prs=prs, prs_mask=prs_mask).logits
    assert torch.allclose(fast, textbook, atol=ATOL)


@pytest.mark.parametrize("fusion", ["prefix", "cross_attention", "centered"])
def test_gradient_checkpointing_gives_the_same_gradients(fusion):
    ids, prs, prs_mask = batch()
    grads = []
    for checkpointing in (False, True):
        model = make_model(fusion).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(ids, prs=prs, prs_mask=prs_mask, labels=ids).loss.backward()
        grads.append(model.model.prs_adapter.fc_in.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# --- padding and the KV cache -------------------------------------------------------------------

@pytest.mark.parametrize("fusion", [*FUSIONS, "centered"])
def test_padded_rows_match_the_row_alone(fusion):
    model = make_model(fusion)
    ids, prs, prs_mask = batch(b=2, s=8)
    short = ids[0, :5]
    alone = model(short[None], prs=prs[:1], prs_mask=prs_mask[:1]).logits[0]  # (5, V)
    pad = torch.zeros(3, dtype=torch.long)
    left = torch.stack([torch.cat([pad, short]), ids[1]])
    left_mask = torch.stack([torch.cat([torch.zeros(3), torch.ones(5)]), torch.ones(8)]).long()
    out_left = model(left, attention_mask=left_mask, prs=prs, prs_mask=prs_mask).logits
    assert torch.allclose(out_left[0, 3:], alone, atol=ATOL)
    right = torch.stack([torch.cat([short, pad]), ids[1]])
    right_mask = torch.stack([torch.cat([torch.ones(5), torch.zeros(3)]), torch.ones(8)]).long()
    out_right = model(right, attention_mask=right_mask, prs=prs, prs_mask=prs_mask).logits
    assert torch.allclose(out_right[0, :5], alone, atol=ATOL)
    # the unpadded row is unaffected by its neighbour's padding
    full = model(ids[1:], prs=prs[1:], prs_mask=prs_mask[1:]).logits[0]
    assert torch.allclose(out_left[1], full, atol=ATOL)


@pytest.mark.parametrize("fusion", [*FUSIONS, "centered"])
def test_cached_decoding_matches_full_forward(fusion):
    """Left-padded prompt, then one token per call with prs omitted: same logits as one full pass."""
    model = make_model(fusion)
    ids, prs, prs_mask = batch(b=3, s=10)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    full = model(ids, attention_mask=mask, prs=prs, prs_mask=prs_mask, use_cache=False).logits
    prompt = 6
    out = model(ids[:, :prompt], attention_mask=mask[:, :prompt], prs=prs, prs_mask=prs_mask, use_cache=True)
    steps = [out.logits]
    cache = out.cache
    k = model.config.prs_tokens if fusion == "prefix" else 0
    assert cache.get_seq_length() == prompt + k
    for t in range(prompt, ids.shape[1]):
        out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
        cache = out.cache
    assert torch.allclose(torch.cat(steps, dim=1)[mask.bool()], full[mask.bool()], atol=ATOL)
    # a two-token chunk on top of a cache works too
    out = model(ids[:, :prompt], attention_mask=mask[:, :prompt], prs=prs, prs_mask=prs_mask, use_cache=True)
    two = model(ids[:, prompt:prompt + 2], attention_mask=mask[:, :prompt + 2], past_key_values=out.cache).logits
    assert torch.allclose(two, full[:, prompt:prompt + 2], atol=ATOL)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids[:, :1], attention_mask=mask, past_key_values=out.cache)


@pytest.mark.parametrize("fusion", ["prefix", "cross_attention", "centered", "logit_bias"])
def test_cache_batch_operations_keep_the_prs_in_step(fusion):
    """Repeat a prefilled cache per sampled path and drop rows: the PRS prefix/memory follow their rows."""
    model = make_model(fusion)
    ids, prs, prs_mask = batch(b=3, s=7)
    out = model(ids[:, :5], prs=prs, prs_mask=prs_mask, use_cache=True)
    cache = out.cache
    cache.batch_repeat_interleave(2)  # 2 paths per subject: rows 0,0,1,1,2,2
    cache.batch_select_indices(torch.tensor([1, 2, 5]))  # keep subjects 0, 1, 2 (one path each)
    step = model(ids[:, 5:6], attention_mask=torch.ones(3, 6, dtype=torch.long), past_key_values=cache).logits
    full = model(ids[:, :6], prs=prs, prs_mask=prs_mask, use_cache=False).logits[:, 5:6]
    assert torch.allclose(step, full, atol=ATOL)


@pytest.mark.parametrize("fusion", ["prefix", "cross_attention", "centered", "logit_bias"])
def test_generate_matches_greedy_full_forwards(fusion):
    model = make_model(fusion)
    ids, prs, prs_mask = batch(b=2, s=6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    generated = model.generate(ids, attention_mask=mask, prs=prs, prs_mask=prs_mask, max_new_tokens=5,
                               do_sample=False, eos_token_id=None, pad_token_id=0)
    seq, seq_mask = ids, mask
    for _ in range(5):  # greedy decoding without any cache
        logits = model(seq, attention_mask=seq_mask, prs=prs, prs_mask=prs_mask, use_cache=False).logits
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        seq_mask = torch.cat([seq_mask, torch.ones(2, 1, dtype=seq_mask.dtype)], dim=1)
    assert torch.equal(generated, seq)
    sampled = model.generate(ids, attention_mask=mask, prs=prs, prs_mask=prs_mask, max_new_tokens=3, do_sample=True,
                             num_return_sequences=4, eos_token_id=None, pad_token_id=0)
    assert sampled.shape == (8, 9)


# --- checkpoints --------------------------------------------------------------------------------

@pytest.mark.parametrize("fusion", ["prefix", "cross_attention", "centered", "logit_bias"])
def test_save_load_by_class_and_auto_class(tmp_path, fusion):
    from transformers import AutoModelForCausalLM

    model = make_model(fusion)
    ids, prs, prs_mask = batch()
    expected = model(ids, prs=prs, prs_mask=prs_mask).logits
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert {"modeling_ehr_prs.py", "configuration_ehr_prs.py"} <= files
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert {"AutoConfig", "AutoModelForCausalLM", "AutoModelForSequenceClassification"} <= set(auto_map)
    for loaded in (EhrPrsForCausalLM.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert type(loaded) is EhrPrsForCausalLM
        assert torch.equal(loaded.eval()(ids, prs=prs, prs_mask=prs_mask).logits, expected)
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied


def test_untied_embeddings_stay_untied(tmp_path):
    model = make_model("none", tie_word_embeddings=False)
    model.save_pretrained(tmp_path)
    loaded = EhrPrsForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_ehr_only_checkpoint_extends_to_cross_attention_unchanged(tmp_path):
    ehr_only = make_model("none")
    ids, prs, prs_mask = batch()
    expected = ehr_only(ids).logits
    ehr_only.save_pretrained(tmp_path)
    extended, info = EhrPrsForCausalLM.from_pretrained(tmp_path, prs_fusion="cross_attention", n_prs=N_PRS,
                                                       output_loading_info=True)
    assert info["missing_keys"] and all("prs_" in key for key in info["missing_keys"])
    assert not info["unexpected_keys"]
    assert all(layer.prs_cross_attn.out.weight.abs().sum() == 0 for layer in extended.model.layers if layer.prs_cross_attn)
    assert torch.equal(extended.eval()(ids, prs=prs, prs_mask=prs_mask).logits, expected)


def test_remote_code_loads_where_the_package_is_not_importable(tmp_path):
    model = make_model("prefix")
    ids, prs, prs_mask = batch()
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    expected = model(ids, prs=prs, prs_mask=prs_mask).logits
    torch.save({"ids": ids, "prs": prs, "prs_mask": prs_mask, "expected": expected}, tmp_path / "io.pt")
    # -I -S: no cwd, no PYTHONPATH, no .pth files (the editable install lives in a .pth); only site-packages.
    script = textwrap.dedent(f"""
        import importlib.util, sys
        sys.path.append({sysconfig.get_paths()["purelib"]!r})
        assert importlib.util.find_spec("modeling_ehr_prs") is None, "package is importable"
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
        io = torch.load({str(tmp_path / "io.pt")!r})
        model = AutoModelForCausalLM.from_pretrained({str(ckpt)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        got = model(io["ids"], prs=io["prs"], prs_mask=io["prs_mask"]).logits
        print("MAXDIFF", (got - io["expected"]).abs().max().item())
        clf = AutoModelForSequenceClassification.from_pretrained({str(ckpt)!r}, trust_remote_code=True, num_labels=1)
        print("CLF", type(clf).__name__, tuple(clf(io["ids"], prs=io["prs"], prs_mask=io["prs_mask"]).logits.shape))
    """)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PATH": os.environ.get("PATH", "")}
    done = subprocess.run([sys.executable, "-I", "-S", "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.split("MAXDIFF")[1].split()[0]) == 0.0
    assert "CLF EhrPrsForSequenceClassification (3, 1)" in done.stdout


# --- sequence classification and PEFT -----------------------------------------------------------

def test_classifier_pools_last_real_token_and_computes_losses():
    torch.manual_seed(0)
    config = tiny_config("prefix", num_labels=1)
    clf = EhrPrsForSequenceClassification(config).eval()
    ids, prs, prs_mask = batch(b=2, s=6)
    alone = clf(ids[:1, :4], prs=prs[:1], prs_mask=prs_mask[:1]).logits
    pad = torch.zeros(1, 2, dtype=torch.long)
    ones, zeros = torch.ones(1, 4, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long)
    left = clf(torch.cat([pad, ids[:1, :4]], 1), attention_mask=torch.cat([zeros, ones], 1), prs=prs[:1],
               prs_mask=prs_mask[:1]).logits
    right = clf(torch.cat([ids[:1, :4], pad], 1), attention_mask=torch.cat([ones, zeros], 1), prs=prs[:1],
                prs_mask=prs_mask[:1]).logits
    assert alone.shape == (1, 1)
    assert torch.allclose(left, alone, atol=ATOL) and torch.allclose(right, alone, atol=ATOL)
    labels = torch.tensor([1.0, 0.0])
    out = clf(ids, prs=prs, prs_mask=prs_mask, labels=labels)
    assert torch.allclose(out.loss, torch.nn.functional.binary_cross_entropy_with_logits(out.logits[:, 0], labels))
    with pytest.raises(ValueError, match="logit_bias"):  # it would never read the scores
        EhrPrsForSequenceClassification(tiny_config("logit_bias", num_labels=1))
    clf2 = EhrPrsForSequenceClassification(tiny_config("prefix", num_labels=2)).eval()
    out2 = clf2(ids, prs=prs, prs_mask=prs_mask, labels=torch.tensor([1, 0]))
    assert out2.logits.shape == (2, 2)
    assert torch.allclose(out2.loss, torch.nn.functional.cross_entropy(out2.logits, torch.tensor([1, 0])))


def test_lora_classifier_trains_only_lora_and_score(tmp_path):
    from peft import LoraConfig, TaskType, get_peft_model

    lm = make_model("prefix")
    lm.save_pretrained(tmp_path / "lm")
    clf = EhrPrsForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=1)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(clf, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=targets))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".score." in n for n in trainable)
    assert not any("prs_adapter" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids, prs, prs_mask = batch()
    for _ in range(2):  # LoRA B starts at zero: the second step moves A too
        loss = peft_model(input_ids=ids, prs=prs, prs_mask=prs_mask, labels=torch.tensor([1.0, 0.0, 1.0])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def _prs_dependent_batch(g: torch.Generator, n: int, length: int = 24, marker: int = 5):
    """Rows of random codes where `marker` appears once with probability sigmoid(-1 + 2 * prs[:, 0]).

    Only PRS column 0 matters; the marker's position is uniform over 1..length-1, so at position 0
    the best next-token log-odds of the marker differ by log(sigmoid(2)/sigmoid(-4)) = 3.9
    between prs[:, 0] = +1.5 and -1.5.
    """
    prs = torch.randn(n, N_PRS, generator=g)
    ids = torch.randint(marker + 1, VOCAB, (n, length), generator=g)
    has = torch.rand(n, generator=g) < torch.sigmoid(-1.0 + 2.0 * prs[:, 0])
    where = torch.randint(1, length, (n,), generator=g)
    ids[has, where[has]] = marker
    ids[:, 0] = 1
    return ids, prs


@pytest.mark.parametrize("fusion", ["prefix", "cross_attention", "centered", "logit_bias"])
def test_a_new_adapter_on_a_frozen_backbone_learns_a_prs_effect(fusion):
    """The paper's second route at toy scale: an EHR-only model, then only the new adapter trained.
    The PRS must reach the next-token distribution through the frozen decoder: a log-odds contrast
    well above 0 for the effect column (150 steps give 0.9-2.4 of the true 3.9 over seeds) and a
    much smaller one for a column without effect. PRS that never reach the logits, reach them
    for the wrong rows or get no gradient give ~0. The centred adapter starts slower on some
    seeds (150 steps: 0.36 / 1.59 / 2.72 for seeds 0-2; 300 steps: 1.57 / 0.97 for seeds 0-1), so it gets 300."""
    marker, steps = 5, 300 if fusion == "centered" else 150
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    base = EhrPrsForCausalLM(tiny_config("none"))
    opt = torch.optim.AdamW(base.parameters(), lr=3e-3)
    for _ in range(steps):
        ids, _ = _prs_dependent_batch(g, 32)
        loss = base(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model = EhrPrsForCausalLM(tiny_config(fusion))
    missing = model.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert missing and all("prs" in k for k in missing)
    trainable = [p for name, p in model.named_parameters() if p.requires_grad_("prs" in name).requires_grad]
    opt = torch.optim.AdamW(trainable, lr=3e-3, weight_decay=0.1)
    for _ in range(steps):
        ids, prs = _prs_dependent_batch(g, 32)
        loss = model(ids, prs=prs, prs_mask=torch.ones(32, dtype=torch.bool), labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, value in base.state_dict().items():  # the backbone did not move
        assert torch.equal(model.state_dict()[name], value), name
    model.eval()

    def contrast(column: int) -> float:
        """Next-token log-odds of the marker at position 0: PRS column at +1.5 minus at -1.5."""
        prs = torch.zeros(2, N_PRS)
        prs[0, column], prs[1, column] = 1.5, -1.5
        ids = torch.ones(2, 1, dtype=torch.long)
        with torch.no_grad():
            logp = torch.log_softmax(model(ids, prs=prs, prs_mask=torch.ones(2, dtype=torch.bool)).logits[:, 0], -1)
        logit = logp[:, marker] - torch.log1p(-logp[:, marker].exp())
        return float(logit[0] - logit[1])

    effect, control = contrast(0), contrast(1)
    assert effect > 0.5, effect  # truth 3.9
    assert abs(control) < 0.5 * effect, (effect, control)  # a column without effect
