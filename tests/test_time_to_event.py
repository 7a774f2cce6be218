"""The time-to-event head: label-free targets, the piecewise-exponential likelihood, hazard risk.

Exact targets on hand-made records, the analytic risk of a head set by hand, the genomic shift
being exactly zero without a genotype, no leakage of events after a prediction time, save/load
(also as hub remote code) and resume equality with the TTE loss on.
"""

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

import modeling_ehr_prs  # noqa: F401
import ehr_prs.recipes.train as train
from ehr_prs.cli import main as cli
from ehr_prs.collator import EhrPrsCollator
from modeling_ehr_prs.configuration_ehr_prs import EhrPrsConfig
from modeling_ehr_prs.modeling_ehr_prs import DAYS_PER_YEAR, EhrPrsForCausalLM, tte_pairs
from test_train import StopAt  # tests/ is on sys.path under pytest
from ehr_prs.risk.hazard import cumulative_hazard, hazard_risk
from ehr_prs.time_to_event import choose_families, code_family, tte_targets

TINY = "hidden_size=32,intermediate_size=64,num_attention_heads=2,num_key_value_heads=2,prs_tokens=2"


# ----------------------------------------------------------------------------- targets


# A hand-made vocabulary: 0 pad, 1 bos, 2 = TIME/1w (7 days), 3 = TIME/1y (365 days),
# 4 = A.1, 5 = A.2 (family A = 0), 6 = B (family 1), 7 = C (family 2), 8 = a value bin.
TOKEN_DAYS = np.array([0, 0, 7, 365, 0, 0, 0, 0, 0], dtype=np.float64)
FAMILY_OF = np.array([-1, -1, -1, -1, 0, 0, 1, 2, -1], dtype=np.int64)


def test_code_family_is_the_code_up_to_its_first_dot():
    assert code_family("ICD10CM/E11.9") == "ICD10CM/E11"
    assert code_family("ICD10CM/E11") == "ICD10CM/E11"
    assert code_family("LOINC/4548-4") == "LOINC/4548-4"
    assert code_family("X/a.b.c") == "X/a"


def test_targets_of_a_hand_made_record():
    #        idx: 0    1  2  3  4    5  6  7    8  9
    record = [1, 4, 8, 2, 6, 3, 5, 7, 2, 6]  # bos A.1 bin | 1w | B | 1y | A.2 C | 1w | B
    positions, first, days = tte_targets(np.array(record), TOKEN_DAYS, FAMILY_OF, 3, width=12, max_positions=8)
    # Ends of days: a time token follows at 3, 5 and 8 -> positions 2, 4, 7.
    assert positions.tolist() == [2, 4, 7, -1, -1, -1, -1, -1]
    # First occurrences: A at 1 (A.2 later is a repeat), B at 4 (repeat at 9), C at 7.
    assert first.tolist() == [1, 4, 7]
    assert days.tolist() == [0, 0, 0, 7, 7, 372, 372, 372, 379, 379, 379, 379]  # pads repeat the end

    time, event, at_risk = tte_pairs(torch.tensor(positions)[None], torch.tensor(first)[None],
                                     torch.tensor(days)[None], torch.tensor([9]))
    # Position 2 (day 0): A already seen; B at day 7 (event), C at day 372 (event).
    assert at_risk[0, 0].tolist() == [False, True, True]
    assert event[0, 0].tolist() == [False, True, True]
    assert time[0, 0, 1:].tolist() == [7.0, 372.0]
    # Position 4 (day 7, B is at this position: already seen); C 365 days later.
    assert at_risk[0, 1].tolist() == [False, False, True] and time[0, 1, 2].item() == 365.0
    # Position 7 (day 372): everything seen, nothing at risk; padding positions never are.
    assert not at_risk[0, 2:].any()


