"""The risk engine against an answer known exactly.

A real EhrPrsForCausalLM is set by hand so that its next-token distribution is the same fixed
vector `p` at every step, whatever the history: then the probability that a target token comes
before the generated clock passes the horizon (or a stop token ends the record) follows from a
small dynamic programme over elapsed days, and every estimator can be checked against it.
"""

import math

import numpy as np
import pytest
import torch

from modeling_ehr_prs.configuration_ehr_prs import EhrPrsConfig
from ehr_prs.errors import InputError
from modeling_ehr_prs.modeling_ehr_prs import EhrPrsForCausalLM
from ehr_prs.risk.sampling import coupled_sample, inverse_cdf_sample, sample_risk

# token ids of the hand-set vocabulary
PAD, EOS, TARGET_A, TARGET_B, DAY1, WEEK1, OTHER = 0, 1, 2, 3, 4, 5, 6
VOCAB = 16
HORIZON = 30.0
DAYS = torch.zeros(VOCAB)
DAYS[DAY1], DAYS[WEEK1] = 1.0, 7.0


def fixed_distribution() -> torch.Tensor:
    p = torch.full((VOCAB,), 1e-9)
    p[TARGET_A], p[TARGET_B] = 0.006, 0.004  # h = 0.01 per step
    p[EOS] = 0.01
    p[DAY1], p[WEEK1] = 0.25, 0.05
    p[OTHER:] = (1 - p[:OTHER].sum()) / (VOCAB - OTHER)
    return p / p.sum()


def constant_model(p: torch.Tensor) -> EhrPrsForCausalLM:
    """A decoder whose logits are log p at every position: blocks write nothing to the residual
    stream, every token has the same embedding, and the LM head maps that one vector to log p."""
    config = EhrPrsConfig.from_preset("tiny", vocab_size=VOCAB, tie_word_embeddings=False, prs_fusion="none",
                                      pad_token_id=PAD, eos_token_id=EOS)
    model = EhrPrsForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                param.zero_()
        e = torch.ones(config.hidden_size)
        model.model.embed_tokens.weight.copy_(e.expand(VOCAB, -1))
        model.model.norm.weight.fill_(1.0)
        normed = e / e.pow(2).mean().sqrt()  # what the final RMSNorm makes of e
        model.lm_head.weight.copy_(torch.log(p)[:, None] * normed[None, :] / normed.pow(2).sum())
    return model


def exact_risk(p: torch.Tensor) -> float:
    """P(target before the clock passes HORIZON or EOS), tokens i.i.d. from p: f(e) over days e."""
    q = float(p[TARGET_A] + p[TARGET_B])
    steps = {1: float(p[DAY1]), 7: float(p[WEEK1])}
    stay = 1.0 - q - float(p[EOS]) - sum(steps.values())  # 0-day, non-target, non-stop tokens
    f = {}
    for e in range(int(HORIZON), -1, -1):
        cont = sum(r * f[e + d] for d, r in steps.items() if e + d <= HORIZON)
        f[e] = (q + cont) / (1.0 - stay)
    return f[0]


def test_constant_model_has_the_hand_set_distribution():
    p = fixed_distribution()
    model = constant_model(p)
    ids = torch.tensor([[EOS + 5, OTHER, DAY1, WEEK1]])
    probs = model(input_ids=ids).logits.softmax(-1)
    assert torch.allclose(probs, p.expand_as(probs), atol=1e-5)


