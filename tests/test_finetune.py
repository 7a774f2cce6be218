"""finetune.py, `ehr-prs predict` and `ehr-prs fewshot` on a tiny simulated cohort.

One tiny causal LM (prefix fusion, 4 pretraining steps) serves every test: the checks are about
plumbing that must hold for any weights -- what loads, what trains, what is saved and reloaded,
what the inputs may contain -- not about how well a 4-step model predicts.
"""

import json
import shutil
from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

import ehr_prs.recipes.finetune as ft
from ehr_prs.data.predictions import PREDICTION_SCHEMA
from ehr_prs.evaluation import baselines
from ehr_prs import cli
from ehr_prs.errors import InputError
from modeling_ehr_prs.modeling_ehr_prs import EhrPrsForCausalLM
from ehr_prs.predict import (
    base_fingerprint,
    load_base_classifier,
    load_for_prediction,
    predict_proba,
    task_inputs,
)
from ehr_prs.data.readers import read_meds_dataset, read_prs_table

TINY = "hidden_size=32,intermediate_size=64,num_attention_heads=2,num_key_value_heads=2,prs_tokens=2"
TASK = "t2d"  # ~8% prevalence: 20 positive train rows in this cohort


@pytest.fixture(scope="module")
def env(tiny_data, tiny_lm) -> dict:
    root = tiny_data
    cohort = root / "cohort"
    return {"root": root, "lm": str(tiny_lm), "meds": str(cohort / "meds"), "prs": str(cohort / "prs.parquet"),
            "labels": str(cohort / "labels" / f"{TASK}.parquet")}


@pytest.fixture(scope="module")
def data(env) -> ft.TaskData:
    return ft.load_task_data(env["lm"], env["meds"], env["labels"], env["prs"], ("train", "tuning", "held_out"))


def fargs(env, out, **kw) -> ft.FinetuneArguments:
    base = dict(model=env["lm"], meds=env["meds"], labels=env["labels"], prs=env["prs"], output_dir=str(out),
                method="lora", epochs=1, min_steps=4, batch_size=16, seed=0)
    base.update(kw)
    return ft.FinetuneArguments(**base)


def lora_count(config, r: int) -> int:
    """LoRA parameters on the 7 projections: r x (in + out) per wrapped Linear."""
    d, i, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    per_layer = (d + q) + 2 * (d + kv) + (q + d) + 2 * (d + i) + (i + d)
    return config.num_hidden_layers * r * per_layer


# ----------------------------------------------------------------------------- loading and counting


def test_classifier_from_causal_lm_keeps_every_backbone_weight(env):
    lm = EhrPrsForCausalLM.from_pretrained(env["lm"])
    clf, tok, std = load_base_classifier(env["lm"])
    lm_state, clf_state = lm.state_dict(), clf.state_dict()
    new = sorted(k for k in clf_state if k not in lm_state)
    assert new == ["score.bias", "score.weight"]
    for k, v in clf_state.items():
        if k.startswith("model."):
            torch.testing.assert_close(v, lm_state[k], rtol=0, atol=0)
    assert clf.config.num_labels == 1 and std is not None and len(tok) == clf.config.vocab_size


def test_only_the_intended_parameters_train(env):
    c = load_base_classifier(env["lm"])[0].config
    d, total_clf = c.hidden_size, sum(p.numel() for p in load_base_classifier(env["lm"])[0].parameters())
    score = d + 1
    adapter = sum(p.numel() for n, p in load_base_classifier(env["lm"])[0].named_parameters() if "prs_adapter" in n)
    assert adapter > 0

    probe, _ = ft.build_classifier(fargs(env, "x", method="probe"))
    assert ft.count_parameters(probe) == (score, total_clf)
    assert {n for n, p in probe.named_parameters() if p.requires_grad} == {"score.weight", "score.bias"}

    full, _ = ft.build_classifier(fargs(env, "x", method="full"))
    assert ft.count_parameters(full) == (total_clf, total_clf)

    lora, _ = ft.build_classifier(fargs(env, "x", method="lora", lora_r=4))
    trainable, total = ft.count_parameters(lora)
    # PEFT keeps a frozen original of `score` beside the trained copy.
    assert trainable == lora_count(c, 4) + score
    assert total == total_clf + lora_count(c, 4) + score
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "score.modules_to_save" in n for n in names)
    assert not any("prs" in n for n in names)

    lora_prs, _ = ft.build_classifier(fargs(env, "x", method="lora", lora_r=4, train_prs_adapter=True))
    assert ft.count_parameters(lora_prs)[0] == lora_count(c, 4) + score + adapter