def test_a_family_that_never_occurs_is_censored_at_the_record_end():
    record = [1, 4, 2, 4, 3, 4]  # bos A | 1w | A | 1y | A: B and C never occur
    positions, first, days = tte_targets(np.array(record), TOKEN_DAYS, FAMILY_OF, 3, width=8, max_positions=4)
    assert positions.tolist() == [1, 3, -1, -1] and first.tolist() == [1, 8, 8]
    time, event, at_risk = tte_pairs(torch.tensor(positions)[None], torch.tensor(first)[None],
                                     torch.tensor(days)[None], torch.tensor([5]))
    assert at_risk[0, :2, 1:].all() and not event.any()
    assert time[0, 0, 1].item() == 372.0 and time[0, 1, 1].item() == 365.0  # to the last real token's day


def test_time_is_counted_from_time_tokens_only_and_positions_are_spread():
    record = [1] + [4, 2] * 50 + [6]  # 50 one-week gaps
    positions, _, days = tte_targets(np.array(record), TOKEN_DAYS, FAMILY_OF, 3, width=len(record), max_positions=5)
    assert days[-1] == 50 * 7
    assert positions.tolist() == [1, 25, 49, 75, 99]  # evenly spread ends of days, first and last kept


def test_collator_adds_targets_aligned_with_truncation():
    collate = EhrPrsCollator(pad_token_id=0, max_length=6, pad_to_multiple_of=None, token_days=TOKEN_DAYS,
                             tte_family_of_token=FAMILY_OF, tte_max_positions=4)
    batch = collate([{"input_ids": [1, 4, 2, 6, 3, 7, 2, 4]}, {"input_ids": [1, 6, 2, 6]}])
    # Row 0 keeps its last 6 tokens: 6 3 7 2 4 ... -> [2, 6, 3, 7, 2, 4]
    assert batch["input_ids"][0].tolist() == [2, 6, 3, 7, 2, 4]
    assert batch["tte_first_index"][0].tolist() == [5, 1, 3]
    assert batch["tte_positions"][0].tolist() == [1, 3, -1, -1]
    assert batch["tte_first_index"][1].tolist() == [6, 1, 6]  # never: the padded width
    assert batch["tte_days"][1].tolist() == [0, 0, 7, 7, 7, 7]


def test_families_are_those_of_at_least_min_subjects_most_common_first(tiny_data):
    from datasets import load_from_disk

    from ehr_prs.tokenizer import EhrTokenizer

    tok = EhrTokenizer.from_pretrained(str(tiny_data / "tok" / "tokenizer"))
    rows = load_from_disk(str(tiny_data / "tok" / "train"))["input_ids"]
    fams = choose_families(tok, rows, min_subjects=20)
    vocab = tok.get_vocab()
    counts = {}
    for ids in rows:
        seen = {code_family(t) for t in tok.convert_ids_to_tokens(ids) if tok._is_code(t)}
        for f in seen:
            counts[f] = counts.get(f, 0) + 1
    assert fams and all(counts[f] >= 20 for f in fams)
    assert set(fams) == {f for f, c in counts.items() if c >= 20}
    assert [counts[f] for f in fams] == sorted((counts[f] for f in fams), reverse=True)
    assert choose_families(tok, rows, min_subjects=20, max_families=3) == fams[:3]
    assert len(vocab) > len(fams)


# ----------------------------------------------------------------------------- the head


def tte_config(**kw) -> EhrPrsConfig:
    base = dict(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=64, prs_tokens=2, prs_adapter_hidden_size=8,
                tte_families=["A", "B", "C"], tte_time_bins=[0.0, 30.0, 365.0], tte_rank=4)
    base.update(kw)
    return EhrPrsConfig(**base)