def test_three_estimators_agree_with_the_exact_risk_and_survival_has_lowest_variance():
    p = fixed_distribution()
    truth = exact_risk(p)
    assert 0.1 < truth < 0.4  # a risk where the comparison means something
    model = constant_model(p)
    prompts = [[OTHER, DAY1, OTHER], [OTHER] * 5, [DAY1]] * 8  # 24 rows of different lengths
    results = {}
    for method in ("mc", "path", "survival"):
        r = sample_risk(model, prompts, [TARGET_A, TARGET_B], DAYS, HORIZON, method=method, samples=32,
                        stop_ids=[EOS], pad_token_id=PAD, max_new_tokens=600, seed=1, progress=False,
                        control_variates=False)  # the estimators themselves; the correction is tested below
        assert r.truncated_paths == 0
        values = r.path_values.ravel()  # every path is an i.i.d. draw here
        results[method] = (values.mean(), values.std(ddof=1) / math.sqrt(values.size), values.var(ddof=1))
    for method, (mean, se, _) in results.items():
        # mc and survival are unbiased; the paper's path estimator keeps sampling after a target
        # token would have happened, a bias of ~q x risk here (< 0.01), allowed for explicitly.
        bias = 0.01 if method == "path" else 0.0
        assert abs(mean - truth) < 4 * se + bias, (method, mean, truth, se)
    assert results["survival"][2] < 0.5 * results["mc"][2]
    assert results["path"][2] < 0.5 * results["mc"][2]


@pytest.mark.parametrize("method", ["survival", "mc"])
def test_control_variates_stay_unbiased_and_cut_the_variance(method):
    """Same paths (same seed) with and without the correction: here a path's value is set by how
    many steps its clock allows, which its time and stop tokens' increments track, so the corrected
    per-row variance must fall by a large fraction, and the mean must stay on the exact risk."""
    p = fixed_distribution()
    truth = exact_risk(p)
    model = constant_model(p)
    prompts = [[OTHER, DAY1], [OTHER] * 3, [DAY1]] * 16  # 48 rows
    kw = dict(method=method, samples=16, stop_ids=[EOS], pad_token_id=PAD, max_new_tokens=600, seed=2, progress=False)
    plain = sample_risk(model, prompts, [TARGET_A, TARGET_B], DAYS, HORIZON, control_variates=False, **kw)
    cv = sample_risk(model, prompts, [TARGET_A, TARGET_B], DAYS, HORIZON, **kw)
    var_plain = plain.path_values.var(axis=1, ddof=1).mean()
    var_cv = cv.path_values.var(axis=1, ddof=1).mean()
    assert cv.variance_reduction == pytest.approx(1 - var_cv / var_plain)
    assert cv.variance_reduction > (0.6 if method == "survival" else 0.8), cv.variance_reduction  # seen: 0.82-0.84, 0.96
    assert plain.variance_reduction == 0.0
    # unbiased: the corrected values' grand mean sits on the exact risk within its standard error
    se = cv.path_values.std(ddof=1) / math.sqrt(cv.path_values.size)
    assert abs(cv.path_values.mean() - truth) < 4 * se, (cv.path_values.mean(), truth, se)
    assert np.all((cv.probability >= 0) & (cv.probability <= 1))
    # too few paths to fit one coefficient per token (2 rows x 2 paths for 16 tokens): left as sampled
    few = sample_risk(model, prompts[:2], [TARGET_A], DAYS, HORIZON, method=method, samples=2, stop_ids=[EOS],
                      seed=2, progress=False)
    assert few.variance_reduction == 0.0


@pytest.mark.parametrize("through", ["bias", "history summary"])
def test_incidence_refit_scales_the_target_rate_exactly(through):
    """A refit (w, b) adds b + w . s(prompt) to the target logits at every step; the constant model's
    final states are all ones, so w = (delta / d) 1 and b = delta are the same shift, and the risk must
    become the exact risk of the shifted distribution (targets x2 here), not the model's own."""
    p = fixed_distribution()
    model = constant_model(p)
    d = model.config.hidden_size
    delta = math.log(2.0)
    is_target = torch.zeros(VOCAB, dtype=torch.bool)
    is_target[[TARGET_A, TARGET_B]] = True
    shifted = torch.softmax(torch.log(p) + delta * is_target, dim=0)
    truth, before = exact_risk(shifted), exact_risk(p)
    assert truth > 1.4 * before  # a shift the check can see
    refit = (torch.zeros(d), delta) if through == "bias" else (torch.full((d,), delta / d), 0.0)
    prompts = [[OTHER, DAY1, OTHER], [OTHER] * 5, [DAY1]] * 8  # different lengths: left padding is pooled out
    r = sample_risk(model, prompts, [TARGET_A, TARGET_B], DAYS, HORIZON, method="survival", samples=32,
                    stop_ids=[EOS], pad_token_id=PAD, max_new_tokens=600, seed=1, progress=False,
                    control_variates=False, incidence_refit=refit)
    se = r.path_values.std(ddof=1) / math.sqrt(r.path_values.size)
    assert abs(r.path_values.mean() - truth) < 4 * se, (r.path_values.mean(), truth, se)
    assert abs(r.path_values.mean() - before) > 8 * se