# ----------------------------------------------------------------------------- save, reload, predict


def test_lora_adapter_reloads_to_identical_predictions(env, data, tmp_path):
    out = tmp_path / "lora"
    result = ft.finetune(fargs(env, out, method="lora", lora_r=4), data=data, quiet=True)
    files = sorted(p.name for p in out.iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors", "finetune_summary.json"} <= set(files)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    summary = json.loads((out / "finetune_summary.json").read_text())
    assert summary["method"] == "lora" and summary["train_rows"] == len(data.splits["train"])
    assert summary["trainable_parameters"] == result.summary["trainable_parameters"] > 0
    assert 0.0 <= summary["tuning_auroc"] <= 1.0 and summary["best_epoch"] >= 1
    # No subject id in the artefacts.
    ids = {str(s) for s in data.splits["train"]["subject_id"]}
    assert not any(i in (out / "finetune_summary.json").read_text() for i in ids)

    held = data.splits["held_out"]
    in_memory = predict_proba(result.model, held, data.tokenizer.pad_token_id, progress=False)
    model, _, _, _ = load_for_prediction(env["lm"], out)
    reloaded = predict_proba(model, held, data.tokenizer.pad_token_id, progress=False)
    np.testing.assert_array_equal(in_memory, reloaded)
    assert in_memory.shape == (len(held),) and np.all((in_memory > 0) & (in_memory < 1))
    # Balanced training, then the prior put back: mean risk near the train prevalence, not near 0.5.
    assert abs(in_memory.mean() - summary["train_prevalence"]) < 0.15

    # The command line writes the same numbers in the MEDS prediction schema.
    pred = tmp_path / "pred.parquet"
    assert cli.main(["predict", "--model", env["lm"], "--adapter", str(out), "--meds", env["meds"], "--prs",
                     env["prs"], "--labels", env["labels"], "--out", str(pred)]) == 0
    frame = pl.read_parquet(pred)
    assert frame.columns == PREDICTION_SCHEMA.names
    np.testing.assert_array_equal(frame["predicted_boolean_probability"].to_numpy(), in_memory)


def test_probe_trains_the_head_only_and_its_folder_reloads(env, data, tmp_path):
    out = tmp_path / "probe"
    before = load_base_classifier(env["lm"])[0].state_dict()
    result = ft.finetune(fargs(env, out, method="probe"), data=data, quiet=True)
    after = result.model.state_dict()
    for k, v in before.items():
        if k.startswith("model."):
            torch.testing.assert_close(after[k], v, rtol=0, atol=0)
    assert not torch.equal(after["score.weight"], before["score.weight"])
    held = data.splits["held_out"]
    model, _, _, summary = load_for_prediction(out)
    assert summary["best_C"] in ft.PROBE_CS and summary["selected_by"] == "tuning AUROC"
    assert summary["method"] == "probe" and summary["trainable_parameters"] == load_base_classifier(
        env["lm"])[0].config.hidden_size + 1
    saved = model.state_dict()
    assert set(saved) == set(after)
    for k, v in after.items():
        torch.testing.assert_close(saved[k], v, rtol=0, atol=0)  # the folder holds exactly these weights
    # Equal weights in other memory (mmap'd from safetensors) may take other CPU matmul kernels: a
    # float32 rounding difference at most, far below anything a probability is read to.
    np.testing.assert_allclose(predict_proba(result.model, held, data.tokenizer.pad_token_id, progress=False),
                               predict_proba(model, held, data.tokenizer.pad_token_id, progress=False),
                               rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- leakage


def plant(meds_src: str, dst: Path, rows: list[tuple[int, object, str]]) -> str:
    """Copy a MEDS dataset and add events (subject_id, time, code) to the shard holding each subject."""
    shutil.copytree(meds_src, dst)
    for path in (dst / "data").rglob("*.parquet"):
        df = pl.read_parquet(path)
        new = [r for r in rows if r[0] in set(df["subject_id"].unique().to_list())]
        if new:
            extra = pl.DataFrame({"subject_id": [r[0] for r in new], "time": [r[1] for r in new],
                                  "code": [r[2] for r in new], "numeric_value": [None] * len(new)},
                                 schema=df.schema)
            pl.concat([df, extra]).sort(["subject_id", "time"], nulls_last=False, maintain_order=True) \
                .write_parquet(path)
    return str(dst)


def test_an_event_after_the_prediction_time_changes_nothing(env, data, tmp_path):
    labels = pl.read_parquet(env["labels"]).sort("subject_id")
    ids = read_meds_dataset(env["meds"]).subject_splits.filter(pl.col("split") == "held_out")["subject_id"]
    held = labels.filter(pl.col("subject_id").is_in(ids.implode())).head(2)
    (s_after, t_after), (s_before, t_before) = held.select("subject_id", "prediction_time").rows()
    code = "MEDS_DEATH" if "MEDS_DEATH" in data.tokenizer.get_vocab() else data.tokenizer.state["codes"][0]
    planted = plant(env["meds"], tmp_path / "meds", [
        (s_after, t_after + timedelta(microseconds=1), code),  # just after: must not reach the input
        (s_after, t_after + timedelta(days=30), code),
        (s_before, t_before - timedelta(days=1), code),  # positive control: before, must reach it
    ])
    std, tok = data.standardizer, data.tokenizer
    prs = read_prs_table(env["prs"])
    clean = task_inputs(read_meds_dataset(env["meds"]), held, tok, std, prs, "held_out", data.max_length)
    dirty = task_inputs(read_meds_dataset(planted), held, tok, std, prs, "held_out", data.max_length)
    assert clean["input_ids"][0] == dirty["input_ids"][0]
    assert clean["input_ids"][1] != dirty["input_ids"][1]
    assert tok.get_vocab()[code] in dirty["input_ids"][1]

    model = ft.build_classifier(fargs(env, "x", method="full"))[0].eval()
    p_clean = predict_proba(model, clean, tok.pad_token_id, progress=False)
    p_dirty = predict_proba(model, dirty, tok.pad_token_id, progress=False)
    assert p_clean[0] == p_dirty[0] and p_clean[1] != p_dirty[1]


# ----------------------------------------------------------------------------- few-shot


def test_few_shot_sampler_draws_k_plus_k_reproducibly():
    y = np.r_[np.ones(30, bool), np.zeros(200, bool)]
    np.random.default_rng(0).shuffle(y)
    a, b = ft.sample_shots(y, 8, seed=5), ft.sample_shots(y, 8, seed=5)
    np.testing.assert_array_equal(a, b)
    assert a.size == 16 and y[a].sum() == 8 and np.unique(a).size == 16
    assert not np.array_equal(a, ft.sample_shots(y, 8, seed=6))
    with pytest.raises(InputError, match="only 30 positive"):
        ft.sample_shots(y, 31, seed=0)
    tuning = ft.sample_shots(y[:20], 64, seed=0, where="tuning split", strict=False)  # takes what there is
    assert tuning.size == 20


def test_fewshot_sweep_writes_curves_and_gbm_all_matches_the_baseline(env, tmp_path):
    import argparse

    from ehr_prs.evaluation.fewshot import add_arguments, run_sweep

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "fs"
    args = parser.parse_args(["--model", env["lm"], "--meds", env["meds"], "--prs", env["prs"], "--labels",
                              env["labels"], "--out", str(out), "--shots", "4", "all", "--seeds", "2",
                              "--seeds-all", "1", "--methods", "probe", "gbm", "--epochs", "1", "--min-steps", "3", "--n-boot", "50"])
    result = run_sweep(args)
    assert {p.name for p in out.iterdir()} == {"fewshot.json", "fewshot.csv", "fewshot.png", "predictions"}
    # 2 methods x (K=4: 2 seeds + K=all: --seeds-all 1)
    assert len(list((out / "predictions").glob("*.parquet"))) == len(result["runs"]) == 2 * (2 + 1)
    assert [(c["method"], c["shots"], c["seeds"]) for c in result["curves"]] == [
        ("probe", "4", 2), ("probe", "all", 1), ("gbm", "4", 2), ("gbm", "all", 1)]
    for r in result["runs"]:
        lo, hi = r["auroc_ci"]
        assert 0 <= lo <= hi <= 1 and 0 <= r["auroc"] <= 1
        assert r["train_rows"] == (8 if r["shots"] == "4" else 248)
    assert len(pl.read_csv(out / "fewshot.csv")) == 6
    # With every train row, the sweep's GBM is exactly `ehr-prs baseline --kind counts-gbm-prs`.
    ref = baselines.run_baseline("counts-gbm-prs", env["meds"], env["labels"], env["prs"], threads=1).predictions
    mine = pl.read_parquet(out / "predictions" / "gbm_kall_seed0.parquet")
    joined = mine.join(ref, on=["subject_id", "prediction_time"], suffix="_ref")
    assert joined.height == mine.height == ref.height
    np.testing.assert_allclose(joined["predicted_boolean_probability"], joined["predicted_boolean_probability_ref"],
                               rtol=1e-6)


def test_fewshot_lora_grid_can_be_smaller_than_the_others(env, tmp_path):
    """--lora-shots / --lora-seeds: LoRA only where asked (its fits are the slow ones), one plot."""
    import argparse

    from ehr_prs.evaluation.fewshot import add_arguments, run_sweep

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--model", env["lm"], "--meds", env["meds"], "--prs", env["prs"], "--labels", env["labels"],
            "--shots", "4", "all", "--seeds", "2", "--seeds-all", "1", "--methods", "lora", "probe",
            "--epochs", "1", "--min-steps", "2", "--n-boot", "20"]
    out = tmp_path / "fs"
    result = run_sweep(parser.parse_args([*base, "--out", str(out), "--lora-shots", "4", "--lora-seeds", "1"]))
    assert sorted((r["method"], r["shots"], r["seed"]) for r in result["runs"]) == [
        ("lora", "4", 0), ("probe", "4", 0), ("probe", "4", 1), ("probe", "all", 0)]
    assert sorted((c["method"], c["shots"], c["seeds"]) for c in result["curves"]) == [
        ("lora", "4", 1), ("probe", "4", 2), ("probe", "all", 1)]
    assert (out / "fewshot.png").stat().st_size > 0
    with pytest.raises(InputError, match="--lora-shots"):
        run_sweep(parser.parse_args([*base, "--out", str(tmp_path / "bad"), "--lora-shots", "16"]))
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_a_clear_error(env, data, tmp_path):
    # Labels of one class only.
    one = tmp_path / "one_class.parquet"
    pl.read_parquet(env["labels"]).with_columns(pl.lit(False).alias("boolean_value")).write_parquet(one)
    with pytest.raises(InputError, match="train split has 0 positive"):
        ft.finetune(fargs(env, tmp_path / "o", labels=str(one)))
    # More shots than positives: the message says how many there are.
    n_pos = int(data.y("train").sum())
    with pytest.raises(InputError, match=f"only {n_pos} positive"):
        ft.finetune(fargs(env, tmp_path / "o", shots=n_pos + 1), data=data)
    assert not (tmp_path / "o").exists()

    out = tmp_path / "lora"
    ft.finetune(fargs(env, out, method="lora", lora_r=2, min_steps=1), data=data, quiet=True)
    # Same shape, other weights (a random twin of the base).
    twin = tmp_path / "twin"
    shutil.copytree(env["lm"], twin)
    lm = EhrPrsForCausalLM.from_pretrained(env["lm"])
    torch.manual_seed(123)
    EhrPrsForCausalLM(lm.config).save_pretrained(twin)
    assert base_fingerprint(load_base_classifier(twin)[0])["weights_sha256"] != \
        base_fingerprint(load_base_classifier(env["lm"])[0])["weights_sha256"]
    with pytest.raises(InputError, match="other weights"):
        load_for_prediction(twin, out)
    # Another shape.
    wide = tmp_path / "wide"
    shutil.copytree(env["lm"], wide)
    config = lm.config
    config.hidden_size, config.intermediate_size = 48, 96
    EhrPrsForCausalLM(config).save_pretrained(wide)
    with pytest.raises(InputError, match="hidden_size: adapter's base 32, --model 48"):
        load_for_prediction(wide, out)
    # A causal LM without an adapter is not a classifier.
    with pytest.raises(InputError, match="pass the LoRA adapter with --adapter"):
        load_for_prediction(env["lm"])
    assert cli.main(["predict", "--model", str(twin), "--adapter", str(out), "--meds", env["meds"], "--labels",
                     env["labels"], "--out", str(tmp_path / "p.parquet")]) == 2


def test_recipe_and_cli_take_the_same_flags(env, tmp_path):
    out = tmp_path / "cli"
    code = cli.main(["finetune", "--model", env["lm"], "--meds", env["meds"], "--prs", env["prs"], "--labels",
                     env["labels"], "--output-dir", str(out), "--method", "probe", "--shots", "4", "--seed", "1",
                     "--epochs", "1", "--min-steps", "2"])
    assert code == 0
    summary = json.loads((out / "finetune_summary.json").read_text())
    assert (summary["method"], summary["shots"], summary["seed"], summary["train_rows"]) == ("probe", 4, 1, 8)
    assert ft.main(["--model", env["lm"], "--meds", env["meds"], "--labels", env["labels"], "--output-dir",
                    str(tmp_path / "x"), "--method", "nope"]) == 2
