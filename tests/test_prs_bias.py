"""The logit_bias adapter's closed-form fit (ehr_prs/fits/logit_bias.py): the per-sequence
incidence statistics against a direct count, the low-rank Poisson fit on data with a known effect,
the fit on a planted effect, and `ehr-prs fit-logit-bias` on the tiny simulated cohort and against
its deprecated alias `ehr-prs pretrain --freeze-backbone --prs-fusion logit_bias`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from datasets import Dataset

import modeling_ehr_prs  # noqa: F401
from modeling_ehr_prs.configuration_ehr_prs import EhrPrsConfig
from modeling_ehr_prs.modeling_ehr_prs import EhrPrsForCausalLM
from ehr_prs.fits.logit_bias import fit_logit_bias, fit_poisson_low_rank, incidence_stats, poisson_nll


def _rows(seqs, prs, mask):
    return Dataset.from_dict({"input_ids": seqs, "prs": prs.tolist(), "prs_mask": list(mask),
                              "length": [len(s) for s in seqs]})


def test_incidence_stats_match_a_direct_count():
    """n = family first seen after the static prefix; E = its next-token probability summed up to then."""
    torch.manual_seed(0)
    model = EhrPrsForCausalLM(EhrPrsConfig.from_preset("tiny", n_prs=3)).eval()
    vocab = model.config.vocab_size
    family = np.full(vocab, -1)
    family[[10, 11]] = 0  # one family, two codes (like ICD10CM/E11.9 and E11.65)
    family[12] = 1
    family[13] = 2  # a static code: only ever in the prefix
    start = np.zeros(vocab, dtype=bool)
    start[20] = True  # the age token that ends the static prefix
    seqs = [[1, 13, 20, 40, 11, 41, 10, 12, 42],  # family 0 at 4 (11), family 1 at 7
            [1, 13, 20, 40, 41, 42],  # nothing after the prefix
            [1, 13, 20, 12, 43, 10, 44, 45, 46, 47, 48],  # family 1 at 3, family 0 at 5 (truncated: 9 kept)
            [1, 13, 20, 10]]  # not genotyped: left out
    prs = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    S, n, E = incidence_stats(model, _rows(seqs, prs, [True, True, True, False]), family, 3, start,
                              batch_size=2, max_length=9)
    assert S.shape == (3, 3) and n.shape == E.shape == (3, 3)
    np.testing.assert_allclose(S, prs[:3], atol=1e-3)  # (the dataset stores float16 on disk; here float32)
    for i, seq in enumerate(seqs[:3]):
        seq = seq[-9:]
        with torch.no_grad():
            p = torch.softmax(model(torch.tensor([seq])).logits[0], -1).numpy()
        s0 = seq.index(20) if 20 in seq else 1
        for f in range(3):
            firsts = [t for t in range(s0, len(seq)) if family[seq[t]] == f]
            last = firsts[0] - 1 if firsts else len(seq) - 2
            expected = sum(p[t, family == f].sum() for t in range(max(s0 - 1, 0), last + 1))
            assert n[i, f] == (1.0 if firsts else 0.0), (i, f)
            assert E[i, f] == pytest.approx(expected, rel=1e-4, abs=1e-7), (i, f)
    assert n[:, 2].sum() == 0  # static codes are never events
    assert n[0, 0] == 1 and n[0, 1] == 1 and n[1].sum() == 0


def _poisson_data(rng, n_rows, effect, n_families=12, n_prs=8):
    S = rng.normal(size=(n_rows, n_prs))
    W = np.zeros((n_families, n_prs))
    W[:3, 0] = effect  # three codes of one disease, driven by score 0
    E = rng.uniform(0.05, 0.4, size=(n_rows, n_families))
    n = rng.poisson(E * np.exp(S @ W.T)).astype(float)
    return S, n, E, W


def test_low_rank_poisson_fit_recovers_a_known_effect():
    rng = np.random.default_rng(0)
    S, n, E, W_true = _poisson_data(rng, 4000, effect=0.5)
    A, B, c = fit_poisson_low_rank(S, n, E, rank=4, lam=0.01 * len(S))
    W = (A @ B).numpy()
    np.testing.assert_allclose(W[:3, 0], 0.5, atol=0.1)  # shrunk a little by the penalty, not more
    null = np.concatenate([W[3:].ravel(), W[:3, 1:].ravel()])  # no effect there: noise of ~1/sqrt(sum E) = 0.03
    assert np.abs(null).max() < 0.12 and np.abs(null).mean() < 0.04
    St, nt, Et, _ = _poisson_data(np.random.default_rng(1), 2000, effect=0.5)
    tuning = [torch.as_tensor(x, dtype=torch.float64) for x in (St, nt, Et)]
    gain = poisson_nll(torch.zeros_like(A @ B), *tuning, c) - poisson_nll(A @ B, *tuning, c)
    # held-out data: the effect families gain ~175 nats, the null ones lose what the fit's noise costs (~17)
    assert gain[:3].sum() > 100 and -0.2 * gain[:3].sum() < gain[3:].sum() < 0
    # no effect anywhere: the penalty keeps W at ~0
    S0, n0, E0, _ = _poisson_data(np.random.default_rng(2), 4000, effect=0.0)
    A0, B0, _ = fit_poisson_low_rank(S0, n0, E0, rank=4, lam=0.05 * len(S0))
    assert float((A0 @ B0).abs().max()) < 0.05


@pytest.fixture(scope="module")
def tok(tiny_data):
    from ehr_prs.tokenizer import EhrTokenizer

    return EhrTokenizer.from_pretrained(str(tiny_data / "tok" / "tokenizer"))


def _planted(tok, rng, n_rows, target, n_prs=4):
    """Sequences <bos> AGE code...; `target` appears with probability sigmoid(-1.5 + 1.5 * prs[:, 0])."""
    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    age = tokens.index(next(t for t in tokens if t.startswith("AGE/")))
    others = [i for i, t in enumerate(tokens) if tok._is_code(t) and not t.startswith(target.split(".")[0])][:40]
    prs = rng.normal(size=(n_rows, n_prs)).astype(np.float32)
    has = rng.random(n_rows) < 1 / (1 + np.exp(1.5 - 1.5 * prs[:, 0]))
    seqs = []
    for i in range(n_rows):
        seq = [tok.bos_token_id, age, *rng.choice(others, size=20).tolist()]
        if has[i]:
            seq.insert(int(rng.integers(3, len(seq))), tokens.index(target))
        seqs.append(seq)
    return _rows(seqs, prs, rng.random(n_rows) < 0.9)


def test_fit_finds_a_planted_effect_and_touches_nothing_else(tok):
    rng = np.random.default_rng(0)
    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    target = next(t for t in tokens if tok._is_code(t) and t.startswith("ICD10CM/"))
    torch.manual_seed(0)
    config = EhrPrsConfig.from_preset("tiny", vocab_size=len(tok), n_prs=4, prs_fusion="logit_bias",
                                      prs_logit_bias_rank=2)
    model = EhrPrsForCausalLM(config).eval()
    base_logits = lambda ids: model(ids).logits  # noqa: E731  (no prs: the backbone alone)
    report = fit_logit_bias(model, tok, _planted(tok, rng, 1500, target), _planted(tok, rng, 600, target),
                            prs_columns=["PGS_a", "PGS_b", "PGS_c", "PGS_d"])
    assert report["chosen_lambda"] is not None
    assert report["families_with_an_effect"] < report["families_fitted"]  # the refit zeroes families without one
    top = report["families"][0]
    assert top["family"] == target.split(".")[0] and top["tuning_gain_nats"] > 20
    ratio = top["rate_ratio_per_sd_of_top_scores"]
    assert next(iter(ratio)) == "PGS_a" and ratio["PGS_a"] > 1.5  # truth: log-odds 1.5 per SD at this rate
    # The model: genotyped rows get the shift on the target's family, non-genotyped rows nothing.
    ids = torch.tensor([[tok.bos_token_id, tokens.index(target) + 0]])
    prs = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    with torch.no_grad():
        shifted = model(ids, prs=prs, prs_mask=torch.tensor([True])).logits[0, 0]
        plain = base_logits(ids)[0, 0]
        hidden = model(ids, prs=prs, prs_mask=torch.tensor([False])).logits[0, 0]
    assert torch.equal(hidden, plain)
    delta = shifted - plain
    family_ids = [i for i, t in enumerate(tokens) if tok._is_code(t) and t.split(".")[0] == target.split(".")[0]]
    assert float(delta[tokens.index(target)]) > 2 * np.log(1.5)
    assert torch.allclose(delta[family_ids], delta[family_ids[0]].expand(len(family_ids)))  # one family, one shift
    not_codes = [i for i, t in enumerate(tokens) if not tok._is_code(t)]
    assert float(delta[not_codes].abs().max()) == 0.0  # time, age and bin tokens are never shifted


def test_fit_logit_bias_command_on_a_frozen_backbone(tiny_data, tmp_path, capsys):
    """`ehr-prs fit-logit-bias` fits, without Trainer steps, on the tiny cohort (too small for a genetic
    effect: the penalty path decides), and writes a folder whose non-genotyped predictions are the backbone's."""
    import ehr_prs.recipes.train as train
    from transformers import AutoModelForCausalLM

    from ehr_prs import cli

    base_dir = tmp_path / "ehr_only"
    base_args = train.PretrainArguments(
        data=str(tiny_data / "tok"), output_dir=str(base_dir), preset="tiny", prs_fusion="none", max_steps=2,
        batch_size=4, warmup_steps=0, eval_steps=2, save_steps=2, logging_steps=1, max_eval_samples=8,
        max_seq_length=128, seed=1)
    train.train(base_args)
    out = tmp_path / "logit_bias"
    argv = ["fit-logit-bias", "--model", str(base_dir), "--data", str(tiny_data / "tok"), "--output-dir", str(out),
            "--batch-size", "8", "--max-eval-samples", "8", "--max-seq-length", "128", "--seed", "1"]
    capsys.readouterr()
    assert cli.main(argv) == 0
    printed = capsys.readouterr()
    assert "logit_bias fitted in closed form on" in printed.out and f"wrote {out}: 0 steps" in printed.out
    assert "deprecated" not in printed.err
    summary = json.loads((out / "training_summary.json").read_text())
    fit = summary["logit_bias_fit"]
    assert summary["steps"] == 0 and fit["genotyped_train_sequences"] > 100
    assert fit["families_fitted"] > 0 and len(fit["penalty_path"]) == 5
    assert all(f["incident_train_subjects"] >= 20 for f in fit.get("families", []))  # the dissemination rule
    assert (out / "prs_standardizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    assert model.config.prs_fusion == "logit_bias"
    ids = torch.tensor([[1, 5, 6, 7]])
    prs = torch.randn(1, model.config.n_prs)
    with torch.no_grad():
        assert torch.equal(model(ids, prs=prs, prs_mask=torch.tensor([False])).logits, base(ids).logits)
        for name, value in base.state_dict().items():
            assert torch.equal(model.state_dict()[name], value), name
    from ehr_prs.errors import InputError
    from ehr_prs.predict import load_base_classifier

    with pytest.raises(InputError, match="logit_bias"):  # a classifier on it would never read the scores
        load_base_classifier(out)
    # The output rules of every command: an earlier model is replaced only with --overwrite; wrong inputs
    # are named by this command's flags (the recipe's --init-from is --model here), exit 2.
    before = (out / "model.safetensors").read_bytes()
    assert cli.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "model.safetensors").read_bytes() == before
    bad = ["fit-logit-bias", "--model", str(tmp_path / "nowhere"), "--data", str(tiny_data / "tok"),
           "--output-dir", str(tmp_path / "x")]
    assert cli.main(bad) == 2
    err = capsys.readouterr().err
    assert f"--model {tmp_path / 'nowhere'}: no such folder" in err and "--init-from" not in err
    assert not (tmp_path / "x").exists()