def test_incidence_fit_recovers_a_known_rate_ratio_and_stays_at_zero_without_one():
    from ehr_prs.fits.incidence import fit_incidence

    rng = np.random.default_rng(0)

    def stats(n, w_true, b_true):
        s = rng.normal(size=(n, 4))
        p = np.full(n, 0.02)
        y = (rng.random(n) < p * np.exp(b_true + s @ w_true)).astype(float)
        return {"s": s, "p": p, "y": y, "weight": np.ones(n)}

    w_true = np.array([0.8, -0.5, 0.0, 0.0])
    w, b, report = fit_incidence(stats(40_000, w_true, 0.3), stats(20_000, w_true, 0.3))
    assert np.abs(w - w_true).max() < 0.12 and abs(b - 0.3) < 0.12, (w, b)
    assert report["tuning_gain_nats"] > 50
    # the summary says nothing about the onsets: no gain on the tuning split, and the refit stays at 0
    w0, b0, report0 = fit_incidence(stats(20_000, np.zeros(4), 0.0), stats(10_000, np.zeros(4), 0.0), alphas=(1.0, 0.3))
    assert report0["chosen_alpha"] is None and not np.any(w0) and b0 == 0.0


def test_time_counts_generated_tokens_only():
    """A prompt full of time tokens must not use up the horizon: risk is the same as for a short prompt."""
    p = fixed_distribution()
    model = constant_model(p)
    long_time_prompt = [WEEK1] * 40  # 280 days of history, far past the 30-day horizon
    r = sample_risk(model, [long_time_prompt, [OTHER]], [TARGET_A], DAYS, HORIZON, method="survival",
                    samples=64, stop_ids=[EOS], pad_token_id=PAD, seed=0, progress=False)
    assert r.probability[0] > 0.05
    assert abs(r.probability[0] - r.probability[1]) < 4 * math.hypot(r.stderr[0], r.stderr[1])


def test_same_seed_same_answer_whatever_the_batching():
    p = fixed_distribution()
    model = constant_model(p)
    prompts = [[OTHER] * n for n in (1, 7, 3, 5)]
    a = sample_risk(model, prompts, [TARGET_A], DAYS, HORIZON, method="mc", samples=8, stop_ids=[EOS], seed=3,
                    progress=False)
    b = sample_risk(model, prompts, [TARGET_A], DAYS, HORIZON, method="mc", samples=8, stop_ids=[EOS], seed=3,
                    paths_per_batch=8, progress=False)  # one prompt per batch instead of all four
    np.testing.assert_array_equal(a.path_values, b.path_values)
    c = sample_risk(model, prompts, [TARGET_A], DAYS, HORIZON, method="mc", samples=8, stop_ids=[EOS], seed=4,
                    progress=False)
    assert not np.array_equal(a.path_values, c.path_values)


def test_inverse_cdf_sampling_has_the_distribution_and_skips_zero_mass():
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3]]).expand(200_000, -1)
    u = torch.from_numpy(1.0 - np.random.default_rng(0).random(200_000))
    ids = inverse_cdf_sample(probs, u)
    freq = torch.bincount(ids, minlength=4).double() / len(ids)
    assert freq[1] == 0 and torch.allclose(freq, probs[0].double(), atol=0.004)
    edge = inverse_cdf_sample(torch.tensor([[0.0, 1.0], [0.5, 0.5]]), torch.tensor([1e-12, 1.0], dtype=torch.float64))
    assert edge.tolist() == [1, 1]