def test_a_head_set_by_hand_gives_the_analytic_risk():
    torch.manual_seed(0)
    model = EhrPrsForCausalLM(tte_config()).eval()
    head = model.tte_head
    rates = torch.tensor([[0.5, 0.2, 0.1], [2.0, 1.0, 0.3], [0.05, 0.05, 0.05]])  # (families, bins) per year
    with torch.no_grad():
        head.time_proj.weight.zero_()
        head.family_bias.copy_(rates.log())
    horizons = [10.0, 30.0, 200.0, 365.0, 1000.0]
    ids = [[1, 5, 6, 7], [1, 8]]
    got = hazard_risk(model, ids, [0, 1], horizons, progress=False)
    for j, h in enumerate(horizons):
        # hazard x overlap of (0, h] with bins [0, 30), [30, 365), [365, inf) days, in years.
        overlap = np.array([min(h, 30), max(0, min(h, 365) - 30), max(0, h - 365)]) / DAYS_PER_YEAR
        cum = (rates[0].numpy() * overlap).sum() + (rates[1].numpy() * overlap).sum()
        assert got[:, j] == pytest.approx(1 - np.exp(-cum), rel=1e-6), h
    # Conditional on 100 days already survived: the window (100, 100 + h].
    cum = cumulative_hazard(torch.log(rates.T)[None], head.bin_starts, 100.0, [265.0])[0, 0]
    expected = (rates[:, 1] * 265 / DAYS_PER_YEAR).double()
    torch.testing.assert_close(cum, expected)


def test_the_prs_shift_is_exactly_zero_without_a_genotype():
    torch.manual_seed(0)
    model = EhrPrsForCausalLM(tte_config(n_prs=5, prs_fusion="logit_bias", prs_dropout=0.0)).eval()
    assert model.tte_head.hazard_shift is not None
    with torch.no_grad():
        model.tte_head.hazard_shift.up.normal_()  # a trained-looking shift
    ids = torch.tensor([[1, 5, 6, 7], [1, 5, 6, 7]])
    prs = torch.randn(2, 5)
    with_prs = model.tte_log_hazards(ids, prs=prs, prs_mask=torch.tensor([True, False]))
    without = model.tte_log_hazards(ids)
    assert torch.equal(with_prs[1], without[1])  # not genotyped: exactly the EHR-only hazards
    assert (with_prs[0] - without[0]).abs().min() > 0  # genotyped: every family moves
    shift = with_prs[0] - without[0]
    torch.testing.assert_close(shift, shift[:1].expand_as(shift))  # proportional: the same shift in every bin
    # A fresh model's shift starts at zero for everyone (up = 0).
    fresh = EhrPrsForCausalLM(tte_config(n_prs=5, prs_fusion="logit_bias")).eval()
    assert torch.equal(fresh.tte_log_hazards(ids, prs=prs, prs_mask=torch.tensor([True, True])), fresh.tte_log_hazards(ids))
    # An EHR-only model has no shift at all.
    assert EhrPrsForCausalLM(tte_config()).tte_head.hazard_shift is None


def test_the_loss_trains_the_head_toward_the_observed_rate():
    """One family, events at known times: the fitted constant hazard is the events / exposure MLE."""
    torch.manual_seed(0)
    model = EhrPrsForCausalLM(tte_config(tte_families=["A"], tte_time_bins=[0.0])).train()
    head = model.tte_head
    time = torch.tensor([[100.0], [200.0], [400.0], [800.0]])
    event = torch.tensor([[True], [False], [True], [False]])
    at_risk = torch.ones(4, 1, dtype=torch.bool)
    opt = torch.optim.Adam([head.family_bias], lr=0.1)
    for _ in range(300):
        log_h = head(torch.zeros(4, 16))
        nll, pairs = head.negative_log_likelihood(log_h, time / DAYS_PER_YEAR, event, at_risk)
        opt.zero_grad()
        (nll / pairs).backward()
        opt.step()
    mle = 2 / (1500 / DAYS_PER_YEAR)  # events per person-year
    assert head.family_bias.exp().item() == pytest.approx(mle, rel=1e-3)


# ----------------------------------------------------------------------------- end to end