def _planted_data(tok, tiny_data, root, target):
    """A `tokenize`-like folder (the tiny cohort's tokenizer, 4 scores) whose splits hold a planted effect."""
    import shutil

    shutil.copytree(tiny_data / "tok" / "tokenizer", root / "tokenizer")
    std_file = root / "tokenizer" / "prs_standardizer.json"
    std = json.loads(std_file.read_text())
    std.update(n_prs=4, columns=["PGS_a", "PGS_b", "PGS_c", "PGS_d"], mean=std["mean"][:4], std=std["std"][:4])
    std_file.write_text(json.dumps(std))
    rng = np.random.default_rng(0)
    _planted(tok, rng, 800, target).save_to_disk(str(root / "train"))
    _planted(tok, rng, 300, target).save_to_disk(str(root / "tuning"))
    return root


def test_fit_logit_bias_and_the_deprecated_pretrain_alias_write_the_same_model(tok, tiny_data, tmp_path, capsys):
    """On a planted effect (a non-zero adapter): `ehr-prs fit-logit-bias` and `ehr-prs pretrain --init-from M
    --freeze-backbone --prs-fusion logit_bias` (deprecated: one line says so) write equal weights and reports."""
    from safetensors.torch import load_file

    from ehr_prs import cli

    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    target = next(t for t in tokens if tok._is_code(t) and t.startswith("ICD10CM/"))
    data = _planted_data(tok, tiny_data, tmp_path / "tok", target)
    torch.manual_seed(0)
    EhrPrsForCausalLM(EhrPrsConfig.from_preset(
        "tiny", vocab_size=len(tok), prs_fusion="none", pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id)).save_pretrained(tmp_path / "ehr_only")
    common = ["--data", str(data), "--batch-size", "32", "--max-seq-length", "64", "--max-eval-samples", "16"]
    capsys.readouterr()
    assert cli.main(["fit-logit-bias", "--model", str(tmp_path / "ehr_only"), "--output-dir", str(tmp_path / "fit"),
                     "--rank", "2", *common]) == 0
    assert "deprecated" not in capsys.readouterr().err
    assert cli.main(["pretrain", "--init-from", str(tmp_path / "ehr_only"), "--output-dir", str(tmp_path / "alias"),
                     "--freeze-backbone", "--prs-fusion", "logit_bias", "--config-overrides", "prs_logit_bias_rank=2",
                     *common]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "deprecated" in line]
    assert len(notes) == 1 and "use `ehr-prs fit-logit-bias --model" in notes[0]
    fitted, alias = load_file(tmp_path / "fit" / "model.safetensors"), load_file(tmp_path / "alias" / "model.safetensors")
    assert fitted.keys() == alias.keys()
    for name, value in fitted.items():
        assert torch.equal(value, alias[name]), name
    assert float(fitted["prs_logit_bias.up"].abs().max()) > 0.1  # the planted effect: a fit that is not zero
    reports = [json.loads((tmp_path / d / "training_summary.json").read_text()) for d in ("fit", "alias")]
    assert reports[0]["logit_bias_fit"] == reports[1]["logit_bias_fit"]
    assert reports[0]["logit_bias_fit"]["families"][0]["family"] == target.split(".")[0]
    assert next(iter(reports[0]["logit_bias_fit"]["families"][0]["rate_ratio_per_sd_of_top_scores"])) == "PGS_a"
    assert reports[0]["final_eval_loss"] == reports[1]["final_eval_loss"]
    assert sorted(p.name for p in (tmp_path / "fit").iterdir()) == sorted(p.name for p in (tmp_path / "alias").iterdir())