def test_coupled_sampling_has_the_distribution_and_parts_paths_only_on_the_target():
    """Two next-token distributions that differ only in the target's mass (0.05 vs 0.10; the rest
    scaled): with the two-draw sampler the same numbers give different tokens only when one of them
    draws the target, about |0.10 - 0.05| of the time; one inverse-CDF draw over the whole
    vocabulary moves every boundary after the target and parts them far more often."""
    vocab, target = 20, 5
    is_target = torch.zeros(vocab, dtype=torch.bool)
    is_target[target] = True
    p1 = torch.full((vocab,), 0.05, dtype=torch.float64)
    p2 = p1 * 0.90 / 0.95
    p2[target] = 0.10
    u = torch.from_numpy(1.0 - np.random.default_rng(0).random((200_000, 2)))
    ids1 = coupled_sample(p1.expand(len(u), -1), is_target, u)
    ids2 = coupled_sample(p2.expand(len(u), -1), is_target, u)
    for ids, p in ((ids1, p1), (ids2, p2)):
        freq = torch.bincount(ids, minlength=vocab).double() / len(ids)
        assert torch.allclose(freq, p, atol=0.003)
    differ = ids1 != ids2
    assert abs(differ.double().mean().item() - 0.05) < 0.003
    assert bool(((ids1 == target) | (ids2 == target))[differ].all())  # only through the target
    one_draw = inverse_cdf_sample(p1.expand(len(u), -1), u[:, 1]) != inverse_cdf_sample(p2.expand(len(u), -1), u[:, 1])
    assert one_draw.double().mean().item() > 3 * differ.double().mean().item()
    # a row whose whole mass is on the target (or off it) is handled
    edge = coupled_sample(torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]), torch.tensor([False, True, False]),
                          torch.tensor([[1.0, 0.5], [1e-12, 0.5]], dtype=torch.float64))
    assert edge.tolist() == [1, 0]


def test_common_random_numbers_take_the_sampling_noise_out_of_a_paired_difference():
    """Two models a little apart (target mass 0.010 vs 0.012 per step), scored with the same seed, keep
    their paths together: the per-row difference has far less spread than with independent seeds,
    and its mean still estimates the true difference of risks."""
    p = fixed_distribution()
    q = p.clone()
    q[TARGET_A] *= 1.0 + 0.002 / float(q[TARGET_A])  # +0.002 target mass, taken from OTHER tokens
    q[OTHER:] -= 0.002 / (VOCAB - OTHER)
    truth = exact_risk(q) - exact_risk(p)
    prompts = [[OTHER]] * 64
    kw = dict(method="survival", samples=8, stop_ids=[EOS], pad_token_id=PAD, max_new_tokens=600, progress=False)
    base = sample_risk(constant_model(p), prompts, [TARGET_A, TARGET_B], DAYS, HORIZON, seed=0, **kw)
    paired = sample_risk(constant_model(q), prompts, [TARGET_A, TARGET_B], DAYS, HORIZON, seed=0, **kw)
    apart = sample_risk(constant_model(q), prompts, [TARGET_A, TARGET_B], DAYS, HORIZON, seed=1, **kw)
    d_crn = paired.probability - base.probability  # (rows,)
    d_ind = apart.probability - base.probability
    assert d_crn.std() < 0.25 * d_ind.std(), (d_crn.std(), d_ind.std())
    assert abs(d_crn.mean() - truth) < 4 * d_crn.std() / math.sqrt(len(d_crn)) + 0.002, (d_crn.mean(), truth)


def test_bad_arguments_are_clear_errors():
    model = constant_model(fixed_distribution())
    with pytest.raises(InputError, match="horizon"):
        sample_risk(model, [[OTHER]], [TARGET_A], DAYS, 0.0, progress=False)
    with pytest.raises(InputError, match="method"):
        sample_risk(model, [[OTHER]], [TARGET_A], DAYS, 10.0, method="topk", progress=False)


# ----------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def pipeline(tiny_data, tiny_lm):
    """The shared tiny cohort (root/cohort) and a 4-step prefix model (root/model)."""
    root = tiny_data
    if not (root / "model").exists():
        (root / "model").symlink_to(tiny_lm)
    return root


