"""`ehr-prs hazard-refit`: the TTE head's hazard of one outcome refitted on a frozen model, without labels.

The fitter recovers a planted log-hazard slope and a planted PRS effect on exponential times with
censoring; a refit set by hand gives the analytic risk through `hazard_risk`; the command writes a
file that loads, refuses what it should, and stores no subject id.
"""

import json

import numpy as np
import pytest
import torch

import modeling_ehr_prs  # noqa: F401
from ehr_prs.cli import main as cli
from ehr_prs.errors import InputError
from ehr_prs.fits.hazard_refit import HazardRefit, fit_hazard, load_hazard_refit
from ehr_prs.risk.hazard import hazard_risk

BIN_STARTS_YEARS = torch.tensor([0, 30, 91, 182, 365, 730, 1095, 1826, 3650], dtype=torch.float64) / 365.25


def _planted(n: int, seed: int, slope: float = 0.8, prs_effect: float = 0.5):
    """Exponential first-occurrence times with log h = -1 + slope * x0 + prs_effect * z0 (genotyped), censored at 4 y."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)
    genotyped = torch.rand(n, generator=g) < 0.6
    rate = torch.exp(-1.0 + slope * x[:, 0] + torch.where(genotyped, prs_effect * z[:, 0], 0.0))  # per year
    t_event = -torch.log(torch.rand(n, generator=g, dtype=torch.float64)) / rate
    censor = torch.full((n,), 4.0, dtype=torch.float64)
    return x, z, genotyped, torch.minimum(t_event, censor), t_event <= censor


def test_the_fit_recovers_a_planted_slope_and_prs_effect():
    train, tuning = _planted(20000, 0), _planted(5000, 1)
    weights, report = fit_hazard(train, tuning, BIN_STARTS_YEARS)
    slope = weights["w"] / weights["sd"]  # back to the raw feature's scale
    assert abs(float(slope[0]) - 0.8) < 0.05 and float(slope[1:].abs().max()) < 0.05
    assert abs(float(weights["b"][0]) - 0.5) < 0.05 and abs(float(weights["b"][1])) < 0.05
    # a constant hazard (exp(-1) a year on average, before the slope) in every bin, up to noise
    assert np.allclose(weights["a"].numpy() + float((weights["w"] * weights["mean"] / weights["sd"]).sum()), -1.0,
                       atol=0.15)
    assert report["tuning_nll"] < report["tuning_nll_constant_hazard"]
    assert report["reads_prs"] and report["train_events"] == int(train[4].sum())


def test_without_scores_the_fit_has_no_prs_term():
    x, _, _, t, e = _planted(5000, 2, prs_effect=0.0)
    weights, report = fit_hazard((x, None, None, t, e), (x, None, None, t, e), BIN_STARTS_YEARS, lambdas=(1e-3,))
    assert "b" not in weights and report["lambda_prs"] is None and not report["reads_prs"]


def test_a_refit_set_by_hand_gives_the_analytic_risk(tiny_tte_lm):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_tte_lm).eval()
    d = model.tte_head.time_proj.in_features
    rate = 0.3  # per year, in every bin, for everyone: w = 0
    refit = HazardRefit(torch.full((9,), np.log(rate), dtype=torch.float64), torch.zeros(d, dtype=torch.float64),
                        torch.zeros(d, dtype=torch.float64), torch.ones(d, dtype=torch.float64), None, ["X"], {})
    prompts = [[1, 5, 6, 7], [1, 8, 9], [1, 5]]
    risk = hazard_risk(model, prompts, [0], [365.25, 730.5], refit=refit, progress=False)
    np.testing.assert_allclose(risk, 1 - np.exp(-rate * np.array([[1.0, 2.0]] * 3)), rtol=1e-12)
    # with w != 0 the risk follows each prompt's head input, exactly as the formula says
    w = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.1
    refit.w = w
    x = torch.stack([model.tte_head_inputs(torch.tensor([p])).double()[0] for p in prompts])  # (3, d')
    expected = 1 - np.exp(-rate * np.exp((x @ w).numpy()) * 2.0)
    np.testing.assert_allclose(hazard_risk(model, prompts, [0], [730.5], refit=refit, progress=False)[:, 0],
                               expected, rtol=1e-6)


def test_the_command_writes_a_refit_that_loads(tiny_tte_lm, tiny_data, tmp_path, capsys):
    out = tmp_path / "hazard_t2d.safetensors"
    args = ["hazard-refit", "--model", str(tiny_tte_lm), "--data", str(tiny_data / "tok"), "--codes", "ICD10CM/E11*",
            "--out", str(out)]
    assert cli(args) == 0, capsys.readouterr().err
    refit = load_hazard_refit(out)
    assert refit.families == ["ICD10CM/E11"] and refit.report["codes"] == ["ICD10CM/E11*"]
    assert refit.w.shape == refit.mean.shape == refit.sd.shape and refit.a.shape == (9,)
    assert refit.b is not None and torch.isfinite(refit.w).all() and np.isfinite(refit.report["tuning_nll"])
    text = json.dumps(refit.report)
    assert "subject_id" not in text
    assert cli(args) == 2 and "already exists" in capsys.readouterr().err  # no --overwrite
    assert cli([*args, "--overwrite"]) == 0
    with pytest.raises(InputError, match="format"):
        from ehr_prs.fits.incidence import save_incidence

        other = tmp_path / "incidence.safetensors"
        save_incidence(other, np.zeros(3), 0.0, ["X"], {})
        load_hazard_refit(other)


def test_the_command_refuses_a_model_without_a_head(tiny_lm, tiny_data, tmp_path, capsys):
    out = tmp_path / "h.safetensors"
    assert cli(["hazard-refit", "--model", str(tiny_lm), "--data", str(tiny_data / "tok"), "--codes", "ICD10CM/E11*",
                "--out", str(out)]) == 2
    assert "no time-to-event head" in capsys.readouterr().err and not out.exists()


def test_risk_uses_the_refit_and_refuses_a_mismatch(tiny_tte_lm, tiny_data, tmp_path, capsys):
    import polars as pl

    cohort = tiny_data / "cohort"
    refit_file = tmp_path / "hazard_t2d.safetensors"
    assert cli(["hazard-refit", "--model", str(tiny_tte_lm), "--data", str(tiny_data / "tok"), "--codes", "ICD10CM/E11*",
                "--out", str(refit_file)]) == 0
    base = ["risk", "--model", str(tiny_tte_lm), "--meds", str(cohort / "meds"), "--prs", str(cohort / "prs.parquet"),
            "--labels", str(cohort / "labels" / "t2d.parquet"), "--horizon-days", "730", "--method", "hazard"]
    head, refitted = tmp_path / "head.parquet", tmp_path / "refit.parquet"
    assert cli([*base, "--codes", "ICD10CM/E11*", "--out", str(head)]) == 0
    assert cli([*base, "--codes", "ICD10CM/E11*", "--hazard-refit", str(refit_file), "--out", str(refitted)]) == 0
    a = pl.read_parquet(head)["predicted_boolean_probability"].to_numpy()
    b = pl.read_parquet(refitted)["predicted_boolean_probability"].to_numpy()
    assert b.shape == a.shape and np.isfinite(b).all() and ((b > 0) & (b < 1)).all() and not np.allclose(a, b)
    # the same rows scored directly with the loaded refit: the command adds nothing of its own
    from transformers import AutoModelForCausalLM

    refit = load_hazard_refit(refit_file)
    rate_check = refit.log_hazard(torch.zeros(1, refit.w.numel(), dtype=torch.float64))
    assert torch.isfinite(rate_check).all()
    model = AutoModelForCausalLM.from_pretrained(tiny_tte_lm).eval()
    other = model.config.tte_families[1]  # a family the refit was not fitted for
    code = next(t for t in json.loads((tiny_tte_lm / "ehr_vocab.json").read_text())["codes"] if t.startswith(other))
    assert cli([*base, "--codes", code, "--hazard-refit", str(refit_file), "--out", str(tmp_path / "x.parquet")]) == 2
    assert "refit with the same --codes" in capsys.readouterr().err
    assert cli([*base[:-2], "--method", "survival", "--samples", "1", "--codes", "ICD10CM/E11*", "--hazard-refit",
                str(refit_file), "--out", str(tmp_path / "y.parquet")]) == 2
    assert "--hazard-refit needs --method hazard" in capsys.readouterr().err
    assert not (tmp_path / "x.parquet").exists() and not (tmp_path / "y.parquet").exists()