def test_pretraining_with_the_head_saves_and_reloads_it(tiny_tte_lm, tiny_data):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_tte_lm).eval()
    config = json.loads((tiny_tte_lm / "config.json").read_text())
    assert len(config["tte_families"]) == 40 and config["tte_time_bins"][0] == 0
    assert model.tte_head is not None and model.tte_head.hazard_shift is not None
    state = json.loads(sorted(tiny_tte_lm.glob("checkpoint-*"))[-1].joinpath("trainer_state.json").read_text())
    assert all(np.isfinite(h["loss"]) for h in state["log_history"] if "loss" in h)
    again = AutoModelForCausalLM.from_pretrained(tiny_tte_lm).eval()
    ids = torch.tensor([[1] + list(range(10, 30))])
    torch.testing.assert_close(model.tte_log_hazards(ids), again.tte_log_hazards(ids), rtol=0, atol=0)
    # The summed loss holds both parts, and the TTE part is finite and positive.
    from datasets import load_from_disk

    from ehr_prs.tokenizer import EhrTokenizer

    tok = EhrTokenizer.from_pretrained(str(tiny_tte_lm))
    rows = [load_from_disk(str(tiny_data / "tok" / "tuning"))[i] for i in range(4)]
    batch = EhrPrsCollator(pad_token_id=tok.pad_token_id, **train.tte_collator_fields(model.config, tok))(rows)
    with torch.no_grad():
        out = model(**batch)
    assert out.tte_loss > 0 and torch.isfinite(out.tte_loss)
    torch.testing.assert_close(out.loss, out.lm_loss + model.config.tte_loss_weight * out.tte_loss)


def test_risk_hazard_curve_and_no_future_leakage(tiny_tte_lm, tiny_data, tmp_path):
    cohort = tiny_data / "cohort"
    out = tmp_path / "h.parquet"
    common = ["--model", str(tiny_tte_lm), "--prs", str(cohort / "prs.parquet"),
              "--labels", str(cohort / "labels" / "t2d.parquet"), "--codes", "ICD10CM/E11*", "--horizon-days", "730",
              "--method", "hazard"]
    assert cli(["risk", "--meds", str(cohort / "meds"), *common, "--horizons", "365", "1095", "--out", str(out)]) == 0
    pred = pl.read_parquet(out)
    p = pred["predicted_boolean_probability"].to_numpy()
    assert pred.height > 10 and np.isfinite(p).all() and ((p > 0) & (p < 1)).all()
    curve = pl.read_parquet(tmp_path / "h.curve.parquet")
    wide = curve.pivot(on="horizon_days", index=["subject_id", "prediction_time"], values="probability")
    assert (wide["365.0"] < wide["730.0"]).all() and (wide["730.0"] < wide["1095.0"]).all()
    at_730 = pred.join(wide, on=["subject_id", "prediction_time"])
    np.testing.assert_allclose(at_730["predicted_boolean_probability"], at_730["730.0"], rtol=0, atol=0)

    # Plant events after every prediction time (the target code itself): nothing changes.
    import shutil

    meds = tmp_path / "meds"
    shutil.copytree(cohort / "meds", meds)
    labels = pl.read_parquet(cohort / "labels" / "t2d.parquet")
    for shard in (meds / "data").rglob("*.parquet"):
        frame = pl.read_parquet(shard)
        later = (labels.join(frame.select("subject_id").unique(), on="subject_id")
                 .group_by("subject_id").agg(pl.col("prediction_time").max())
                 .select("subject_id", (pl.col("prediction_time") + pl.duration(days=1)).alias("time"),
                         pl.lit("ICD10CM/E11.9").alias("code"), pl.lit(None, dtype=pl.Float32).alias("numeric_value")))
        planted = pl.concat([frame, later.cast(frame.schema)]).sort("subject_id", "time", nulls_last=False,
                                                                      maintain_order=True)
        planted.write_parquet(shard)
    out2 = tmp_path / "h2.parquet"
    assert cli(["risk", "--meds", str(meds), *common, "--out", str(out2)]) == 0
    np.testing.assert_array_equal(pl.read_parquet(out2)["predicted_boolean_probability"].to_numpy(), p)