def cli(*argv):
    from ehr_prs import cli as cli_module

    return cli_module.main(["risk", *map(str, argv)])


def test_risk_cli_writes_meds_predictions_for_the_split(pipeline, tmp_path, capsys):
    import polars as pl

    out = tmp_path / "pred.parquet"
    c = pipeline / "cohort"
    rc = cli("--model", pipeline / "model", "--meds", c / "meds", "--prs", c / "prs.parquet", "--labels",
             c / "labels" / "t2d.parquet", "--codes", "ICD10CM/E11*", "--horizon-days", 365, "--samples", 2,
             "--max-new-tokens", 16, "--out", out)
    assert rc == 0
    # a few dozen rows x K = 2 are too few paths to fit one coefficient per token: said, not hidden
    assert "control variates not applied" in capsys.readouterr().out
    pred = pl.read_parquet(out)
    assert pred.columns == ["subject_id", "prediction_time", "boolean_value", "predicted_boolean_probability"]
    labels = pl.read_parquet(c / "labels" / "t2d.parquet")
    held = pl.read_parquet(c / "meds" / "metadata" / "subject_splits.parquet").filter(pl.col("split") == "held_out")
    expected = labels.filter(pl.col("subject_id").is_in(held["subject_id"].implode()))
    assert pred.height == expected.height > 0
    assert pred["boolean_value"].to_list() == expected["boolean_value"].to_list()
    p = pred["predicted_boolean_probability"].to_numpy()
    assert np.all((p >= 0) & (p <= 1))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--codes": "NOPE/123"}, "NOPE/123"),
        ({"--horizon-days": "0"}, "horizon"),
        ({"--split": "validation"}, "split"),
    ],
)
def test_risk_cli_bad_input_exits_2_without_output(pipeline, tmp_path, capsys, change, message):
    c = pipeline / "cohort"
    flags = {"--model": pipeline / "model", "--meds": c / "meds", "--prs": c / "prs.parquet",
             "--labels": c / "labels" / "t2d.parquet", "--codes": "ICD10CM/E11*", "--horizon-days": "365",
             "--samples": "2", "--out": tmp_path / "p.parquet"}
    flags.update(change)
    assert cli(*[x for kv in flags.items() for x in kv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p.parquet").exists()


def test_risk_cli_labels_for_absent_subjects_and_missing_standardiser(pipeline, tmp_path, capsys):
    import shutil

    import polars as pl

    c = pipeline / "cohort"
    held = pl.read_parquet(c / "meds" / "metadata" / "subject_splits.parquet").filter(pl.col("split") == "held_out")
    bad = pl.read_parquet(c / "labels" / "t2d.parquet").filter(pl.col("subject_id").is_in(held["subject_id"].implode()))
    # A subject that the held-out split assigns but whose events were removed from the data.
    meds = tmp_path / "meds"
    shutil.copytree(c / "meds", meds)
    ghost = int(bad["subject_id"][0])
    for f in (meds / "data" / "held_out").glob("*.parquet"):
        frame = pl.read_parquet(f)
        frame.filter(pl.col("subject_id") != ghost).write_parquet(f)
    args = ["--model", pipeline / "model", "--meds", meds, "--prs", c / "prs.parquet", "--labels",
            c / "labels" / "t2d.parquet", "--codes", "ICD10CM/E11*", "--horizon-days", 365, "--samples", 2,
            "--out", tmp_path / "p.parquet", "--strict-labels"]
    # the shared label policy (tests/test_input_policy.py): refused under --strict-labels, else dropped
    assert cli(*args) == 2
    assert str(ghost) in capsys.readouterr().err

    model = tmp_path / "model"
    shutil.copytree(pipeline / "model", model)
    (model / "prs_standardizer.json").unlink()
    args[1], args[3] = model, c / "meds"
    assert cli(*args) == 2
    assert "prs_standardizer.json" in capsys.readouterr().err


@pytest.mark.parametrize("room", [2, 64])
@pytest.mark.parametrize("fusion", ["none", "prefix", "cross_attention", "centered", "logit_bias"])
def test_shared_prompt_cache_gives_the_same_logits_as_repeated_prompts(fusion, room):
    """The sampler keeps one copy of each prompt for its K paths; the model must see no difference
    from K repeated copies: left padding, grouped-query heads (tiny: 4 query / 2 key-value heads),
    buffer growth, and compaction that drops a whole prompt and then part of another. Room 2: the
    buffer doubles before the compactions; room 64: the first compaction cuts it to 16 slots,
    and 25 steps must grow it again."""
    from ehr_prs.risk.shared_prompt import share_prompts as _share_prompts

    torch.manual_seed(0)
    centered = fusion == "centered"  # cross-attention with prs_centered
    config = EhrPrsConfig.from_preset("tiny", vocab_size=VOCAB, n_prs=8, prs_centered=centered,
                                      prs_fusion="cross_attention" if centered else fusion)
    model = EhrPrsForCausalLM(config).eval()
    with torch.no_grad():  # cross-attention's output projection starts at 0: draw it so the memory counts
        for layer in model.model.layers:
            if layer.prs_cross_attn is not None:
                layer.prs_cross_attn.out.weight.normal_(0.0, 0.02)
        if model.prs_logit_bias is not None:  # `up` starts at 0 too
            model.prs_logit_bias.up.normal_(0.0, 0.5)
    ids = torch.randint(3, VOCAB, (3, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded row
    prs, prs_mask = torch.randn(3, 8), torch.tensor([True, False, True])
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, prs=prs, prs_mask=prs_mask, use_cache=True)
        b = model(input_ids=ids, attention_mask=mask, prs=prs, prs_mask=prs_mask, use_cache=True)
        a.cache.batch_repeat_interleave(2)  # the reference: every path its own copy of its prompt
        prefix = b.cache.get_seq_length() - ids.shape[1]
        assert prefix == (config.prs_tokens if fusion == "prefix" else 0)
        key_valid = torch.cat([torch.ones(3, prefix, dtype=torch.long), mask], dim=1).bool()
        _share_prompts(b.cache, config.num_hidden_layers, key_valid, k=2, room=room)
        keep = torch.tensor([0, 1, 4, 5])  # prompt 1's two paths are done
        a.cache.batch_select_indices(keep)
        b.cache.batch_select_indices(keep)
        assert b.cache.layers[0].prompt_keys_t.shape[0] == 2  # its keys are gone too
        if room == 64:  # nothing generated yet: the compaction keeps 16 slots of the 64
            assert b.cache.layers[0]._k.shape[-2] == 16
        m = mask.repeat_interleave(2, 0)[keep]
        position = m.sum(dim=1)
        ca, cb = a.cache, b.cache
        for step in range(25):
            new = torch.randint(3, VOCAB, (m.shape[0], 1))
            m = torch.cat([m, torch.ones(m.shape[0], 1, dtype=m.dtype)], dim=1)
            oa = model(input_ids=new, attention_mask=m, cache=ca, use_cache=True)
            ob = model(input_ids=new, position_ids=position[:, None], cache=cb, use_cache=True)
            torch.testing.assert_close(oa.logits, ob.logits, rtol=0, atol=1e-5)
            assert cb.get_seq_length() == ca.get_seq_length()
            ca, cb, position = oa.cache, ob.cache, position + 1
            if step == 2:  # one path of prompt 0 finishes
                keep = torch.tensor([1, 2, 3])
                ca.batch_select_indices(keep)
                cb.batch_select_indices(keep)
                m, position = m[keep], position[keep]
    assert cb.layers[0]._len == 25 and cb.layers[0]._k.shape[-2] >= 25


def test_incidence_refit_cli_writes_a_refit_that_risk_uses_and_rejects_other_codes(pipeline, tmp_path, capsys):
    import json

    import polars as pl

    from ehr_prs import cli as cli_module
    from ehr_prs.fits.incidence import load_incidence

    refit = tmp_path / "t2d.safetensors"
    assert cli_module.main(["incidence-refit", "--model", str(pipeline / "model"), "--data", str(pipeline / "tok"),
                            "--codes", "ICD10CM/E11*", "--out", str(refit), "--negative-fraction", "0.5",
                            "--max-sequences", "400"]) == 0
    assert "training onsets" in capsys.readouterr().out
    w, b, tokens, report = load_incidence(refit)
    hidden = json.loads((pipeline / "model" / "config.json").read_text())["hidden_size"]
    assert w.shape == (hidden,) and len(tokens) > 1 and all(t.startswith("ICD10CM/E11") for t in tokens)
    assert report["train_onsets"] >= 20 and report["codes"] == ["ICD10CM/E11*"]
    # a sample of 400 sequences, less those the tokenizer cut to its 128 tokens (a repeat could pass for an onset)
    assert report["train_sequences"] + report["train_sequences_cut_left_out"] == 400
    assert report["train_sequences_cut_left_out"] > 0
    c = pipeline / "cohort"
    args = ["--model", pipeline / "model", "--meds", c / "meds", "--prs", c / "prs.parquet", "--labels",
            c / "labels" / "t2d.parquet", "--codes", "ICD10CM/E11*", "--horizon-days", 365, "--samples", 2,
            "--max-new-tokens", 16]
    assert cli(*args, "--out", tmp_path / "plain.parquet") == 0
    assert "incidence refit" not in capsys.readouterr().out
    assert cli(*args, "--out", tmp_path / "refit.parquet", "--incidence-refit", refit) == 0
    assert f"incidence refit {refit}" in capsys.readouterr().out  # the log says which refit scored the rows
    plain = pl.read_parquet(tmp_path / "plain.parquet")["predicted_boolean_probability"].to_numpy()
    with_refit = pl.read_parquet(tmp_path / "refit.parquet")["predicted_boolean_probability"].to_numpy()
    if np.any(w.numpy()) or b != 0.0:
        assert not np.allclose(plain, with_refit)
    else:  # left at 0 (no tuning gain on so tiny a cohort): the model unchanged, to the last digit
        assert np.array_equal(plain, with_refit)
    capsys.readouterr()
    # a refit for other codes, or a file that is not a refit: exit 2, no output
    narrower = [("ICD10CM/E11.9" if a == "ICD10CM/E11*" else a) for a in args]  # one of the refit's tokens only
    assert cli(*narrower, "--out", tmp_path / "x.parquet", "--incidence-refit", refit) == 2
    assert "refit with the same --codes" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    assert cli(*args, "--out", tmp_path / "y.parquet", "--incidence-refit", tmp_path / "junk.safetensors") == 2
    assert "incidence-refit" in capsys.readouterr().err
    assert not (tmp_path / "x.parquet").exists() and not (tmp_path / "y.parquet").exists()


def test_incidence_statistics_read_the_scores_of_a_model_that_takes_them(pipeline):
    """The refit's offset is the model's own onset probability: for a PRS model it must come from
    the person's scores, not from the "no genotype" tokens (rows without a prs column)."""
    import datasets

    from ehr_prs.checkpoints import load_model_and_tokenizer
    from ehr_prs.fits.at_risk import start_tokens
    from ehr_prs.fits.incidence import onset_statistics

    model, tok, _ = load_model_and_tokenizer(pipeline / "model")
    rows = datasets.load_from_disk(str(pipeline / "tok" / "train"))
    rows = rows.select(np.flatnonzero(np.asarray(rows["prs_mask"], dtype=bool))[:24])  # genotyped
    target = tok.code_token_ids(["ICD10CM/E11*"])
    start = start_tokens(tok.convert_ids_to_tokens(list(range(len(tok)))))
    kw = dict(negative_fraction=1.0, desc="test")
    with_scores = onset_statistics(model, rows, target, start, **kw)
    without = onset_statistics(model, rows.remove_columns(["prs", "prs_mask"]), target, start, **kw)
    assert with_scores["y"].size == without["y"].size > 100 and np.array_equal(with_scores["y"], without["y"])
    assert not np.allclose(with_scores["p"], without["p"])
    assert np.all((with_scores["p"] > 0) & (with_scores["p"] < 1)) and np.all(with_scores["weight"] == 1.0)