def test_fit_logit_bias_on_a_time_to_event_model_trains_only_the_hazard_shift_after_the_fit(tiny_data, tiny_tte_lm,
                                                                                         tmp_path, capsys):
    """A TTE head's PRS hazard shift has no closed form: with --max-steps it alone takes Trainer steps after
    the fit (the fitted bias, the decoder and the head kept); without, it is left as the model has it."""
    from safetensors.torch import load_file

    from ehr_prs import cli

    common = ["--model", str(tiny_tte_lm), "--data", str(tiny_data / "tok"), "--batch-size", "8",
              "--max-seq-length", "128", "--max-eval-samples", "8", "--seed", "1"]
    capsys.readouterr()
    assert cli.main(["fit-logit-bias", *common, "--output-dir", str(tmp_path / "fit")]) == 0
    assert "hazard shift has no closed form and --max-steps is 0" in capsys.readouterr().out
    assert cli.main(["fit-logit-bias", *common, "--output-dir", str(tmp_path / "steps"), "--max-steps", "2",
                     "--learning-rate", "3e-2", "--warmup-steps", "0"]) == 0
    base = load_file(tiny_tte_lm / "model.safetensors")
    fit, steps = (load_file(tmp_path / d / "model.safetensors") for d in ("fit", "steps"))
    summaries = [json.loads((tmp_path / d / "training_summary.json").read_text()) for d in ("fit", "steps")]
    assert [s["steps"] for s in summaries] == [0, 2] and all("logit_bias_fit" in s for s in summaries)
    shift = [k for k in base if "hazard_shift" in k]
    assert shift and fit.keys() == steps.keys() == base.keys()
    for name in base:
        if "hazard_shift" in name:  # trained by the steps only
            assert torch.equal(fit[name], base[name]) and not torch.equal(steps[name], base[name]), name
        elif "prs_logit_bias" in name:  # the fit's, the same with or without the steps after it
            assert torch.equal(steps[name], fit[name]), name
        else:  # decoder and TTE head: the model's
            assert torch.equal(fit[name], base[name]) and torch.equal(steps[name], base[name]), name