def test_risk_hazard_refuses_a_model_without_a_head_and_unknown_families(tiny_lm, tiny_tte_lm, tiny_data, tmp_path, capsys):
    cohort = tiny_data / "cohort"
    base = ["risk", "--meds", str(cohort / "meds"), "--labels", str(cohort / "labels" / "t2d.parquet"),
            "--horizon-days", "730", "--method", "hazard", "--out", str(tmp_path / "x.parquet")]
    assert cli([*base, "--model", str(tiny_lm), "--codes", "ICD10CM/E11*"]) == 2
    assert "time-to-event head" in capsys.readouterr().err
    config = json.loads((tiny_tte_lm / "config.json").read_text())
    from ehr_prs.tokenizer import EhrTokenizer

    tok = EhrTokenizer.from_pretrained(str(tiny_tte_lm))
    rare = next(t for t in tok.get_vocab() if tok._is_code(t) and code_family(t) not in config["tte_families"])
    assert cli([*base, "--model", str(tiny_tte_lm), "--codes", rare]) == 2
    assert "does not predict" in capsys.readouterr().err
    assert not (tmp_path / "x.parquet").exists()


def test_the_head_loads_as_hub_remote_code_in_a_clean_process(tiny_tte_lm, tmp_path):
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1] + list(range(10, 40))])
    expected = AutoModelForCausalLM.from_pretrained(tiny_tte_lm).eval().tte_log_hazards(ids)
    torch.save({"ids": ids, "expected": expected}, tmp_path / "io.pt")  # our own file, written by this test
    script = textwrap.dedent(f"""
        import importlib.util, sys
        sys.path.append({sysconfig.get_paths()["purelib"]!r})
        assert importlib.util.find_spec("modeling_ehr_prs") is None
        import torch
        from transformers import AutoModelForCausalLM
        io = torch.load({str(tmp_path / "io.pt")!r})
        lm = AutoModelForCausalLM.from_pretrained({str(tiny_tte_lm)!r}, trust_remote_code=True).eval()
        print("RESULT", type(lm).__module__, (lm.tte_log_hazards(io["ids"]) - io["expected"]).abs().max().item())
    """)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PATH": os.environ.get("PATH", ""),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-I", "-S", "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    module, diff = done.stdout.split("RESULT", 1)[1].split()
    assert module.startswith("transformers_modules") and float(diff) == 0.0


def test_resume_equality_with_the_tte_loss_on(tiny_data, tmp_path):
    def args(out, **kw):
        return train.PretrainArguments(
            data=str(tiny_data / "tok"), output_dir=str(out), preset="tiny", prs_fusion="logit_bias", max_steps=6,
            batch_size=4, learning_rate=3e-3, warmup_steps=0, eval_steps=3, save_steps=3, logging_steps=1,
            max_eval_samples=8, max_seq_length=128, config_overrides=TINY, seed=7, tte_families=20, **kw)

    def losses(out):
        state = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1] / "trainer_state.json"
        return {h["step"]: h["loss"] for h in json.loads(state.read_text())["log_history"] if "loss" in h}

    train.train(args(tmp_path / "full"))
    train.train(args(tmp_path / "cut"), callbacks=[StopAt(3)])
    train.train(args(tmp_path / "cut", resume=True))
    a, b = losses(tmp_path / "full"), losses(tmp_path / "cut")
    for step in (4, 5, 6):
        assert a[step] == pytest.approx(b[step], abs=1e-6), (step, a[step], b[step])


def test_an_ehr_only_checkpoint_gains_a_head_with_init_from(tiny_lm, tiny_data, tmp_path):
    args = train.PretrainArguments(
        data=str(tiny_data / "tok"), output_dir=str(tmp_path / "ext"), preset="tiny", prs_fusion="prefix",
        max_steps=2, batch_size=4, learning_rate=3e-3, warmup_steps=0, eval_steps=2, save_steps=2, logging_steps=1,
        max_eval_samples=8, max_seq_length=128, seed=7, init_from=str(tiny_lm), tte_families=10)
    out = train.train(args)
    config = json.loads((out / "config.json").read_text())
    assert len(config["tte_families"]) == 10


@pytest.mark.parametrize("fusion,summary", [("prefix", False), ("cross_attention", False), ("logit_bias", True)])
def test_prefix_and_cross_attention_models_train_with_the_head(fusion, summary):
    """The head reads event positions only: a prefix shifts nothing, and every fusion trains with it
    (also with the history summary, whose padded positions must add nothing)."""
    torch.manual_seed(0)
    model = EhrPrsForCausalLM(tte_config(n_prs=5, prs_fusion=fusion, prs_dropout=0.0,
                                         tte_history_summary=summary)).train()
    collate = EhrPrsCollator(pad_token_id=0, pad_to_multiple_of=None, token_days=[0, 0, 7, 365] + [0] * 12,
                             tte_family_of_token=[-1, -1, -1, -1, 0, 0, 1, 2] + [-1] * 8, tte_max_positions=4)
    rows = [{"input_ids": [1, 4, 2, 6, 3, 7, 2, 4], "prs": [0.5] * 5, "prs_mask": True},
            {"input_ids": [1, 6, 2, 5], "prs": [0.0] * 5, "prs_mask": False}]
    batch = collate(rows)
    out = model(**batch)
    assert torch.isfinite(out.tte_loss) and out.tte_loss > 0
    out.loss.backward()
    assert model.tte_head.time_proj.weight.grad.abs().sum() > 0
    assert model.tte_head.hazard_shift.down.weight.grad is not None  # the genotyped row reaches the shift
    # Hazards at the last real token equal those of the row scored alone (padding and prefix accounted for).
    model.eval()
    alone = model.tte_log_hazards(batch["input_ids"][1:, :4], batch["attention_mask"][1:, :4],
                                  prs=batch["prs"][1:], prs_mask=batch["prs_mask"][1:])
    both = model.tte_log_hazards(batch["input_ids"], batch["attention_mask"], prs=batch["prs"],
                                 prs_mask=batch["prs_mask"])
    torch.testing.assert_close(both[1:], alone, rtol=1e-5, atol=1e-5)
    if summary:  # the head reads [state ; mean of the states so far]
        hidden = model.model(input_ids=batch["input_ids"][1:, :4]).last_hidden_state  # (1, 4, d)
        x = model._head_input(hidden, None)
        torch.testing.assert_close(x[0, 2, 16:], hidden[0, :3].mean(0))


def test_a_frozen_tte_backbone_gains_a_genomic_hazard_shift(tiny_data, tmp_path):
    """--init-from an EHR-only TTE model, --freeze-backbone --prs-fusion logit_bias: the logit bias is fitted
    in closed form, the hazard shift by gradient; the decoder and the head stay exactly as they were."""
    from transformers import AutoModelForCausalLM

    def args(out, **kw):
        base = dict(data=str(tiny_data / "tok"), output_dir=str(out), preset="tiny", max_steps=4, batch_size=4,
                    learning_rate=3e-2, warmup_steps=0, eval_steps=4, save_steps=4, logging_steps=1,
                    max_eval_samples=8, max_seq_length=128, seed=7)
        base.update(kw)
        return train.PretrainArguments(**base)

    ehr = train.train(args(tmp_path / "ehr", prs_fusion="none", config_overrides=TINY, tte_families=20))
    ext = train.train(args(tmp_path / "ext", prs_fusion="logit_bias", init_from=str(ehr), freeze_backbone=True))
    a = AutoModelForCausalLM.from_pretrained(ehr).eval()
    b = AutoModelForCausalLM.from_pretrained(ext).eval()
    assert b.config.tte_families == a.config.tte_families and b.tte_head.hazard_shift is not None
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # decoder and head untouched
    assert b.tte_head.hazard_shift.up.abs().sum() > 0  # the shift learned something
    ids = torch.tensor([[1] + list(range(10, 30))])
    prs = torch.randn(1, b.config.n_prs)
    # Not genotyped: the backbone's hazards (two loaded models: equal up to float summation order).
    torch.testing.assert_close(b.tte_log_hazards(ids, prs=prs, prs_mask=torch.tensor([False])), a.tte_log_hazards(ids),
                               rtol=0, atol=1e-5)
    assert not torch.equal(b.tte_log_hazards(ids, prs=prs, prs_mask=torch.tensor([True])), a.tte_log_hazards(ids))
    summary = json.loads((ext / "training_summary.json").read_text())
    assert "logit_bias_fit" in summary and summary["steps"] == 4
